"""The plot of `zooter bench --plot`: latency against query length, per engine (PNG, matplotlib Agg)."""

from __future__ import annotations


def latency(report: dict, path) -> None:
    """`zooter bench --plot`: p50 and p99 latency against query length, per engine (batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [c for c in report["cells"] if c["batch"] == 1]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in single[0]["results"] if single else []:
        xs = [c["tokens"] for c in single]
        line, = ax.plot(xs, [c["results"][name]["p50_ms"] for c in single], marker="o", label=f"{name} p50")
        ax.plot(xs, [c["results"][name]["p99_ms"] for c in single], linestyle="--", color=line.get_color(), label=f"{name} p99")
    if "budget" in report:
        ax.axhline(report["budget"]["ms"], color="red", linewidth=0.8, label="budget")
    ax.set_xlabel("query length (tokens)")
    ax.set_ylabel("latency per query (ms)")
    ax.set_yscale("log")
    ax.set_title(f"zooter router latency, batch 1 ({report['model_file']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
