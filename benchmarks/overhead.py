"""Cost of DiffInCallback: time and peak memory with and without it, side by side in one process.

    python -m benchmarks.overhead [--device cpu|cuda] [--repeats 3] [--epochs 4] \
        [--workloads mlp cnn transformer] [--settings ...] [--breakdown mlp] [--opacus] \
        [--out benchmarks/results/overhead.md]

For each workload the plain fit and the fits with the callback alternate, ``repeats`` times
(plain, setting 1, setting 2, ..., plain, setting 1, ...); the table gives medians of wall
time and CPU time and the ratios callback/plain, the peak memory ratio, and the end-of-fit
pass's share of the fit. On CPU the peak memory is the peak resident set size above the
level before the fit (sampled every 2 ms); on CUDA ``torch.cuda.max_memory_allocated``
(with ``torch.cuda.synchronize`` around every timed region). ``--breakdown`` times the parts
of the callback (target gradient, perturbed pass, dot products, end-of-fit pass,
bookkeeping) on one workload by wrapping the library's functions with timers.
``--opacus`` adds Opacus' ``GradSampleModule`` (per-sample gradients by hooks, the cost
users know) on the same models.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from diffin_lightning import DiffInCallback
from diffin_lightning.bundled import CNNClassifier, DigitsDataModule, MLPClassifier, SyntheticDataModule
from diffin_lightning.bundled.datamodule import ClassificationDataModule

SETTINGS: dict[str, dict[str, Any]] = {
    "first order (defaults)": dict(compute_second_order=False),
    "Diff-In (defaults)": dict(),
    "Diff-In, every 10 steps": dict(every_n_steps=10),
    "Diff-In, target every step (old default)": dict(target_refresh_every_n_steps=1, target_max_samples=None),
}


# ---------------------------------------------------------------------- workloads


class TokenClassifier(pl.LightningModule):
    """A small ``nn.TransformerEncoder`` over token sequences, mean-pooled, linear head."""

    def __init__(self, vocab: int = 512, length: int = 32, width: int = 64, layers: int = 2, num_classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)
        self.lr = lr

    def per_sample_loss(self, batch: dict[str, Any]) -> Tensor:
        hidden = self.encoder(self.embed(batch["input"]))
        return F.cross_entropy(self.head(hidden.mean(1)), batch["target"], reduction="none")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _tokens(num_samples: int, vocab: int, length: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (num_samples, length), generator=generator)
    labels = (tokens[:, : length // 2].sum(1) % 10).long()  # a learnable rule of the tokens
    return TensorDataset(tokens, labels)


def token_data(num_samples: int = 4096, batch_size: int = 128) -> ClassificationDataModule:
    return ClassificationDataModule(
        train=_tokens(num_samples, 512, 32, 0), val=_tokens(1024, 512, 32, 1), test=_tokens(256, 512, 32, 2),
        num_classes=10, corrupted=None, batch_size=batch_size, shuffle_seed=0,
    )


Workload = tuple[str, Callable[[], Any], Callable[[Any], pl.LightningModule]]


def workloads() -> dict[str, Workload]:
    return {
        "mlp": (
            "MLP 256-1024-1024-10, synthetic N=2048, batch 256",
            lambda: SyntheticDataModule(num_samples=2048, dim=256, num_classes=10, batch_size=256),
            lambda data: MLPClassifier(**data.model_kwargs(), hidden_dims=(1024, 1024)),
        ),
        "cnn": (
            "bundled CNN (conv8-conv16) on digits, batch 64",
            lambda: DigitsDataModule(batch_size=64, image=True),
            lambda data: CNNClassifier(**data.model_kwargs()),
        ),
        "transformer": (
            "TransformerEncoder 2x64 (4 heads), 32 tokens, N=1024, batch 128",
            lambda: token_data(num_samples=1024),
            lambda data: TokenClassifier(),
        ),
    }


# ---------------------------------------------------------------------- measurement


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or the resident set size sampled on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._rss()
        self._stop = threading.Event()
        self._max = self._base

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._max = max(self._max, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, self._rss()) - self._base


def _trainer(device: str, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


class _EndOfFitTimer(pl.Callback):
    """Times the callbacks' on_train_end (the end-of-fit pass) from outside."""

    def __init__(self, device: str) -> None:
        self.device, self.started, self.seconds = device, 0.0, 0.0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Registered first, so Lightning calls it before DiffInCallback's on_train_end ...
        _synchronize(self.device)
        self.started = time.perf_counter()


