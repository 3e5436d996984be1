"""Large N: a tiny Linear model, 50 optimizer steps, N training samples; what the callback costs.

    python -m benchmarks.large_n [--sizes 1000000 10000000] [--repeats 3] [--steps 50] \
        [--training-set-batch-size 65536] [--out benchmarks/results/large_n.md]
    python -m benchmarks.large_n --quick          # N = 100k, 1 repeat, no file

For each N the plain fit and the fit with ``DiffInCallback(targets={"val": ..., "train":
"train"})`` (defaults: Diff-In with the end-of-fit drift pass over all N samples) alternate
``repeats`` times in one process; the table gives medians of wall and CPU time, the drift
pass's time (timed from outside by callbacks registered before and after DiffInCallback)
and its share of the fit, the time to write (``save_influence``) and load
(``load_influence``) the scores, the ``top_k`` time, the file size and the peak resident
set size above the level before the fit (sampled every 2 ms). Only ratios and medians mean
anything on a shared machine; the machine's load is printed beside the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.overhead import PeakMemory, _EndOfFitStop, _EndOfFitTimer
from diffin_lightning import DiffInCallback, EpochSeededSampler, IndexedDataset, load_influence, save_influence, top_k

INPUT_DIM, NUM_CLASSES, BATCH_SIZE = 16, 4, 256


class TinyLinear(pl.LightningModule):
    """One ``nn.Linear``: the smallest model whose per-sample work the callback still has to do."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(INPUT_DIM, NUM_CLASSES)
        self.lr = lr

    def per_sample_loss(self, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(self.net(batch["input"]), batch["target"], reduction="none")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(num_samples: int, num_val: int = 2048, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(INPUT_DIM, NUM_CLASSES, generator=generator)
    inputs = torch.randn(num_samples + num_val, INPUT_DIM, generator=generator)
    labels = (inputs @ weights).argmax(1)
    return TensorDataset(inputs[:num_samples], labels[:num_samples]), TensorDataset(inputs[num_samples:], labels[num_samples:])


def fit_once(train: TensorDataset, val: TensorDataset, steps: int, with_callback: bool, output_dir: str, pass_batch: int | None = 65536) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    indexed = IndexedDataset(train)
    loader = DataLoader(indexed, batch_size=BATCH_SIZE, sampler=EpochSeededSampler(len(indexed), seed=0))
    timer = _EndOfFitTimer("cpu")
    callbacks: list[pl.Callback] = [timer]
    callback = None
    if with_callback:
        callback = DiffInCallback(targets={"val": val, "train": "train"}, training_set_batch_size=pass_batch, output_dir=output_dir)
        callbacks.append(callback)
    callbacks.append(_EndOfFitStop(timer))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    with PeakMemory("cpu") as memory:
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(TinyLinear(), train_dataloaders=loader)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {"wall": wall, "cpu": cpu, "peak": float(memory.peak), "drift": timer.seconds if with_callback else 0.0}
    if callback is not None:
        result = callback.influence
        with PeakMemory("cpu") as memory:
            start = time.perf_counter()
            path = save_influence(result, output_dir)
            out["write"] = time.perf_counter() - start
        out["write_peak"] = float(memory.peak)
        out["file_bytes"] = float(path.stat().st_size)
        del result
        with PeakMemory("cpu") as memory:
            start = time.perf_counter()
            loaded = load_influence(output_dir)
            out["load"] = time.perf_counter() - start
        out["load_peak"] = float(memory.peak)
        del loaded
        start = time.perf_counter()
        top_k(output_dir, "val", 100, largest=False)
        out["top_k"] = time.perf_counter() - start
    return out


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def measure(num_samples: int, steps: int, repeats: int, pass_batch: int | None = 65536) -> str:
    train, val = make_data(num_samples)
    directory = tempfile.mkdtemp(prefix="diffin_large_n_")
    plain: list[dict[str, float]] = []
    with_cb: list[dict[str, float]] = []
    try:
        for _ in range(repeats):
            plain.append(fit_once(train, val, steps, False, directory, pass_batch))
            with_cb.append(fit_once(train, val, steps, True, directory, pass_batch))
            print(f"N={num_samples:,}: plain {plain[-1]} | callback {with_cb[-1]}", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return format_row(num_samples, steps, plain, with_cb)


def format_row(num_samples: int, steps: int, plain: list[dict[str, float]], with_cb: list[dict[str, float]]) -> str:
    mib = 1024.0**2
    fit, drift = _median(with_cb, "wall"), _median(with_cb, "drift")
    # One plain epoch, extrapolated from the plain fit's time per step (an over-estimate of nothing:
    # it includes the fit's fixed start-up cost spread over `steps`).
    epoch = _median(plain, "wall") / steps * -(-num_samples // BATCH_SIZE)
    return (
        f"| {num_samples:,} | {_median(plain, 'wall'):.1f} / {_median(plain, 'cpu'):.1f} | {fit:.1f} / {_median(with_cb, 'cpu'):.1f} "
        f"| {fit / _median(plain, 'wall'):.2f} | {drift:.1f} ({100 * drift / fit:.0f}%) | {epoch:.0f} | {_median(with_cb, 'write'):.2f} "
        f"| {_median(with_cb, 'load'):.2f} | {_median(with_cb, 'top_k'):.2f} | {_median(with_cb, 'file_bytes') / mib:.0f} "
        f"| {_median(plain, 'peak') / mib:.0f} | {_median(with_cb, 'peak') / mib:.0f} "
        f"| {_median(with_cb, 'write_peak') / mib:.0f} / {_median(with_cb, 'load_peak') / mib:.0f} |"
    )


HEADER = (
    "| N | plain fit s (wall / CPU) | fit with callback s (wall / CPU) | ratio (wall) | drift pass s (share of fit) | one plain epoch s (extrapolated) "
    "| write s | load s | top_k s | file MiB | peak RSS plain MiB | peak RSS callback MiB | peak RSS write / load MiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N = 100k, one repeat, nothing written")
    parser.add_argument("--training-set-batch-size", type=int, default=65536, help="0 = the automatic default (training_set_batch_size=None)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [100_000], 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    pass_batch = args.training_set_batch_size or None
    rows = [measure(n, args.steps, args.repeats, pass_batch) for n in args.sizes]
    load = os.getloadavg()
    text = "\n".join(
        [
            f"Tiny Linear ({INPUT_DIM} -> {NUM_CLASSES}), batch {BATCH_SIZE}, max_steps={args.steps}, targets val (2048 samples) + train, "
            f"defaults (Diff-In, propagated: end-of-fit drift pass over all N), training_set_batch_size={pass_batch or 'automatic'}. Medians of {args.repeats} "
            f"alternating runs, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average at the end "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (a shared machine: compare ratios, not absolute times).",
            "",
            HEADER,
            *rows,
            "",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
