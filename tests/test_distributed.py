"""DDP on CPU (gloo, 2 processes) against one process over the same global batches, float64.

Each case runs tests/ddp_run.py twice in subprocesses: once with ``devices=2`` and a
per-rank batch ``b``, once in one process with batch ``2b`` over the same sampler (the
run script explains why the global batches then agree), and compares every stored
component of every target, under every second-order term. The tolerance: first-order
parts agree to rounding (1e-12 relative); second-order parts go through a forward
finite difference with eps = 1e-6, which turns rounding differences of 1e-16 (the ranks
add the same numbers in another order) into about 1e-10, so they are compared at 1e-8
relative to the largest score.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from safetensors.torch import load_file

from diffin_lightning import distributed, load_influence
from diffin_lightning.distributed import unsupported_strategy_message
from diffin_lightning.engine import gradient_of_mean
from diffin_lightning.per_sample import PerSampleLoss

RUN = Path(__file__).parent / "ddp_run.py"
ROOT = Path(__file__).parent.parent
FIRST_ORDER_RTOL = 1e-12
SECOND_ORDER_RTOL = 1e-8


# A process group made earlier in the pytest process (a DDPStrategy test) leaves these set, and its
# store still listens on MASTER_PORT: a child that inherited them would fail with EADDRINUSE.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def _run(out: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=out.parent
    )


def _fit_pair(tmp_path: Path, *args: str, strategy: str = "ddp", batch_size: int = 2, timeout: float = 240) -> tuple[Path, Path]:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = _run(single, "--devices", "1", "--batch-size", str(2 * batch_size), *args, timeout=timeout)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(ddp, "--devices", "2", "--strategy", strategy, "--batch-size", str(batch_size), *args, timeout=timeout)
    assert two.returncode == 0, two.stderr[-3000:]
    return single, ddp


def _assert_same_scores(single: Path, ddp: Path) -> None:
    params_single, params_ddp = load_file(str(single / "params.safetensors")), load_file(str(ddp / "params.safetensors"))
    for name in params_single:  # the same training: the comparison below is about the callback
        torch.testing.assert_close(params_ddp[name], params_single[name], rtol=1e-12, atol=1e-14)
    terms = sorted(p.name for p in single.iterdir() if (p / "influence.safetensors").is_file())
    assert terms, f"no scores written under {single}"
    for term in terms:
        reference = load_file(str(single / term / "influence.safetensors"))
        scores = load_file(str(ddp / term / "influence.safetensors"))
        assert set(scores) == set(reference)
        for key, expected in reference.items():
            rtol = FIRST_ORDER_RTOL if key.endswith(("/first_order", "/visits")) else SECOND_ORDER_RTOL
            scale = float(expected.abs().max())
            assert expected.dtype == torch.float64 and scores[key].dtype == torch.float64
            torch.testing.assert_close(scores[key], expected, rtol=0, atol=rtol * max(scale, 1e-30), msg=f"{term} {key}")
    # The file the callback itself wrote (global rank zero only) holds the same default scores.
    written = load_file(str(ddp / "files" / "influence.safetensors"))
    for key, value in load_file(str(single / "files" / "influence.safetensors")).items():
        torch.testing.assert_close(written[key], value, rtol=0, atol=SECOND_ORDER_RTOL * max(float(value.abs().max()), 1e-30))


# ---------------------------------------------------------------- the default suite's representative case


def test_ddp_two_processes_match_one_process_all_targets(tmp_path):
    single, ddp = _fit_pair(tmp_path, "--targets", "val,train,self")
    _assert_same_scores(single, ddp)
    # every target kind was really recorded (and propagated drift included)
    scores = load_file(str(ddp / "propagated" / "influence.safetensors"))
    assert float(scores["val/second_order"].abs().max()) > 0 and float(scores["self/first_order"].min()) > 0


def test_ddp_a_nan_loss_on_one_rank_skips_the_step_on_every_rank_as_one_process_does(tmp_path):
    # Step 1's NaN lands on rank 1 (global position 1), step 3's on rank 0 (position 2): the
    # one-process run skips both steps for the targets that use G_B, and so must every rank.
    single, ddp = _fit_pair(tmp_path, "--targets", "val,train,self", "--nan-loss", "1:1,3:2", "--refresh", "3")
    _assert_same_scores(single, ddp)
    for run in (single, ddp):
        meta = load_influence(run / "files").metadata
        assert meta["nonfinite_steps_skipped"] == {"val": 2, "train": 2}, (run.name, meta["nonfinite_steps_skipped"])
        assert meta["nonfinite_samples_skipped"] == {"self": 2}, (run.name, meta["nonfinite_samples_skipped"])
        assert meta["complete"] is True


def test_ddp_parameters_turned_non_finite_end_the_scoring_on_every_rank_as_in_one_process(tmp_path):
    # A weight turns NaN after step 2's update, so the parameters are non-finite from step 3 on (the learning
    # rate stays finite). A rank-zero logger reading the verdict makes rank zero alone know it on the host:
    # the ranks must still take the same path at the later steps (else they meet in different collectives).
    # (A hang ends in subprocess.TimeoutExpired; the runs take 5 to 10 s each on 2 shared cores.)
    single, ddp = _fit_pair(tmp_path, "--targets", "val,train,self", "--nan-parameters-after", "2", "--read-on-rank-zero", timeout=120)
    for run in (single, ddp):
        meta = load_influence(run / "files").metadata
        assert meta["complete"] is False and meta["model_nonfinite_step"] == 3, (run.name, meta["model_nonfinite_step"])
    reference, scores = load_influence(single / "files"), load_influence(ddp / "files")
    for name in ("val", "train", "self"):
        for component in ("first_order", "visits"):
            torch.testing.assert_close(scores[name].component(component), reference[name].component(component), rtol=0, atol=1e-12)


@pytest.mark.parametrize("every_n_steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ddp_recorded_steps_wait_on_the_host_once_each(tmp_path, every_n_steps):
    """Under DDP a recorded step after the first reads nothing back and agrees with the other ranks once; others not at all.

    The one agreement is the step's checks (a rank whose ids failed stops every rank) and
    whether every rank has its training step's gradients; the finiteness gates stay on the
    device (their agreement is a device collective, which waits for nothing on the host).
    """
    out = tmp_path / "ddp"
    run = _run(
        out, "--devices", "2", "--strategy", "ddp", "--batch-size", "2", "--targets", "val,train,self", "--refresh", "100",
        "--every-n-steps", str(every_n_steps), "--watch-host-syncs",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    recorded_after_the_first = len([step for step in range(1, 8) if step % every_n_steps == 0])
    for rank in (0, 1):
        report = json.loads((out / f"host_syncs_rank{rank}.json").read_text())
        assert report["watched_steps"] == 7  # 2 epochs of 4 steps, the first not watched
        assert report["read_backs"] == [], sorted(set(report["read_backs"]))
        assert report["agreements"] == recorded_after_the_first, report


# ---------------------------------------------------------------- the full matrix (slow)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--targets", "val,train,self", "--every-n-steps", "2"), id="every_2"),
        pytest.param(("--targets", "val,train", "--every-n-steps", "2", "--refresh", "3", "--target-max-samples", "5"), id="every_2_refresh_subset"),
        pytest.param(("--targets", "val", "--accumulate", "2", "--epochs", "3"), id="accumulate_2"),
        # The clipped steps' projection reads the global batch's G_B (<G_B, G_i> in the direct form under DDP).
        pytest.param(("--targets", "val,train,self", "--gradient-clip-val", "0.05"), id="norm_clipped"),
        pytest.param(("--targets", "val,train,self", "--schedule", "checkpoints", "--num-checkpoints", "3"), id="checkpoint_schedule"),
        pytest.param(("--targets", "val,train,self", "--dot-products", "functional"), id="recomputed_functional"),
    ],
)
def test_ddp_matches_one_process(tmp_path, args):
    single, ddp = _fit_pair(tmp_path, *args)
    _assert_same_scores(single, ddp)
    if "--gradient-clip-val" in args:  # every step clipped, in both runs
        for run in (single, ddp):
            meta = load_influence(run / "files").metadata
            assert meta["clipped_steps"] == meta["steps_recorded"] > 0, (run.name, meta["clipped_steps"])


@pytest.mark.slow
def test_ddp_bf16_mixed_first_order_matches_one_process(tmp_path):
    # bf16-mixed first order reads each rank's own bfloat16 captures and the all-reduced .grad (float32). The two
    # runs then differ by bfloat16 rounding (the ranks' half batches round apart, and the training follows): a
    # scale or a reduction gone wrong would be off by a factor, which 2e-2 of the largest score catches.
    single, ddp = _fit_pair(tmp_path, "--targets", "val,train,self", "--precision", "bf16-mixed", "--first-order-only")
    params_single, params_ddp = load_file(str(single / "params.safetensors")), load_file(str(ddp / "params.safetensors"))
    for name in params_single:
        torch.testing.assert_close(params_ddp[name], params_single[name], rtol=2e-2, atol=2e-2)
    reference, scores = load_file(str(single / "sum" / "influence.safetensors")), load_file(str(ddp / "sum" / "influence.safetensors"))
    assert {key for key in reference if key.endswith("/first_order")} == {"val/first_order", "train/first_order", "self/first_order"}
    for key, expected in reference.items():
        atol = 0 if key.endswith("/visits") else 2e-2 * float(expected.abs().max())
        torch.testing.assert_close(scores[key], expected, rtol=0, atol=atol, msg=key)
    for run in (single, ddp):
        assert load_influence(run / "files").metadata["per_sample_engine"].startswith("captured from the training step (bf16-mixed"), run.name


@pytest.mark.slow
def test_ddp_spawn_matches_one_process(tmp_path):
    _assert_same_scores(*_fit_pair(tmp_path, "--targets", "val,train,self", "--every-n-steps", "2", strategy="ddp_spawn"))


@pytest.mark.slow
def test_ddp_resumed_from_a_checkpoint_matches_one_uninterrupted_process(tmp_path):
    """The checkpoint holds the totals over ranks; resumed, rank zero carries them and the others restart at 0."""
    single = tmp_path / "single"
    assert _run(single, "--devices", "1", "--batch-size", "4").returncode == 0
    first = tmp_path / "first"
    stopped = _run(
        first, "--devices", "2", "--strategy", "ddp", "--batch-size", "2", "--max-steps", "4", "--checkpoint-every", "4", "--save-on-checkpoint"
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    checkpoint = first / "checkpoints" / "last.ckpt"
    # save_on_checkpoint under DDP: rank zero wrote the totals over ranks for the checkpoint's step
    assert json.loads((first / "files" / "influence.json").read_text())["global_step"] == 4
    resumed = _run(tmp_path / "resumed", "--devices", "2", "--strategy", "ddp", "--batch-size", "2", "--ckpt-path", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_scores(single, tmp_path / "resumed")


# ---------------------------------------------------------------- an error on one rank ends the run on all


@pytest.mark.parametrize("failing_rank", [pytest.param(1, id="child_rank"), pytest.param(0, id="rank_zero", marks=pytest.mark.slow)])
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path, failing_rank):
    # A hang would end in subprocess.TimeoutExpired; measured 15 to 30 s to the end on 2 shared cores.
    result = _run(
        tmp_path / "out", "--devices", "2", "--strategy", "ddp", "--batch-size", "2", "--fail-rank", str(failing_rank), timeout=120
    )
    _assert_every_rank_raised(result, failing_rank)


@pytest.mark.parametrize(
    "fail_step", [pytest.param(2, id="before_the_next_recorded_step"), pytest.param(7, id="after_the_last_recorded_step", marks=pytest.mark.slow)]
)
def test_an_error_on_a_step_that_records_nothing_stops_every_rank_at_the_next_agreement(tmp_path, fail_step):
    # Steps 0 and 4 of 0..7 are recorded: a step between them issues no collective, so rank 1's error
    # waits for step 4's agreement, or, after step 4, for the end of training's.
    result = _run(
        tmp_path / "out", "--devices", "2", "--strategy", "ddp", "--batch-size", "2", "--every-n-steps", "4",
        "--fail-rank", "1", "--fail-step", str(fail_step), timeout=120,
    )
    _assert_every_rank_raised(result, 1)


def _assert_every_rank_raised(result: subprocess.CompletedProcess[str], failing_rank: int) -> None:
    assert result.returncode != 0
    message = f"stopped the run on every rank because rank {failing_rank}: ValueError: DiffInCallback: sample ids must lie in [0, N)"
    for rank in (0, 1):  # both ranks raise it, each in its own traceback
        assert any(line.startswith(f"[rank{rank}]") and message in line for line in result.stderr.splitlines()), result.stderr[-3000:]


# ---------------------------------------------------------------- strategies refused, and helpers in one process


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused_naming_what_is_supported(strategy):
    message = unsupported_strategy_message(strategy(), 2)
    assert message is not None and strategy.__name__ in message
    assert "strategy='ddp'" in message and "'ddp_spawn'" in message and "devices=1" in message
    assert unsupported_strategy_message(DDPStrategy(), 2) is None


def test_deepspeed_is_refused_though_it_subclasses_ddp():
    """DeepSpeedStrategy is a DDPStrategy that shards the parameters: refused. Lightning's own class, built without its
    __init__ (which needs the deepspeed package, absent here): the rule reads the strategy's type and nothing else."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    assert isinstance(strategy, DDPStrategy)
    message = unsupported_strategy_message(strategy, 2)
    assert message is not None and "DeepSpeedStrategy" in message and "strategy='ddp'" in message
    assert unsupported_strategy_message(strategy, 1) is not None  # one device does not make it whole either


