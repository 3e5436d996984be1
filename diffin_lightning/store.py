"""Influence files: typed results, atomic writes, safe and checked loads.

A result is two files side by side: ``influence.safetensors`` (one float tensor
``[N]`` per target and component, keyed ``"<target>/<component>"``) and
``influence.json`` (the metadata of DESIGN.md, "What is stored", plus the SHA-256
of the tensor file so that a mismatched pair is refused, plus ``metadata_sha256``
over the metadata's own canonical JSON so that an edited or damaged metadata file
is refused too). Neither format can execute code when loaded. Each file is written
to a temporary name in the same directory, flushed to disk and renamed over the
old one, so a crash mid-write leaves the previous complete pair in place; the
temporary files a killed writer leaves are removed by the next write.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffin_lightning.data import IndexedDataset, dataset_fingerprint
from diffin_lightning.tensor_file import file_sha256, read_tensors, safetensors_parts, sha256_of

# Version 2 adds `metadata_sha256`, the metadata's checksum over its own canonical JSON.
FORMAT_VERSION = 2
METADATA_CHECKSUM_FIELD = "metadata_sha256"
TARGET_KINDS: tuple[str, ...] = ("dataset", "train", "self")
TENSOR_FILE = "influence.safetensors"
METADATA_FILE = "influence.json"
# The metadata of a write in progress; see save_influence.
PENDING_METADATA_FILE = ".influence.json.pending"
COMPONENTS: tuple[str, ...] = ("first_order", "second_order", "diffin", "visits")
SIGN_CONVENTION = (
    "influence(i) approximates L_V(theta_T without i) - L_V(theta_T): "
    "positive = sample i helped the target (removing it would raise the target loss); negative = harmful."
)


class InfluenceFileError(ValueError):
    """An influence file that cannot be used: says which file, what is wrong and what to do."""


@dataclass(frozen=True)
class TargetInfluence:
    """One target's per-sample scores, each a float tensor ``[N]`` indexed by sample id.

    Attributes:
        name: the target's name.
        kind: ``"dataset"``, ``"train"`` or ``"self"``.
        first_order: the in-run TracIn term.
        second_order: the Diff-In second-order term, normalized as the metadata says.
        diffin: ``first_order + second_order``.
        visits: how many recorded steps contributed to each sample.
    """

    name: str
    kind: str
    first_order: Tensor
    second_order: Tensor
    diffin: Tensor
    visits: Tensor

    def component(self, name: str) -> Tensor:
        if name not in COMPONENTS:
            raise KeyError(f"`component` must be one of {COMPONENTS}; got {name!r}.")
        return getattr(self, name)


@dataclass(frozen=True)
class InfluenceResult(Mapping[str, TargetInfluence]):
    """Scores per target plus the run's metadata; ``result["val"].diffin`` is a tensor ``[N]``."""

    targets: dict[str, TargetInfluence]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> TargetInfluence:
        if name not in self.targets:
            raise KeyError(f"no target {name!r} in this result; it has {sorted(self.targets)}.")
        return self.targets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_samples(self) -> int:
        return int(self.metadata["num_samples"])


