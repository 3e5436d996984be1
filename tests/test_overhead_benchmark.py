"""The overhead benchmark's measurement: peak memory in a fresh process sees what a fit allocates."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from benchmarks.overhead import FitSpec, _ClearGradSamples, _trainer, _why, _wrap_with_opacus, fit_in_subprocess
from benchmarks.peak_memory import PeakMemory
from diffin_lightning.bundled import MLPClassifier, SyntheticDataModule

MiB = 2**20


def test_a_fit_holding_64_mib_more_peaks_at_least_60_mib_higher() -> None:
    # Two real fits, each in its own process (the benchmark's path): the second holds a touched
    # 64 MiB tensor from on_train_start to on_train_end. A measurement that missed growth (the
    # in-process "n/a" it replaces) or counted the warm-up would fail one of the bounds.
    # This process holds 512 MiB more than the fits need while it spawns them: a kernel figure
    # that inherits the parent's size at exec (ru_maxrss does) would read the same for both.
    ballast = torch.ones(512 * MiB // 4)
    plain = fit_in_subprocess(FitSpec("cnn", "cpu", epochs=1, threads=1))
    held = fit_in_subprocess(FitSpec("cnn", "cpu", epochs=1, threads=1, extra_mb=64))
    del ballast
    assert 60 * MiB <= held["peak"] - plain["peak"] <= 72 * MiB, (plain["peak"] / MiB, held["peak"] / MiB)
    assert plain["peak"] > 0  # a fit allocates something: gradients, activations, batches
    if plain["peak_kernel"] is not None:  # the kernel's VmHWM agrees where its mark can be reset
        assert 60 * MiB <= held["peak_kernel"] - plain["peak_kernel"] <= 72 * MiB
        assert abs(held["peak_kernel"] - held["peak"]) <= 4 * MiB


def test_peak_memory_counts_a_touched_block_and_not_a_freed_one() -> None:
    before = torch.ones(32 * MiB // 4)
    del before  # freed before the region: must not be in its figure
    with PeakMemory("cpu") as memory:
        block = torch.ones(32 * MiB // 4)
        time.sleep(0.05)  # the sampler reads every 2 ms: a shorter spike may be missed (VmHWM would not)
        del block
    assert 30 * MiB <= memory.sampled <= 40 * MiB
    if memory.kernel is not None:
        assert 30 * MiB <= memory.kernel <= 40 * MiB


def test_peak_memory_rejects_an_unknown_device() -> None:
    with pytest.raises(ValueError, match="`device` must be 'cpu' or 'cuda'; got 'tpu'"):
        PeakMemory("tpu")


def test_a_failed_fit_is_reported_in_one_line() -> None:
    stderr = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n"
    assert _why(1, stderr) == "torch.OutOfMemoryError: CUDA out of memory."
    assert _why(-9, "") == "killed by signal 9 (SIGKILL: out of memory?)"
    assert _why(75, "PeakMemory: the resident set grew by 9000 MiB, over ...\n").startswith("PeakMemory:")


def _opacus_fit(clear: bool) -> nn.Module:
    pl.seed_everything(0, verbose=False)
    data = SyntheticDataModule(num_samples=48, dim=8, num_classes=3, batch_size=16)
    data.setup("fit")
    model = MLPClassifier(**data.model_kwargs(), hidden_dims=(4,))
    _wrap_with_opacus(model)
    trainer = _trainer("cpu", 1, [_ClearGradSamples()] if clear else [])
    trainer.fit(model, datamodule=data)
    return model.net


def test_opacus_grad_samples_are_cleared_each_step_as_dp_optimizer_does() -> None:
    pytest.importorskip("opacus")
    # Without the callback a plain optimizer leaves p.grad_sample, and Opacus appends every
    # step's per-sample gradients to a list (3 steps: 3 entries): the memory leak of the MLP row.
    leaked = _opacus_fit(clear=False)
    assert all(isinstance(p.grad_sample, list) and len(p.grad_sample) == 3 for p in leaked.parameters())
    cleared = _opacus_fit(clear=True)
    assert all(isinstance(p.grad_sample, torch.Tensor) and p.grad_sample.shape[0] == 16 for p in cleared.parameters())


def test_the_breakdown_times_every_part_of_a_diffin_step(tmp_path) -> None:
    # The parts are timed by wrapping the engine's methods: a method the step no longer calls would
    # silently move its time into "bookkeeping" (the perturbed pass did once, when the step moved to
    # perturbed_along).
    from benchmarks.overhead import timed_parts
    from diffin_lightning import DiffInCallback

    torch.manual_seed(0)
    data = SyntheticDataModule(num_samples=64, dim=8, num_classes=3, batch_size=16)
    model = MLPClassifier(**data.model_kwargs(), hidden_dims=(16,))
    callback = DiffInCallback(targets={"val": data.val_dataset}, output_dir=tmp_path)
    with timed_parts("cpu") as parts:
        _trainer("cpu", 2, [callback]).fit(model, datamodule=data)
    for part in ("perturbed pass", "per-sample dot products at theta", "f_i = <G_B, G_i> at theta", "target gradient", "end-of-fit pass"):
        assert any(name.startswith(part) and seconds > 0 for name, seconds in parts.items()), (part, dict(parts))


@pytest.mark.slow
def test_the_ddp_benchmark_times_a_two_process_fit_with_and_without_the_callback() -> None:
    """Each DDP fit runs in a fresh process pair and reports rank zero's time after the warm-up epoch (about 25 s)."""
    from benchmarks.overhead_ddp import DDPFitSpec
    from benchmarks.overhead_ddp import fit_in_subprocess as ddp_fit_in_subprocess

    plain = ddp_fit_in_subprocess(DDPFitSpec("mlp", 1, None), timeout=300)
    with_callback = ddp_fit_in_subprocess(DDPFitSpec("mlp", 1, "first order (defaults)"), timeout=300)
    assert 0 < plain < 60 and 0 < with_callback < 60
    with pytest.raises(RuntimeError, match="failed"):  # a setting the benchmark does not know ends the fit with its error
        ddp_fit_in_subprocess(DDPFitSpec("mlp", 1, "no such setting"), timeout=300)
