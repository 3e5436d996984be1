"""Coreset selection: keep the most valuable fraction by score, verify against random, EL2N and forgetting."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffin_lightning.errors import UsageError
from diffin_lightning.dynamics import load_dynamics
from diffin_lightning.tasks import plots
from diffin_lightning.tasks.report import format_table, write_csv, write_json
from diffin_lightning.tasks.retrain import progress, retrain
from diffin_lightning.tasks.run import TrainedRun, evaluate

BASELINES = ("random", "el2n", "forgetting")


def select_top(values: Tensor, fraction: float, labels: Tensor | None = None) -> list[int]:
    """Ids of the ``fraction`` highest ``values``; with ``labels``, the same fraction of every class."""
    if not 0 < fraction <= 1:
        raise UsageError(f"fraction must be in (0, 1]; got {fraction}. Example: p=[0.1,0.3,0.5]")
    if labels is None:
        size = max(1, round(fraction * len(values)))
        return sorted(torch.argsort(values, descending=True)[:size].tolist())
    kept: list[int] = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        size = max(1, round(fraction * len(members)))
        kept += members[torch.argsort(values[members], descending=True)[:size]].tolist()
    return sorted(kept)


def coreset(
    run: TrainedRun,
    out_dir: Path,
    target: str | None = None,
    score: str = "diffin",
    fractions: Sequence[float] = (0.1, 0.3, 0.5),
    class_balanced: bool = False,
    verify: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    baselines: Sequence[str] = BASELINES,
) -> dict[str, Any]:
    """Write the kept ids per fraction; with ``verify``, retrain and tabulate test accuracy against baselines."""
    # val first: with noisy labels the training loss rewards keeping the samples that fit their wrong
    # labels (measured: README, coreset table), while the validation loss does not.
    target = target or run.default_target(("val", "test", "train"))
    for name in baselines:
        if name not in BASELINES:
            raise UsageError(f"baselines must be drawn from {BASELINES}; got {name!r}.")
    if not seeds:
        raise UsageError("seeds must name at least one seed, e.g. seeds=[0,1,2].")
    scores = run.scores(target, score)
    labels = run.train_labels if class_balanced else None
    out_dir.mkdir(parents=True, exist_ok=True)
    selections = {fraction: select_top(scores, fraction, labels) for fraction in sorted(fractions)}
    for fraction, kept in selections.items():
        write_json(out_dir / f"coreset_{fraction:g}.json", {"fraction": fraction, "target": target, "score": score, "class_balanced": class_balanced, "ids": kept})
    print(
        f"Coresets by {score} influence on {target!r} (highest kept"
        + (", class-balanced" if class_balanced else "")
        + "): "
        + ", ".join(f"{f:g} -> {len(ids)} samples" for f, ids in selections.items())
    )
    summary: dict[str, Any] = {"target": target, "score": score, "class_balanced": class_balanced, "files": [str(out_dir / f"coreset_{f:g}.json") for f in selections]}
    if verify:
        summary["accuracy"] = _verify(run, out_dir, selections, scores, labels, seeds, baselines, f"diffin:{target}/{score}")
    write_json(out_dir / "coreset.json", summary)
    print(f"Wrote {', '.join(summary['files'])}" + (f", {out_dir / 'coreset.csv'} and {out_dir / 'coreset.png'}" if verify else ""))
    return summary


def _verify(run, out_dir, selections, scores, labels, seeds, baselines, method_name) -> dict[str, dict[str, list[float]]]:
    n = run.influence.num_samples
    dynamics: dict[str, Tensor] = {}
    if {"el2n", "forgetting"} & set(baselines):
        try:
            dynamics = load_dynamics(run.directory)
        except FileNotFoundError as error:
            print(f"note: EL2N and forgetting baselines skipped: {error}")
    methods = [method_name] + [b for b in baselines if b == "random" or b in dynamics]
    jobs = [(method, fraction, seed) for fraction in selections for method in methods for seed in seeds]
    jobs += [("all data", 1.0, seed) for seed in seeds]
    accuracy: dict[str, dict[str, list[float]]] = {}
    for method, fraction, seed in progress(jobs, "coreset: retraining"):
        if method == method_name:
            kept = selections[fraction]
        elif method == "random":
            generator = torch.Generator().manual_seed(10_000 + int(seed))
            kept = sorted(torch.randperm(n, generator=generator)[: len(selections[fraction])].tolist())
        elif method == "all data":
            kept = None
        else:
            kept = select_top(dynamics[method].nan_to_num(0.0), fraction, labels)
        model = retrain(run, keep_ids=kept, seed=int(seed))
        accuracy.setdefault(method, {}).setdefault(f"{fraction:g}", []).append(evaluate(model, run.datamodule.test_dataset)["accuracy"])
    header = ["fraction", "method", "test accuracy mean", "std", "seeds"]
    rows = []
    for method, per_fraction in accuracy.items():
        for fraction, values in per_fraction.items():
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append([fraction, method, statistics.fmean(values), std, len(values)])
    rows.sort(key=lambda row: (float(row[0]), row[1]))
    print("Test accuracy after retraining on each subset (mean ± std over seeds):")
    print(format_table(header, rows))
    write_csv(out_dir / "coreset.csv", header, rows)
    caption = plots.run_caption(
        run, f"retraining seeds {', '.join(str(s) for s in seeds)}; points: mean test accuracy over the seeds, error bars: ± 1 standard deviation over the seeds"
    )
    _plot(out_dir / "coreset.png", accuracy, method_name, caption)
    return accuracy


def _method_label(method: str, diffin_method: str) -> tuple[str, str]:
    """(legend text in words, colour key) for a method name of the accuracy table."""
    if method == diffin_method:
        target = method.split(":", 1)[1].split("/", 1)[0] if ":" in method else "the target"
        return f"Diff-In: highest influence on the {target} loss kept", "diffin"
    return {
        "random": ("random subset of the same size", "random"),
        "el2n": ("EL2N: hardest samples kept", "el2n"),
        "forgetting": ("forgetting: most often forgotten kept", "forgetting"),
    }.get(method, (method, "random"))


def _plot(path: Path, accuracy: dict[str, dict[str, list[float]]], diffin_method: str, caption: str) -> Path:
    fig, axes = plots.figure(1)
    fig.set_size_inches(9.5, 4.6)  # room for the legend beside the axes, where it covers no point
    ax = axes[0][0]
    tops = []
    means_by_method: dict[str, dict[str, float]] = {}
    for method, per_fraction in accuracy.items():
        if method == "all data":
            continue
        fractions = sorted(per_fraction, key=float)
        means = [statistics.fmean(per_fraction[f]) for f in fractions]
        stds = [statistics.stdev(per_fraction[f]) if len(per_fraction[f]) > 1 else 0.0 for f in fractions]
        means_by_method[method] = dict(zip(fractions, means))
        label, color = _method_label(method, diffin_method)
        ax.errorbar([float(f) for f in fractions], means, yerr=stds, marker="o", capsize=3, color=plots.COLORS[color], label=label)
        tops += [m + s for m, s in zip(means, stds)]
    if "all data" in accuracy:
        everything = statistics.fmean(accuracy["all data"]["1"])
        ax.axhline(everything, color=plots.COLORS["all data"], ls=":", label=f"all data: {everything:.3f}")
        tops.append(everything)
    low, _ = ax.get_ylim()
    ax.set_ylim(low, min(1.0, max(tops)) + 0.08 * (max(tops) - low))  # the all-data line clear of the border
    ax.set_xlabel("share of the training data kept")
    ax.set_xticks(sorted({float(f) for per in means_by_method.values() for f in per}))  # the fractions measured
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.set_ylabel("test accuracy after retraining")
    diffin = means_by_method.get(diffin_method, {})
    random = means_by_method.get("random", {})
    shared = [f for f in diffin if f in random]
    if shared:
        wins = sum(diffin[f] > random[f] for f in shared)
        best = max(shared, key=lambda f: diffin[f] - random[f])
        fig.suptitle(
            f"Diff-In subsets beat random ones at {wins} of {len(shared)} sizes"
            + (f" (largest gain {diffin[best] - random[best]:+.3f} at {float(best):.0%} kept)" if wins else ""),
            fontsize=11,
        )
    else:
        fig.suptitle("Test accuracy of models retrained on subsets of the training data", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return plots.save(fig, path, caption)
