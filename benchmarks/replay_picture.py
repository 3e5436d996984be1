"""The README's picture: predicted against actual leave-one-out change, replay beside in-run Diff-In.

    .venv/bin/python -m benchmarks.replay_picture [--kind mlp] [--regime long_hot] [--num-ids 100]

One float64 fit on digits (the fidelity benchmark's recipe) with DiffInCallback (default settings,
target val) and TrajectoryLog attached; then trajectory_influence on the log, and leave-one-out
retraining for ``num_ids`` random ids (``benchmarks.harness``). Writes
``benchmarks/results/replay_vs_in_run_<kind>_<regime>.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from benchmarks.fidelity import REGIMES, make_model
from benchmarks.harness import TrajectoryRecorder, functional_cross_entropy, leave_one_out_truth
from diffin_lightning import DiffInCallback, TrajectoryLog, trajectory_influence
from diffin_lightning.bundled import DigitsDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--regime", default="long_hot", choices=list(REGIMES))
    parser.add_argument("--num-ids", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    regime = REGIMES[args.regime]
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        datamodule = DigitsDataModule(batch_size=64, double=True, image=args.kind == "cnn")
        model = make_model(args.kind, datamodule, regime.lr)
        recorder = TrajectoryRecorder()
        in_run = DiffInCallback(targets={"val": datamodule.val_dataset}, output_dir=workdir / "in_run")
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, precision="64-true", max_epochs=regime.epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=[recorder, in_run, TrajectoryLog(output_dir=workdir / "trajectory")],
        )
        trainer.fit(model, datamodule=datamodule)
        replayed = trajectory_influence(model, workdir / "trajectory", datamodule.train_dataset, {"val": datamodule.val_dataset}, progress=False)
        train, target = datamodule.train_dataset.dataset.tensors, datamodule.val_dataset.tensors
        ids = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(0))[: args.num_ids]
        truth, _ = leave_one_out_truth(functional_cross_entropy(model), recorder.steps, train, target, ids.tolist())
    panels = {
        "in-run diffin (DiffInCallback, default)": in_run.influence["val"].diffin[ids],
        "replay (trajectory_influence, after training)": replayed["val"].diffin[ids],
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # In units of 1e-3 so that the axes need no offset text.
    truth = truth * 1e3
    panels = {name: values * 1e3 for name, values in panels.items()}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    low, high = float(truth.min()), float(truth.max())
    margin = 0.1 * (high - low)
    frame = (low - margin, high + margin)
    for ax, (name, predicted) in zip(axes, panels.items()):
        # Same frame on both axes, so "on the diagonal" means "predicted the actual change";
        # predictions outside the frame are drawn on its edge as triangles and counted.
        inside = (predicted >= frame[0]) & (predicted <= frame[1])
        ax.plot(frame, frame, color="grey", lw=0.8, ls="--", label="predicted = actual")
        ax.scatter(truth[inside].numpy(), predicted[inside].numpy(), s=12, alpha=0.75, label="training sample")
        for side, marker in ((frame[0], "v"), (frame[1], "^")):
            beyond = (predicted < frame[0]) if marker == "v" else (predicted > frame[1])
            if bool(beyond.any()):
                ax.scatter(truth[beyond].numpy(), [side] * int(beyond.sum()), marker=marker, color="tab:red", s=30, label=f"{int(beyond.sum())} beyond the frame")
        ax.set_xlim(*frame)
        ax.set_ylim(*frame)
        ax.set_title(f"{name}\nPearson {float(pearson_corrcoef(predicted, truth)):.3f}, Spearman {float(spearman_corrcoef(predicted, truth)):.3f}", fontsize=9)
        ax.set_xlabel("actual leave-one-out change of the val loss, L_V(without i) - L_V(with i)  [x 1e-3]", fontsize=8)
        ax.set_ylabel("predicted change: influence, > 0 = helped  [x 1e-3]", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"digits {args.kind.upper()}, {regime.epochs} epochs at lr {regime.lr}, {args.num_ids} random training samples", fontsize=10)
    fig.tight_layout()
    out = Path(args.out_dir) / f"replay_vs_in_run_{args.kind}_{args.regime}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"written to {out}")
    for name, predicted in panels.items():
        print(f"{name}: Pearson {float(pearson_corrcoef(predicted, truth)):.3f}, Spearman {float(spearman_corrcoef(predicted, truth)):.3f}")


if __name__ == "__main__":
    main()
