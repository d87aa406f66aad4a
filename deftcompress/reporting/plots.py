"""Pictures of a run: per-layer density of every step (a picture is quicker to read than the table)."""

from __future__ import annotations

from pathlib import Path

from deftcompress.reporting.report import Report


def plot_density(report: Report, path: Path) -> Path | None:
    """Per-layer density of every step as grouped bars (a picture is quicker to read than the table)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [s for s in report.steps if s.density.get("per_layer")]
    if not steps:
        return None
    labels = [f"{l['stack'][:3]}.{l['layer']}" for l in steps[0].density["per_layer"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) * max(1, len(steps)) / 2), 3.5))
    width = 0.8 / len(steps)
    for k, s in enumerate(steps):
        values = [l["density"] for l in s.density["per_layer"]]
        xs = [i + k * width for i in range(len(values))]
        ax.bar(xs, values, width=width, label=f"{s.index}: {s.pass_name} ({s.task_metric} {s.task_score:.3f})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=45, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"density ({steps[0].density.get('mode')})")
    ax.set_title(f"{report.name}: MLP activation density per layer")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
