"""On a device without float64 (Apple's MPS) nothing the callback computes there is float64.

A float64 tensor on MPS raises where it is made ("Cannot convert a MPS Tensor to float64
dtype"), so every sum or norm the library widens goes through ``precision.widest_float``.
CI has no MPS: these tests make the CPU stand in for it (``widest_float`` answers float32 for
every device) and watch, op by op, for a float64 result issued from the library's code during
a fit. The results are built on the host in float64 by contract (``results.py``, ``store.py``,
after ``.to("cpu", float64)``, which MPS's copy to the host converts): those are not watched.
"""

from __future__ import annotations

import collections
import os
import traceback

import pytest

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffin_lightning import DiffInCallback, precision
from diffin_lightning.precision import widened, widest_float
from helpers import TinyClassifier, TinyData, trainer

# Host-side result building: CPU float64 by contract (the scores, their files).
_HOST_RESULTS = ("results.py", "store.py", "tensor_file.py")


def test_widest_float_is_float64_except_on_mps():
    assert widest_float("cpu") is torch.float64
    assert widest_float(torch.device("cuda", 0)) is torch.float64
    assert widest_float("mps") is torch.float32
    assert widest_float(torch.device("mps:0")) is torch.float32
    assert widened(torch.ones(2, dtype=torch.float32)).dtype is torch.float64


class _Float64Made(TorchDispatchMode):
    """Counts ops with a float64 result issued from this library's code (innermost frame outside torch),
    except under the host-side result building (``_HOST_RESULTS`` anywhere on the stack)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(r, torch.Tensor) and r.dtype == torch.float64 for r in results):
            stack = traceback.extract_stack()[:-1]
            issuer = next((f for f in reversed(stack) if f"{os.sep}torch{os.sep}" not in f.filename), None)
            host_results = any(f.filename.endswith(_HOST_RESULTS) for f in stack if "diffin_lightning" in f.filename)
            if issuer is not None and "diffin_lightning" in issuer.filename and not host_results:
                self.where[f"{issuer.filename.split('diffin_lightning')[-1]}:{issuer.lineno} {func}"] += 1
        return out


@pytest.fixture
def no_float64_device(monkeypatch):
    """The CPU standing in for MPS: the library's widest float is float32 everywhere."""
    monkeypatch.setattr(precision, "widest_float", lambda device: torch.float32)
    monkeypatch.setattr("diffin_lightning.callback.widest_float", lambda device: torch.float32)


class _ScaledClassifier(TinyClassifier):
    """An elementwise scale no capture rule covers: its parameter goes through the functional fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](x)) * self.scale)


@pytest.mark.parametrize(
    "model, setting",
    [
        (TinyClassifier, dict()),
        (TinyClassifier, dict(target_refresh_every_n_steps=2, finite_difference="central")),
        (TinyClassifier, dict(second_order="paper")),
        (_ScaledClassifier, dict()),
    ],
    ids=["defaults", "damped-refresh-central", "paper", "functional-fallback"],
)
def test_a_float32_fit_makes_no_float64_tensor_where_the_device_lacks_float64(tmp_path, no_float64_device, model, setting):
    data = TinyData.make(num_train=16, num_val=6, seed=0, dtype=torch.float32)
    callback = DiffInCallback(targets={"val": data.val, "train": "train", "self": "self"}, **setting)
    with _Float64Made() as watch:
        trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[callback], precision="32-true").fit(model(), data.loader())
    assert callback.steps_recorded == 8
    assert watch.where == {}, dict(watch.where)
    scores = callback.influence.targets["val"].diffin
    assert scores.dtype is torch.float64 and bool(torch.isfinite(scores).all())


def test_the_watch_sees_float64_made_on_the_device(no_float64_device):
    """Without the stand-in, the fit above makes float64 tensors (the watch is not blind)."""
    with _Float64Made() as watch:
        from diffin_lightning.engine import relative_difference

        relative_difference({"w": torch.ones(3)}, {"w": torch.zeros(3)})  # through widened: float32 here
    assert watch.where == {}
    with _Float64Made() as watch:
        from diffin_lightning.accumulator import InfluenceAccumulator

        InfluenceAccumulator(["val"], num_samples=4, device=torch.device("cpu"), dtype=torch.float64)
    assert watch.where and all(key.startswith("/accumulator.py:") for key in watch.where), dict(watch.where)


def test_finite_difference_fallback_makes_no_float64_tensor(no_float64_device):
    from diffin_lightning.dots.functional import functional_dots

    w = torch.tensor([1.0, 2.0])
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    with _Float64Made() as watch:
        dots = functional_dots(lambda p: F.softplus(x @ p["w"]), {"w": w}, [{"w": torch.ones(2)}], method="finite_difference")
    assert watch.where == {}, dict(watch.where)
    exact = torch.sigmoid(x @ w) * (x @ torch.ones(2))
    torch.testing.assert_close(dots[0], exact, rtol=1e-3, atol=1e-3)
