"""DiffInCallback's cost under DDP (CPU, gloo, two processes): wall ratios with and without it.

    python -m benchmarks.overhead_ddp --workloads mlp transformer --repeats 3 --epochs 4

Each fit is one ``trainer.fit`` with ``strategy="ddp"`` and two CPU processes (one torch
thread each, so the two ranks share this machine's two cores), started in a fresh Python
process; plain and callback fits alternate. The workloads are ``benchmarks.overhead``'s, with
their batch size per rank (a global batch twice as large). What is timed, on global rank
zero: from the start of the second epoch (the first is the warm-up: imports, the process
group's first collectives, the callback's first-step check) to the end of ``on_train_end``
after the callback's end-of-fit pass. The callback's target is the validation set, its
settings ``benchmarks.overhead.SETTINGS``. Peak memory is not measured here (see
``benchmarks.overhead``: a rank's memory is a one-process run's).

``--one-fit`` is internal: the script run in the fresh process, which Lightning's DDP
launcher starts once more for rank one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.overhead import SETTINGS, _atomic_write, reproducing_command, workloads
from diffin_lightning import DiffInCallback

_REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_SETTINGS = ["first order (defaults)", "Diff-In (defaults)", "Diff-In, every 10 steps"]


@dataclass(frozen=True)
class DDPFitSpec:
    workload: str
    epochs: int  # measured epochs; one more runs first as the warm-up
    setting: str | None  # a key of benchmarks.overhead.SETTINGS; None: no DiffInCallback


class _WallClock(pl.Callback):
    """On every rank: the time from the second epoch's start to the end of training (placed last: after the callback's end-of-fit pass)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            torch.distributed.barrier()  # both ranks start the clock together
            self.started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.distributed.barrier()  # the slower rank's end is the fit's end
        assert self.started is not None
        self.seconds = time.perf_counter() - self.started


def one_ddp_fit(spec: DDPFitSpec, result: Path, output_dir: Path) -> None:
    """The measured fit (both ranks run this); global rank zero writes ``{"wall": seconds}`` to ``result``."""
    torch.set_num_threads(1)
    _, make_data, make_model = workloads()[spec.workload]
    pl.seed_everything(0, verbose=False)
    data = make_data()
    model = make_model(data)
    clock = _WallClock()
    callbacks: list[pl.Callback] = []
    if spec.setting is not None:
        data.setup("fit")
        callbacks.append(DiffInCallback(targets={"val": data.val_dataset}, output_dir=output_dir, **SETTINGS[spec.setting]))
    callbacks.append(clock)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=spec.epochs + 1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        _atomic_write(result, json.dumps({"wall": clock.seconds}))


def fit_in_subprocess(spec: DDPFitSpec, timeout: float) -> float:
    with tempfile.TemporaryDirectory(prefix="diffin_overhead_ddp_") as folder:
        result = Path(folder) / "result.json"
        environment = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
        environment["PYTHONWARNINGS"] = "ignore"
        command = [sys.executable, "-m", "benchmarks.overhead_ddp", "--one-fit", json.dumps(asdict(spec)), "--result", str(result), "--output-dir", str(Path(folder) / "run")]
        process = subprocess.run(command, cwd=_REPOSITORY, env=environment, capture_output=True, text=True, timeout=timeout)
        if process.returncode != 0 or not result.exists():
            tail = [line for line in process.stderr.splitlines() if line.strip()][-3:]
            raise RuntimeError(f"the DDP fit {spec} failed (exit status {process.returncode}): {' | '.join(tail)}")
        return float(json.loads(result.read_text())["wall"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "transformer"], choices=list(workloads()))
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="measured epochs (one warm-up epoch runs before them)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a fit may take before it counts as hung")
    parser.add_argument("--out", default="benchmarks/results/overhead_ddp.md")
    parser.add_argument("--one-fit", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_fit is not None:
        if args.result is None or args.output_dir is None:
            parser.error("`--one-fit` needs `--result PATH` and `--output-dir PATH`.")
        one_ddp_fit(DDPFitSpec(**json.loads(args.one_fit)), Path(args.result), Path(args.output_dir))
        return
    started, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    rows = []
    for key in args.workloads:
        walls: dict[str, list[float]] = {label: [] for label in ["plain", *args.settings]}
        for repeat in range(args.repeats):
            for label in walls:
                wall = fit_in_subprocess(DDPFitSpec(key, args.epochs, None if label == "plain" else label), args.timeout)
                walls[label].append(wall)
                print(f"{key} repeat {repeat + 1}/{args.repeats} {label}: {wall:.2f} s", flush=True)
        plain = statistics.median(walls["plain"])
        for label in args.settings:
            mine = statistics.median(walls[label])
            spread = (max(walls[label]) - min(walls[label])) / mine
            rows.append(f"| {workloads()[key][0]} | {label} | {plain:.2f} | {mine:.2f} | **{mine / plain:.2f}** | {100 * spread:.0f}% |")
    command = reproducing_command(
        "benchmarks.overhead_ddp",
        ["--workloads " + " ".join(args.workloads), f"--repeats {args.repeats}", f"--epochs {args.epochs}"],
        args.settings,
        DEFAULT_SETTINGS,
        args.out,
        "benchmarks/results/overhead_ddp.md",
    )
    lines = [
        f"# DiffInCallback cost under DDP (CPU, gloo, 2 processes of 1 thread; {args.epochs} measured epochs; median of {args.repeats}, alternating)",
        "",
        f"Command: `{command}`",
        "",
        f"Measured from {started} to {time.strftime('%H:%M UTC', time.gmtime())}; load average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in load)} at the start.",
        "Wall time on global rank zero from the second epoch's start to the end of on_train_end (the end-of-fit pass included);",
        "each fit in a fresh process pair; the batch size is per rank. `spread` = (max - min) / median of the callback's fits.",
        "",
        "| workload | callback | plain s | with s | wall ratio | spread |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
