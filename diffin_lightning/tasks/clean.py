"""Data cleaning: rank training samples from most to least suspicious."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from diffin_lightning.tasks import plots
from diffin_lightning.tasks.report import format_table, write_csv, write_json
from diffin_lightning.tasks.run import TrainedRun, predictions_on_train, suspicion

INSPECTED_SHARES = (0.05, 0.10, 0.20)


def recall_at(order: Tensor, corrupted: Tensor, share: float) -> float:
    """Share of the corrupted samples found among the first ``share`` of ``order``."""
    inspected = max(1, round(share * len(order)))
    return float(corrupted[order[:inspected]].sum()) / max(1, int(corrupted.sum()))


def clean(run: TrainedRun, out_dir: Path, target: str | None = None, score: str = "diffin", show: int = 20) -> dict[str, Any]:
    """Write ``suspects.csv`` and ``clean.png``; print the most suspicious samples and, with ground truth, recall and AUROC."""
    target = target or run.default_target(("self", "val", "train"))
    kind = run.influence[target].kind
    scores = run.scores(target, score)
    suspicious = suspicion(scores, kind)
    order = torch.argsort(suspicious, descending=True)
    labels = run.train_labels
    predictions = predictions_on_train(run)
    corrupted = run.corrupted
    original = getattr(run.datamodule, "original_labels", None)  # where the data module knows them
    header = ["rank", "id", "score", "label"] + (["original_label"] if original is not None else []) + ["prediction"]
    header += ["corrupted"] if corrupted is not None else []
    rows = []
    for rank, sample in enumerate(order.tolist(), start=1):
        row = [rank, sample, f"{float(scores[sample]):.6g}", int(labels[sample])]
        row += [int(original[sample])] if original is not None else []
        row += [int(predictions[sample])]
        rows.append(row + ([int(corrupted[sample])] if corrupted is not None else []))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "suspects.csv", header, rows)

    summary: dict[str, Any] = {"target": target, "target_kind": kind, "score": score, "num_samples": len(order)}
    direction = "highest self-influence first" if kind == "self" else "lowest (most harmful) influence first"
    print(f"Most suspicious training samples for target {target!r} ({score}, {direction}):")
    print(format_table(header, rows[:show]))
    if corrupted is not None:
        summary["recall"] = {f"{int(share * 100)}%": recall_at(order, corrupted, share) for share in INSPECTED_SHARES}
        summary["auroc"] = float(binary_auroc(suspicious.float(), corrupted.long()))
        summary["corrupted_in_top_shown"] = int(corrupted[order[:show]].sum())
        print(f"{summary['corrupted_in_top_shown']} of the top {show} are known to be corrupted.")
        print(
            "Recall of corrupted labels: "
            + ", ".join(f"{v:.3f} in the top {k}" for k, v in summary["recall"].items())
            + f"; AUROC {summary['auroc']:.3f}"
        )
    summary["plot"] = str(_plot(out_dir / "clean.png", scores, order, corrupted, target, score, kind, plots.run_caption(run)))
    summary["suspects_csv"] = str(out_dir / "suspects.csv")
    write_json(out_dir / "clean.json", summary)
    print(f"Wrote {summary['suspects_csv']} and {summary['plot']}")
    return summary


def _plot(path: Path, scores: Tensor, order: Tensor, corrupted: Tensor | None, target: str, score: str, kind: str, caption: str) -> Path:
    fig, axes = plots.figure(2 if corrupted is not None else 1)
    ax = axes[0][0]
    values = scores.numpy()
    if kind == "self":
        meaning = "self-influence (high = hard or mislabelled)"
        suspicious_end = "high self-influence"
    else:
        meaning = f"influence on the {target} loss (< 0 = harmful, > 0 = helped)"
        suspicious_end = f"low (harmful) influence on the {target} loss"
    name = {"diffin": "Diff-In", "first_order": "first-order", "second_order": "second-order term of"}.get(score, score)
    if corrupted is not None:
        bins = 60
        ax.hist(values[~corrupted.numpy()], bins=bins, alpha=0.6, color=plots.COLORS["clean"], label="label as given (clean)")
        ax.hist(values[corrupted.numpy()], bins=bins, alpha=0.6, color=plots.COLORS["corrupted"], label="corrupted label")
        found = recall_at(order, corrupted, 0.10)
        fig.suptitle(
            f"Ranking by {suspicious_end}: the top 10% holds {found:.0%} of the corrupted labels (random order: 10%)", fontsize=11
        )
    else:
        ax.hist(values, bins=60, alpha=0.8, color=plots.COLORS["diffin"], label="all training samples")
        fig.suptitle(f"Where the training samples fall: the most suspicious have {suspicious_end}", fontsize=11)
    ax.set_xlabel(f"{name} {meaning}")
    ax.set_ylabel("number of training samples")
    ax.set_title("distribution of the scores", fontsize=9)
    ax.legend(fontsize=8)
    if corrupted is not None:
        ax = axes[0][1]
        found_curve = torch.cumsum(corrupted[order].double(), 0) / max(1, int(corrupted.sum()))
        inspected = torch.arange(1, len(order) + 1, dtype=torch.float64) / len(order)
        ax.plot(inspected.numpy(), found_curve.numpy(), color=plots.COLORS["diffin"], label=f"most suspicious first ({name} {kind if kind == 'self' else target})")
        ax.plot([0, 1], [0, 1], "--", color=plots.COLORS["random"], label="random order")
        ax.set_xlabel("share of training data inspected")
        ax.set_ylabel("share of corrupted labels found")
        ax.set_title("how fast inspection finds them", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    return plots.save(fig, path, caption)
