"""Influence files: typed results, atomic writes, safe and checked loads.

A result is two files side by side: ``influence.safetensors`` (one float tensor
``[N]`` per target and component, keyed ``"<target>/<component>"``) and
``influence.json`` (the metadata of DESIGN.md, "What is stored", plus the SHA-256
of the tensor file so that a mismatched pair is refused). Neither format can
execute code when loaded. Each file is written to a temporary name in the same
directory, flushed to disk and renamed over the old one, so a crash mid-write
leaves the previous complete pair in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from diffin_lightning.data import IndexedDataset, dataset_fingerprint
from diffin_lightning.tensor_file import file_sha256, read_tensors, safetensors_parts, sha256_of

FORMAT_VERSION = 1
TENSOR_FILE = "influence.safetensors"
METADATA_FILE = "influence.json"
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


def atomic_write_bytes(path: Path, payload: bytes | Sequence[memoryview]) -> None:
    """Write ``payload`` (bytes, or buffers written one after another) to a temporary file, fsync, rename over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            for part in [payload] if isinstance(payload, bytes) else payload:
                stream.write(part)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_influence(result: InfluenceResult, directory: str | os.PathLike[str]) -> Path:
    """Write ``result`` atomically into ``directory``; returns the tensor file's path.

    Memory: the tensors stream from the result's own memory to the file (no extra copy of
    the scores for contiguous CPU tensors, which ``callback.influence`` gives; tensors elsewhere
    are copied to the CPU first: one copy).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}/{component}": getattr(target, component)
        for name, target in result.targets.items()
        for component in COMPONENTS
    }
    metadata = dict(result.metadata)
    # Tensors first, then the metadata that vouches for them: a reader that finds the
    # new JSON always finds the tensors it describes.
    parts = safetensors_parts(tensors)  # buffers over the tensors' memory: no copy of the scores
    checksum = sha256_of(parts)
    atomic_write_bytes(directory / TENSOR_FILE, parts)
    metadata.update(
        format_version=FORMAT_VERSION,
        sign_convention=SIGN_CONVENTION,
        target_kinds={name: target.kind for name, target in result.targets.items()},
        tensor_file=TENSOR_FILE,
        tensor_sha256=checksum,
    )
    atomic_write_bytes(directory / METADATA_FILE, (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode())
    return directory / TENSOR_FILE


def _resolve_directory(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_metadata(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """``(tensor file path, metadata)`` of a result directory (or either of its files), checked for format version."""
    directory = _resolve_directory(path)
    tensor_path, metadata_path = directory / TENSOR_FILE, directory / METADATA_FILE
    for needed in (tensor_path, metadata_path):
        if not needed.is_file():
            raise InfluenceFileError(
                f"load_influence: {needed} does not exist. Pass the directory the callback wrote "
                f"(its `output_path`), which holds {TENSOR_FILE} and {METADATA_FILE}."
            )
    try:
        metadata = json.loads(metadata_path.read_text())
    except json.JSONDecodeError as error:
        raise InfluenceFileError(f"load_influence: {metadata_path} is not valid JSON ({error}).") from error
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise InfluenceFileError(
            f"load_influence: {metadata_path} has format_version {version!r}; this library reads version "
            f"{FORMAT_VERSION}. Re-record the run, or install the diffin_lightning version named in its "
            f"'library_version' ({metadata.get('library_version')!r})."
        )
    return tensor_path, metadata


def check_checksum(tensor_path: Path, metadata: Mapping[str, Any]) -> None:
    """Refuse a tensor file whose SHA-256 is not the one its metadata records (read in chunks)."""
    if file_sha256(tensor_path) != metadata.get("tensor_sha256"):
        raise InfluenceFileError(
            f"load_influence: {tensor_path} does not match the checksum in {tensor_path.parent / METADATA_FILE}; the pair "
            "comes from different runs or the tensor file is damaged. Re-export both files together."
        )


def read_scores(tensor_path: Path, metadata: Mapping[str, Any], keys: list[str]) -> dict[str, Tensor]:
    """The named ``[N]`` tensors of a tensor file, each read once from the file (no other tensor is read).

    Read through ``safe_open``, which maps the file: memory holds the tensors asked for,
    never the file's bytes as well.
    """
    num_samples = int(metadata["num_samples"])
    try:
        tensors, available = read_tensors(tensor_path, keys)
    except Exception as error:  # safetensors raises its own error type for a malformed file
        raise InfluenceFileError(f"load_influence: {tensor_path} is not a readable safetensors file ({error}).") from error
    for key in keys:
        if key not in available:
            raise InfluenceFileError(f"load_influence: {tensor_path} lacks tensor {key!r} named by its metadata.")
        if tuple(tensors[key].shape) != (num_samples,):
            raise InfluenceFileError(
                f"load_influence: tensor {key!r} in {tensor_path} has shape {tuple(tensors[key].shape)}; "
                f"the metadata says N={num_samples}, so it must be ({num_samples},)."
            )
    return tensors


def check_fingerprint(tensor_path: Path, metadata: Mapping[str, Any], dataset: IndexedDataset | None, fingerprint: str | None) -> None:
    expected = fingerprint
    if dataset is not None:
        expected = dataset_fingerprint(len(dataset), dataset.labels())
    if expected is not None and metadata.get("fingerprint") != expected:
        raise InfluenceFileError(
            f"load_influence: {tensor_path} was recorded on a training set with fingerprint "
            f"{metadata.get('fingerprint')!r} (N={metadata.get('num_samples')}); the data given has fingerprint {expected!r}. "
            "Scores are indexed by sample id and only mean something for the data they were recorded on: "
            "use the same data set (same order, same labels) or re-record."
        )


def load_influence(
    path: str | os.PathLike[str],
    *,
    dataset: IndexedDataset | None = None,
    fingerprint: str | None = None,
) -> InfluenceResult:
    """Read an influence result written by the callback, refusing files that do not fit.

    Memory: the checksum is taken over the file in 16 MiB chunks and each tensor is read
    once through the mapped file, so loading holds the scores once (no second copy).

    Args:
        path: the directory holding ``influence.safetensors`` and ``influence.json``,
            or either file.
        dataset: when given, the scores must have been recorded on this training set
            (same size, ids and labels).
        fingerprint: the same check against a fingerprint string from a previous run.

    Raises:
        InfluenceFileError: a file is missing, of another format version, does not match
            its metadata, has tensors of the wrong shape, or belongs to another data set.
    """
    tensor_path, metadata = read_metadata(path)
    check_checksum(tensor_path, metadata)
    kinds: dict[str, str] = metadata["target_kinds"]
    tensors = read_scores(tensor_path, metadata, [f"{name}/{component}" for name in kinds for component in COMPONENTS])
    targets = {
        name: TargetInfluence(name=name, kind=kind, **{component: tensors[f"{name}/{component}"] for component in COMPONENTS})
        for name, kind in kinds.items()
    }
    check_fingerprint(tensor_path, metadata, dataset, fingerprint)
    return InfluenceResult(targets=targets, metadata=metadata)
