"""Fidelity of the influence estimators against trajectory-specific leave-one-out on digits.

    bash benchmarks/fidelity.sh              # sets up .venv with the bench extra (Captum), then runs this
    .venv/bin/python -m benchmarks.fidelity  # the same, in a .venv that has it
Writes benchmarks/results/fidelity.md and fidelity_<model>_<regime>.png.

For each training regime it trains one small MLP (float64, plain SGD, fixed seed and batch
order) through a real Lightning Trainer with several DiffInCallbacks attached (in-run and
checkpoint schedules), replays the run with each chosen id's loss weight set to 0
(``benchmarks.harness``, 100+ models at once with torch.func) to get
``truth(j) = L_V(theta^-j) - L_V(theta)``, and reports Pearson and Spearman of every
estimator against it, beside Captum's TracInCP and the exact SGD-influence of Hara et al.
The same estimators are then run on digits with 10% flipped labels: recall of flipped
labels among the 10% lowest scores, and AUROC.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc

from benchmarks.harness import TrajectoryRecorder, exact_sgd_influence, functional_cross_entropy, leave_one_out_truth
from diffin_lightning import DiffInCallback, TrajectoryLog, trajectory_influence
from diffin_lightning.bundled import CNNClassifier, DigitsDataModule, MLPClassifier


@dataclass(frozen=True)
class Regime:
    name: str
    epochs: int
    lr: float


REGIMES = {
    "short_cool": Regime("short_cool", epochs=3, lr=0.05),
    "long_hot": Regime("long_hot", epochs=30, lr=0.3),
}

# name -> DiffInCallback options; every callback records the val target in the same run.
CALLBACKS: dict[str, dict] = {
    "in_run": dict(),
    "in_run_central": dict(finite_difference="central"),
    "checkpoints_5": dict(schedule="checkpoints", num_checkpoints=5),
    "checkpoints_20": dict(schedule="checkpoints", num_checkpoints=20),
}


def _rows(callbacks: dict[str, DiffInCallback]) -> dict[str, Callable[[], Tensor]]:
    """Estimator rows read from the callbacks: name -> scores [N]."""
    return {
        "first_order (in-run TracIn)": lambda: callbacks["in_run"].influence["val"].first_order,
        "diffin, second_order=propagated (default)": lambda: callbacks["in_run"].influence_with("propagated")["val"].diffin,
        "diffin, propagated, central FD": lambda: callbacks["in_run_central"].influence_with("propagated")["val"].diffin,
        "diffin, second_order=paper (Eq. 9, 1/m)": lambda: callbacks["in_run"].influence_with("paper")["val"].diffin,
        "diffin, second_order=sum (Eq. 9, all steps)": lambda: callbacks["in_run"].influence_with("sum")["val"].diffin,
        "diffin, sum, central FD": lambda: callbacks["in_run_central"].influence_with("sum")["val"].diffin,
        "paper Eq. 9, checkpoints m=5": lambda: callbacks["checkpoints_5"].influence_with("paper")["val"].diffin,
        "paper Eq. 9, checkpoints m=20": lambda: callbacks["checkpoints_20"].influence_with("paper")["val"].diffin,
    }


def make_model(kind: str, datamodule: DigitsDataModule, lr: float) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    if kind == "cnn":
        return CNNClassifier(**datamodule.model_kwargs(), channels=(4, 8), lr=lr)
    # mlp_dropout: the same MLP with dropout 0.2 after the hidden layer; truth and the exact
    # SGD-influence replay each step's training masks and measure L_V in eval mode (no dropout).
    return MLPClassifier(**datamodule.model_kwargs(), hidden_dims=(32,), lr=lr, dropout=0.2 if kind == "mlp_dropout" else 0.0)


def train_with_estimators(kind: str, regime: Regime, label_noise: float, workdir: Path, in_run: bool = True, double: bool = True):
    """One fit with the recorder, a TrajectoryLog (``workdir/trajectory``) and, with ``in_run``, every DiffInCallback."""
    datamodule = DigitsDataModule(label_noise=label_noise, batch_size=64, double=double, image=kind == "cnn")
    model = make_model(kind, datamodule, regime.lr)
    recorder = TrajectoryRecorder()
    callbacks = {
        name: DiffInCallback(targets={"val": datamodule.val_dataset}, output_dir=workdir / name, **options)
        for name, options in (CALLBACKS.items() if in_run else ())
    }
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true" if double else "32-true",
        max_epochs=regime.epochs,
        callbacks=[recorder, *callbacks.values(), TrajectoryLog(output_dir=workdir / "trajectory")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(workdir),
    )
    trainer.fit(model, datamodule=datamodule)
    return datamodule, model, recorder, callbacks


def captum_tracin(model: torch.nn.Module, recorder: TrajectoryRecorder, train, target, num_checkpoints: int, workdir: Path) -> Tensor:
    """Captum's TracInCP from ``num_checkpoints`` evenly spaced checkpoints of the same run."""
    try:
        from captum.influence import TracInCP
    except ImportError as error:
        raise SystemExit(
            "error: the TracInCP row needs Captum, a benchmark-only dependency: "
            '.venv/bin/pip install -e ".[bench]" (or run bash benchmarks/fidelity.sh)'
        ) from error
    total = len(recorder.steps)
    chosen = [recorder.steps[int((k + 0.5) * total / num_checkpoints)] for k in range(num_checkpoints)]
    paths, learning_rates = [], {}
    for record in chosen:
        path = workdir / f"tracin_{record.step}.pt"
        torch.save(record.params, path)
        paths.append(str(path))
        learning_rates[str(path)] = record.lr

    def load(net: torch.nn.Module, path: str) -> float:
        net.load_state_dict(torch.load(path, weights_only=True), strict=False)
        return learning_rates[path]

    tracin = TracInCP(
        model,
        torch.utils.data.TensorDataset(*train),
        paths,
        checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=512,
    )
    scores = tracin.influence(tuple(target), aggregate=True)
    return scores.reshape(-1).detach()