def _umask() -> int:
    # The process umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(path: Path) -> list[Path]:
    """Delete temporary files that an interrupted write of ``path`` left behind; returns them.

    Temporary names carry the writer's process id (``.<name>.<pid>.<random>.tmp``); one whose
    writer is gone (killed mid-write) is an orphan. A live writer's file, in this process or
    another, is left alone, so two processes may write the same directory.
    """
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = candidate.name[len(path.name) + 2 : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit():
            continue  # not a name this module makes
        pid = int(parts[0])
        if pid != os.getpid() and _process_alive(pid):
            continue
        if pid == os.getpid() and candidate.name in _WRITING:
            continue
        try:
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass
    return removed


_WRITING: set[str] = set()  # temporary names this process is writing right now (threads)


def atomic_write_bytes(path: Path, payload: bytes | Sequence[memoryview]) -> None:
    """Write ``payload`` to ``path`` so that a reader sees the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory, are flushed to disk, and the
    temporary file is renamed over ``path``. The file is created with mode ``0o666`` less the
    user's umask, like any file the user's tools write (``mkstemp`` would give ``0o600``).
    Orphans of earlier interrupted writes to ``path`` are removed first.
    """
    path = Path(path)
    remove_orphaned_temporaries(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    _WRITING.add(temporary.name)
    try:
        # O_EXCL: never follow or reuse a file someone placed under this name. Mode 0o666 is
        # narrowed by the umask in the kernel.
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(handle, "wb") as stream:
            for part in [payload] if isinstance(payload, bytes) else payload:  # buffers: written in order, never joined
                stream.write(part)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        _WRITING.discard(temporary.name)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _metadata_checksum(metadata: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata's canonical JSON (sorted keys, no spaces), without the checksum field."""
    body = {key: value for key, value in metadata.items() if key != METADATA_CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save_influence(result: InfluenceResult, directory: str | os.PathLike[str]) -> Path:
    """Write ``result`` atomically into ``directory``; returns the tensor file's path.

    The metadata records the tensor file's SHA-256 and its own (``metadata_sha256``, over the
    canonical JSON of every other field), so that a change to either file is refused on load.

    Raises:
        InfluenceFileError: ``result`` would not pass :func:`load_influence`'s checks
            (non-finite scores, ``diffin != first_order + second_order``, wrong shapes).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, target in result.targets.items():
        for component in COMPONENTS:
            tensor = getattr(target, component).detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in seen:
                tensor = tensor.clone()  # safetensors refuses tensors that share memory
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[f"{name}/{component}"] = tensor
    metadata = dict(result.metadata)
    metadata.update(
        format_version=FORMAT_VERSION,
        sign_convention=SIGN_CONVENTION,
        target_kinds={name: target.kind for name, target in result.targets.items()},
        tensor_file=TENSOR_FILE,
    )
    try:
        # Through JSON and back, so that the checksum below is taken over exactly what a reader
        # parses (tuples become lists, keys strings); NaN and inf are not JSON.
        metadata = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise InfluenceFileError(
            f"save_influence: the metadata for {directory / METADATA_FILE} cannot be stored as strict JSON ({error}). "
            "Metadata values must be strings, finite numbers, booleans, null, lists or string-keyed objects."
        ) from error
    # Refuse here what the reader would refuse: a file that cannot be loaded helps nobody.
    where = directory / TENSOR_FILE
    _check_metadata(metadata, where, checksum=False)
    for name in result.targets:
        _check_values(name, {c: tensors[f"{name}/{c}"] for c in COMPONENTS}, where)
    # Buffers over the tensors' own memory (diffin_lightning.tensor_file): safetensors' `save`
    # would build the whole file in memory, one more copy of every score.
    payload = safetensors_parts(tensors)
    metadata["tensor_sha256"] = sha256_of(payload)
    metadata[METADATA_CHECKSUM_FIELD] = _metadata_checksum(metadata)
    # Two files cannot be replaced in one atomic step. The new metadata is first put in place
    # under PENDING_METADATA_FILE, then the tensors, then the metadata under its own name. A
    # process killed between the last two renames leaves the new tensors with the old
    # metadata; the reader then finds the metadata that vouches for them in the pending file.
    text = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(directory / PENDING_METADATA_FILE, text)
    atomic_write_bytes(directory / TENSOR_FILE, payload)
    os.replace(directory / PENDING_METADATA_FILE, directory / METADATA_FILE)
    _fsync_directory(directory)
    return directory / TENSOR_FILE


def _resolve_directory(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def _result_files(path: str | os.PathLike[str], caller: str) -> tuple[Path, list[dict[str, Any]]]:
    """``(tensor file, metadata that may vouch for it)`` of a result, or an error from ``caller``.

    The candidates are the metadata file and, where a write was killed between its renames
    (see :func:`save_influence`), the pending metadata: the tensor file may already be the new
    one. A first write into a directory killed there leaves no metadata file at all; the pending
    metadata is then the only candidate (a damaged one is refused, being the only evidence).
    Whichever candidate the tensor file's checksum matches describes it.
    """
    directory = _resolve_directory(path)
    tensor_path, metadata_path, pending = directory / TENSOR_FILE, directory / METADATA_FILE, directory / PENDING_METADATA_FILE
    fix = f"Pass the directory the callback wrote (its `output_path`), which holds {TENSOR_FILE} and {METADATA_FILE}."
    if not tensor_path.is_file():
        raise InfluenceFileError(f"{caller}: {tensor_path} does not exist. {fix}")
    if not metadata_path.is_file():
        if not pending.is_file():
            raise InfluenceFileError(f"{caller}: {metadata_path} does not exist. {fix}")
        return tensor_path, [_read_metadata(pending)]
    candidates = [_read_metadata(metadata_path)]
    if pending.is_file():
        try:
            candidates.append(_read_metadata(pending))
        except InfluenceFileError:
            pass  # a damaged record of an interrupted write is no evidence of anything
    return tensor_path, candidates


def has_result(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a result to load: a tensor file and metadata that may vouch for it.

    The pending metadata counts (a first write killed between its renames); whether it does
    vouch for the tensors is :func:`load_influence`'s check.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path  # a missing directory holds nothing (not its parent's result)
    return (directory / TENSOR_FILE).is_file() and any((directory / name).is_file() for name in (METADATA_FILE, PENDING_METADATA_FILE))


_FIX_PAIR = (
    "Re-export both files together (the callback writes them at the end of fit; or save_influence), "
    "or re-record the run; do not edit either file by hand."
)


def _refuse(file: Path, field: str, problem: str, fix: str = _FIX_PAIR) -> InfluenceFileError:
    return InfluenceFileError(f"load_influence: {file}: {field} {problem}. {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_count_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in value.items())


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


# Every field this library writes, with the rule its value must follow. Fields not listed
# (added by a newer writer or by the user) are kept as read; their values are still covered
# by the metadata checksum.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format_version": (_is_int, "must be an int"),
    "num_samples": (lambda v: _is_int(v) and v >= 1, "must be a positive int"),
    "target_kinds": (
        lambda v: isinstance(v, dict) and len(v) > 0 and all(isinstance(k, str) and k and "/" not in k and t in TARGET_KINDS for k, t in v.items()),
        f"must map each target name (a non-empty string without '/') to one of {TARGET_KINDS}",
    ),
    "tensor_file": (lambda v: v == TENSOR_FILE, f"must be {TENSOR_FILE!r}"),
    "tensor_sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "must be 64 lowercase hex digits"),
    METADATA_CHECKSUM_FIELD: (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None, "must be 64 lowercase hex digits"),
    "sign_convention": (lambda v: v == SIGN_CONVENTION, "must be this library's sign convention"),
    "fingerprint": (lambda v: v is None or isinstance(v, str), "must be a string or null"),
    "library": (lambda v: isinstance(v, str), "must be a string"),
    "library_version": (lambda v: isinstance(v, str), "must be a string"),
    "targets": (_is_str_list, "must be a list of strings"),
    "second_order": (lambda v: isinstance(v, str), "must be a string"),
    "second_order_terms_available": (_is_str_list, "must be a list of strings"),
    "propagated_drift_included": (lambda v: isinstance(v, bool), "must be true or false"),
    "finite_difference": (lambda v: isinstance(v, str), "must be a string"),
    "compute_second_order": (lambda v: isinstance(v, bool), "must be true or false"),
    "eps": (lambda v: v == "auto" or (_is_number(v) and math.isfinite(v) and v > 0), "must be 'auto' or a positive number"),
    "eps_last_step": (lambda v: v is None or _is_number(v), "must be a number or null"),
    "every_n_steps": (lambda v: _is_int(v) and v >= 1, "must be a positive int"),
    "schedule": (lambda v: isinstance(v, str), "must be a string"),
    "num_checkpoints": (lambda v: v is None or (_is_int(v) and v >= 1), "must be a positive int or null"),
    "checkpoint_steps": (_is_int_list, "must be a list of ints"),
    "target_refresh_every_n_steps": (lambda v: _is_int(v) and v >= 1, "must be a positive int"),
    "steps_recorded": (lambda v: _is_int(v) and v >= 0, "must be a non-negative int"),
    "steps_represented": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "must be a non-negative number"),
    "skipped_amp_steps": (lambda v: _is_int(v) and v >= 0, "must be a non-negative int"),
    "clipped_steps": (lambda v: _is_int(v) and v >= 0, "must be a non-negative int"),
    "nonfinite_skipped": (lambda v: _is_int(v) and v >= 0, "must be a non-negative int"),
    "complete": (lambda v: isinstance(v, bool), "must be true or false"),
    "incomplete_reason": (lambda v: v is None or isinstance(v, str), "must be a string or null"),
    "nonfinite_samples_skipped": (lambda v: _is_count_map(v), "must map target names to non-negative ints"),
    "nonfinite_steps_skipped": (lambda v: _is_count_map(v), "must map target names to non-negative ints"),
    "model_nonfinite_step": (lambda v: v is None or (_is_int(v) and v >= 0), "must be a non-negative int or null"),
    "global_step": (lambda v: _is_int(v) and v >= 0, "must be a non-negative int"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "must be a non-negative int"),
}
_REQUIRED_FIELDS = ("format_version", "num_samples", "target_kinds", "tensor_file", "tensor_sha256", METADATA_CHECKSUM_FIELD, "sign_convention")


def _check_metadata(metadata: Any, file: Path, *, checksum: bool = True) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise _refuse(file, "the top level", f"must be a JSON object; got {type(metadata).__name__}")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise InfluenceFileError(
            f"load_influence: {file}: field 'format_version' is {version!r}; this library reads version "
            f"{FORMAT_VERSION}. Re-record the run, or install the diffin_lightning version named in its "
            f"'library_version' ({metadata.get('library_version')!r})."
        )
    required = _REQUIRED_FIELDS if checksum else _REQUIRED_FIELDS[:3]
    for name in required:
        if name not in metadata:
            raise _refuse(file, f"field {name!r}", "is missing")
    if checksum:
        # Checked before the fields' types: a damaged file is reported as damaged, whatever broke.
        expected = _metadata_checksum(metadata)
        if metadata[METADATA_CHECKSUM_FIELD] != expected:
            raise _refuse(
                file,
                f"field {METADATA_CHECKSUM_FIELD!r}",
                f"does not match the file's content (recorded {str(metadata[METADATA_CHECKSUM_FIELD])[:64]!r}, "
                f"computed {expected!r}): the file was edited or damaged after it was written",
            )
    for name, (rule, wording) in _FIELD_RULES.items():
        if name in metadata and not rule(metadata[name]):
            raise _refuse(file, f"field {name!r}", f"{wording}; got {_short(metadata[name])}")
    return metadata


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_metadata(file: Path) -> dict[str, Any]:
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise _refuse(file, "the file", f"cannot be read ({error})", "Check the path and its permissions.") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _refuse(file, "the file", f"is not UTF-8 text (byte {error.start})") from error
    try:
        metadata = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as error:
        raise _refuse(file, "the file", f"is not valid JSON ({error})") from error
    return _check_metadata(metadata, file)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in an influence file")


_DTYPES = {"F64": torch.float64, "F32": torch.float32}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _check_header(file: Path, header: dict[str, Any], data_size: int, metadata: dict[str, Any]) -> None:
    """The safetensors header against the metadata: names, dtypes, shapes, offsets inside the file."""
    num_samples = metadata["num_samples"]
    expected_keys = {f"{name}/{component}" for name in metadata["target_kinds"] for component in COMPONENTS}
    if set(header) != expected_keys:
        missing, extra = sorted(expected_keys - set(header)), sorted(set(header) - expected_keys)
        raise _refuse(file, "the tensor names", f"do not match the metadata's targets (missing {missing[:4]}, unexpected {extra[:4]})")
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise _refuse(file, f"tensor {key!r}", f"must be float64 or float32; got {_short(entry)}")
        if entry.get("shape") != [num_samples]:
            raise _refuse(
                file, f"tensor {key!r}", f"has shape {_short(entry.get('shape'))}; the metadata says N={num_samples}, so it must be [{num_samples}]"
            )
        offsets = entry.get("data_offsets")
        itemsize = _DTYPES[entry["dtype"]].itemsize
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] and offsets[1] - offsets[0] == num_samples * itemsize and offsets[1] <= data_size
        ):
            raise _refuse(file, f"tensor {key!r}", f"has data offsets {_short(offsets)} outside the file's {data_size} data bytes")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    if any(end > start for (_, end), (start, _) in zip(spans, spans[1:])):
        raise _refuse(file, "the header", "has tensors whose data overlap")


def _read_tensor_file(file: Path, candidates: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Check the safetensors header against the metadata, then read, hash and map the tensors.

    ``candidates`` are the metadata that may describe this file (the metadata file, and the
    metadata of an interrupted write, see :func:`save_influence`); the one whose checksum the
    file matches is returned with the tensors. The file is read once into one buffer; the
    tensors are views into it (no second copy).
    """
    try:
        stream = file.open("rb")
    except OSError as error:
        raise _refuse(file, "the file", f"cannot be read ({error})", "Check the path and its permissions.") from error
    with stream:
        size = os.fstat(stream.fileno()).st_size
        head = stream.read(8)
        if len(head) < 8:
            raise _refuse(file, "the header", f"is truncated (the file has {size} bytes)")
        header_length = int.from_bytes(head, "little")
        if header_length > min(size - 8, _MAX_HEADER_BYTES):
            raise _refuse(file, "the header", f"claims {header_length} bytes but the file has {size}: truncated or damaged")
        try:
            header = json.loads(stream.read(header_length).decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise _refuse(file, "the header", f"is not valid safetensors JSON ({error})") from error
        if not isinstance(header, dict):
            raise _refuse(file, "the header", f"must be a JSON object; got {type(header).__name__}")
        header.pop("__metadata__", None)
        fitting, first_error = [], None
        for metadata in candidates:
            try:
                _check_header(file, header, size - 8 - header_length, metadata)
                fitting.append(metadata)
            except InfluenceFileError as error:
                first_error = first_error or error
        if not fitting:
            assert first_error is not None
            raise first_error
        # Only now the data: one buffer, hashed, then viewed.
        stream.seek(0)
        buffer = bytearray(size)
        if stream.readinto(buffer) != size:
            raise _refuse(file, "the file", "changed size while being read")
    digest = hashlib.sha256(buffer).hexdigest()
    matching = [metadata for metadata in fitting if metadata["tensor_sha256"] == digest]
    if not matching:
        raise _refuse(
            file,
            "the content",
            f"does not match the checksum 'tensor_sha256' in {METADATA_FILE}; the pair comes from different runs "
            "or the tensor file is damaged",
        )
    metadata = matching[0]
    tensors = {}
    for key, entry in header.items():
        dtype = _DTYPES[entry["dtype"]]
        begin = 8 + header_length + entry["data_offsets"][0]
        count = metadata["num_samples"]
        if begin % dtype.itemsize:  # a valid but unaligned file (another writer): copy this tensor
            tensors[key] = torch.frombuffer(bytearray(buffer[begin : begin + count * dtype.itemsize]), dtype=dtype)
        else:
            tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=begin)
    return metadata, tensors


_CHECK_CHUNK = 1 << 20  # values checked a slice at a time: temporaries of 1M values, not of N


def _check_values(name: str, components: Mapping[str, Tensor], file: Path) -> None:
    """Finite scores, whole non-negative visits, and diffin = first_order + second_order."""
    for component in COMPONENTS:
        values = components[component]
        if values.dim() != 1 or not values.dtype.is_floating_point:
            raise _refuse(file, f"tensor '{name}/{component}'", f"must be a 1-d float tensor; got {values.dtype} {tuple(values.shape)}")
        for start in range(0, values.numel(), _CHECK_CHUNK):
            bad = ~torch.isfinite(values[start : start + _CHECK_CHUNK])
            if bool(bad.any()):
                total_bad = int((~torch.isfinite(values)).sum())
                raise _refuse(
                    file,
                    f"tensor '{name}/{component}'",
                    f"holds {total_bad} non-finite value(s) (first at sample {start + int(bad.nonzero()[0])})",
                    "A diverged run cannot be scored: fix the training (learning rate, eps) and re-record.",
                )
    visits = components["visits"]
    first, second, diffin = components["first_order"], components["second_order"], components["diffin"]
    worst_excess, worst = 0.0, -1
    for start in range(0, visits.numel(), _CHECK_CHUNK):
        part = slice(start, start + _CHECK_CHUNK)
        v = visits[part]
        if bool((v < 0).any()) or not torch.equal(v, v.round()):
            raise _refuse(file, f"tensor '{name}/visits'", "must hold whole non-negative counts")
        f, s_, d = first[part].double(), second[part].double(), diffin[part]
        total = f + s_
        tolerance = 4 * torch.finfo(d.dtype).eps * (f.abs() + s_.abs() + total.abs())
        error = (d.double() - total).abs()
        excess = error - tolerance
        if bool((excess > 0).any()):
            index = int(error.argmax())
            if worst < 0 or float(error[index]) > worst_excess:
                worst_excess, worst = float(error[index]), start + index
    if worst >= 0:
        total_worst = float(first[worst].double() + second[worst].double())
        raise _refuse(
            file,
            f"tensor '{name}/diffin'",
            f"must equal first_order + second_order; at sample {worst} it is {float(diffin[worst])!r}, the sum is {total_worst!r}",
        )


def load_influence(
    path: str | os.PathLike[str],
    *,
    dataset: IndexedDataset | None = None,
    fingerprint: str | None = None,
) -> InfluenceResult:
    """Read an influence result written by the callback, refusing files that do not fit.

    Order of checks: the JSON metadata (UTF-8, an object, its own checksum, every known
    field's type), then the tensor file's header (names, dtypes, shapes and offsets against
    the metadata) before any tensor data is read, then the tensor file's checksum, then the
    values (finite, whole visit counts, ``diffin = first_order + second_order``), then the
    data set's fingerprint.

    Args:
        path: the directory holding ``influence.safetensors`` and ``influence.json``,
            or either file.
        dataset: when given, the scores must have been recorded on this training set
            (same size, same samples in the same id order; see :func:`dataset_fingerprint`).
        fingerprint: the same check against a fingerprint string from a previous run.

    Raises:
        InfluenceFileError: a file is missing, damaged, edited, of another format version,
            does not match its metadata, or belongs to another data set. The message names
            the file, the field and the fix.
    """
    tensor_path, candidates = _result_files(path, "load_influence")
    metadata, tensors = _read_tensor_file(tensor_path, candidates)
    targets: dict[str, TargetInfluence] = {}
    for name, kind in metadata["target_kinds"].items():
        components = {component: tensors[f"{name}/{component}"] for component in COMPONENTS}
        _check_values(name, components, tensor_path)
        targets[name] = TargetInfluence(name=name, kind=kind, **components)
    expected = fingerprint
    if dataset is not None:
        expected = dataset_fingerprint(dataset)
    if expected is not None and metadata.get("fingerprint") != expected:
        num_samples = metadata["num_samples"]
        raise InfluenceFileError(
            f"load_influence: {tensor_path} was recorded on a training set with fingerprint "
            f"{metadata.get('fingerprint')!r} (N={num_samples}); the data given has fingerprint {expected!r}. "
            "Scores are indexed by sample id and only mean something for the data they were recorded on: "
            "use the same data set (same samples, same order) or re-record."
        )
    return InfluenceResult(targets=targets, metadata=metadata)


def read_one_tensor(path: str | os.PathLike[str], key: str, *, verify_checksum: bool = False) -> tuple[dict[str, Any], Tensor]:
    """``(metadata, tensor)`` for one ``"<target>/<component>"`` of a result, reading no other tensor.

    The metadata is checked as :func:`load_influence` checks it (its own checksum, field
    types); the tensor's dtype and shape against it. The whole tensor file's checksum is
    taken (in 16 MiB chunks) only with ``verify_checksum``, since that reads every tensor.
    The values' checks (finite, ``diffin = first_order + second_order``) are
    :func:`load_influence`'s, which reads all components.
    """
    tensor_path, candidates = _result_files(path, "read_one_tensor")
    metadata = candidates[0]
    if verify_checksum or len(candidates) > 1:
        # Two candidates (a write killed between its renames): only the checksum tells which
        # metadata the tensor file belongs to, so it is taken whatever was asked.
        digest = file_sha256(tensor_path)
        matching = [candidate for candidate in candidates if candidate["tensor_sha256"] == digest]
        if matching:
            metadata = matching[0]
        else:
            raise _refuse(
                tensor_path,
                "the content",
                f"does not match the checksum 'tensor_sha256' in {METADATA_FILE}; the pair comes from different runs "
                "or the tensor file is damaged",
            )
    try:
        tensors, available = read_tensors(tensor_path, [key])
    except Exception as error:  # safetensors raises its own error type for a malformed file
        raise _refuse(tensor_path, "the file", f"is not a readable safetensors file ({error})") from error
    if key not in available:
        raise _refuse(tensor_path, f"tensor {key!r}", "is missing although the metadata names its target")
    tensor = tensors[key]
    if tensor.dtype not in _DTYPES.values() or tuple(tensor.shape) != (metadata["num_samples"],):
        raise _refuse(
            tensor_path, f"tensor {key!r}", f"is {tensor.dtype} {tuple(tensor.shape)}; the metadata says N={metadata['num_samples']} floats"
        )
    return metadata, tensor
