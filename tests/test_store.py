"""Influence files: round trip, atomic writes, and refusals that name the file, the field and the fix."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from diffin_lightning import (
    SIGN_CONVENTION,
    IndexedDataset,
    InfluenceFileError,
    InfluenceResult,
    TargetInfluence,
    dataset_fingerprint,
    load_influence,
    save_influence,
)

COMPONENTS = ("first_order", "second_order", "diffin", "visits")


def _result(n=5, fingerprint="abc", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    targets = {}
    for name, kind in (("val", "dataset"), ("self", "self")):
        first, second = (torch.randn(n, generator=g, dtype=dtype) for _ in range(2))
        visits = torch.randint(0, 4, (n,), generator=g).to(dtype)
        targets[name] = TargetInfluence(name, kind, first, second, first + second, visits)
    return InfluenceResult(targets, {"num_samples": n, "fingerprint": fingerprint, "library_version": "0.1.0"})


def _resign(meta):
    """Recompute the metadata checksum the way the format defines it (canonical JSON, sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    meta["metadata_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return meta


def _edit_metadata(directory, resign=True, **changes):
    meta = json.loads((directory / "influence.json").read_text())
    meta.update(changes)
    (directory / "influence.json").write_text(json.dumps(_resign(meta) if resign else meta))


def _assert_equal_results(loaded, original):
    assert sorted(loaded) == sorted(original)
    for name in original:
        assert loaded[name].kind == original[name].kind
        for component in COMPONENTS:
            assert torch.equal(loaded[name].component(component), original[name].component(component))


def test_round_trip(tmp_path):
    path = save_influence(_result(), tmp_path)
    loaded = load_influence(path)
    _assert_equal_results(loaded, _result())
    assert loaded.metadata["sign_convention"] == SIGN_CONVENTION
    assert load_influence(tmp_path).num_samples == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary files left behind"


def test_round_trip_float32(tmp_path):
    save_influence(_result(dtype=torch.float32), tmp_path)
    loaded = load_influence(tmp_path)
    assert loaded["val"].diffin.dtype == torch.float32
    _assert_equal_results(loaded, _result(dtype=torch.float32))


def test_overwrite_is_atomic_and_complete(tmp_path):
    save_influence(_result(fingerprint="first"), tmp_path)
    second = _result(n=7, fingerprint="second")  # other tensors too: both files must be the second write's
    save_influence(second, tmp_path)
    loaded = load_influence(tmp_path)
    assert loaded.metadata["fingerprint"] == "second"
    _assert_equal_results(loaded, second)
    # Nothing of the write is left beside the pair: no temporary (.<name>.<pid>.<random>.tmp), no pending metadata.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["influence.json", "influence.safetensors"]


def test_refuses_other_format_version(tmp_path):
    save_influence(_result(), tmp_path)
    _edit_metadata(tmp_path, format_version=99)
    with pytest.raises(InfluenceFileError, match="'format_version' is 99.*reads version 2"):
        load_influence(tmp_path)


def test_refuses_edited_metadata_by_its_checksum(tmp_path):
    save_influence(_result(), tmp_path)
    _edit_metadata(tmp_path, resign=False, target_kinds={"val": "self", "self": "self"})
    with pytest.raises(InfluenceFileError, match=r"influence.json: field 'metadata_sha256' does not match.*Re-export"):
        load_influence(tmp_path)


def test_refuses_mismatched_pair(tmp_path):
    save_influence(_result(), tmp_path / "a")
    save_influence(_result(n=6), tmp_path / "b")
    (tmp_path / "a" / "influence.safetensors").write_bytes((tmp_path / "b" / "influence.safetensors").read_bytes())
    # The header is checked first: the other file's shapes give it away before any data is read.
    with pytest.raises(InfluenceFileError, match=r"tensor '.*' has shape \[6\].*must be \[5\]"):
        load_influence(tmp_path / "a")
    other = _result(n=5)
    other.targets["val"] = TargetInfluence("val", "dataset", *(2 * other["val"].component(c) for c in COMPONENTS))
    save_influence(other, tmp_path / "b")
    (tmp_path / "a" / "influence.safetensors").write_bytes((tmp_path / "b" / "influence.safetensors").read_bytes())
    with pytest.raises(InfluenceFileError, match="does not match the checksum 'tensor_sha256'"):
        load_influence(tmp_path / "a")


def test_refuses_wrong_shapes_even_with_a_valid_checksum(tmp_path):
    save_influence(_result(), tmp_path)
    _edit_metadata(tmp_path, num_samples=7)
    with pytest.raises(InfluenceFileError, match=r"has shape \[5\]; the metadata says N=7, so it must be \[7\]"):
        load_influence(tmp_path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_samples", "5", "'num_samples' must be a positive int; got '5'"),
        ("num_samples", True, "'num_samples' must be a positive int; got True"),
        ("target_kinds", [], "'target_kinds' must map"),
        ("target_kinds", {"val": "cleaning", "self": "self"}, "'target_kinds' must map"),
        ("fingerprint", 3, "'fingerprint' must be a string or null"),
        ("complete", "yes", "'complete' must be true or false"),
        ("eps", -1.0, "'eps' must be 'auto' or a positive number"),
        ("tensor_file", "../elsewhere.safetensors", "'tensor_file' must be 'influence.safetensors'"),
    ],
)
def test_every_field_is_type_checked(tmp_path, field, value, message):
    save_influence(_result(), tmp_path)
    _edit_metadata(tmp_path, **{field: value})
    with pytest.raises(InfluenceFileError, match=f"influence.json: field {message}"):
        load_influence(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[]", "the top level must be a JSON object; got list"),
        (b"\xff\xfe{}", "is not UTF-8"),
        (b'{"format_version": 2', "is not valid JSON"),
        (b'{"format_version": NaN}', "is not valid JSON"),
        (b"{}", "'format_version' is None"),
        (b'{"format_version": 2}', "field 'num_samples' is missing"),
    ],
)
def test_malformed_metadata_is_an_influence_file_error(tmp_path, content, message):
    save_influence(_result(), tmp_path)
    (tmp_path / "influence.json").write_bytes(content)
    with pytest.raises(InfluenceFileError, match=message):
        load_influence(tmp_path)