def correlation_rows(truth: Tensor, scores: dict[str, Tensor], ids: Tensor) -> dict[str, tuple[float, float]]:
    return {
        name: (float(pearson_corrcoef(values[ids], truth)), float(spearman_corrcoef(values[ids], truth)))
        for name, values in scores.items()
    }


def mislabel_rows(scores: dict[str, Tensor], flipped: Tensor) -> dict[str, tuple[float, float]]:
    out = {}
    for name, values in scores.items():
        suspicion = -values  # lowest (most harmful) influence on the val loss first
        order = torch.argsort(suspicion, descending=True)
        inspected = round(0.1 * len(order))
        recall = float(flipped[order[:inspected]].sum()) / float(flipped.sum())
        out[name] = (recall, float(binary_auroc(suspicion.float(), flipped.long())))
    return out


def kronfluence_ekfac(model: pl.LightningModule, train, target, workdir: Path) -> Tensor:
    """kronfluence's EK-FAC influence of every training sample on the mean target loss, at the final model.

    Its recommended settings (``FactorArguments(strategy="ekfac")``, default damping heuristic), float32
    as it defaults to. Sign: kronfluence's score ``g_target^T (G + damping)^-1 g_i`` is, up to 1/N,
    the change of the target loss when i is removed, so > 0 means helpful, as here.
    """
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task
    except ImportError as error:
        raise SystemExit(
            "error: the EK-FAC row needs kronfluence, a benchmark-only dependency: run bash benchmarks/fidelity.sh, "
            'or .venv/bin/pip install -e ".[bench]" && .venv/bin/pip install --no-deps kronfluence==1.0.1'
        ) from error
    import copy
    import logging

    import torch.nn.functional as F

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    network = prepare_model(copy.deepcopy(model.net).float().eval(), task)
    train_set = torch.utils.data.TensorDataset(train[0].float(), train[1])
    target_set = torch.utils.data.TensorDataset(target[0].float(), target[1])
    analyzer = Analyzer(
        analysis_name="fidelity", model=network, task=task, cpu=True, disable_tqdm=True, disable_model_save=True, output_dir=str(workdir / "kronfluence")
    )
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train_set, factor_args=FactorArguments(strategy="ekfac"), per_device_batch_size=256, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        scores_name="val", factors_name="ekfac", query_dataset=target_set, train_dataset=train_set, per_device_query_batch_size=len(target_set), per_device_train_batch_size=256, overwrite_output_dir=True
    )
    scores = analyzer.load_pairwise_scores("val")["all_modules"]  # [queries, train]
    return scores.sum(0).double() / len(target_set)


def replay_float32(kind: str, regime: Regime, label_noise: float, workdir: Path) -> Tensor:
    """The replay of a float32 run of the same recipe (same initial values, same batch order)."""
    datamodule, model, _, _ = train_with_estimators(kind, regime, label_noise, workdir / "float32", in_run=False, double=False)
    return trajectory_influence(model, workdir / "float32" / "trajectory", datamodule.train_dataset, {"val": datamodule.val_dataset}, progress=False)["val"].diffin


def all_scores(
    datamodule, model, recorder, callbacks, workdir, kind: str, regime: Regime, label_noise: float, in_run: bool = True, with_captum: bool = True
) -> dict[str, Tensor]:
    train = datamodule.train_dataset.dataset.tensors
    target = datamodule.val_dataset.tensors
    scores: dict[str, Tensor] = {}
    if in_run:
        scores = {name: read() for name, read in _rows(callbacks).items()}
        if with_captum:
            scores["Captum TracInCP, 5 checkpoints"] = captum_tracin(model, recorder, train, target, 5, workdir)
    scores["kronfluence EK-FAC, final model"] = kronfluence_ekfac(model, train, target, workdir)
    scores["exact SGD-influence (Hara et al.)"] = exact_sgd_influence(
        functional_cross_entropy(model, training=True),
        recorder.steps,
        recorder.final,
        train,
        target,
        target_loss=functional_cross_entropy(model, training=False),
    )
    started = time.perf_counter()
    scores["replay (trajectory_influence), float64, central FD"] = trajectory_influence(
        model, workdir / "trajectory", datamodule.train_dataset, {"val": datamodule.val_dataset}, progress=False
    )["val"].diffin
    print(f"  replay float64: {time.perf_counter() - started:.1f} s", flush=True)
    scores["replay (trajectory_influence), float32 run, central FD"] = replay_float32(kind, regime, label_noise, workdir)
    return scores


