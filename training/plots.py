"""PNG plots of an evaluation report: quality vs cost, reliability of the expected rewards, per-tag
quality, chosen vs best candidate, routing accuracy vs reward entropy, a run's training curves.
matplotlib with the Agg backend. (The latency plot of `zooter bench` is zooter.bench.plots.)"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quality_cost(report: dict, path: Path) -> Path | None:
    """The tolerance sweep as a curve, each single candidate, the best single and the oracle as points."""
    if not report.get("pareto"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    sweep = report["pareto"]
    ax.plot([p["mean_cost"] for p in sweep], [p["mean_reward"] for p in sweep], "o-", color="C0", label="router, tolerance sweep")
    for name, v in report["baselines"]["per_candidate"].items():
        if v["mean_cost"] is None or v["mean_reward"] is None:
            continue
        best = name == report["baselines"]["best_single"]["candidate"]
        ax.scatter(v["mean_cost"], v["mean_reward"], marker="*" if best else "s", s=120 if best else 40, color="C1" if best else "gray")
        ax.annotate(name, (v["mean_cost"], v["mean_reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    oracle = report["baselines"]["oracle"]
    if oracle["mean_cost"] is not None:
        ax.scatter(oracle["mean_cost"], oracle["mean_reward"], marker="^", color="C2", s=80, label="oracle")
    ax.set_xlabel(f"mean cost ({report.get('cost_unit') or 'unit'})")
    ax.set_ylabel("mean reward")
    ax.set_title("Quality vs cost (star: best single on training data)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def per_tag(report: dict, path: Path) -> Path | None:
    tags = report.get("per_tag") or {}
    if not tags:
        return None
    plt = _pyplot()
    names = list(tags)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.5))
    for k, (key, label) in enumerate([("best_single", "best single"), ("router", "router"), ("oracle", "oracle")]):
        ax.bar(x + (k - 1) * 0.27, [tags[t][key] or 0.0 for t in names], width=0.27, label=label)
    ax.set_xticks(x, [f"{t}\n(n={tags[t]['n']})" for t in names], fontsize=8, rotation=30 if len(names) > 6 else 0)
    ax.set_ylabel("mean reward")
    ax.set_title("Quality per tag")
    ax.legend()
    return _save(fig, path)


def chosen_vs_best(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 1.0 + 0.55 * len(labels)))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("chosen by the router")
    ax.set_ylabel("best candidate (ties split)")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j] >= 0.5:
                ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("Chosen vs best candidate\n(rows where the choice matters)")
    return _save(fig, path)


def entropy_accuracy(report: dict, path: Path) -> Path | None:
    bins = report.get("entropy_vs_accuracy") or []
    if not bins:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(bins)), [b["accuracy"] for b in bins])
    ax.set_xticks(range(len(bins)), [f"{b['entropy_low']:.2f}-{b['entropy_high']:.2f}\n(n={b['n']})" for b in bins], fontsize=7)
    ax.set_xlabel("entropy of s(q) (nats)")
    ax.set_ylabel("routing accuracy (chose a best candidate)")
    ax.set_title("Routing accuracy vs reward entropy")
    return _save(fig, path)


def training_curves(history: list[dict], path: Path) -> Path | None:
    if not history:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="C0")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (KL)", color="C0")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["dev_reward"] for h in history], "s-", color="C1")
    ax2.set_ylabel("dev routed reward", color="C1")
    ax.set_title("Training curves")
    return _save(fig, path)


def write_all(report: dict, confusion_matrix: np.ndarray, labels: Sequence[str], folder, history: list | None = None) -> list[str]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = [quality_cost(report, folder / "quality_cost.png"), reliability(report, folder / "reliability.png"),
            per_tag(report, folder / "per_tag.png"),
            chosen_vs_best(confusion_matrix, labels, folder / "chosen_vs_best.png"),
            entropy_accuracy(report, folder / "entropy_accuracy.png")]
    if history:
        made.append(training_curves(history, folder / "training_curves.png"))
    return [str(p) for p in made if p is not None]


def reliability(report: dict, path: Path) -> Path:
    """Predicted (expected) reward of the chosen candidate against the realised reward, per bin."""
    plt = _pyplot()
    bins = report["calibration"]["bins"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    xs, ys = [b["predicted"] for b in bins], [b["realised"] for b in bins]
    lo, hi = min(xs + ys), max(xs + ys)
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8, label="perfect calibration")
    ax.plot(xs, ys, "o-", color="C0", label=f"router (ECE {report['calibration']['ece']:.3f})")
    for b, x, y in zip(bins, xs, ys):
        ax.annotate(str(b["n"]), (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("expected reward of the chosen candidate (bin mean)")
    ax.set_ylabel("realised reward (bin mean)")
    ax.set_title(f"Reliability, {report['n']} held-out rows, {len(bins)} equal-count bins")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
