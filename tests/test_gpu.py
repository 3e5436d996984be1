"""On a CUDA device the callback computes where the model lives and agrees with the CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


@pytest.mark.gpu
def test_cuda_scores_match_cpu_scores(tmp_path, tiny_data):
    results = {}
    for accelerator in ("cpu", "cuda"):
        callback = DiffInCallback(targets={"val": tiny_data.val, "train": "train", "self": "self"}, eps=1e-6)
        model = TinyClassifier().double()
        trainer(default_root_dir=tmp_path / accelerator, accelerator="gpu" if accelerator == "cuda" else "cpu", max_epochs=2, callbacks=[callback]).fit(
            model, tiny_data.loader()
        )
        assert all(t.device.type == accelerator for sums in callback._sums.values() for t in sums.values())
        results[accelerator] = callback.influence
    for name in results["cpu"]:
        for component in ("first_order", "second_order", "diffin", "visits"):
            torch.testing.assert_close(results["cuda"][name].component(component), results["cpu"][name].component(component), rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("refresh", [100, 2], ids=["one refresh", "refresh every 2 steps, damped"])
def test_recorded_steps_after_the_first_never_synchronise_with_the_host(tmp_path, tiny_data, refresh):
    """eps, |g_V|, the curvature and the propagation factor stay on the device: CUDA's sync debug mode raises
    on any host synchronisation inside the callback's per-step hooks after the first step (which checks once),
    the batch start's too (where a refresh before the forward runs), refreshes and their extrapolation included."""

    def strict_after_the_first_step(hook):
        def watched(self, trainer, *args):
            if trainer.global_step > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(self, trainer, *args)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return watched

    class Strict(DiffInCallback):
        on_before_optimizer_step = strict_after_the_first_step(DiffInCallback.on_before_optimizer_step)
        on_train_batch_start = strict_after_the_first_step(DiffInCallback.on_train_batch_start)

    callback = Strict(
        targets={"val": tiny_data.val, "train": "train", "self": "self"}, target_refresh_every_n_steps=refresh,
        target_extrapolation="damped" if refresh == 2 else None,
    )
    trainer(default_root_dir=tmp_path, accelerator="gpu", max_epochs=2, callbacks=[callback]).fit(TinyClassifier().double(), tiny_data.loader())
    assert callback._recorder.use_capture and callback.steps_recorded == 8


@pytest.mark.gpu
def test_steps_with_nan_losses_are_skipped_without_synchronising(tmp_path, tiny_data):
    """The device gates of a faulty step (NaN per-sample losses) under CUDA's sync debug mode: skipped and counted
    as on the CPU (tests/test_nonfinite.py), with no host synchronisation in the callback's per-step hook."""
    from test_nonfinite import FaultyClassifier, _faults_in_batches

    class Strict(DiffInCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            finally:
                torch.cuda.set_sync_debug_mode(0)

    class OnDevice(FaultyClassifier):
        """The faults' ids moved to the GPU once (a tensor built from a list per call would copy it each time)."""

        def on_fit_start(self):
            self._on_device = {step: torch.tensor(ids, dtype=torch.long, device=self.device) for step, ids in self.nan_loss.items()}
            self._none = torch.empty(0, dtype=torch.long, device=self.device)

        def _mask(self, faults, batch):
            return torch.isin(batch["index"], self._on_device.get(self.global_step, self._none))

    faults = _faults_in_batches(tiny_data, steps=[1, 4, 6], per_step=2)
    callback = Strict(targets={"val": tiny_data.val, "train": "train", "self": "self"}, target_refresh_every_n_steps=100)
    trainer(default_root_dir=tmp_path, accelerator="gpu", max_epochs=2, callbacks=[callback]).fit(OnDevice(nan_loss=faults).double(), tiny_data.loader())
    assert callback.nonfinite_steps_skipped == {"val": 3, "train": 3}
    assert callback.nonfinite_samples_skipped == {"self": 6}


def _encoder_products_match_each_samples_own_gradient(device: str, dtype: torch.dtype, backend, rtol: float, monkeypatch) -> None:
    """A TransformerEncoder's captured per-sample products, with SDPA restricted to ``backend`` (the fused
    kernel it trains with; SDPA raises if that kernel cannot run), equal a loop over samples on the same
    device and kernel; self-attention's projections come from the call's graph (nothing recomputed)."""
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.attention import sdpa_kernel

    from diffin_lightning.dots import LayerCapture, rules
    from dots_reference import per_sample_gradients_by_loop, rows_of

    recomputed = []
    core = rules.MultiheadAttentionRule._self_attention_core
    monkeypatch.setattr(rules.MultiheadAttentionRule, "_self_attention_core", staticmethod(lambda *a: recomputed.append(1) or core(*a)))
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    model = nn.ModuleDict({"encoder": nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), "head": nn.Linear(64, 3)}).to(device, dtype)
    x = torch.randn(6, 16, 64, device=device, dtype=dtype)
    targets = torch.randint(0, 3, (6,), device=device)

    def losses(inputs):
        return F.cross_entropy(model["head"](model["encoder"](inputs).mean(1)).float(), targets[rows_of(x, inputs)], reduction="none")

    names = [n for n, _ in model.named_parameters()]
    with sdpa_kernel(backend), LayerCapture(model, names) as capture:
        with capture.recording():
            losses(x).sum().backward()
        per_sample = capture.per_sample()
        direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        got = per_sample.dots([direction])[0].float()
        reference = per_sample_gradients_by_loop(model, losses, x, names)
    expected = sum((reference[n].flatten(1).float() @ direction[n].flatten().float()) for n in names)
    assert capture.uncovered_parameter_names == ()
    assert not recomputed
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_encoder_products_under_the_cpu_flash_kernel(monkeypatch):
    """The check the CUDA kernels below run, on the CPU's own fused kernel (float32 flash attention)."""
    from torch.nn.attention import SDPBackend

    _encoder_products_match_each_samples_own_gradient("cpu", torch.float32, SDPBackend.FLASH_ATTENTION, 1e-4, monkeypatch)


