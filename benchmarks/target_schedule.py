"""Fidelity versus cost of the dataset target's refresh schedule (how the callback's defaults were chosen).

    python -m benchmarks.target_schedule [--models mlp] [--regimes short_cool long_hot] [--num-ids 100]

One training run per regime (digits, float64, plain SGD, the fidelity benchmark's setup)
carries one DiffInCallback per schedule (``target_refresh_every_n_steps`` x
``target_max_samples``); leave-one-out truth for ``num_ids`` random ids comes from the
fidelity harness. For each schedule: Spearman and Pearson of the first-order and the default
Diff-In scores against the truth, and the schedule's cost as target samples forwarded and
backwarded per optimizer step, in training-batch equivalents (``min(max_samples, |V|) /
refresh / batch size``): the target gradient's share of a step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from benchmarks.fidelity import REGIMES, make_model
from benchmarks.harness import TrajectoryRecorder, functional_cross_entropy, leave_one_out_truth, paired_spearman_difference
from diffin_lightning import DiffInCallback
from diffin_lightning.bundled import DigitsDataModule

# (refresh every n steps, max target samples or None for all, g_V between refreshes: target_extrapolation)
SCHEDULES: list[tuple[int, int | None, str]] = [
    (1, None, "none"), (5, None, "none"), (10, None, "none"), (20, None, "none"), (50, None, "none"), (10, 128, "none"), (1, 128, "none"),
    (10, None, "linear"), (10, None, "damped"),
]


def run(kind: str, regime_name: str, num_ids: int) -> tuple[list[str], float]:
    regime = REGIMES[regime_name]
    started = time.perf_counter()
    datamodule = DigitsDataModule(label_noise=0.0, batch_size=64, double=True, image=kind == "cnn")
    model = make_model(kind, datamodule, regime.lr)
    recorder = TrajectoryRecorder()
    with tempfile.TemporaryDirectory() as scratch:
        callbacks = {
            (refresh, cap, extrapolate): DiffInCallback(
                targets={"val": datamodule.val_dataset},
                target_refresh_every_n_steps=refresh,
                target_max_samples=cap,
                target_extrapolation=extrapolate,  # named on every row: the automatic choice is 'damped'
                output_dir=Path(scratch) / f"{refresh}_{cap}_{extrapolate}",
                seed=refresh,  # distinct state keys; the seed only picks the subsets
            )
            for refresh, cap, extrapolate in SCHEDULES
        }
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, precision="64-true", max_epochs=regime.epochs, callbacks=[recorder, *callbacks.values()],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            default_root_dir=scratch,
        )
        trainer.fit(model, datamodule=datamodule)
    train = datamodule.train_dataset.dataset.tensors
    target = datamodule.val_dataset.tensors
    ids = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(0))[:num_ids]
    truth, _ = leave_one_out_truth(functional_cross_entropy(model), recorder.steps, train, target, ids.tolist())
    size_v = len(target[1])
    lines = [
        f"## {kind}, {regime_name}: {regime.epochs} epochs, lr {regime.lr}, batch 64, |V| = {size_v}",
        "",
        "| refresh every n steps | max target samples | g_V between refreshes | target cost per step (batch equivalents) | first order Spearman | Diff-In Spearman | Diff-In Pearson | first order: difference to the first row [95% interval] | Diff-In: difference to the first row [95% interval] | first order / Diff-In: Spearman with the first row's scores, all samples |",
        "| ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference = next(iter(callbacks.values())).influence["val"]
    for (refresh, cap, extrapolate), callback in callbacks.items():
        scores = callback.influence["val"]
        cost = min(cap or size_v, size_v) / refresh / 64
        first = float(spearman_corrcoef(scores.first_order[ids], truth))
        diffin = float(spearman_corrcoef(scores.diffin[ids], truth))
        pearson = float(pearson_corrcoef(scores.diffin[ids], truth))
        # How far this schedule moves each score from the first row's, with a paired bootstrap over the ids: whether
        # a move of 0.01 (the engine issue's bar) can be told apart from none with this many ids.
        moves = [
            "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired_spearman_difference(mine[ids], theirs[ids], truth))
            for mine, theirs in ((scores.first_order, reference.first_order), (scores.diffin, reference.diffin))
        ]
        # The schedule's effect on the scores themselves, over every training sample (no leave-one-out noise):
        # what the moves against the truth above cannot resolve where the truth is noisy (long, hot runs).
        agreement = [
            float(spearman_corrcoef(mine, theirs))
            for mine, theirs in ((scores.first_order, reference.first_order), (scores.diffin, reference.diffin))
        ]
        lines.append(
            f"| {refresh} | {cap or 'all'} | {extrapolate} | {cost:.2f} | {first:.3f} | {diffin:.3f} | {pearson:.3f} | {moves[0]} | {moves[1]} "
            f"| {agreement[0]:.4f} / {agreement[1]:.4f} |"
        )
    return lines, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp"], choices=["mlp", "cnn"])
    parser.add_argument("--regimes", nargs="+", default=["short_cool", "long_hot"], choices=list(REGIMES))
    parser.add_argument("--num-ids", type=int, default=100)
    parser.add_argument("--refresh", type=int, nargs="+", default=None, help="only these refresh intervals (whole target)")
    parser.add_argument(
        "--schedules", nargs="+", default=None, metavar="N:CAP",
        help="only these schedules, each refresh:max_samples[:mode] (max_samples 'all' for the whole target; mode, g_V between "
        "refreshes (target_extrapolation): none (the default here), linear (or x) or damped), e.g. 1:all 10:128 10:all:damped",
    )
    parser.add_argument("--out", default="benchmarks/results/target_schedule.md")
    args = parser.parse_args()
    if args.refresh:
        SCHEDULES[:] = [(refresh, None, False) for refresh in args.refresh]
    if args.schedules:
        SCHEDULES[:] = [
            (int(parts[0]), None if parts[1] == "all" else int(parts[1]), {"x": "linear"}.get(mode := (parts[2:] or ["none"])[0], mode))
            for parts in (item.split(":") for item in args.schedules)
        ]
    command = f"python -m benchmarks.target_schedule --models {' '.join(args.models)} --regimes {' '.join(args.regimes)} --num-ids {args.num_ids}"
    if args.refresh:
        command += f" --refresh {' '.join(map(str, args.refresh))}"
    if args.schedules:
        command += f" --schedules {' '.join(args.schedules)}"
    lines = [
        "# Target refresh schedule: fidelity against leave-one-out versus cost",
        "",
        f"Command: `{command}`",
        "",
        "Each row is one DiffInCallback in the same training run (same trajectory); Spearman/Pearson against the",
        "leave-one-out truth of the fidelity benchmark (digits, float64). Diff-In = the default second order (propagated).",
        "The differences to the first row come with a paired bootstrap interval over the ids (2,000 resamples, percentile):",
        "both schedules scored on the same resampled ids each time. The last column compares the scores, not their",
        "fit to the truth: the Spearman correlation of each row's scores with the first row's over every training sample.",
        "",
    ]
    for kind in args.models:
        for regime in args.regimes:
            rows, seconds = run(kind, regime, args.num_ids)
            rows[0] += f" ({seconds:.0f} s)"
            print("\n".join(rows), flush=True)
            lines += rows + [""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
