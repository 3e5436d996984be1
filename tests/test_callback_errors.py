"""Bad input gets a clear error (argument, rule, value, fix), before training where possible."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from diffin_lightning import DiffInCallback
from helpers import TinyClassifier, trainer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": "self"}, "`targets` must be a non-empty dict"),
        ({"targets": {}}, "`targets` must be a non-empty dict"),
        ({"targets": {"v": 3}}, r"`targets\['v'\]` must be a Dataset, a DataLoader, 'train' or 'self'; got int"),
        ({"targets": {"v": "validation"}}, "got the string 'validation'"),
        ({"targets": {"a/b": "self"}}, "without '/'"),
        ({"targets": {"s": "self"}, "every_n_steps": 0}, "`every_n_steps` must be a positive int; got 0"),
        ({"targets": {"s": "self"}, "eps": -1.0}, "`eps` must be a positive float or None"),
        ({"targets": {"s": "self"}, "second_order": "mean"}, "`second_order` must be one of"),
        ({"targets": {"s": "self"}, "schedule": "checkpoints"}, "`num_checkpoints` must be set"),
        ({"targets": {"s": "self"}, "num_checkpoints": 5}, "only applies to schedule='checkpoints'"),
        ({"targets": {"s": "self"}, "schedule": "checkpoints", "num_checkpoints": 5, "second_order": "propagated"}, "needs schedule='in_run'"),
        ({"targets": {"s": "self"}, "schedule": "epochs"}, "`schedule` must be one of"),
        ({"targets": {"s": "self"}, "finite_difference": "backward"}, "`finite_difference` must be one of"),
        ({"targets": {"s": "self"}, "train_target_decay": 1.0}, r"`train_target_decay` must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DiffInCallback(**kwargs)


def _fit(tmp_path, data_loader, callback, model=None, **trainer_kwargs):
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback], **trainer_kwargs).fit(
        model or TinyClassifier().double(), data_loader
    )


def test_batch_without_ids(tmp_path, tiny_data):
    plain = DataLoader(tiny_data.train, batch_size=4)
    with pytest.raises(ValueError, match=r"carries no sample ids.*IndexedDataset.*index_fn"):
        _fit(tmp_path, plain, DiffInCallback(targets={"s": "self"}), model=TinyClassifier().double())


def test_ids_out_of_range(tmp_path, tiny_data):
    callback = DiffInCallback(targets={"s": "self"}, index_fn=lambda b: b["index"] + 100)
    with pytest.raises(ValueError, match=r"must lie in \[0, N\) with N=16; the batch holds ids from 10\d"):
        _fit(tmp_path, tiny_data.loader(), callback)


def test_ids_repeated_within_a_step(tmp_path, tiny_data):
    callback = DiffInCallback(targets={"s": "self"}, index_fn=lambda b: b["index"] % 2)
    with pytest.raises(ValueError, match="must not repeat within an optimizer step"):
        _fit(tmp_path, tiny_data.loader(), callback)


def test_ids_repeated_across_micro_batches_of_one_step(tmp_path, tiny_data):
    callback = DiffInCallback(targets={"s": "self"}, index_fn=lambda b: b["index"] % 4)
    with pytest.raises(ValueError, match="must not repeat within an optimizer step"):
        _fit(tmp_path, tiny_data.loader(batch_size=2), callback, accumulate_grad_batches=2)


def test_loss_that_is_not_per_sample(tmp_path, tiny_data):
    callback = DiffInCallback(targets={"s": "self"}, loss_fn=lambda m, b: m.per_sample_loss(b).mean())
    with pytest.raises(ValueError, match=r"shape \[B\] = \(4,\).*got \(\).*reduction='none'"):
        _fit(tmp_path, tiny_data.loader(), callback)


def test_module_without_per_sample_loss(tmp_path, tiny_data):
    class NoLoss(TinyClassifier):
        per_sample_loss = None  # type: ignore[assignment]

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch["input"]), batch["target"])

    with pytest.raises(AttributeError, match="has no method `per_sample_loss"):
        _fit(tmp_path, tiny_data.loader(), DiffInCallback(targets={"s": "self"}), model=NoLoss().double())


def test_target_without_batches_fails_before_training(tmp_path, tiny_data):
    empty = TensorDataset(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    model = TinyClassifier().double()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="target 'val' yields no batches"):
        _fit(tmp_path, tiny_data.loader(), DiffInCallback(targets={"val": empty}), model=model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "training must not have started"


def test_non_sgd_optimizer_warns_once_and_says_what_is_approximated(tmp_path, tiny_data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, tiny_data.loader(), DiffInCallback(targets={"s": "self"}), model=TinyClassifier(optimizer="adam").double())
    relevant = [w for w in caught if "assumes plain SGD" in str(w.message)]
    assert len(relevant) == 1
    assert "Adam, not SGD" in str(relevant[0].message)


@pytest.mark.parametrize(
    ("algorithm", "own_clipping", "expected"),
    [
        ("norm", False, "norm clipping: each step counts at its clipped learning rate and its first-order terms are taken along"),
        ("value", False, "value clipping is ignored"),
        (None, True, "configure_gradient_clipping is not read: each step is taken as unclipped"),
    ],
)
def test_gradient_clipping_is_named_in_the_approximation_warning(tmp_path, tiny_data, algorithm, own_clipping, expected):
    class ClipsItsOwnWay(TinyClassifier):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=0.01, gradient_clip_algorithm="value")

    model = (ClipsItsOwnWay() if own_clipping else TinyClassifier()).double()
    clipping = {} if algorithm is None else dict(gradient_clip_val=0.05, gradient_clip_algorithm=algorithm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[DiffInCallback(targets={"s": "self"})], **clipping).fit(model, tiny_data.loader())
    relevant = [str(w.message) for w in caught if "assumes plain SGD" in str(w.message)]
    assert len(relevant) == 1 and expected in relevant[0], relevant


def test_ddp_strategy_in_one_process_records_what_a_single_device_does(tmp_path, tiny_data):
    # DDP is supported (tests/test_distributed.py runs 2 processes; sharded strategies are refused there).
    on_ddp, single = DiffInCallback(targets={"s": "self"}), DiffInCallback(targets={"s": "self"})
    # use_distributed_sampler=False: the same batch order as the single-device fit.
    ddp = DDPStrategy(process_group_backend="gloo")
    _fit(tmp_path / "ddp", tiny_data.loader(), on_ddp, strategy=ddp, devices=1, use_distributed_sampler=False)
    _fit(tmp_path / "single", tiny_data.loader(), single)
    torch.testing.assert_close(on_ddp.influence["s"].first_order, single.influence["s"].first_order, rtol=1e-12, atol=0)


def test_nonfinite_contributions_are_skipped_counted_and_warned(tmp_path, tiny_data):
    def loss_with_a_poisoned_sample(module, batch):
        losses = module.per_sample_loss(batch)
        # Sample 0's gradient is infinite; the others' stay finite (per-sample gradients are separate).
        return losses * torch.where(batch["index"] == 0, float("inf"), 1.0)

    callback = DiffInCallback(targets={"s": "self"}, loss_fn=loss_with_a_poisoned_sample)
    with pytest.warns(UserWarning, match="non-finite contribution"):
        _fit(tmp_path, tiny_data.loader(), callback)
    scores = callback.influence["s"]
    assert callback.nonfinite_skipped == 1
    assert torch.isfinite(scores.first_order).all()
    assert scores.visits[0] == 0 and scores.visits[1:].eq(1).all()
    assert callback.influence.metadata["nonfinite_skipped"] == 1


def test_amp_scaler_skipped_step_records_nothing(tmp_path, tiny_data):
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    callback = DiffInCallback(targets={"s": "self"})
    model = TinyClassifier(blow_up_at_step=1)
    trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=[callback], precision=None, plugins=[precision]).fit(
        model, _float32(tiny_data.loader())
    )
    assert callback.skipped_amp_steps == 1
    assert callback.steps_recorded == 3
    assert int(callback.influence["s"].visits.sum()) == 12


def test_a_plugin_with_a_scaler_or_autocast_counts_as_mixed_precision():
    """Its step's captures are scaled or in half precision: the recorder must recompute, never read them."""
    from lightning.pytorch.plugins import HalfPrecision, Precision

    from diffin_lightning.lightning_state import is_mixed_precision

    class ScalingPlugin(Precision):  # a user's plugin that scales the loss like AMP, not MixedPrecision
        scaler = torch.amp.GradScaler("cpu")

    class AutocastPlugin(Precision):
        precision = "bf16-mixed"

    assert is_mixed_precision(MixedPrecision("bf16-mixed", "cpu"))
    assert is_mixed_precision(ScalingPlugin()) and is_mixed_precision(AutocastPlugin())
    assert not is_mixed_precision(Precision()) and not is_mixed_precision(HalfPrecision("bf16-true"))