def run_regime(
    kind: str, regime: Regime, num_ids: int, plot_dir: Path | None, in_run: bool = True, with_captum: bool = True
) -> tuple[dict, dict, float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        datamodule, model, recorder, callbacks = train_with_estimators(kind, regime, 0.0, workdir / "clean", in_run=in_run)
        train = datamodule.train_dataset.dataset.tensors
        target = datamodule.val_dataset.tensors
        n = len(train[1])
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:num_ids]
        truth, _ = leave_one_out_truth(
            functional_cross_entropy(model, training=True),
            recorder.steps,
            train,
            target,
            ids.tolist(),
            target_loss=functional_cross_entropy(model, training=False),
        )
        scores = all_scores(datamodule, model, recorder, callbacks, workdir / "clean", kind, regime, 0.0, in_run, with_captum)
        fidelity = correlation_rows(truth, scores, ids)
        if plot_dir is not None:
            prefix = "fidelity" if in_run else "fidelity_posthoc"
            scatter(plot_dir / f"{prefix}_{kind}_{regime.name}.png", truth, scores, ids, f"{kind}, {regime.name}")

        noisy = train_with_estimators(kind, regime, 0.1, workdir / "noisy", in_run=in_run)
        mislabel = mislabel_rows(all_scores(*noisy, workdir / "noisy", kind, regime, 0.1, in_run, with_captum), noisy[0].corrupted)
    return fidelity, mislabel, time.perf_counter() - started


def scatter(path: Path, truth: Tensor, scores: dict[str, Tensor], ids: Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = (len(scores) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.6 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, scores.items()):
        ax.scatter(truth.numpy(), values[ids].numpy(), s=8, alpha=0.7)
        spearman = float(spearman_corrcoef(values[ids], truth))
        ax.set_title(f"{name}\nSpearman {spearman:.3f}", fontsize=8)
        ax.set_xlabel("leave-one-out truth: L_V(without) - L_V(with)", fontsize=7)
        ax.set_ylabel("score (> 0 = helped)", fontsize=7)
    for ax in list(axes.flat)[len(scores) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Influence fidelity against leave-one-out on digits.")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "mlp_dropout"])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--num-ids", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/fidelity.md")
    parser.add_argument(
        "--estimators", default="all", choices=["all", "post-hoc"],
        help="post-hoc: only the rows computed after training (exact SGD-influence, replay, kronfluence), without the in-run callbacks and Captum",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-captum", action="store_true", help="leave out the TracInCP row (no Captum needed)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.fidelity " + " ".join(
        [f"--models {' '.join(args.models)}", f"--regimes {' '.join(args.regimes)}", f"--num-ids {args.num_ids}"]
        + ([f"--estimators {args.estimators}"] if args.estimators != "all" else [])
        + ([f"--out {args.out}"] if args.out != "benchmarks/results/fidelity.md" else [])
        + ([f"--threads {args.threads}"] if args.threads else [])
        + (["--no-captum"] if args.no_captum else [])
    )
    lines = [
        "# Fidelity against leave-one-out (digits, plain SGD, float64)",
        "",
        f"Command: `bash benchmarks/fidelity.sh {command.split(' ', 3)[3]}` (or `.venv/bin/{command}` in a .venv with the bench extra)",
        "",
        "Truth: the same run with sample j's loss weight set to 0 in every batch that held it (same order, same",
        f"denominator), truth(j) = L_V(without j) - L_V(with), for {args.num_ids} random ids. Mislabel columns: a second",
        "run on digits with 10% flipped train labels; recall = share of flipped labels among the 10% lowest scores.",
        "Sign: every score > 0 means the sample helped (lowered the validation loss).",
        "",
    ]
    for kind in args.models:
        for name in args.regimes:
            regime = REGIMES[name]
            fidelity, mislabel, seconds = run_regime(
                kind, regime, args.num_ids, out.parent, in_run=args.estimators == "all", with_captum=not args.no_captum
            )
            lines += [
                f"## {kind}, {name}: {regime.epochs} epochs, lr {regime.lr}, batch 64 ({seconds:.0f} s)",
                "",
                "| estimator | Pearson | Spearman | mislabel recall@10% | mislabel AUROC |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for row, (pearson, spearman) in fidelity.items():
                recall, auroc = mislabel[row]
                lines.append(f"| {row} | {pearson:.3f} | {spearman:.3f} | {recall:.3f} | {auroc:.3f} |")
            prefix = "fidelity" if args.estimators == "all" else "fidelity_posthoc"
            lines += ["", f"Scatter plots: `{prefix}_{kind}_{name}.png`", ""]
            print("\n".join(lines[-len(fidelity) - 5 :]), flush=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