def _rewrite_tensors(directory, tensors):
    """A tensor file with other values but a consistent pair of checksums: the value checks must stand alone."""
    from safetensors.torch import save

    payload = save(tensors)
    (directory / "influence.safetensors").write_bytes(payload)
    _edit_metadata(directory, tensor_sha256=hashlib.sha256(payload).hexdigest())


def _tensors(result):
    return {f"{name}/{c}": result[name].component(c).clone() for name in result for c in COMPONENTS}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t["val/first_order"].__setitem__(1, float("nan")), r"'val/first_order' holds 1 non-finite value\(s\) \(first at sample 1\)"),
        (lambda t: t["val/diffin"].__setitem__(2, 123.0), r"'val/diffin' must equal first_order \+ second_order; at sample 2"),
        (lambda t: t["self/visits"].__setitem__(0, 0.5), "'self/visits' must hold whole non-negative counts"),
        (lambda t: t.__setitem__("val/visits", t["val/visits"].long()), "must be float64 or float32"),
        (lambda t: t.__setitem__("extra/diffin", torch.zeros(5, dtype=torch.float64)), r"tensor names do not match.*unexpected \['extra/diffin'\]"),
    ],
)
def test_values_are_checked(tmp_path, change, message):
    save_influence(_result(), tmp_path)
    tensors = _tensors(_result())
    change(tensors)
    _rewrite_tensors(tmp_path, tensors)
    with pytest.raises(InfluenceFileError, match=message):
        load_influence(tmp_path)


def test_save_refuses_what_load_would_refuse(tmp_path):
    result = _result()
    result.targets["val"] = TargetInfluence("val", "dataset", *(result["val"].component(c) for c in COMPONENTS[:2]), torch.zeros(5, dtype=torch.float64), result["val"].visits)
    with pytest.raises(InfluenceFileError, match="'val/diffin' must equal"):
        save_influence(result, tmp_path)
    with pytest.raises(InfluenceFileError, match="strict JSON"):
        save_influence(InfluenceResult(_result().targets, {"num_samples": 5, "eps_last_step": float("nan")}), tmp_path)
    assert not (tmp_path / "influence.json").exists()


def test_header_is_checked_before_the_data_is_read(tmp_path):
    save_influence(_result(), tmp_path)
    tensor_file = tmp_path / "influence.safetensors"
    payload = tensor_file.read_bytes()
    tensor_file.write_bytes(payload[:8])  # a header length and nothing else
    with pytest.raises(InfluenceFileError, match="the header claims .* bytes but the file has 8"):
        load_influence(tmp_path)
    tensor_file.write_bytes(payload[:5])
    with pytest.raises(InfluenceFileError, match="the header is truncated"):
        load_influence(tmp_path)


def test_refuses_another_data_set(tmp_path):
    data = IndexedDataset(TensorDataset(torch.zeros(5, 2), torch.tensor([0, 1, 0, 1, 1])))
    save_influence(_result(fingerprint=dataset_fingerprint(data)), tmp_path)
    assert load_influence(tmp_path, dataset=data).num_samples == 5
    other_labels = IndexedDataset(TensorDataset(torch.zeros(5, 2), torch.tensor([1, 1, 0, 1, 1])))
    other_inputs = IndexedDataset(TensorDataset(torch.ones(5, 2), torch.tensor([0, 1, 0, 1, 1])))
    for other in (other_labels, other_inputs):
        with pytest.raises(InfluenceFileError, match="fingerprint"):
            load_influence(tmp_path, dataset=other)