def test_helpers_are_the_identity_in_one_process():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.effective_batch_size(5) == 5
    values = {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.float64)}
    summed = distributed.sum_over_ranks(values)
    assert all(torch.equal(summed[k], values[k]) and summed[k] is not values[k] for k in values)
    assert distributed.shard_indices([5, 6, 7, 8, 9], rank_=1, world=2) == [6, 8]
    assert list(distributed.shard_batches(range(7), rank_=2, world=3)) == [2, 5]
    # every index lands in exactly one shard
    shards = [distributed.shard_indices(range(11), rank_=r, world=3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_mean_gradient_across_ranks_equals_the_whole_mean_gradient_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    loss = PerSampleLoss(model, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum(-1))
    batches = [{"x": torch.randn(n, 3, dtype=torch.float64), "y": torch.randn(n, 2, dtype=torch.float64)} for n in (4, 3, 1)]
    params = loss.parameters()
    expected = loss.batch_gradient(params, batches)
    got = gradient_of_mean(loss, params, batches, across_ranks=True)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-14, atol=0)
    total, count = distributed.sum_with_count_over_ranks(None, 0, params)  # an empty shard contributes zeros
    assert count == 0 and all(bool((v == 0).all()) for v in total.values())
    with pytest.raises(ValueError, match="no samples"):
        gradient_of_mean(loss, params, [], across_ranks=True)


def test_a_failed_check_is_raised_as_it_is_in_one_process():
    distributed.raise_if_any_rank_failed(None)
    with pytest.raises(KeyError, match="bad"):
        distributed.raise_if_any_rank_failed(KeyError("bad"))