class _EndOfFitStop(pl.Callback):
    def __init__(self, timer: _EndOfFitTimer) -> None:
        self.timer = timer

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ... and this one after it.
        _synchronize(self.timer.device)
        self.timer.seconds = time.perf_counter() - self.timer.started


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fit_once(workload: Workload, device: str, epochs: int, setting: dict[str, Any] | None, opacus: bool = False) -> dict[str, float]:
    """One fit; returns wall and CPU seconds, peak memory bytes and the end-of-fit pass's seconds."""
    _, make_data, make_model = workload
    pl.seed_everything(0, verbose=False)
    data = make_data()
    data.setup("fit")
    model = make_model(data)
    if opacus:
        _wrap_with_opacus(model)
    timer = _EndOfFitTimer(device)
    callbacks: list[pl.Callback] = [timer]
    if setting is not None:
        callbacks.append(DiffInCallback(targets={"val": data.val_dataset}, output_dir="/tmp/diffin_overhead", **setting))
    callbacks.append(_EndOfFitStop(timer))
    trainer = _trainer(device, epochs, callbacks)
    with PeakMemory(device) as memory:
        _synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=data)
        _synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "peak": float(memory.peak), "end": timer.seconds if setting is not None else 0.0}


def _wrap_with_opacus(model: pl.LightningModule) -> None:
    """Per-sample gradients on every backward, by Opacus' hooks (what a DP-SGD user pays before clipping)."""
    from opacus import GradSampleModule

    for name in ("net", "encoder", "embed", "head"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            setattr(model, name, GradSampleModule(inner, loss_reduction="mean"))


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def compare(workload: Workload, device: str, epochs: int, repeats: int, settings: dict[str, dict[str, Any] | None], opacus: bool) -> list[str]:
    """Alternate plain and each setting ``repeats`` times; one table row per setting."""
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    labels = ["plain", *settings] + (["Opacus GradSampleModule (no callback)"] if opacus else [])
    fit_once(workload, device, 1, None)  # warm-up: imports, allocator, kernels
    for repeat in range(repeats):
        print(f"  {workload[0]}: repeat {repeat + 1}/{repeats}", flush=True)
        for label in labels:
            if label == "plain":
                runs[label].append(fit_once(workload, device, epochs, None))
            elif label.startswith("Opacus"):
                runs[label].append(fit_once(workload, device, epochs, None, opacus=True))
            else:
                runs[label].append(fit_once(workload, device, epochs, settings[label]))
            run = runs[label][-1]
            print(f"    {label}: wall {run['wall']:.2f} s, cpu {run['cpu']:.2f} s, peak {run['peak'] / 2**20:.0f} MB, end-of-fit {run['end']:.2f} s", flush=True)
    plain = runs["plain"]
    rows = []
    for label in labels[1:]:
        ratio = _median(runs[label], "wall") / _median(plain, "wall")
        cpu_ratio = _median(runs[label], "cpu") / _median(plain, "cpu")
        plain_peak = _median(plain, "peak")
        # A plain fit after the first repeat often grows the resident set by nothing measurable; a ratio
        # over ~0 bytes would be noise, so it is reported only where the plain fit itself needs >= 1 MiB.
        memory_ratio = f"{_median(runs[label], 'peak') / plain_peak:.2f}" if plain_peak >= 2**20 else "n/a"
        end_share = _median(runs[label], "end") / _median(runs[label], "wall")
        spread = (max(r["wall"] for r in runs[label]) - min(r["wall"] for r in runs[label])) / _median(runs[label], "wall")
        rows.append(
            f"| {workload[0]} | {label} | {_median(plain, 'wall'):.2f} | {_median(runs[label], 'wall'):.2f} | **{ratio:.2f}** | "
            f"{cpu_ratio:.2f} | {memory_ratio} | {_median(plain, 'peak') / 2**20:.0f} / {_median(runs[label], 'peak') / 2**20:.0f} | "
            f"{100 * end_share:.0f}% | {100 * spread:.0f}% |"
        )
    return rows


# ---------------------------------------------------------------------- per-part breakdown


@contextlib.contextmanager
def timed_parts(device: str) -> Iterator[dict[str, float]]:
    """Wrap the library's functions with timers (exclusive of nested timed parts)."""
    from diffin_lightning import callback, engine, recorder, targets

    parts: dict[str, float] = defaultdict(float)
    stack: list[str] = []
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            _synchronize(device)
            started = time.perf_counter()
            if stack:
                parts[stack[-1]] -= 0.0  # parent keeps running; nested time is subtracted below
            stack.append(part)
            try:
                result = original(*args, **kwargs)
                if hasattr(result, "__next__"):
                    result = list(result)
                return result
            finally:
                _synchronize(device)
                elapsed = time.perf_counter() - started
                stack.pop()
                parts[part] += elapsed
                if stack:
                    parts[stack[-1]] -= elapsed

        patched.append((owner, name, original))
        setattr(owner, name, timed)

    wrap(callback.DiffInCallback, "on_train_batch_start", "bookkeeping (hooks, ids, checks, accumulation)")
    wrap(callback.DiffInCallback, "on_before_optimizer_step", "bookkeeping (hooks, ids, checks, accumulation)")
    wrap(targets.DatasetTarget, "target_gradient", "target gradient")
    wrap(engine.CapturedStep, "perturbed", "perturbed pass (forward+backward at theta + eps u, and its f_i)")
    wrap(engine.RecomputedStep, "perturbed", "perturbed pass (forward+backward at theta + eps u, and its f_i)")
    wrap(engine.CapturedStep, "dots", "per-sample dot products at theta")
    wrap(engine.RecomputedStep, "dots", "per-sample dot products at theta")
    wrap(recorder.InfluenceRecorder, "_verify", "first-step check (once)")
    wrap(recorder.InfluenceRecorder, "compute_drift", "end-of-fit pass")
    try:
        yield parts
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def breakdown(workload: Workload, device: str, epochs: int, setting: dict[str, Any]) -> list[str]:
    plain = fit_once(workload, device, epochs, None)
    with timed_parts(device) as parts:
        run = fit_once(workload, device, epochs, setting)
    steps = None
    lines = [
        f"Plain fit {plain['wall']:.2f} s; with the callback {run['wall']:.2f} s (ratio {run['wall'] / plain['wall']:.2f}; "
        "timers add synchronisation, so the parts sum to a little more than the difference).",
        "",
        "| part | seconds | share of the callback's time | per plain fit |",
        "| --- | ---: | ---: | ---: |",
    ]
    total = sum(parts.values())
    for part, seconds in sorted(parts.items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {seconds:.2f} | {100 * seconds / total:.0f}% | {seconds / plain['wall']:.2f}x |")
    del steps
    return lines


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "transformer"], choices=list(workloads()))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--breakdown", default=None, choices=list(workloads()), help="time the callback's parts on this workload")
    parser.add_argument("--one-epoch-end", action="store_true", help="also report the end-of-fit pass for a 1-epoch fit")
    parser.add_argument("--opacus", action="store_true", help="add Opacus GradSampleModule rows (needs the bench extra)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--out", default="benchmarks/results/overhead.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.overhead " + " ".join(
        [f"--device {args.device}", f"--threads {args.threads}", f"--repeats {args.repeats}", f"--epochs {args.epochs}", "--workloads " + " ".join(args.workloads)]
        + (["--settings " + " ".join(f"'{s}'" for s in args.settings)] if args.settings != list(SETTINGS) else [])
        + ([f"--breakdown {args.breakdown}"] if args.breakdown else [])
        + (["--one-epoch-end"] if args.one_epoch_end else [])
        + (["--opacus"] if args.opacus else [])
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# DiffInCallback cost ({device_name}; {args.epochs} epochs; median of {args.repeats}, alternating)",
        "",
        f"Command: `{command}`",
        "",
        "Ratios are with-callback / plain on the same machine in the same process (val target). CPU time is the",
        "process's user+system time. Peak memory: "
        + ("CUDA max_memory_allocated." if args.device == "cuda" else "peak RSS above the level before the fit (MB, plain / with)."),
        "`end-of-fit` is the share of the fit spent in the end-of-fit pass; `spread` is (max - min)/median of the",
        "with-callback wall times (noise).",
        "",
        "| workload | callback | plain s | with s | wall ratio | CPU-time ratio | peak memory ratio | peak MB | end-of-fit | spread |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    settings = {label: SETTINGS[label] for label in args.settings}
    for key in args.workloads:
        workload = workloads()[key]
        try:
            rows = compare(workload, args.device, args.epochs, args.repeats, settings, args.opacus)
        except Exception as error:  # a workload the engine cannot run yet: say so in the table
            rows = [f"| {workload[0]} | all | - | - | fails: {type(error).__name__}: {str(error).splitlines()[0][:160]} | | | | | |"]
        for row in rows:
            print(row, flush=True)
        lines += rows
    if args.one_epoch_end:
        lines += ["", "## The end-of-fit pass in a 1-epoch fit", "", "| workload | fit s | end-of-fit s | share |", "| --- | ---: | ---: | ---: |"]
        for key in args.workloads:
            workload = workloads()[key]
            with contextlib.suppress(Exception):
                run = fit_once(workload, args.device, 1, SETTINGS["Diff-In (defaults)"])
                lines.append(f"| {workload[0]} | {run['wall']:.2f} | {run['end']:.2f} | {100 * run['end'] / run['wall']:.0f}% |")
                print(lines[-1], flush=True)
    if args.breakdown:
        workload = workloads()[args.breakdown]
        lines += ["", f"## Where the time goes: {workload[0]}, Diff-In (defaults), {args.epochs} epochs", ""]
        lines += breakdown(workload, args.device, args.epochs, SETTINGS["Diff-In (defaults)"])
        print("\n".join(lines[-12:]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