def test_missing_files_say_what_to_pass(tmp_path):
    with pytest.raises(InfluenceFileError, match="does not exist"):
        load_influence(tmp_path)


# ---------------------------------------------------------------- fuzzing: refused, or equal to the original

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _mutation(draw, size):
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "byte", "splice"]))
    if kind == "flip":
        flips = draw(st.lists(st.integers(0, size * 8 - 1), min_size=1, max_size=4))
        return kind, flips
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "byte":
        return kind, (draw(st.integers(0, size - 1)), draw(st.integers(0, 255)))
    start = draw(st.integers(0, size))
    return kind, (start, draw(st.integers(start, size)), draw(st.binary(max_size=16)))


def _apply(payload, mutation):
    kind, argument = mutation
    data = bytearray(payload)
    if kind == "flip":
        for bit in argument:
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        del data[argument:]
    elif kind == "byte":
        data[argument[0]] = argument[1]
    else:
        start, end, insert = argument
        data[start:end] = insert
    return bytes(data)


def _assert_refused_or_equal(directory):
    try:
        loaded = load_influence(directory)
    except InfluenceFileError:
        return
    _assert_equal_results(loaded, _result())
    reference = json.loads(json.dumps(load_influence_original_metadata))
    assert {k: v for k, v in loaded.metadata.items()} == reference


load_influence_original_metadata: dict = {}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pristine")
    save_influence(_result(), directory)
    load_influence_original_metadata.update(load_influence(directory).metadata)
    return {name: (directory / name).read_bytes() for name in ("influence.json", "influence.safetensors")}


@pytest.mark.parametrize("target_file", ["influence.json", "influence.safetensors"])
def test_fuzzed_files_are_refused_or_load_unchanged(tmp_path, pristine, target_file):
    size = len(pristine[target_file])

    @_FUZZ
    @given(mutation=_mutation(size))
    def check(mutation):
        for name, payload in pristine.items():
            (tmp_path / name).write_bytes(_apply(payload, mutation) if name == target_file else payload)
        _assert_refused_or_equal(tmp_path)

    check()


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def test_fuzzed_json_edits_are_refused_or_load_unchanged(tmp_path, pristine):
    original = json.loads(pristine["influence.json"])

    @_FUZZ
    @given(key=st.sampled_from(sorted(original)) | st.text(max_size=6), value=_JSON_VALUES, delete=st.booleans(), resign=st.booleans())
    def check(key, value, delete, resign):
        meta = dict(original)
        if delete:
            meta.pop(key, None)
        else:
            meta[key] = value
        if resign:  # the checksum fits: the type checks must catch what breaks the format (a forged value of
            # the right type is not detectable without a key; then only the tensors must be the original's)
            _resign(meta)
        (tmp_path / "influence.safetensors").write_bytes(pristine["influence.safetensors"])
        (tmp_path / "influence.json").write_text(json.dumps(meta))
        try:
            loaded = load_influence(tmp_path)
        except InfluenceFileError:
            return
        _assert_equal_results(loaded, _result())
        if not resign:
            assert loaded.metadata == original

    check()


def test_a_write_killed_between_its_renames_leaves_a_loadable_pair(tmp_path):
    old, new = _result(fingerprint="old"), _result(fingerprint="new")
    new.targets["val"] = TargetInfluence("val", "dataset", *(2 * new["val"].component(c) for c in COMPONENTS))
    save_influence(old, tmp_path / "run")
    save_influence(new, tmp_path / "next")
    run, next_ = tmp_path / "run", tmp_path / "next"
    # Killed after the pending metadata landed, before the tensors: the old pair is intact.
    (run / ".influence.json.pending").write_bytes((next_ / "influence.json").read_bytes())
    assert load_influence(run).metadata["fingerprint"] == "old"
    # Killed after the tensors landed, before the metadata's rename: the pending metadata vouches for them.
    (run / "influence.safetensors").write_bytes((next_ / "influence.safetensors").read_bytes())
    assert load_influence(run).metadata["fingerprint"] == "new"
    _assert_equal_results(load_influence(run), new)
    # A damaged pending file is no evidence: the mismatch is refused.
    (run / ".influence.json.pending").write_bytes(b"{")
    with pytest.raises(InfluenceFileError, match="does not match the checksum 'tensor_sha256'"):
        load_influence(run)
    # The next write completes the story.
    save_influence(new, run)
    assert not (run / ".influence.json.pending").exists() and load_influence(run).metadata["fingerprint"] == "new"


