"""What a routing data set holds: coverage, per-candidate means, and the headroom routing can take."""

from __future__ import annotations

from collections import Counter

import numpy as np

from zooter.training.dataset import RoutingDataset


def data_stats(data: RoutingDataset) -> dict:
    r = data.rewards()
    scored = ~np.isnan(r)
    per_candidate = {}
    for j, name in enumerate(data.candidates):
        col = r[scored[:, j], j]
        per_candidate[name] = {
            "mean_reward": float(col.mean()) if col.size else None,
            "coverage": float(scored[:, j].mean()),
        }
    ranked = [n for n in data.candidates if per_candidate[n]["mean_reward"] is not None]
    best = max(ranked, key=lambda n: per_candidate[n]["mean_reward"])
    # Random: the expected reward of a uniform pick among the candidates that were scored on the row.
    random_mean = float(np.mean(np.nanmean(r, axis=1)))
    tags = Counter(t for row in data.rows for t in row.tags)
    return {
        "path": data.path,
        "rows": len(data),
        "candidates": data.candidates,
        "per_candidate": per_candidate,
        "best_single": {"candidate": best, "mean_reward": per_candidate[best]["mean_reward"]},
        "oracle": {"mean_reward": float(np.mean(np.nanmax(r, axis=1)))},
        "random": {"mean_reward": random_mean},
        "with_responses": sum(1 for row in data.rows if row.responses),
        "tags": dict(tags.most_common()),
    }


def format_stats(stats: dict, max_tags: int = 15) -> str:
    lines = [f"{stats['path']}: {stats['rows']} rows, {len(stats['candidates'])} candidates"]
    width = max(len(n) for n in stats["candidates"])
    lines.append(f"  {'candidate':<{width}}  mean reward  coverage")
    order = sorted(stats["per_candidate"].items(), key=lambda kv: -(kv[1]["mean_reward"] or -1))
    for name, s in order:
        mean = "-" if s["mean_reward"] is None else f"{s['mean_reward']:.4f}"
        lines.append(f"  {name:<{width}}  {mean:>11}  {s['coverage']:>8.1%}")
    b = stats["best_single"]
    lines.append(f"  best single: {b['candidate']} ({b['mean_reward']:.4f})")
    lines.append(f"  oracle (per-query best): {stats['oracle']['mean_reward']:.4f}")
    lines.append(f"  random: {stats['random']['mean_reward']:.4f}")
    if stats["with_responses"]:
        lines.append(f"  rows with responses: {stats['with_responses']}")
    tags = list(stats["tags"].items())
    if tags:
        shown = ", ".join(f"{t} ({n})" for t, n in tags[:max_tags])
        more = f", ... {len(tags) - max_tags} more" if len(tags) > max_tags else ""
        lines.append(f"  tags ({len(tags)}): {shown}{more}")
    else:
        lines.append("  tags: none (add some with `zooter tag`)")
    return "\n".join(lines)
