"""Write, load and top_k of a synthetic influence result (2 targets, float64) at N = 1M and 10M: time and peak RSS.

    python -m benchmarks.large_n_io

Medians of 3; peak RSS above the level before each call (sampled every 2 ms). The result is
built before the timing, so the write peak is what writing adds; the load peak includes the
loaded scores themselves.
"""

import statistics
import tempfile
import time

import torch

from benchmarks.overhead import PeakMemory
from diffin_lightning import InfluenceResult, TargetInfluence, save_influence, load_influence, top_k
for n in (1_000_000, 10_000_000):
    g = torch.Generator().manual_seed(0)
    def t(name, kind):
        f = torch.randn(n, generator=g, dtype=torch.float64); s = torch.randn(n, generator=g, dtype=torch.float64)
        return TargetInfluence(name, kind, f, s, f + s, torch.randint(0, 3, (n,), generator=g).double())
    r = InfluenceResult({"val": t("val", "dataset"), "train": t("train", "train")}, {"num_samples": n, "fingerprint": "x", "library_version": "0"})
    d = tempfile.mkdtemp()
    rows = {"write": [], "load": [], "top_k": [], "wpeak": [], "lpeak": []}
    for _ in range(3):
        with PeakMemory("cpu") as m:
            a = time.perf_counter(); save_influence(r, d); rows["write"].append(time.perf_counter() - a)
        rows["wpeak"].append(m.peak / 2**20)
        with PeakMemory("cpu") as m:
            a = time.perf_counter(); x = load_influence(d); rows["load"].append(time.perf_counter() - a)
        rows["lpeak"].append(m.peak / 2**20); del x
        a = time.perf_counter(); top_k(d, "val", 100); rows["top_k"].append(time.perf_counter() - a)
    print(n, {k: round(statistics.median(v), 2) for k, v in rows.items()}, flush=True)
