"""Single random bit flips in each influence file: how many are refused, load unchanged, or load changed.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bit_flips [--flips 500]

The issue's baseline (format 1): of 500 flips of the JSON file, 49 loaded with changed
fields and 70 raised raw errors. Format 2 should refuse every one with InfluenceFileError.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch

from diffin_lightning import InfluenceFileError, InfluenceResult, TargetInfluence, load_influence, save_influence

COMPONENTS = ("first_order", "second_order", "diffin", "visits")


def _result(n: int = 5) -> InfluenceResult:
    g = torch.Generator().manual_seed(0)
    targets = {}
    for name, kind in (("val", "dataset"), ("self", "self")):
        first, second = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
        targets[name] = TargetInfluence(name, kind, first, second, first + second, torch.randint(0, 4, (n,), generator=g).double())
    return InfluenceResult(targets, {"num_samples": n, "fingerprint": "abc", "library_version": "0.1.0"})


def main() -> None:
    flips = int(sys.argv[sys.argv.index("--flips") + 1]) if "--flips" in sys.argv else 500
    directory = Path(tempfile.mkdtemp())
    save_influence(_result(), directory)
    pristine = {name: (directory / name).read_bytes() for name in ("influence.json", "influence.safetensors")}
    original = load_influence(directory)
    rng = random.Random(0)
    for target in pristine:
        counts = {"refused": 0, "equal": 0, "changed": 0, "other_error": 0}
        for _ in range(flips):
            data = bytearray(pristine[target])
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            for name, payload in pristine.items():
                (directory / name).write_bytes(bytes(data) if name == target else payload)
            try:
                loaded = load_influence(directory)
            except InfluenceFileError:
                counts["refused"] += 1
                continue
            except Exception:  # noqa: BLE001 - counted: a raw error is a finding
                counts["other_error"] += 1
                continue
            same = loaded.metadata == original.metadata and all(
                torch.equal(loaded[t].component(c), original[t].component(c)) for t in original for c in COMPONENTS
            )
            counts["equal" if same else "changed"] += 1
        print(target, counts)


if __name__ == "__main__":
    main()
