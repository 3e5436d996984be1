"""Data deletion: remove the most harmful samples, predict the change of the target loss, verify by retraining."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffin_lightning.errors import UsageError
from diffin_lightning.tasks import plots
from diffin_lightning.tasks.report import format_table, write_csv, write_json
from diffin_lightning.tasks.retrain import progress, retrain
from diffin_lightning.tasks.run import TrainedRun, evaluate, target_split


def deletion_sets(scores: torch.Tensor, k: Sequence[int] | None, fractions: Sequence[float] | None, ids: Sequence[int] | None) -> list[list[int]]:
    """The id sets to delete: the ``k`` most harmful (lowest influence) for each size, or an explicit list."""
    n = len(scores)
    if ids is not None:
        bad = [i for i in ids if not 0 <= int(i) < n]
        if bad:
            raise UsageError(f"ids must lie in [0, {n}); got {bad[:5]}.")
        return [sorted({int(i) for i in ids})]
    if fractions is not None:
        for fraction in fractions:
            if not 0 < fraction <= 1:
                raise UsageError(f"fraction must be in (0, 1]; got {fraction}. Example: fraction=0.05")
        sizes = [max(1, round(f * n)) for f in fractions]
    else:
        sizes = list(k or [])
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= n:
                raise UsageError(f"k must be an int in [1, {n}] or a list of them; got {size!r}.")
    if not sizes:
        raise UsageError("delete needs k, fraction or ids: e.g. k=30, k=[10,30,60], fraction=0.05 or ids=[3,17].")
    order = torch.argsort(scores).tolist()  # most harmful (most negative) first
    return [order[:size] for size in sorted(sizes)]


def delete(
    run: TrainedRun,
    out_dir: Path,
    target: str | None = None,
    score: str = "diffin",
    k: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    ids: Sequence[int] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Predict (and with ``verify`` measure) the effect of deleting the most harmful samples."""
    target = target or run.default_target(("val", "test", "train"))
    if run.influence[target].kind == "self":
        raise UsageError(f"delete needs a target loss to predict; {target!r} is a self-influence target. Use target=val or target=train.")
    scores = run.scores(target, score)
    sets = deletion_sets(scores, k, fractions, ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    records: list[dict[str, Any]] = []
    for chosen in sets:
        predicted = float(scores[chosen].sum())
        records.append({"k": len(chosen), "ids": chosen, "predicted_change": predicted})
        rows.append([len(chosen), predicted])
    header = ["k", f"predicted change of {target} loss"]
    if verify:
        header, rows = _verify(run, target, records)
    print(f"Deleting the most harmful samples for target {target!r} (score {score}); change = loss without - loss with:")
    print(format_table(header, rows))
    summary: dict[str, Any] = {"target": target, "score": score, "deletions": records, "verified": verify}
    if verify and len(records) > 1:
        predicted = [r["predicted_change"] for r in records]
        actual = [r["actual_change"] for r in records]
        summary["predictions_monotone"] = all(a >= b for a, b in zip(predicted, predicted[1:]))
        summary["actual_monotone"] = all(a >= b for a, b in zip(actual, actual[1:]))
        print(f"Predictions monotone in k: {summary['predictions_monotone']}; actual changes monotone in k: {summary['actual_monotone']}")
    write_csv(out_dir / "deletion.csv", header, rows)
    if verify:
        caption = plots.run_caption(
            run,
            f"one retraining per point, each with the training seed; random: one draw of k ids (generator seed {run.config.seed}); "
            "no error bars: a single run per point",
        )
        summary["plot"] = str(_plot(out_dir / "deletion.png", records, target, caption))
    write_json(out_dir / "deletion.json", summary)
    print(f"Wrote {out_dir / 'deletion.csv'}, {out_dir / 'deletion.json'}" + (f" and {summary['plot']}" if verify else ""))
    return summary


def _verify(run: TrainedRun, target: str, records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    split, test = target_split(run, target), run.datamodule.test_dataset
    n = run.influence.num_samples
    generator = torch.Generator().manual_seed(int(run.config.seed))
    jobs = [("full", None)]
    for record in records:
        removed = set(record["ids"])
        random_removed = set(torch.randperm(n, generator=generator)[: len(removed)].tolist())
        record["random_ids"] = sorted(random_removed)
        jobs += [("harmful", record), ("random", record)]
    results: dict[tuple[str, int], dict[str, float]] = {}
    for kind, record in progress(jobs, "delete: retraining"):
        removed = set() if record is None else set(record["ids"] if kind == "harmful" else record["random_ids"])
        model = retrain(run, keep_ids=[i for i in range(n) if i not in removed])
        size = 0 if record is None else record["k"]
        results[(kind, size)] = {"target_loss": evaluate(model, split)["loss"], "test_accuracy": evaluate(model, test)["accuracy"]}
    base = results[("full", 0)]
    rows = []
    for record in records:
        harmful, random = results[("harmful", record["k"])], results[("random", record["k"])]
        record.update(
            actual_change=harmful["target_loss"] - base["target_loss"],
            random_change=random["target_loss"] - base["target_loss"],
            test_accuracy=harmful["test_accuracy"],
            random_test_accuracy=random["test_accuracy"],
            full_test_accuracy=base["test_accuracy"],
            full_target_loss=base["target_loss"],
        )
        rows.append(
            [
                record["k"],
                record["predicted_change"],
                record["actual_change"],
                record["random_change"],
                base["test_accuracy"],
                record["test_accuracy"],
                record["random_test_accuracy"],
            ]
        )
    header = [
        "k",
        f"predicted d{target}_loss",
        f"actual d{target}_loss (harmful removed)",
        f"actual d{target}_loss (random removed)",
        "test acc (all)",
        "test acc (harmful removed)",
        "test acc (random removed)",
    ]
    return header, rows


def _plot(path: Path, records: list[dict[str, Any]], target: str, caption: str) -> Path:
    fig, axes = plots.figure(2)
    ks = [r["k"] for r in records]
    colors = plots.COLORS
    ax = axes[0][0]
    ax.plot(ks, [r["predicted_change"] for r in records], "o:", color=colors["diffin"], label="predicted for the most harmful (sum of their influences)")
    ax.plot(ks, [r["actual_change"] for r in records], "s-", color=colors["harmful"], label="most harmful removed (measured)")
    ax.plot(ks, [r["random_change"] for r in records], "^--", color=colors["random"], label="k random samples removed (measured)")
    ax.axhline(0, color=colors["all data"], lw=0.8, ls=":", label="all data (no change)")
    ax.set_xlabel("number of samples removed (k)")
    ax.set_ylabel(f"change of the {target} loss after retraining")
    ax.set_title(f"{target} loss: below 0 = removing them helped", fontsize=9)
    ax = axes[0][1]
    ax.plot(ks, [r["test_accuracy"] for r in records], "s-", color=colors["harmful"])
    ax.plot(ks, [r["random_test_accuracy"] for r in records], "^--", color=colors["random"])
    ax.axhline(records[0]["full_test_accuracy"], color=colors["all data"], lw=0.8, ls=":")
    ax.set_xlabel("number of samples removed (k)")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title("test accuracy", fontsize=9)
    lower = sum(r["actual_change"] < r["random_change"] for r in records)
    fig.suptitle(
        f"Removing the most harmful samples lowers the {target} loss more than removing random ones at {lower} of {len(records)} k",
        fontsize=11,
    )
    # one legend for both panels (same colours in both), under the title, covering no line
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.94), ncol=2, fontsize=8, frameon=False)
    for panel in axes[0]:
        panel.margins(y=0.12)  # the all-data line clear of the border
    fig.tight_layout(rect=(0, 0.06, 1, 0.84))
    return plots.save(fig, path, caption, layout=False)
