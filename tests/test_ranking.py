"""top_k and select against a brute-force sort of a loaded result (float64), from memory and from the file."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from diffin_lightning import InfluenceFileError, InfluenceResult, TargetInfluence, load_influence, save_influence, select, top_k
from diffin_lightning.store import atomic_write_bytes
from diffin_lightning.tensor_file import safetensors_parts, sha256_of


def _result(n: int = 200) -> InfluenceResult:
    g = torch.Generator().manual_seed(3)
    # Rounded to a coarse grid so that many scores tie, including at the k-th place.
    diffin = torch.randint(-6, 7, (n,), generator=g).to(torch.float64) / 4
    first = torch.randint(-20, 21, (n,), generator=g).to(torch.float64) / 8
    targets = {
        "val": TargetInfluence("val", "dataset", first, diffin - first, diffin, torch.randint(0, 3, (n,), generator=g).double()),
        "self": TargetInfluence("self", "self", first.abs(), 0 * first, first.abs(), torch.ones(n, dtype=torch.float64)),
    }
    return InfluenceResult(targets, {"num_samples": n, "fingerprint": "x", "library_version": "0"})


def brute_force(values: torch.Tensor, k: int, largest: bool) -> list[int]:
    """Sort every id by (score, id), best first: the most negative first unless ``largest``."""
    scores = values.tolist()
    return sorted(range(len(scores)), key=lambda i: (-scores[i] if largest else scores[i], i))[:k]


@pytest.mark.parametrize("from_file", [False, True], ids=["result", "file"])
@pytest.mark.parametrize("component", ["diffin", "first_order", "visits"])
@pytest.mark.parametrize("largest", [False, True], ids=["most harmful", "most helpful"])
def test_top_k_equals_brute_force_sort(tmp_path, from_file, component, largest):
    result = _result()
    save_influence(result, tmp_path)
    loaded = load_influence(tmp_path)
    source = tmp_path if from_file else loaded
    values = loaded["val"].component(component)
    assert len(set(values.tolist())) < len(values) / 4, "the test needs ties"
    for k in (0, 1, 7, 50, 200):
        ranked = top_k(source, "val", k, component=component, largest=largest)
        expected = brute_force(values, k, largest)
        assert ranked.ids.tolist() == expected
        assert ranked.ids.dtype == torch.int64 and ranked.scores.dtype == torch.float64
        assert torch.equal(ranked.scores, values[expected])


def test_sign_convention_most_harmful_is_most_negative(tmp_path):
    values = torch.tensor([0.3, -5.0, 2.0, -0.1, 9.0], dtype=torch.float64)
    result = InfluenceResult({"val": TargetInfluence("val", "dataset", values, 0 * values, values, 0 * values)}, {"num_samples": 5})
    save_influence(result, tmp_path)
    assert top_k(tmp_path, "val", 2).ids.tolist() == [1, 3]  # default: most harmful (most negative) first
    assert top_k(tmp_path, "val", 2, largest=True).ids.tolist() == [4, 2]


def test_select_equals_indexing_the_loaded_result(tmp_path):
    result = _result()
    save_influence(result, tmp_path)
    loaded = load_influence(tmp_path)
    ids = torch.tensor([[5, 0], [199, 5]])
    for component in ("diffin", "second_order"):
        expected = torch.tensor([[loaded["val"].component(component)[int(i)].item() for i in row] for row in ids.tolist()], dtype=torch.float64)
        assert torch.equal(select(tmp_path, "val", ids, component=component), expected)
        assert torch.equal(select(loaded, "val", ids, component=component), expected)


def test_errors_name_the_argument_and_the_fix(tmp_path):
    save_influence(_result(), tmp_path)
    with pytest.raises(KeyError, match=r"`target` 'test' is not in .* it has \['self', 'val'\]"):
        top_k(tmp_path, "test", 3)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[0, N\] with N=200; got 201"):
        top_k(tmp_path, "val", 201)
    with pytest.raises(ValueError, match="`component` must be one of"):
        top_k(tmp_path, "val", 3, component="tracin")
    with pytest.raises(IndexError, match=r"`ids` must lie in \[0, N\) with N=200; got ids from -1 to 3"):
        select(tmp_path, "val", torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integer sample ids"):
        select(tmp_path, "val", torch.tensor([1.0]))


def test_checksum_is_checked_when_asked(tmp_path):
    save_influence(_result(), tmp_path / "a")
    other = _result()
    other = InfluenceResult({name: TargetInfluence(t.name, t.kind, -t.first_order, -t.second_order, -t.diffin, t.visits) for name, t in other.items()}, other.metadata)
    save_influence(other, tmp_path / "b")
    (tmp_path / "a" / "influence.safetensors").write_bytes((tmp_path / "b" / "influence.safetensors").read_bytes())
    # Without the check only the ranked tensor is read (this is the swapped-in file's).
    assert torch.equal(top_k(tmp_path / "a", "val", 3).ids, top_k(tmp_path / "b", "val", 3).ids)
    with pytest.raises(InfluenceFileError, match="does not match the checksum"):
        top_k(tmp_path / "a", "val", 3, verify_checksum=True)
    with pytest.raises(InfluenceFileError, match="does not match the checksum"):
        load_influence(tmp_path / "a")


def test_streamed_file_is_a_safetensors_file_and_its_checksum_is_the_files(tmp_path):
    tensors = {
        "a/f64": torch.randn(13, dtype=torch.float64),
        "b/f32": torch.randn(3, 5),
        "c/bf16": torch.randn(7).to(torch.bfloat16),
        "d/i64": torch.arange(5),
        "e/strided": torch.randn(4, 6, dtype=torch.float64)[:, ::2],
        "f/empty": torch.zeros(0),
        "g/bool": torch.tensor([True, False, True]),
    }
    parts = safetensors_parts(tensors)
    atomic_write_bytes(tmp_path / "t.safetensors", parts)
    checksum = sha256_of(parts)
    assert checksum == hashlib.sha256((tmp_path / "t.safetensors").read_bytes()).hexdigest()
    loaded = load_file(tmp_path / "t.safetensors")
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
