"""Pictures of a run: per-layer density of every step, one panel per stack (a picture is quicker to read than the table)."""

from __future__ import annotations

from pathlib import Path

from deftcompress.reporting.report import Report


def plot_density(report: Report, path: Path) -> Path | None:
    """Per-layer density of every step as grouped bars, encoder and decoder in their own panels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [s for s in report.steps if s.density.get("per_layer")]
    if not steps:
        return None
    stacks = [name for name in ("encoder", "decoder") if any(l["stack"] == name for s in steps for l in s.density["per_layer"])]
    layers = {name: sorted({int(l["layer"]) for s in steps for l in s.density["per_layer"] if l["stack"] == name})
              for name in stacks}
    width_per_panel = max(5.0, 0.35 * max(len(v) for v in layers.values()) * max(1, len(steps)))
    fig, axes = plt.subplots(len(stacks), 1, figsize=(width_per_panel, 3.2 * len(stacks)), squeeze=False)
    width = 0.8 / len(steps)
    for ax, stack in zip(axes[:, 0], stacks):
        index = {layer: i for i, layer in enumerate(layers[stack])}
        for k, s in enumerate(steps):
            by_layer = {int(l["layer"]): l["density"] for l in s.density["per_layer"] if l["stack"] == stack}
            xs = [index[layer] + k * width for layer in by_layer]
            mode = s.density.get("mode")
            ax.bar(xs, list(by_layer.values()), width=width,
                   label=f"{s.index}: {s.pass_name} ({s.task_metric} {s.task_score:.3f}, {mode})")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers[stack]))], [str(x) for x in layers[stack]], fontsize=8)
        ax.set_xlabel(f"{stack} layer (missing bars: MLP block skipped at that step)")
        ax.set_ylim(0, 1.05)
        modes = sorted({str(s.density.get("mode")) for s in steps})
        ax.set_ylabel(f"exact nonzero fraction\n({' / '.join(modes)} mode{'s' if len(modes) > 1 else ''})", fontsize=8)
        ax.set_title(f"{report.name}: {stack} MLP activation density", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_figure(fig, path, **options) -> None:
    """Render to memory, then write atomically: a link at `path` is replaced, never followed."""
    import io

    from deftcompress.core.files import write_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format=str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else "png", **options)
    write_atomic(path, buffer.getvalue())
