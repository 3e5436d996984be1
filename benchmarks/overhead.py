"""Cost of DiffInCallback: time and peak memory with and without it, fits alternating side by side.

    python -m benchmarks.overhead [--device cpu|cuda] [--repeats 3] [--epochs 4] \
        [--workloads mlp cnn transformer] [--settings ...] [--breakdown mlp] [--opacus] \
        [--in-process] [--out benchmarks/results/overhead.md]

For each workload the plain fit and the fits with the callback alternate, ``repeats`` times
(plain, setting 1, setting 2, ..., plain, setting 1, ...); the table gives medians of wall
time and CPU time and the ratios callback/plain, the peak memory ratio, and the end-of-fit
pass's share of the fit.

Every measured fit runs in a fresh process (this module with ``--one-fit``): a 1-epoch
warm-up fit of the same configuration, then the measured fit, whose peak memory is its
growth above the level just before ``trainer.fit`` (see ``benchmarks/peak_memory.py``; in
one long process the allocator reuses what earlier fits freed, and a plain fit then grows
the resident set by nothing measurable). ``--in-process`` keeps the earlier method (all
fits in this process, time only). On CUDA the memory is ``torch.cuda.max_memory_allocated``
and every timed region is bracketed by ``torch.cuda.synchronize``. ``--breakdown`` times the
parts of the callback (target gradient, perturbed pass, dot products, end-of-fit pass,
bookkeeping) on one workload by wrapping the library's functions with timers (in this
process). ``--opacus`` adds Opacus' ``GradSampleModule`` (per-sample gradients by hooks, the
cost users know) on the same models, with no DiffInCallback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from benchmarks.peak_memory import PeakMemory
from diffin_lightning import DiffInCallback
from diffin_lightning.bundled import CNNClassifier, DigitsDataModule, MLPClassifier, SyntheticDataModule
from diffin_lightning.bundled.datamodule import ClassificationDataModule

SETTINGS: dict[str, dict[str, Any]] = {
    "first order (defaults)": dict(compute_second_order=False),
    "Diff-In (defaults)": dict(),
    "Diff-In, every 10 steps": dict(every_n_steps=10),
    "Diff-In, target every step (old default)": dict(target_refresh_every_n_steps=1, target_max_samples=None),
    # The defaults before g_V was extrapolated (damped) between refreshes: what the extrapolation costs.
    "Diff-In, g_V held between refreshes": dict(target_extrapolation="none"),
    "first order, g_V held between refreshes": dict(compute_second_order=False, target_extrapolation="none"),
    # On a GPU a small model's step is bound by the operations issued: the default refreshes 1,024 target
    # samples in batches of the training micro-batch (8 on the 4x256 encoder); one batch issues an eighth
    # of the refresh's operations for eight times its activations. Not in the default list: run it by name.
    "first order, target in one batch of 1,024 (GPU lever)": dict(compute_second_order=False, target_batch_size=1024),
    # One recomputed full-precision forward+backward per recorded step instead of the training step's captures: the
    # path every mixed-precision step took before bf16-mixed first-order steps read their own (--precision bf16-mixed).
    "first order, recomputed per step": dict(compute_second_order=False, reuse_training_step=False),
}
# What a run measures unless --settings says otherwise (the GPU lever's and the recomputation's rows are asked for by name).
DEFAULT_SETTINGS = [name for name in SETTINGS if "GPU lever" not in name and "recomputed per step" not in name]


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


class GPT2LanguageModel(pl.LightningModule):
    """A Hugging Face ``GPT2LMHeadModel`` trained on its own next-token loss, one loss per sequence.

    The per-sample loss is the mean token cross-entropy of a sequence; the attention runs through
    ``scaled_dot_product_attention`` (the "sdpa" implementation: flash or efficient kernels on a GPU).
    """

    def __init__(self, vocab: int = 512, length: int = 32, width: int = 256, layers: int = 4, heads: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        import transformers  # only this workload needs it

        config = transformers.GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=length,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)
        self.lr = lr

    def per_sample_loss(self, batch: dict[str, Any]) -> Tensor:
        tokens = batch["input"]
        logits = self.model(input_ids=tokens).logits
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return losses.view(tokens.shape[0], -1).mean(1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _images(num_samples: int, shape: tuple[int, int, int], seed: int) -> TensorDataset:
    """Gaussian images labelled by a fixed random linear teacher (seed 0), so the splits share one rule."""
    teacher = torch.randn(10, shape[0] * shape[1] * shape[2], generator=torch.Generator().manual_seed(0))
    images = torch.randn(num_samples, *shape, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(images, (images.flatten(1) @ teacher.T).argmax(1))


def image_data(num_samples: int = 8192, shape: tuple[int, int, int] = (3, 32, 32), batch_size: int = 256) -> ClassificationDataModule:
    return ClassificationDataModule(
        train=_images(num_samples, shape, 1), val=_images(2048, shape, 2), test=_images(256, shape, 3),
        num_classes=10, corrupted=None, batch_size=batch_size, shuffle_seed=0,
    )


def _tokens(num_samples: int, vocab: int, length: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (num_samples, length), generator=generator)
    labels = (tokens[:, : length // 2].sum(1) % 10).long()  # a learnable rule of the tokens
    return TensorDataset(tokens, labels)


def token_data(num_samples: int = 4096, batch_size: int = 128, val_samples: int = 1024) -> ClassificationDataModule:
    return ClassificationDataModule(
        train=_tokens(num_samples, 512, 32, 0), val=_tokens(val_samples, 512, 32, 1), test=_tokens(256, 512, 32, 2),
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
        # The same MLP trained hot (lr 3.0): the damped extrapolation's persistence is 0 at every refresh (measured
        # over 8 epochs), the regime where the CPU keeps no slope (targets.persistence_known_zero).
        "mlp_hot": (
            "MLP 256-1024-1024-10, synthetic N=2048, batch 256, lr 3.0 (hot)",
            lambda: SyntheticDataModule(num_samples=2048, dim=256, num_classes=10, batch_size=256),
            lambda data: MLPClassifier(**data.model_kwargs(), hidden_dims=(1024, 1024), lr=3.0),
        ),
        "cnn": (
            "bundled CNN (conv8-conv16) on digits, batch 64",
            lambda: DigitsDataModule(batch_size=64, image=True),
            lambda data: CNNClassifier(**data.model_kwargs()),
        ),
        "transformer": (
            "TransformerEncoder 2x64 (4 heads), 32 tokens, N=1024, |V| = 1,024, batch 128",
            lambda: token_data(num_samples=1024),
            lambda data: TokenClassifier(),
        ),
        # The same model with the validation target a quarter of N, as the MLP's (N/4) and digits' splits are:
        # the workload above validates on |V| = N = 1,024, and a target refresh costs |V| / (k |B|) batches a step.
        "transformer_val_quarter": (
            "TransformerEncoder 2x64 (4 heads), 32 tokens, N=1024, |V| = 256, batch 128",
            lambda: token_data(num_samples=1024, val_samples=256),
            lambda data: TokenClassifier(),
        ),
        # The GPU rows of the issue that asked for this benchmark (a GPU's step is too short for the
        # CPU workloads above to say anything but launch overhead). Too slow for a CPU run.
        "mlp_gpu": (
            "MLP 1024-4096-4096-10 (21M parameters), synthetic N=16384, batch 1024",
            lambda: SyntheticDataModule(num_samples=16384, dim=1024, num_classes=10, batch_size=1024),
            lambda data: MLPClassifier(**data.model_kwargs(), hidden_dims=(4096, 4096)),
        ),
        "cnn_gpu": (
            "CNN conv64-conv128 on synthetic 3x32x32 images, N=8192, batch 256",
            lambda: image_data(),
            lambda data: CNNClassifier(**data.model_kwargs(), channels=(64, 128)),
        ),
        "transformer_gpu": (
            "TransformerEncoder 4x256 (4 heads), 32 tokens, N=4096, batch 128",
            lambda: token_data(num_samples=4096),
            lambda data: TokenClassifier(width=256, layers=4),
        ),
        "gpt2_gpu": (
            "Hugging Face GPT2LMHeadModel 4 layers, 256 wide (sdpa attention), 32 tokens, N=4096, batch 128, per-sequence mean token loss",
            lambda: token_data(num_samples=4096),
            lambda data: GPT2LanguageModel(),
        ),
    }


# ---------------------------------------------------------------------- measurement


def _trainer(device: str, epochs: int, callbacks: list[pl.Callback], gradient_clip_val: float | None = None, precision: str | None = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        gradient_clip_val=gradient_clip_val,
        precision=precision,
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
        self.memory: PeakMemory | None = None
        self.peak_before = 0  # peak memory growth of the fit before the end-of-fit pass

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Registered first, so Lightning calls it before DiffInCallback's on_train_end ...
        _synchronize(self.device)
        if self.memory is not None:
            self.peak_before = self.memory.so_far()
        self.started = time.perf_counter()


class _EndOfFitStop(pl.Callback):
    def __init__(self, timer: _EndOfFitTimer) -> None:
        self.timer = timer

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ... and this one after it.
        _synchronize(self.timer.device)
        self.timer.seconds = time.perf_counter() - self.timer.started


class _HoldMemory(pl.Callback):
    """Holds ``num_bytes`` of touched memory from the start to the end of training (the memory test's known extra)."""

    def __init__(self, num_bytes: int, device: str) -> None:
        self.num_bytes, self.device, self.block = num_bytes, device, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # torch.ones writes every page: torch.empty/zeros pages would not be resident yet.
        self.block = torch.ones(self.num_bytes // 4, dtype=torch.float32, device=self.device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.block = None


class _ClearGradSamples(pl.Callback):
    """Drops Opacus' ``p.grad_sample`` before every zero_grad, as Opacus' own ``DPOptimizer.zero_grad`` does.

    A plain optimizer's zero_grad leaves them, and ``GradSampleModule`` then appends each step's
    per-sample gradients to a growing list (``promote_current_grad_sample``): with the MLP's
    1024x1024 layer at batch 256 that is 1 GiB more per step, which is what exhausted the
    machine's memory in the first attempt at these rows.
    """

    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        from opacus import GradSampleModule

        for module in pl_module.modules():
            if isinstance(module, GradSampleModule):
                module.set_grad_sample_to_none()


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _wrap_with_opacus(model: pl.LightningModule) -> str:
    """Per-sample gradients on every backward by Opacus' hooks (what a DP-SGD user pays before clipping and noise).

    Returns a note for the table: what had to change in the model for Opacus to accept it.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    notes = []
    for name in ("net", "embed", "encoder", "head"):
        inner = getattr(model, name, None)
        if not isinstance(inner, nn.Module):
            continue
        if not ModuleValidator.is_valid(inner):
            # Opacus' documented way: replace each layer it refuses by its registered fixer
            # (nn.MultiheadAttention -> opacus.layers.DPMultiheadAttention, BatchNorm -> GroupNorm).
            before = {type(module) for module in inner.modules()}
            refused = sorted(kind.__name__ for kind in before if kind in ModuleValidator.VALIDATORS)
            inner = ModuleValidator.fix(inner)
            added = sorted(kind.__name__ for kind in {type(module) for module in inner.modules()} - before)
            notes.append(f"{', '.join(refused)} replaced by {', '.join(added)} (opacus.validators.ModuleValidator.fix)")
        setattr(model, name, GradSampleModule(inner, loss_reduction="mean"))
    return "; ".join(notes)


def fit_once(
    workload: Workload,
    device: str,
    epochs: int,
    setting: dict[str, Any] | None,
    opacus: bool = False,
    output_dir: str = "/tmp/diffin_overhead",
    extra_bytes: int = 0,
    memory_limit_bytes: int | None = None,
    extra_callbacks: Sequence[pl.Callback] = (),
    gradient_clip_val: float | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """One fit, timed and measured (``gradient_clip_val``: Lightning's norm clipping, with or without the callback;
    ``precision``: the Trainer's, e.g. 'bf16-mixed', plain and callback fits alike).

    Returns wall and CPU seconds, the end-of-fit pass's seconds, the parameters' bytes and the
    peak memory growth during ``trainer.fit`` above the level just before it (model, data and
    trainer built): ``peak`` (sampled RSS, or CUDA's allocator peak) and ``peak_kernel``
    (the kernel's VmHWM; ``None`` on CUDA or where the kernel's mark cannot be reset).
    """
    _, make_data, make_model = workload
    pl.seed_everything(0, verbose=False)
    data = make_data()
    data.setup("fit")
    model = make_model(data)
    note = _wrap_with_opacus(model) if opacus else ""
    timer = _EndOfFitTimer(device)
    callbacks: list[pl.Callback] = [timer]
    if setting is not None:
        callbacks.append(DiffInCallback(targets={"val": data.val_dataset}, output_dir=output_dir, **setting))
    if opacus:
        callbacks.append(_ClearGradSamples())
    if extra_bytes:
        callbacks.append(_HoldMemory(extra_bytes, device))
    callbacks.append(_EndOfFitStop(timer))
    callbacks += list(extra_callbacks)
    trainer = _trainer(device, epochs, callbacks, gradient_clip_val, precision)
    if device == "cuda":
        model.to(device)  # the parameters are in the baseline on both devices
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with PeakMemory(device, limit_bytes=memory_limit_bytes) as memory:
        timer.memory = memory
        _synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=data)
        _synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall": wall, "cpu": cpu, "end": timer.seconds if setting is not None else 0.0,
        "param_bytes": param_bytes, "peak": memory.sampled, "peak_kernel": memory.kernel, "peak_before_end": timer.peak_before, "note": note,
    }


@dataclass(frozen=True)
class FitSpec:
    """One measured fit, as handed to a fresh process (``--one-fit``, JSON)."""

    workload: str
    device: str
    epochs: int
    threads: int
    setting: str | None = None  # a key of SETTINGS; None: no DiffInCallback
    opacus: bool = False
    extra_mb: int = 0  # hold this much more memory during the fit (the benchmark's own test)
    memory_limit_mb: int = 8192  # end the fit beyond this growth: the machine is shared
    gradient_clip_val: float | None = None  # Lightning's norm clipping, plain and callback fits alike
    precision: str | None = None  # the Trainer's precision (None: its default), plain and callback fits alike


def one_fit(spec: FitSpec, output_dir: str) -> dict[str, Any]:
    """In a fresh process: a 1-epoch warm-up fit of the same configuration, then the measured fit.

    The warm-up makes lazy imports and one-time allocations (kernels, thread pools, the
    callback's first-call set-up) count in neither time nor memory; its freed memory is handed
    back to the kernel before the measured fit's baseline (see PeakMemory).
    """
    torch.set_num_threads(spec.threads)
    workload = workloads()[spec.workload]
    setting = SETTINGS[spec.setting] if spec.setting is not None else None
    clip, precision = spec.gradient_clip_val, spec.precision
    fit_once(
        workload, spec.device, 1, setting, spec.opacus, output_dir=output_dir, memory_limit_bytes=spec.memory_limit_mb * 2**20, gradient_clip_val=clip,
        precision=precision,
    )
    return fit_once(
        workload, spec.device, spec.epochs, setting, spec.opacus, output_dir=output_dir,
        extra_bytes=spec.extra_mb * 2**20, memory_limit_bytes=spec.memory_limit_mb * 2**20, gradient_clip_val=clip, precision=precision,
    )


class FitFailed(RuntimeError):
    """A measured fit's process ended without a result; the message is one line saying why."""


_REPOSITORY = Path(__file__).resolve().parent.parent


def fit_in_subprocess(spec: FitSpec) -> dict[str, Any]:
    """Run ``one_fit`` in a fresh Python process (this module with ``--one-fit``) and return its result."""
    with tempfile.TemporaryDirectory(prefix="diffin_overhead_") as folder:
        result = Path(folder) / "result.json"
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPOSITORY), environment.get("PYTHONPATH")]))
        process = subprocess.run(
            [sys.executable, "-m", "benchmarks.overhead", "--one-fit", json.dumps(asdict(spec)), "--result", str(result), "--output-dir", str(Path(folder) / "run")],
            cwd=_REPOSITORY, env=environment, capture_output=True, text=True,
        )
        if process.returncode != 0 or not result.exists():
            raise FitFailed(_why(process.returncode, process.stderr))
        return json.loads(result.read_text())


def _why(returncode: int, stderr: str) -> str:
    """One line from a failed fit's stderr: the memory limit's message, the exception, or the exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("PeakMemory:") or re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
            return line[:200]
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (SIGKILL: out of memory?)" if returncode == -9 else "")
    return (lines[-1][:200] if lines else "") + f" (exit status {returncode})"


def reproducing_command(
    module: str, arguments: list[str], settings: list[str], default_settings: list[str], out: str, default_out: str, flags: Sequence[str] = ()
) -> str:
    """The command line a results file names: ``arguments``, then ``--settings`` where not the default, ``flags``,
    and ``--out`` where not the default (shared by the cost benchmarks)."""
    return f"python -m {module} " + " ".join(
        arguments
        + (["--settings " + " ".join(f"'{s}'" for s in settings)] if settings != default_settings else [])
        + list(flags)
        + ([f"--out {out}"] if out != default_out else [])
    )


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


OPACUS = "Opacus GradSampleModule (no callback)"


def compare(
    key: str, device: str, epochs: int, repeats: int, threads: int, labels: list[str], opacus: bool, in_process: bool,
    gradient_clip_val: float | None = None,
    precision: str | None = None,
) -> list[str]:
    """Alternate plain and each setting ``repeats`` times; one table row per setting.

    Each fit runs in a fresh process (``in_process=False``: time and memory), or all in this
    process after one warm-up fit (``in_process=True``: time only, the earlier method).
    """
    workload = workloads()[key]
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    failed: dict[str, str] = {}
    order = ["plain", *labels] + ([OPACUS] if opacus else [])
    if in_process:
        fit_once(workload, device, 1, None, gradient_clip_val=gradient_clip_val, precision=precision)  # warm-up: imports, allocator, kernels
    for repeat in range(repeats):
        print(f"  {workload[0]}: repeat {repeat + 1}/{repeats}", flush=True)
        for label in order:
            if label in failed:
                continue
            setting = None if label in ("plain", OPACUS) else label
            try:
                if in_process:
                    run = fit_once(workload, device, epochs, SETTINGS[setting] if setting else None, label == OPACUS, gradient_clip_val=gradient_clip_val, precision=precision)
                    run["peak"] = run["peak_kernel"] = run["peak_before_end"] = None  # the allocator reuses what earlier fits freed
                else:
                    run = fit_in_subprocess(FitSpec(key, device, epochs, threads, setting, label == OPACUS, gradient_clip_val=gradient_clip_val, precision=precision))
            except Exception as error:  # FitFailed (from the fresh process) or any error of this one
                if label == "plain":
                    raise
                failed[label] = str(error).splitlines()[0][:200] if isinstance(error, FitFailed) else f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                print(f"    {label}: fails: {failed[label]}", flush=True)
                continue
            runs[label].append(run)
            peak = "n/a" if run["peak"] is None else f"{run['peak'] / 2**20:.1f} MB (VmHWM {_mb(run['peak_kernel'])})"
            print(f"    {label}: wall {run['wall']:.2f} s, cpu {run['cpu']:.2f} s, peak growth {peak}, end-of-fit {run['end']:.2f} s", flush=True)
    return [_row(workload[0], label, runs["plain"], runs[label], failed.get(label)) for label in order[1:]]


def _mb(num_bytes: float | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def _row(name: str, label: str, plain: list[dict[str, Any]], runs: list[dict[str, Any]], failure: str | None) -> str:
    note = next((run["note"] for run in runs if run.get("note")), "")
    title = f"{label}: {note}" if note else label
    if failure is not None:
        return f"| {name} | {title} | {_median(plain, 'wall'):.2f} | - | fails: {failure} | | | | | | | | |"
    ratio = _median(runs, "wall") / _median(plain, "wall")
    cpu_ratio = _median(runs, "cpu") / _median(plain, "cpu")
    end_share = _median(runs, "end") / _median(runs, "wall")
    spread = (max(r["wall"] for r in runs) - min(r["wall"] for r in runs)) / _median(runs, "wall")
    params = plain[0]["param_bytes"]
    memory = kernel = before_end = "n/a"
    if plain[0]["peak"] is not None:
        # Training memory = the parameters (in the baseline, counted exactly) + the fit's peak growth.
        growth_plain, growth_with = _median(plain, "peak"), _median(runs, "peak")
        memory = f"{_mb(growth_plain)} / {_mb(growth_with)} | **{(params + growth_with) / (params + growth_plain):.2f}**"
        if plain[0]["peak_kernel"] is not None and runs[0]["peak_kernel"] is not None:
            kernel_plain, kernel_with = _median(plain, "peak_kernel"), _median(runs, "peak_kernel")
            kernel = f"{_mb(kernel_plain)} / {_mb(kernel_with)} ({(params + kernel_with) / (params + kernel_plain):.2f})"
        before_end = _mb(_median(runs, "peak_before_end"))
    else:
        memory = "n/a | n/a"
    return (
        f"| {name} | {title} | {_median(plain, 'wall'):.2f} | {_median(runs, 'wall'):.2f} | **{ratio:.2f}** | {cpu_ratio:.2f} | "
        f"{_mb(params)} | {memory} | {kernel} | {before_end} | {100 * end_share:.0f}% | {100 * spread:.0f}% |"
    )


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
    # The in-run step calls perturbed_along (which may call perturbed: nested time stays under the same part).
    for method in ("perturbed_along", "perturbed"):
        wrap(engine.CapturedStep, method, "perturbed pass (forward+backward at theta + eps u, and its f_i)")
        wrap(engine.RecomputedStep, method, "perturbed pass (forward+backward at theta + eps u, and its f_i)")
    wrap(engine.CapturedStep, "dots", "per-sample dot products at theta")
    wrap(engine.CapturedStep, "gradient_dots", "f_i = <G_B, G_i> at theta")
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
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    parser.add_argument("--breakdown", default=None, choices=list(workloads()), help="time the callback's parts on this workload")
    parser.add_argument("--one-epoch-end", action="store_true", help="also report the end-of-fit pass for a 1-epoch fit")
    parser.add_argument("--opacus", action="store_true", help="add Opacus GradSampleModule rows (needs the bench extra)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--in-process", action="store_true", help="all fits in this process (the earlier method): time only, no memory figures")
    parser.add_argument(
        "--gradient-clip-val", type=float, default=None, help="Lightning's norm clipping in every fit (plain and callback): what clipping costs the callback"
    )
    parser.add_argument(
        "--precision", default=None, help="the Trainer's precision in every fit, plain and callback (e.g. bf16-mixed): what mixed precision costs the callback"
    )
    parser.add_argument("--out", default="benchmarks/results/overhead.md")
    parser.add_argument("--one-fit", default=None, help=argparse.SUPPRESS)  # internal: a FitSpec as JSON, run by fit_in_subprocess
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: where --one-fit writes its JSON result
    parser.add_argument("--output-dir", default="/tmp/diffin_overhead", help=argparse.SUPPRESS)  # internal: the callback's run directory
    args = parser.parse_args()
    if args.one_fit is not None:
        if args.result is None:
            parser.error("`--one-fit` needs `--result PATH` (where the JSON result goes); got none.")
        result = one_fit(FitSpec(**json.loads(args.one_fit)), args.output_dir)
        _atomic_write(Path(args.result), json.dumps(result))
        return
    torch.set_num_threads(args.threads)
    command = reproducing_command(
        "benchmarks.overhead",
        [f"--device {args.device}", f"--threads {args.threads}", f"--repeats {args.repeats}", f"--epochs {args.epochs}", "--workloads " + " ".join(args.workloads)],
        args.settings,
        DEFAULT_SETTINGS,
        args.out,
        "benchmarks/results/overhead.md",
        flags=([f"--breakdown {args.breakdown}"] if args.breakdown else [])
        + (["--one-epoch-end"] if args.one_epoch_end else [])
        + (["--opacus"] if args.opacus else [])
        + (["--in-process"] if args.in_process else [])
        + ([f"--gradient-clip-val {args.gradient_clip_val}"] if args.gradient_clip_val is not None else [])
        + ([f"--precision {args.precision}"] if args.precision is not None else []),
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load_at_start, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = "in one process after one warm-up fit" if args.in_process else "each in a fresh process after a 1-epoch warm-up fit of the same configuration"
    lines = [
        f"# DiffInCallback cost ({device_name}; {args.epochs} epochs; median of {args.repeats}, alternating)",
        "",
        f"Command: `{command}`",
        "",
        f"Ratios are with-callback / plain, fits alternating (plain, setting 1, setting 2, ...) {where};",
        "the DiffInCallback's target is the validation set. CPU time is the process's user+system time."
        + ("" if args.gradient_clip_val is None else f" Every fit, plain or not, clips its gradients by norm at {args.gradient_clip_val} (Lightning's gradient_clip_val).")
        + ("" if args.precision is None else f" Every fit, plain or not, trains at precision={args.precision!r}."),
        "`end-of-fit` is the share of the fit spent in the end-of-fit pass; `spread` is (max - min)/median of the",
        "with-callback wall times (noise).",
        "",
        *_memory_header(args.device, args.in_process),
        "",
        "| workload | callback | plain s | with s | wall ratio | CPU-time ratio | params MB | peak growth MB, plain / with | peak memory ratio | kernel VmHWM growth MB, plain / with (ratio) | with: growth before end-of-fit MB | end-of-fit | spread |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key in args.workloads:
        try:
            rows = compare(key, args.device, args.epochs, args.repeats, args.threads, list(args.settings), args.opacus, args.in_process, args.gradient_clip_val, args.precision)
        except Exception as error:  # the plain fit itself failed: say so in the table
            rows = [f"| {workloads()[key][0]} | all | - | - | fails: {type(error).__name__}: {str(error).splitlines()[0][:160]} | | | | | | | | |"]
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
    write_timed_results(args.out, lines, started, load_at_start)


def write_timed_results(out: str, lines: list[str], started: str, load_at_start: tuple[float, float, float]) -> None:
    """Write a timing table's ``lines`` to ``out`` (atomically), when and under what load it ran inserted after its command line."""
    # Timings on a shared machine mean little without the load they were taken under.
    load = f"load average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in load_at_start)} at the start, {' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    lines[3:3] = ["", f"Measured from {started} to {time.strftime('%H:%M UTC', time.gmtime())} on {os.cpu_count()} CPU cores; {load}."]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(out), "\n".join(lines) + "\n")
    print(f"written to {out}")


def _memory_header(device: str, in_process: bool) -> list[str]:
    if in_process:
        return ["Peak memory: not measured (all fits share one process, whose allocator reuses what earlier fits freed)."]
    common = [
        "Peak memory: *training memory* = the parameters' bytes (`params MB`, counted exactly) + the peak growth",
        "during `trainer.fit` above the level just before it, when data, model and Trainer are built (the growth",
        "holds the gradients, optimizer state (none here: SGD without momentum), activations, the current batch,",
        "Lightning's per-fit objects and, with the callback, everything the callback allocates; the training and",
        "target data are already in the baseline and not counted). `peak memory ratio` = training memory with /",
        "plain (medians of the growths). `with: growth before end-of-fit` is the peak growth of the run with the",
        "callback up to the start of on_train_end (the larger of the samples and VmHWM): where it is far below",
        "the run's peak, the end-of-fit pass sets the peak.",
    ]
    if device == "cuda":
        return common + [
            "On CUDA the growth is `torch.cuda.max_memory_allocated()` minus `torch.cuda.memory_allocated()` just",
            "before the fit, with the model already moved to the GPU (tensors only; the caching allocator's reserve",
            "is not counted); the VmHWM column does not apply.",
        ]
    return common + [
        "On CPU the growth is in resident set size: /proc/self/statm sampled every 2 ms by a thread",
        "(`peak growth`), and as a cross-check the kernel's own high-water mark VmHWM (/proc/self/status), reset",
        "at the baseline through /proc/self/clear_refs (exact: it misses no spike). Not `ru_maxrss`: the kernel",
        "raises it at exec to the spawning parent's RSS and at every thread exit, and clear_refs does not reset",
        "that part. Before the baseline, garbage is collected and `malloc_trim(0)` returns the warm-up's freed",
        "heap pages to the kernel, so memory the measured fit needs shows as growth instead of being reused silently.",
    ]


if __name__ == "__main__":
    main()
