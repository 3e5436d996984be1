"""Influence files: round trip, atomic writes, and refusals with a reason."""

from __future__ import annotations

import json

import pytest
import torch
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


def _result(n=5, fingerprint="abc"):
    g = torch.Generator().manual_seed(0)
    targets = {
        name: TargetInfluence(name, kind, *(torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4)))
        for name, kind in (("val", "dataset"), ("self", "self"))
    }
    return InfluenceResult(targets, {"num_samples": n, "fingerprint": fingerprint, "library_version": "0.1.0"})


def test_round_trip(tmp_path):
    path = save_influence(_result(), tmp_path)
    loaded = load_influence(path)
    original = _result()
    for name in original:
        for component in ("first_order", "second_order", "diffin", "visits"):
            assert torch.equal(loaded[name].component(component), original[name].component(component))
        assert loaded[name].kind == original[name].kind
    assert loaded.metadata["sign_convention"] == SIGN_CONVENTION
    assert load_influence(tmp_path).num_samples == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "temporary files left behind"


def test_overwrite_is_atomic_and_complete(tmp_path):
    save_influence(_result(fingerprint="first"), tmp_path)
    save_influence(_result(fingerprint="second"), tmp_path)
    assert load_influence(tmp_path).metadata["fingerprint"] == "second"


def test_refuses_other_format_version(tmp_path):
    save_influence(_result(), tmp_path)
    meta = json.loads((tmp_path / "influence.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "influence.json").write_text(json.dumps(meta))
    with pytest.raises(InfluenceFileError, match="format_version 99"):
        load_influence(tmp_path)


def test_refuses_mismatched_pair(tmp_path):
    save_influence(_result(), tmp_path / "a")
    save_influence(_result(n=6), tmp_path / "b")
    (tmp_path / "a" / "influence.safetensors").write_bytes((tmp_path / "b" / "influence.safetensors").read_bytes())
    with pytest.raises(InfluenceFileError, match="does not match the checksum"):
        load_influence(tmp_path / "a")


def test_refuses_wrong_shapes(tmp_path):
    save_influence(_result(), tmp_path)
    meta = json.loads((tmp_path / "influence.json").read_text())
    meta["num_samples"] = 7
    (tmp_path / "influence.json").write_text(json.dumps(meta))
    with pytest.raises(InfluenceFileError, match=r"must be \(7,\)"):
        load_influence(tmp_path)


def test_refuses_another_data_set(tmp_path):
    data = IndexedDataset(TensorDataset(torch.zeros(5, 2), torch.tensor([0, 1, 0, 1, 1])))
    save_influence(_result(fingerprint=dataset_fingerprint(5, data.labels())), tmp_path)
    assert load_influence(tmp_path, dataset=data).num_samples == 5
    other = IndexedDataset(TensorDataset(torch.zeros(5, 2), torch.tensor([1, 1, 0, 1, 1])))
    with pytest.raises(InfluenceFileError, match="fingerprint"):
        load_influence(tmp_path, dataset=other)


def test_missing_files_say_what_to_pass(tmp_path):
    with pytest.raises(InfluenceFileError, match="does not exist"):
        load_influence(tmp_path)
