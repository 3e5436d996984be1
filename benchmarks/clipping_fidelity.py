"""Fidelity under norm clipping: the in-run scores with each step at its clipped learning rate, against without.

    python -m benchmarks.clipping_fidelity [--regimes short_cool long_hot] [--clip 0.5] [--num-ids 100] \
        [--out benchmarks/results/clipping_fidelity.md]

Under ``Trainer(gradient_clip_val=C)`` (norm clipping) a step updates ``theta - eta c G_B`` with
``c = min(1, C / (|G_B| + 1e-6))``. The callback counts each step at ``eta c`` and takes its
first-order terms along the clipped step's Jacobian (``g - kappa <g, G_B^> G_B^``: removing a sample
turns a clipped step rather than shortening it); before, it counted ``eta`` along ``g`` and warned
that clipping was ignored.
This benchmark trains the fidelity benchmark's digits MLP (float64, plain SGD, fixed batch order)
with norm clipping, takes leave-one-out truth from replays that clip as the run does (each
replayed model its own factor, from its own batch gradient), and reports Spearman/Pearson of:
the callback as it is; the same callback with the factor switched off (a second fit of the same
recipe with ``norm_clip_factor`` returning 1, so no step counts as clipped: the scores before the
change, same trajectory); and
the post-hoc replay (``trajectory_influence``), which differentiates the clipping (the exact
derivative of the clipped run: its adjoint projected off each clipped step's gradient direction).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.func import grad, vmap

from benchmarks.fidelity import REGIMES, Regime, correlation_rows, make_model
from benchmarks.harness import FunctionalLoss, Params, StepRecord, TrajectoryRecorder, functional_cross_entropy, mean_target_loss
from diffin_lightning import DiffInCallback, TrajectoryLog, lightning_state, trajectory_influence
from diffin_lightning.bundled import DigitsDataModule


def clipped_replay(loss: FunctionalLoss, steps: list[StepRecord], inputs: Tensor, labels: Tensor, weights: Tensor, clip: float) -> Params:
    """Final parameters of ``K`` clipped SGD runs (run ``k`` weights sample ``i`` by ``weights[k, i]``), each clipping its own gradient."""
    stacked = {name: value.unsqueeze(0).repeat(weights.shape[0], *[1] * value.dim()) for name, value in steps[0].params.items()}

    def weighted_batch_loss(params: Params, sample_weights: Tensor, batch_inputs: Tensor, batch_labels: Tensor) -> Tensor:
        return (sample_weights * loss(params, batch_inputs, batch_labels)).sum() / batch_labels.shape[0]

    gradient = vmap(grad(weighted_batch_loss), in_dims=(0, 0, None, None))
    for record in steps:
        ids = torch.tensor(record.ids)
        update = gradient(stacked, weights[:, ids], inputs[ids], labels[ids])
        norms = torch.sqrt(sum(value.flatten(1).pow(2).sum(1) for value in update.values()))
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s, per replayed model
        stacked = {name: value - record.lr * factor.view(-1, *[1] * (value.dim() - 1)) * update[name] for name, value in stacked.items()}
    return stacked


def clipped_leave_one_out(model: pl.LightningModule, steps: list[StepRecord], train, target, ids: list[int], clip: float, chunk: int = 64) -> Tensor:
    inputs, labels = train
    loss = functional_cross_entropy(model, training=True)
    truths = []
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        weights = torch.ones(len(part) + 1, len(labels), dtype=inputs.dtype)
        for row, sample in enumerate(part, start=1):
            weights[row, sample] = 0.0
        losses = mean_target_loss(loss, clipped_replay(loss, steps, inputs, labels, weights, clip), *target)
        truths.append(losses[1:] - losses[0])
    return torch.cat(truths)


def clipped_fit(regime: Regime, clip: float, workdir: Path, factor_on: bool):
    datamodule = DigitsDataModule(batch_size=64, double=True)
    model = make_model("mlp", datamodule, regime.lr)
    recorder = TrajectoryRecorder()
    callback = DiffInCallback(targets={"val": datamodule.val_dataset}, output_dir=workdir / "in_run")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="64-true", max_epochs=regime.epochs, gradient_clip_val=clip,
        callbacks=[recorder, callback, TrajectoryLog(output_dir=workdir / "trajectory")],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=str(workdir),
    )
    switch = contextlib.nullcontext() if factor_on else mock.patch.object(lightning_state, "norm_clip_factor", lambda trainer, optimizer: 1.0)
    with switch:
        trainer.fit(model, datamodule=datamodule)
    return datamodule, model, recorder, callback


def run(regime: Regime, clip: float, num_ids: int) -> tuple[list[str], float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        datamodule, model, recorder, new = clipped_fit(regime, clip, workdir / "new", factor_on=True)
        _, _, old_recorder, old = clipped_fit(regime, clip, workdir / "old", factor_on=False)
        same = all(torch.equal(a.params[k], b.params[k]) for a, b in zip(recorder.steps, old_recorder.steps) for k in a.params)
        train, target = datamodule.train_dataset.dataset.tensors, datamodule.val_dataset.tensors
        x, y = train
        factors = []
        loss = functional_cross_entropy(model, training=True)
        for record in recorder.steps:
            ids = torch.tensor(record.ids)
            batch_gradient = grad(lambda p: loss(p, x[ids], y[ids]).mean())(record.params)
            norm = float(torch.sqrt(sum(g.pow(2).sum() for g in batch_gradient.values())))
            factors.append(min(1.0, clip / (norm + 1e-6)))
        factors_t = torch.tensor(factors)
        ids = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:num_ids]
        truth = clipped_leave_one_out(model, recorder.steps, train, target, ids.tolist(), clip)
        replay = trajectory_influence(model, workdir / "new" / "trajectory", datamodule.train_dataset, {"val": datamodule.val_dataset}, progress=False)
        scores = {
            "first_order, clipped steps at eta * c along their Jacobian (this change)": new.influence["val"].first_order,
            "first_order, every step at eta along g_V (before)": old.influence["val"].first_order,
            "diffin, propagated, clipped steps as above (this change)": new.influence["val"].diffin,
            "diffin, propagated, every step at eta along g_V (before)": old.influence["val"].diffin,
            "replay (trajectory_influence), clipping differentiated": replay["val"].diffin,
        }
        rows = correlation_rows(truth, scores, ids)
    seconds = time.perf_counter() - started
    lines = [
        f"## mlp, {regime.name}: {regime.epochs} epochs, lr {regime.lr}, batch 64, gradient_clip_val {clip} ({seconds:.0f} s)",
        "",
        f"{len(factors)} steps; clipped (c < 1) at {int((factors_t < 1).sum())}; factor c min / median / max "
        f"{factors_t.min():.3f} / {factors_t.median():.3f} / {factors_t.max():.3f}. The two fits' trajectories are "
        f"{'identical' if same else 'NOT identical'}.",
        "",
        "| estimator | Pearson | Spearman |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {pearson:.3f} | {spearman:.3f} |" for name, (pearson, spearman) in rows.items()],
        "",
    ]
    return lines, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--clip", type=float, default=0.5, help="gradient_clip_val (norm clipping)")
    parser.add_argument("--num-ids", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clipping_fidelity.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = f"python -m benchmarks.clipping_fidelity --regimes {' '.join(args.regimes)} --clip {args.clip} --num-ids {args.num_ids} --out {args.out}"
    lines = [
        "# Fidelity under norm clipping (digits MLP, float64): the clipping factor in the in-run scores",
        "",
        f"Command: `{command}`",
        "",
        "Truth: leave-one-out replays that clip as the run does (each replayed model by its own factor). Sign: > 0 helped.",
        "",
    ]
    for name in args.regimes:
        section, seconds = run(REGIMES[name], args.clip, args.num_ids)
        print("\n".join(section), flush=True)
        lines += section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
