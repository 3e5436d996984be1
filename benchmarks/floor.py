"""The arithmetic floor of each callback setting: what its unavoidable passes cost with nothing else around them.

    python -m benchmarks.floor [--device cpu|cuda] [--workloads mlp cnn transformer] [--repeats 5] [--epochs 4] \
        [--threads 2] [--bfloat16] [--out benchmarks/results/floor.md]

Issue 7 asks for wall-time ratios (first order <= 1.3x on the MLP, ...). Whether a ratio is
reachable at all by an exact implementation of the estimator at the default schedule is a
question about the passes the maths needs, not about this library's code. So each *floor* row
below is a plain fit plus a bare callback (:class:`FloorCallback`, plain autograd, no hooks, no
checks, no accumulation, nothing stored) that runs only those passes, at the schedule the real
callback's defaults give:

- **the target gradient** (first order and Diff-In): every ``target_refresh_every_n_steps``
  recorded steps, a forward and a full backward over the target set (at most
  ``target_max_samples``, in batches of the training micro-batch, collated once on the device,
  as ``cache_target_on_device`` does), the gradients summed in place;
- **the first-order products** ``<g_V, G_i>``: one forward of the step's batch without a graph,
  at the step's parameters. A Linear layer's direct-form product ``sum_p delta_ip^T V a_ip``
  is one matrix product of its forward's size, and so is a convolution's; the forward stands in
  for them (it also runs the activations and, on the transformer, the attention scores, which
  no product needs; it leaves out capturing the layers' inputs and output gradients);
- **the perturbed pass** (Diff-In): the step's batch forward at ``theta + eps u`` and a backward
  that computes the layers' input gradients and no weight gradient but the first layer's (the
  engine's Gram-form layers skip theirs), the parameters shifted and restored in place. The
  products ``f_i`` at both points and ``<eps u, G_i>`` are left out: a lower bound;
- **the end-of-fit pass** (Diff-In): the target gradient once more, then one forward and
  input-gradient backward over the training set (its two directions' products left out).

Next to them, in the same process and alternating with them (plain, floors, callback settings,
plain, ...; a 1-epoch warm-up of each first), the real DiffInCallback with the same settings. A
floor above a target means no exact implementation at that schedule meets it; the callback's
distance from its floor is what its own code costs (hooks, checks, bookkeeping, the products
the floor leaves out). ``--bfloat16`` adds floors whose target gradient and products run under
``torch.autocast`` in bfloat16 (an approximation the callback does not make: does lower
precision move the floor under a target?). Time only: no memory figures. On CUDA every fit is
bracketed by synchronisation (``benchmarks.overhead.fit_once``); there a small model's step is
bound by the operations the host issues, and the floor issues far fewer than the callback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from benchmarks.overhead import SETTINGS, fit_once, reproducing_command, workloads, write_timed_results
from diffin_lightning.data import IndexedDataset
from diffin_lightning.settings import DEFAULT_TARGET_MAX_SAMPLES, DEFAULT_TARGET_REFRESH_EVERY_N_STEPS


class FloorCallback(pl.Callback):
    """Only the passes an exact implementation of a setting cannot skip (see the module docstring).

    Args:
        second_order: also the perturbed pass each recorded step and the end-of-fit pass.
        every_n_steps: record every n-th optimizer step (the callback's ``every_n_steps``).
        refresh_every_n_steps: recompute g_V at a recorded step once this many optimizer steps have passed
            since the last refresh (the callback's ``target_refresh_every_n_steps``).
        max_target_samples: at most this many target samples per refresh (the first ones: a floor
            need not draw the callback's seeded subset, only pass over as many samples).
        low_precision: run the target gradient and the products under bfloat16 autocast.

    ``counts`` says what ran (refreshes, target samples, product forwards, perturbed passes,
    end-of-fit samples), so a test can hold the floor to the schedule it claims.
    """

    def __init__(
        self,
        second_order: bool,
        every_n_steps: int = 1,
        refresh_every_n_steps: int = DEFAULT_TARGET_REFRESH_EVERY_N_STEPS,
        max_target_samples: int | None = DEFAULT_TARGET_MAX_SAMPLES,
        low_precision: bool = False,
    ) -> None:
        self.second_order, self.every_n_steps = second_order, every_n_steps
        self.refresh_every_n_steps, self.max_target_samples = refresh_every_n_steps, max_target_samples
        self.low_precision = low_precision
        self.counts = {"refreshes": 0, "target samples": 0, "product forwards": 0, "perturbed passes": 0, "end-of-fit samples": 0}
        self._target_batches: list[Any] = []
        self._target_size = 0
        self._target_gradient: list[Tensor] = []
        self._last_refresh: int | None = None
        self._batch: Any = None
        self._device_type = "cpu"
        self._shift_scale = 0.0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self._device_type, dtype=torch.bfloat16) if self.low_precision else contextlib.nullcontext()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        target = IndexedDataset(datamodule.val_dataset)  # the callback's batches of a target: dictionaries
        if self.max_target_samples is not None and len(target) > self.max_target_samples:
            target = Subset(target, range(self.max_target_samples))
        batch_size = datamodule.batch_size
        device = pl_module.device
        self._device_type = device.type
        # Collated once and kept on the device, as cache_target_on_device=True does.
        self._target_batches = [pl_module.transfer_batch_to_device(batch, device, 0) for batch in DataLoader(target, batch_size=batch_size)]
        self._target_size = len(target)
        self._target_gradient = [torch.zeros_like(p) for p in pl_module.parameters()]

    def _recorded(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._batch = batch if self._recorded(step) else None
        if self._batch is None:
            return
        if self._last_refresh is None or step - self._last_refresh >= self.refresh_every_n_steps:
            self._refresh(pl_module)
            self._last_refresh = step

    def _refresh(self, pl_module: pl.LightningModule) -> None:
        parameters = list(pl_module.parameters())
        for summed in self._target_gradient:
            summed.zero_()
        for batch in self._target_batches:
            with self._autocast():
                loss = pl_module.per_sample_loss(batch).float().sum() / self._target_size
            torch._foreach_add_(self._target_gradient, torch.autograd.grad(loss, parameters))
            self.counts["target samples"] += len(batch["target"])
        self.counts["refreshes"] += 1
        # eps u = 1e-3 g_V / |g_V| (the step's size is immaterial to the cost); read back once a refresh, not once a step.
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in self._target_gradient]))
        self._shift_scale = 1e-3 / (float(norm) + 1e-30)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._batch is None:
            return
        with torch.no_grad(), self._autocast():  # the first-order products' stand-in
            pl_module.per_sample_loss(self._batch)
        self.counts["product forwards"] += 1
        if self.second_order:
            self._perturbed_pass(pl_module, self._batch)
        self._batch = None

    def _perturbed_pass(self, pl_module: pl.LightningModule, batch: Any) -> None:
        parameters = list(pl_module.parameters())
        with torch.no_grad():
            torch._foreach_add_(parameters, self._target_gradient, alpha=self._shift_scale)
        try:
            _input_gradient_pass(pl_module, batch, parameters)
        finally:
            with torch.no_grad():
                torch._foreach_sub_(parameters, self._target_gradient, alpha=self._shift_scale)
        self.counts["perturbed passes"] += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.second_order:
            return
        # The drift correction's g_V(theta_T): the callback's takes the whole target, uncapped (the same here
        # while |V| <= max_target_samples, as on every benchmark workload).
        self._refresh(pl_module)
        parameters = list(pl_module.parameters())
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        for batch in DataLoader(datamodule.train_dataset, batch_size=datamodule.batch_size):
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            _input_gradient_pass(pl_module, batch, parameters)
            self.counts["end-of-fit samples"] += len(batch["target"])


def _input_gradient_pass(pl_module: pl.LightningModule, batch: Any, parameters: list[Tensor]) -> None:
    """A forward and a backward that computes every layer's input gradient and the first parameter's gradient only.

    (Asking autograd for the first parameter alone makes it skip every other weight gradient,
    as the derivative formulas compute only the inputs' gradients that are needed.)
    """
    loss = pl_module.per_sample_loss(batch).sum()
    torch.autograd.grad(loss, parameters[:1])


# The floors measured, each beside the DiffInCallback setting it bounds.
FLOORS: dict[str, tuple[str, dict[str, Any]]] = {
    "first order floor": ("first order (defaults)", dict(second_order=False)),
    "Diff-In floor": ("Diff-In (defaults)", dict(second_order=True)),
    "every 10 steps floor": ("Diff-In, every 10 steps", dict(second_order=True, every_n_steps=10)),
}
LOW_PRECISION_FLOORS: dict[str, tuple[str, dict[str, Any]]] = {
    "first order floor, bfloat16": ("first order (defaults)", dict(second_order=False, low_precision=True)),
    "Diff-In floor, bfloat16 target and products": ("Diff-In (defaults)", dict(second_order=True, low_precision=True)),
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def measure(key: str, device: str, epochs: int, repeats: int, floors: dict[str, tuple[str, dict[str, Any]]]) -> list[str]:
    """Alternate plain, each floor and each callback setting ``repeats`` times in this process; one row per floor."""
    workload = workloads()[key]
    settings = sorted({setting for setting, _ in floors.values()}, key=list(SETTINGS).index)

    def run(label: str) -> float:
        if label == "plain":
            return fit_once(workload, device, epochs, None)["wall"]
        if label in floors:
            return fit_once(workload, device, epochs, None, extra_callbacks=[FloorCallback(**floors[label][1])])["wall"]
        return fit_once(workload, device, epochs, SETTINGS[label])["wall"]

    labels = ["plain", *floors, *settings]
    for label in labels:  # warm-up: lazy imports, kernels, first-call set-up
        if label == "plain":
            fit_once(workload, device, 1, None)
        elif label in floors:
            fit_once(workload, device, 1, None, extra_callbacks=[FloorCallback(**floors[label][1])])
        else:
            fit_once(workload, device, 1, SETTINGS[label])
    walls: dict[str, list[float]] = {label: [] for label in labels}
    ratios: dict[str, list[float]] = {label: [] for label in labels if label != "plain"}
    for _ in range(repeats):
        plain = run("plain")
        walls["plain"].append(plain)
        for label in labels[1:]:
            wall = run(label)
            walls[label].append(wall)
            ratios[label].append(wall / plain)
    rows = []
    for floor, (setting, _) in floors.items():
        floor_ratio, setting_ratio = statistics.median(ratios[floor]), statistics.median(ratios[setting])
        rows.append(
            f"| {workload[0]} | {setting} | {statistics.median(walls['plain']):.2f} | {statistics.median(walls[floor]):.2f} | "
            f"**{floor_ratio:.2f}** | {statistics.median(walls[setting]):.2f} | **{setting_ratio:.2f}** | {setting_ratio - floor_ratio:+.2f} | {floor} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "transformer"], choices=list(workloads()))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bfloat16", action="store_true", help="add floors whose target gradient and products run in bfloat16 autocast")
    parser.add_argument("--out", default="benchmarks/results/floor.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    floors = dict(FLOORS)
    if args.bfloat16:
        floors.update(LOW_PRECISION_FLOORS)
    command = reproducing_command(
        "benchmarks.floor",
        [f"--device {args.device}", f"--workloads {' '.join(args.workloads)}", f"--repeats {args.repeats}", f"--epochs {args.epochs}", f"--threads {args.threads}"],
        [], [], args.out, "benchmarks/results/floor.md", flags=["--bfloat16"] if args.bfloat16 else [],
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    started, load_at_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    lines = [
        f"# The arithmetic floor of each setting beside the callback ({device_name}; {args.epochs} epochs; median of {args.repeats}, alternating, one process)",
        "",
        f"Command: `{command}`",
        "",
        "A *floor* is a plain fit plus only the passes an exact implementation of the setting cannot skip, at the",
        "default schedule (target gradient every 10 recorded steps over at most 1,024 target samples; the first-order",
        "products as one forward without a graph; Diff-In's perturbed forward and input-gradient backward; Diff-In's",
        "end-of-fit forward and input-gradient backward over the training set): see `benchmarks/floor.py`. Ratios are",
        "medians of per-pair ratios to the plain fit run just before. `gap` = callback ratio - floor ratio: what the",
        "callback's own code costs beyond the passes (hooks, checks, bookkeeping, and the products the floor leaves out).",
        "",
        "| workload | callback setting | plain s | floor s | floor ratio | callback s | callback ratio | gap | floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    with _quiet():
        for key in args.workloads:
            rows = measure(key, args.device, args.epochs, args.repeats, floors)
            for row in rows:
                print(row, flush=True)
            lines += rows
    write_timed_results(args.out, lines, started, load_at_start)


if __name__ == "__main__":
    main()
