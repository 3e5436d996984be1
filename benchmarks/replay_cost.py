"""What the trajectory log and the post-hoc replay cost, measured side by side in one process.

    .venv/bin/python -m benchmarks.replay_cost [--repeats 3] [--epochs 10] [--threads 1]

For each workload (the fidelity benchmark's digits MLP and CNN, float32, plain SGD, batch 64)
and each repeat, in this order: a plain fit, the same fit with TrajectoryLog attached, the
replay of that log for one target (val) and for two targets (val + test). The table gives
median wall and CPU seconds, the ratios to the plain fit, and the log's size beside the
model's. ``--threads 1`` by default: on a small shared machine torch's thread pool contends
with other processes and the ratios would measure the contention.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.fidelity import make_model
from diffin_lightning import TrajectoryLog, trajectory_influence
from diffin_lightning.bundled import DigitsDataModule


def _timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    value = function()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def _fit(kind: str, epochs: int, log_dir: Path | None):
    datamodule = DigitsDataModule(batch_size=64, image=kind == "cnn")
    model = make_model(kind, datamodule, lr=0.3)
    callbacks = [] if log_dir is None else [TrajectoryLog(output_dir=log_dir)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    return datamodule, model


def measure(kind: str, epochs: int, repeats: int) -> dict:
    rows: dict[str, list[tuple[float, float]]] = {"plain fit": [], "fit + TrajectoryLog": [], "replay, 1 target": [], "replay, 2 targets": []}
    split: dict[str, list[float]] = {"forward": [], "adjoint": []}
    sizes = {}
    for _ in range(repeats):
        scratch = Path(tempfile.mkdtemp())
        try:
            _, wall, cpu = _timed(lambda: _fit(kind, epochs, None))
            rows["plain fit"].append((wall, cpu))
            (datamodule, model), wall, cpu = _timed(lambda: _fit(kind, epochs, scratch / "log"))
            rows["fit + TrajectoryLog"].append((wall, cpu))
            for name, targets in (("replay, 1 target", {"val": datamodule.val_dataset}), ("replay, 2 targets", {"val": datamodule.val_dataset, "test": datamodule.test_dataset})):
                result, wall, cpu = _timed(lambda: trajectory_influence(model, scratch / "log", datamodule.train_dataset, targets, progress=False))
                rows[name].append((wall, cpu))
                if name == "replay, 1 target":
                    split["forward"].append(result.metadata["seconds_forward_replay"])
                    split["adjoint"].append(result.metadata["seconds_adjoint"])
            sizes = {
                "log bytes": sum(p.stat().st_size for p in (scratch / "log").iterdir()),
                "model bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "steps": int(result.metadata["steps_recorded"]),
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values)) for name, values in rows.items()}
    return {"medians": medians, "split": {k: statistics.median(v) for k, v in split.items()}, "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--out", default="benchmarks/results/replay_cost.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = f"python -m benchmarks.replay_cost --repeats {args.repeats} --epochs {args.epochs} --threads {args.threads} --models {' '.join(args.models)}"
    lines = [
        "# Cost of the trajectory log and of the post-hoc replay",
        "",
        f"Command: `.venv/bin/{command}`; torch threads: {args.threads}; median of {args.repeats} alternating repeats.",
        "Digits (1,078 training samples), float32, SGD lr 0.3, batch 64; replay: central finite-difference HVPs,",
        "default checkpoint interval (checkpoints at the start and half way, plus the final parameters). Ratios are to the plain fit of the same repeat set.",
        "",
    ]
    for kind in args.models:
        figures = measure(kind, args.epochs, args.repeats)
        plain_wall, plain_cpu = figures["medians"]["plain fit"]
        one_wall = figures["medians"]["replay, 1 target"][0]
        two_wall = figures["medians"]["replay, 2 targets"][0]
        sizes = figures["sizes"]
        lines += [
            f"## {kind.upper()}, {args.epochs} epochs ({sizes['steps']} steps)",
            "",
            "| run | wall s | CPU s | wall / plain fit |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, (wall, cpu) in figures["medians"].items():
            lines.append(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / plain_wall:.2f} |")
        lines += [
            f"| each extra target (2 targets - 1 target) | {two_wall - one_wall:.2f} | | {(two_wall - one_wall) / plain_wall:.2f} |",
            "",
            f"Where the replay's time goes (1 target): forward replay {figures['split']['forward']:.2f} s, adjoint sweep "
            f"{figures['split']['adjoint']:.2f} s, the rest reading the log and the target gradient.",
            f"Log size: {sizes['log bytes'] / 1024:.0f} KiB for a model of {sizes['model bytes'] / 1024:.1f} KiB "
            f"({sizes['log bytes'] / sizes['model bytes']:.1f}x).",
            "",
        ]
        print("\n".join(lines[-12:]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
