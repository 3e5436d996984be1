"""One training run with DiffInCallback, as a script: the worker behind tests/test_distributed.py.

``strategy="ddp"`` re-launches the running script once per extra rank, so a DDP run
cannot live inside the pytest process: the test runs this file in a subprocess.

    python tests/ddp_run.py --strategy ddp --devices 2 --batch-size 2 --out DIR [--targets val,train,self] ...

Every rank draws its batches from the same EpochSeededSampler, which Lightning wraps in
a ``DistributedSamplerWrapper`` (for training always with ``shuffle=True``, seeded with
``PL_GLOBAL_SEED`` or 0): its
positions are permuted per epoch and rank r takes permuted positions r, r+W, ... A
one-process run (``--devices 1``) with batch size W*b over the same wrapper with one
replica therefore sees, at every step, the union of the ranks' batches: the same global
batches in the same order. After fit, global rank zero writes,
under ``--out``, the scores with each second-order term (``<term>/influence.*``) and the
final parameters (``params.safetensors``), all float64.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from diffin_lightning import DiffInCallback, EpochSeededSampler, IndexedDataset, distributed  # noqa: E402
from diffin_lightning.store import save_influence  # noqa: E402
from helpers import TinyClassifier, TinyData  # noqa: E402


class SaveEveryTerm(Callback):
    """After DiffInCallback's own write (it comes first in the callback list): every term and the parameters."""

    def __init__(self, influence: DiffInCallback, out: Path) -> None:
        self.influence, self.out = influence, out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        terms = ("paper", "sum") if self.influence.schedule == "checkpoints" else ("propagated", "paper", "sum")
        for term in terms:
            save_influence(self.influence.influence_with(term), self.out / term)
        params = {name: p.detach().cpu().contiguous() for name, p in pl_module.named_parameters()}
        save_file(params, str(self.out / "params.safetensors"))


