"""Peak live tensor memory of a fit with and without the DiffInCallback, and where the peak is (CPU).

``benchmarks.overhead`` reports the resident set size, which is what the machine pays but also
holds what glibc's allocator keeps of freed memory (its thresholds move with the sizes freed
before), so a few megabytes there are not the callback's tensors. This benchmark reads the
tensors themselves: the PyTorch profiler's allocator accounting (``Total Allocated`` of its
``[memory]`` events) during ``trainer.fit``, above its level at the fit's start, and the Python
frames around the peak, so the table says which of the callback's passes sets it.

Ratios are *training memory* with / plain, training memory = the parameters' bytes + the peak
live growth during the fit (as in ``benchmarks.overhead``). ``after the first recorded step``
leaves out the first step, whose one-time check (is the training step's gradient the mean of
``per_sample_loss``'s?) recomputes the step's gradient beside the training step's own.

Usage::

    python -m benchmarks.live_memory --workloads mlp cnn transformer --epochs 2
"""

from __future__ import annotations

import argparse
import bisect
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.overhead import SETTINGS, _atomic_write, fit_once, reproducing_command, workloads

DEFAULT_SETTINGS = ["first order (defaults)", "Diff-In (defaults)", "Diff-In, every 10 steps"]


class _ProfileFit(pl.Callback):
    """Profiles tensor allocations (with Python frames) from the fit's start to its end."""

    def __init__(self) -> None:
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.profiler.start()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.profiler.stop()


def _frame(name: str) -> str:
    return name.split("site-packages/")[-1]


def live_peaks(trace: dict[str, Any]) -> dict[str, Any]:
    """Peak live bytes above the first memory event's level, overall and after the first recorded step, and where."""
    memory = sorted((e for e in trace["traceEvents"] if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return {"peak": 0.0, "steady": 0.0, "where": "no allocation"}
    times = [e["ts"] for e in memory]
    live = [e["args"]["Total Allocated"] for e in memory]
    start = live[0] - memory[0]["args"]["Bytes"]
    frames = [e for e in trace["traceEvents"] if e.get("ph") == "X" and ("diffin_lightning/" in e["name"] or "lightning/pytorch/" in e["name"])]
    recorded = [e for e in frames if "diffin_lightning/callback.py" in e["name"] and "on_before_optimizer_step" in e["name"]]
    after = bisect.bisect_right(times, min(e["ts"] + e["dur"] for e in recorded)) if recorded else 0

    def where(index: int) -> str:
        moment = times[index]
        around = sorted((e for e in frames if e["ts"] <= moment <= e["ts"] + e.get("dur", 0)), key=lambda e: e["ts"])
        library = [_frame(e["name"]) for e in around if "diffin_lightning/" in e["name"] and "/bundled/" not in e["name"]]
        if library:
            # The callback's hook and the innermost frames of the library say which pass it is.
            return " > ".join(library[:2] + (["..."] if len(library) > 4 else []) + library[max(2, len(library) - 2) :])
        phases = [_frame(e["name"]) for e in around if "lightning/pytorch/" in e["name"]]
        return phases[-1] if phases else "outside the library"

    peak_index = max(range(len(live)), key=live.__getitem__)
    steady_index = max(range(after, len(live)), key=live.__getitem__) if after < len(live) else peak_index
    return {
        "peak": (live[peak_index] - start) / 2**20,
        "steady": (live[steady_index] - start) / 2**20,
        "where": where(peak_index),
        "steady_where": where(steady_index),
    }


def measure(key: str, setting: str | None, epochs: int) -> dict[str, Any]:
    workload = workloads()[key]
    options = None if setting is None else SETTINGS[setting]
    fit_once(workload, "cpu", 1, options)  # warm-up: first-call allocations are not the fit's
    watcher = _ProfileFit()
    run = fit_once(workload, "cpu", epochs, options, extra_callbacks=[watcher])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        watcher.profiler.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return {"params": run["param_bytes"] / 2**20, **live_peaks(trace)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "transformer"], choices=list(workloads()))
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/live_memory.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = reproducing_command(
        "benchmarks.live_memory",
        ["--workloads " + " ".join(args.workloads), f"--epochs {args.epochs}", f"--threads {args.threads}"],
        args.settings,
        DEFAULT_SETTINGS,
        args.out,
        "benchmarks/results/live_memory.md",
    )
    lines = [
        f"# Peak live tensor memory with and without the DiffInCallback (CPU, {args.epochs} epochs)",
        "",
        f"Command: `{command}`",
        "",
        *__doc__.split("\n\n")[1:3],
        "",
        "| workload | callback | params MB | live peak growth MB, plain / with | live peak ratio | with, after the first recorded step: growth MB (ratio) | the peak is in | after the first recorded step, the peak is in |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for key in args.workloads:
        plain = measure(key, None, args.epochs)
        for setting in args.settings:
            run = measure(key, setting, args.epochs)
            base = plain["params"] + plain["peak"]
            lines.append(
                f"| {workloads()[key][0]} | {setting} | {run['params']:.1f} | {plain['peak']:.1f} / {run['peak']:.1f} | "
                f"**{(run['params'] + run['peak']) / base:.2f}** | {run['steady']:.1f} ({(run['params'] + run['steady']) / base:.2f}) | "
                f"`{run['where']}` | `{run['steady_where']}` |"
            )
            print(lines[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    lines[3:3] = ["", f"Measured from {started} to {time.strftime('%H:%M UTC', time.gmtime())} on commit {commit} (allocator accounting: no timing, no load dependence)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(args.out), "\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