class _KilledBeforeTheMetadataRename(Exception):
    """Stands for SIGKILL between save_influence's last two steps (the kill loop lands there)."""


def _save_killed_before_the_metadata_rename(result, directory, monkeypatch):
    real_replace = os.replace

    def replace(source, destination):
        if os.path.basename(source) == ".influence.json.pending":
            raise _KilledBeforeTheMetadataRename
        real_replace(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr("diffin_lightning.store.os.replace", replace)
        with pytest.raises(_KilledBeforeTheMetadataRename):
            save_influence(result, directory)


def test_a_first_write_killed_between_its_renames_is_read_from_the_pending_metadata(tmp_path, monkeypatch):
    """The kill loop's state: the tensors landed, the metadata is still only the pending file."""
    from diffin_lightning.ranking import top_k
    from diffin_lightning.store import has_result, read_one_tensor

    first = _result(fingerprint="first")
    _save_killed_before_the_metadata_rename(first, tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".influence.json.pending", "influence.safetensors"]
    assert has_result(tmp_path) and has_result(tmp_path / "influence.safetensors")
    assert not has_result(tmp_path / "replayed")  # a directory not there holds nothing, whatever its parent holds
    loaded = load_influence(tmp_path)
    assert loaded.metadata["fingerprint"] == "first"
    _assert_equal_results(loaded, first)
    for verify in (False, True):
        metadata, tensor = read_one_tensor(tmp_path, "val/diffin", verify_checksum=verify)
        assert metadata["fingerprint"] == "first" and torch.equal(tensor, first["val"].diffin)
    assert top_k(tmp_path, "val", 2).ids.tolist() == first["val"].diffin.argsort()[:2].tolist()
    with pytest.raises(KeyError, match="'test' is not in"):
        top_k(tmp_path, "test", 2)
    # The pending metadata is the only evidence: damaged, it is refused, not passed over.
    pending = (tmp_path / ".influence.json.pending").read_bytes()
    (tmp_path / ".influence.json.pending").write_bytes(b"{")
    for read in (load_influence, lambda path: read_one_tensor(path, "val/diffin")):
        with pytest.raises(InfluenceFileError, match=r"\.influence\.json\.pending.*not valid JSON"):
            read(tmp_path)
    (tmp_path / ".influence.json.pending").write_bytes(pending)
    # Killed earlier, before the tensors: nothing was recorded, and the error says what is missing.
    (tmp_path / "influence.safetensors").unlink()
    assert not has_result(tmp_path)
    with pytest.raises(InfluenceFileError, match="influence.safetensors does not exist"):
        load_influence(tmp_path)


def test_one_tensor_is_read_with_the_metadata_that_vouches_for_it(tmp_path, monkeypatch):
    """A later write killed between its renames: the old metadata file, the new tensors and pending metadata."""
    from diffin_lightning.store import read_one_tensor

    old, new = _result(fingerprint="old"), _result(fingerprint="new")
    new.targets["val"] = TargetInfluence("val", "dataset", *(2 * new["val"].component(c) for c in COMPONENTS))
    save_influence(old, tmp_path)
    _save_killed_before_the_metadata_rename(new, tmp_path, monkeypatch)
    assert json.loads((tmp_path / "influence.json").read_text())["fingerprint"] == "old"
    for verify in (False, True):
        metadata, tensor = read_one_tensor(tmp_path, "val/diffin", verify_checksum=verify)
        assert metadata["fingerprint"] == "new" and torch.equal(tensor, new["val"].diffin)
    assert load_influence(tmp_path).metadata["fingerprint"] == "new"


# ---------------------------------------------------------------- temporary files and permissions


def test_orphaned_temporaries_are_removed_at_the_next_write(tmp_path):
    save_influence(_result(), tmp_path)
    # A writer killed mid-write leaves its temporary behind; its process id is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    orphan = tmp_path / f".influence.safetensors.{dead}.0123456789ab.tmp"
    orphan.write_bytes(b"x" * 1000)
    live = tmp_path / f".influence.json.{os.getppid()}.0123456789ab.tmp"  # a live writer's: kept
    live.write_bytes(b"{}")
    unrelated = tmp_path / ".influence.json.notes.tmp"  # not a name the writer makes: kept
    unrelated.write_bytes(b"")
    save_influence(_result(), tmp_path)
    assert not orphan.exists()
    assert live.exists() and unrelated.exists()
    assert load_influence(tmp_path).num_samples == 5


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_influence(_result(), tmp_path)
    finally:
        os.umask(previous)
    for name in ("influence.json", "influence.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