def _gpt2_products_match_each_samples_own_gradient(device: str, dtype: torch.dtype, backend, rtol: float) -> None:
    """A Hugging Face GPT-2 (its Conv1D projections, SDPA attention restricted to ``backend``): every parameter's
    per-sample products from the registry equal a loop over samples on the same device and kernel."""
    from torch.nn import functional as F
    from torch.nn.attention import sdpa_kernel

    from diffin_lightning.dots import LayerCapture
    from dots_reference import per_sample_gradients_by_loop
    from test_dots_capture import _gpt2

    model = _gpt2(dtype, width=64, heads=4, vocab=80, device=device)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 80, (6, 12), device=device)

    def losses(tokens):
        logits = model(input_ids=tokens).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(tokens.shape[0], -1).mean(1)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with sdpa_kernel(backend), LayerCapture(model, names) as capture:
        with capture.recording():
            losses(ids).sum().backward()
        per_sample = capture.per_sample()
        direction = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
        got = per_sample.dots([direction])[0].float()
        reference = per_sample_gradients_by_loop(model, losses, ids, names)
    expected = sum((reference[n].flatten(1).float() @ direction[n].flatten().float()) for n in names)
    assert capture.uncovered_parameter_names == ()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_gpt2_products_under_the_cpu_flash_kernel():
    """GPT-2 as it trains in float32 on the CPU: SDPA's flash kernel (tests/test_dots_capture checks float64, the math kernel)."""
    from torch.nn.attention import SDPBackend

    _gpt2_products_match_each_samples_own_gradient("cpu", torch.float32, SDPBackend.FLASH_ATTENTION, 1e-4)


@pytest.mark.gpu
def test_gpt2_products_on_cuda_under_the_efficient_kernel():
    from torch.nn.attention import SDPBackend

    _gpt2_products_match_each_samples_own_gradient("cuda", torch.float32, SDPBackend.EFFICIENT_ATTENTION, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["efficient", "flash"])
def test_encoder_products_on_cuda_under_fused_attention(kernel, monkeypatch):
    """CUDA's memory-efficient kernel (float32) and flash kernel (half precision only: float16, checked to
    half precision's accuracy) for the transformer encoder that the overhead benchmark trains."""
    from torch.nn.attention import SDPBackend

    backend, dtype, rtol = {
        "efficient": (SDPBackend.EFFICIENT_ATTENTION, torch.float32, 1e-4),
        "flash": (SDPBackend.FLASH_ATTENTION, torch.float16, 5e-2),
    }[kernel]
    _encoder_products_match_each_samples_own_gradient("cuda", dtype, backend, rtol, monkeypatch)


@pytest.mark.gpu
def test_the_fused_finiteness_check_is_the_default_on_cuda_and_agrees_with_the_elementwise_test():
    """On CUDA the per-step check takes the foreach norm (one launch per dtype): NaN and infinities found in every
    dtype a model may hold, finite values not flagged, the verdict a device flag read back only here."""
    from diffin_lightning.finite import _float32_sums, finite_flag

    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for bad in (None, float("nan"), float("inf")):
        for where in range(len(dtypes)):
            tensors = [torch.randn(300, 7, device="cuda").to(dtype) for dtype in dtypes]
            if bad is not None:
                tensors[where][123, 4] = bad
            fused, summed = _float32_sums(tensors), _float32_sums(tensors, fused=False)
            assert fused.device.type == "cuda" and fused.shape == summed.shape
            assert bool(torch.isfinite(fused).all()) == bool(torch.isfinite(summed).all()) == (bad is None)
            flag = finite_flag(tensors)
            assert flag.device.type == "cuda" and bool(flag) == (bad is None)