class FailingIds:
    """An index function that gives an id out of range on one rank at one step (a fault injected on purpose)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step, self.calls = rank, step, 0

    def __call__(self, batch):
        ids = batch["index"]
        self.calls += 1
        if int(os.environ.get("LOCAL_RANK", "0")) == self.rank and self.calls == self.step + 1:
            return ids + 10_000
        return ids


class NanLossAt(TinyClassifier):
    """The loss of the sample at global batch position ``q`` of step ``s`` is NaN in every pass of that step's batch.

    A position of the global batch, not an id: under DDP rank ``q % W`` holds it at its
    position ``q // W`` (the run's sampler deals the global batch out that way), so the
    one-process run and the DDP run fault the same sample, on whichever rank it lands. The
    fault follows the training batch into the callback's passes of that step (the same ids),
    never into a target batch (whose ids number the target set). Training stays alive as
    careful users keep it: the non-finite losses count as zero (the mean keeps its
    denominator, so the other samples' gradients stay those of the mean of
    ``per_sample_loss``, as the callback's capture assumes), and non-finite gradients are
    zeroed before the update.
    """

    def __init__(self, faults: dict[int, list[int]]) -> None:
        super().__init__()
        self.faults = faults
        self.faulty: tuple[int, torch.Tensor, list[int]] | None = None  # (step, the batch's ids, positions)

    def training_step(self, batch, batch_idx):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        positions = [q // world for q in self.faults.get(self.global_step, []) if q % world == rank]
        self.faulty = (self.global_step, batch["index"].clone(), positions)
        losses = self.per_sample_loss(batch)
        return torch.where(torch.isfinite(losses), losses, 0.0).sum() / losses.numel()

    def per_sample_loss(self, batch):
        losses = super().per_sample_loss(batch)
        if self.faulty is None:
            return losses
        step, ids, positions = self.faulty
        if positions and step == self.global_step and batch["index"].shape == ids.shape and torch.equal(batch["index"], ids):
            mask = torch.zeros_like(losses, dtype=torch.bool)
            mask[positions] = True
            # Through torch.where the gradient stays finite: only the rank holding the sample sees the
            # NaN (in its per-sample losses), so the ranks must agree to skip the step.
            losses = torch.where(mask, float("nan"), losses)
        return losses

    def on_before_optimizer_step(self, optimizer):
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class NanParametersAfter(Callback):
    """Makes one weight NaN on every rank after one step's update (the learning rate stays finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:  # (global_step counts the update just made)
            with torch.no_grad():
                next(pl_module.parameters())[0, 0] = float("nan")


class ReadOnRankZero(Callback):
    """Reads the callback's ``model_nonfinite_step`` after every batch on global rank zero only, as a rank-zero logger would."""

    def __init__(self, influence: DiffInCallback) -> None:
        self.influence = influence

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            self.influence.model_nonfinite_step


def watched_for_host_syncs(base: type[DiffInCallback], out: Path) -> type[DiffInCallback]:
    """``base`` whose recorded steps after the first are watched for what waits on the host.

    Two kinds: read backs issued by this library (tests/test_host_sync.py's watch) and the
    host agreements (``distributed.sum_scalars_over_ranks``: a collective whose result the
    host reads). Each rank writes ``host_syncs_rank{r}.json`` at the end of fit.
    """
    from test_host_sync import _strict

    agreements = {"count": 0, "watching": False}
    original = distributed.sum_scalars_over_ranks

    def counted(values):
        agreements["count"] += agreements["watching"]
        return original(values)

    distributed.sum_scalars_over_ranks = counted

    class Watched(_strict(base)):  # type: ignore[misc, valid-type]
        watched_steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            if self._watch is not None:
                agreements["watching"] = True
                self.watched_steps += 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            agreements["watching"] = False

        def on_fit_end(self, trainer, pl_module):
            super().on_fit_end(trainer, pl_module)
            report = {"read_backs": self.read_backs, "agreements": agreements["count"], "watched_steps": self.watched_steps}
            (out / f"host_syncs_rank{trainer.global_rank}.json").write_text(json.dumps(report))

    return Watched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, required=True, help="per rank")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", default="val,train,self")
    parser.add_argument("--every-n-steps", type=int, default=1)
    parser.add_argument("--refresh", type=int, default=1)
    parser.add_argument("--target-max-samples", type=int, default=None)
    parser.add_argument("--schedule", default="in_run")
    parser.add_argument("--num-checkpoints", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--gradient-clip-val", type=float, default=None, help="Lightning's norm clipping")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="step-based ModelCheckpoint")
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--dot-products", default="auto")
    parser.add_argument("--precision", default="64-true", help="the Trainer's; other than 64-true, the data and model stay float32")
    parser.add_argument("--first-order-only", action="store_true", help="compute_second_order=False")
    parser.add_argument("--save-on-checkpoint", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--fail-step", type=int, default=2)
    parser.add_argument("--nan-loss", default=None, help="STEP:POSITION,...: NaN losses at global batch positions (NanLossAt)")
    parser.add_argument("--watch-host-syncs", action="store_true", help="write what waits on the host per recorded step")
    parser.add_argument("--nan-parameters-after", type=int, default=None, help="a weight becomes NaN after this step's update")
    parser.add_argument("--read-on-rank-zero", action="store_true", help="read model_nonfinite_step on rank zero after every batch")
    args = parser.parse_args()

    float64 = args.precision == "64-true"
    data = TinyData.make(num_train=args.num_train, num_val=6, seed=0, dtype=torch.float64 if float64 else torch.float32)
    indexed = IndexedDataset(data.train)
    sampler = EpochSeededSampler(len(indexed), seed=0)
    if args.devices == 1:
        # What Lightning builds around the sampler under DDP, with one replica (Lightning leaves it as it is).
        # Lightning seeds its DistributedSampler with PL_GLOBAL_SEED (0 when unset); the same here.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = DistributedSamplerWrapper(sampler, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(indexed, batch_size=args.batch_size, sampler=sampler)
    spec = {"val": data.val, "train": "train", "self": "self"}
    targets = {name: spec[name] for name in args.targets.split(",")}
    callback_class = watched_for_host_syncs(DiffInCallback, args.out) if args.watch_host_syncs else DiffInCallback
    args.out.mkdir(parents=True, exist_ok=True)
    influence = callback_class(
        targets=targets,
        every_n_steps=args.every_n_steps,
        target_refresh_every_n_steps=args.refresh,
        target_max_samples=args.target_max_samples,
        target_batch_size=4,  # several target batches, so the shards differ in size
        schedule=args.schedule,
        num_checkpoints=args.num_checkpoints,
        second_order="paper" if args.schedule == "checkpoints" else None,
        eps=1e-6,
        dot_products=args.dot_products,
        compute_second_order=not args.first_order_only,
        save_on_checkpoint=args.save_on_checkpoint,
        output_dir=args.out / "files",
        index_fn=None if args.fail_rank is None else FailingIds(args.fail_rank, args.fail_step),
    )
    callbacks: list[Callback] = [influence, SaveEveryTerm(influence, args.out)]
    if args.nan_parameters_after is not None:
        callbacks.append(NanParametersAfter(args.nan_parameters_after))
    if args.read_on_rank_zero:
        callbacks.append(ReadOnRankZero(influence))
    if args.checkpoint_every is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=args.out / "checkpoints", every_n_train_steps=args.checkpoint_every, save_top_k=-1, save_last=True
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.gradient_clip_val,
        logger=False,
        enable_checkpointing=args.checkpoint_every is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    # float64 before fit: a checkpoint restored into a float32 model would be rounded (as in test_resume.py).
    model = TinyClassifier()
    if args.nan_loss:
        faults: dict[int, list[int]] = {}
        for fault in args.nan_loss.split(","):
            step, position = (int(part) for part in fault.split(":"))
            faults.setdefault(step, []).append(position)
        model = NanLossAt(faults)
    trainer.fit(model.double() if float64 else model, loader, ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
