"""Wall time of Trainer.fit with and without DiffInCallback, measured side by side in one process.

    .venv/bin/python -m benchmarks.overhead [--device cpu|cuda] [--repeats 3] [--out benchmarks/results/overhead.md]

For each workload the plain fit and the fits with the callback alternate, `repeats` times;
the table gives the median seconds and the ratio callback/plain. Absolute times depend on
the machine; the ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from diffin_lightning import DiffInCallback
from diffin_lightning.bundled import DigitsDataModule, MLPClassifier, SyntheticDataModule

CALLBACK_SETTINGS = {
    "diffin val+self+train": dict(targets=("val", "self", "train")),
    "diffin val": dict(targets=("val",)),
    "diffin val, <=256 target samples per refresh": dict(targets=("val",), target_max_samples=256),
    "first_order val": dict(targets=("val",), compute_second_order=False),
    "diffin val, every 10 steps": dict(targets=("val",), every_n_steps=10),
}


def workloads(device: str) -> dict[str, tuple]:
    return {
        "digits MLP 64-64-10, batch 64, 10 epochs": (lambda: DigitsDataModule(label_noise=0.1), dict(hidden_dims=(64,)), 10),
        "synthetic MLP 256-1024-1024-10, N=8192, batch 256, 2 epochs": (
            lambda: SyntheticDataModule(num_samples=8192, dim=256, num_classes=10, batch_size=256),
            dict(hidden_dims=(1024, 1024)),
            2,
        ),
    }


def fit_seconds(make_data, model_kwargs, epochs, device, setting) -> float:
    pl.seed_everything(0, verbose=False)
    data = make_data()
    model = MLPClassifier(**data.model_kwargs(), **model_kwargs)
    callbacks = []
    if setting is not None:
        options = dict(setting)
        names = options.pop("targets")
        targets = {name: (data.val_dataset if name == "val" else name) for name in names}
        callbacks.append(DiffInCallback(targets=targets, output_dir="/tmp/diffin_overhead", **options))
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/overhead.md")
    parser.add_argument("--workloads", nargs="+", default=["digits", "synthetic"], choices=["digits", "synthetic"])
    args = parser.parse_args()
    lines = [
        f"# DiffInCallback overhead ({args.device}, {torch.get_num_threads()} threads, median of {args.repeats})",
        "",
        "Command: `.venv/bin/python -m benchmarks.overhead "
        + f"--device {args.device} --repeats {args.repeats} --workloads {' '.join(args.workloads)}`",
        "",
        "| workload | callback | plain s | with callback s | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, (make_data, model_kwargs, epochs) in workloads(args.device).items():
        if name.split()[0] not in args.workloads:
            continue
        fit_seconds(make_data, model_kwargs, 1, args.device, None)  # warm-up
        for label, setting in CALLBACK_SETTINGS.items():
            plain, with_callback = [], []
            for _ in range(args.repeats):
                plain.append(fit_seconds(make_data, model_kwargs, epochs, args.device, None))
                with_callback.append(fit_seconds(make_data, model_kwargs, epochs, args.device, setting))
            p, w = statistics.median(plain), statistics.median(with_callback)
            row = f"| {name} | {label} | {p:.2f} | {w:.2f} | {w / p:.2f} |"
            print(row, flush=True)
            lines.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