@pytest.mark.parametrize(
    ("clip_val", "gradient", "expected"),
    [
        (0.5, [3.0, 4.0], 0.5 / (5.0 + 1e-6)),  # clip_grad_norm_'s factor
        (10.0, [3.0, 4.0], 1.0),  # under the bound: not clipped
        (-1.0, [3.0, 4.0], 1.0),  # Lightning clips nothing at a value <= 0
        (0.5, [float("nan"), 4.0], 1.0),  # non-finite: left to the non-finite checks, never a NaN or zero learning rate
        (0.5, [float("inf"), 4.0], 1.0),
    ],
)
def test_norm_clip_factor_is_lightnings_and_stays_finite(clip_val, gradient, expected):
    import lightning.pytorch as pl

    from diffin_lightning import lightning_state

    parameter = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    parameter.grad = torch.tensor(gradient, dtype=torch.float64)
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    run = pl.Trainer(gradient_clip_val=clip_val, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert lightning_state.clip_algorithm(run) == ("norm" if clip_val > 0 else None)
    assert lightning_state.norm_clip_factor(run, optimizer) == pytest.approx(expected, rel=1e-12)


def _float32(loader):
    train = loader.dataset.dataset
    x, y = train.tensors
    from diffin_lightning import EpochSeededSampler, IndexedDataset

    data = IndexedDataset(TensorDataset(x.float(), y))
    return DataLoader(data, batch_size=4, sampler=EpochSeededSampler(len(data)))
