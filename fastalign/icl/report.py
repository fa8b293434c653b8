"""Each ICL mode's outputs in the run folder: ``<mode>.md`` (table), ``<mode>.json`` and ``<mode>.png``."""

from __future__ import annotations

from pathlib import Path

from fastalign.engine.runs import write_json


def markdown_table(rows: dict, columns: list) -> str:
    """One line per condition; ``columns`` is ``[(key, title), ...]``; "—" where a value is missing."""
    lines = ["| condition | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        cells = []
        for key, _ in columns:
            value = values.get(key)
            cells.append(f"{value:.3f}" if isinstance(value, float) else ("—" if value is None else str(value)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_mode_report(run_dir, mode: str, *, title: str, rows: dict, columns: list, notes=(), data=None) -> Path:
    """Write ``<mode>.md`` and ``<mode>.json``; returns the markdown path."""
    run_dir = Path(run_dir)
    table = markdown_table(rows, columns)
    lines = [f"# {title}", "", table, ""] + [f"- {n}" for n in notes]
    if (run_dir / f"{mode}.png").exists():
        lines += ["", f"![{mode}]({mode}.png)"]
    path = run_dir / f"{mode}.md"
    path.write_text("\n".join(lines) + "\n")
    write_json(run_dir / f"{mode}.json", {"mode": mode, "rows": rows, **(data or {})})
    print(f"\nicl {mode}:\n{table}\n" + "".join(f"  {n}\n" for n in notes))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(path, panels: dict, *, title: str = "") -> Path:
    """``panels``: ``{panel title: {bar label: value}}``; missing values are left out."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, bars) in zip(axes[0], panels.items()):
        labels = [k for k, v in bars.items() if v is not None]
        ax.bar(range(len(labels)), [bars[k] for k in labels], color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, max([1.0] + [bars[k] for k in labels]))
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path, title)


def _save(plt, fig, path, title) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def line_plot(path, panels: dict, *, xlabel: str, title: str = "", hlines=None) -> Path:
    """``panels``: ``{panel title: {series label: [(x, y), ...]}}``; ``hlines``: ``{panel: {label: y}}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            pts = [(x, y) for x, y in points if y is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for label, y in ((hlines or {}).get(name) or {}).items():
            if y is not None:
                ax.axhline(y, linestyle="--", linewidth=1, color="gray")
                ax.annotate(label, (ax.get_xlim()[0], y), fontsize=7, color="gray", va="bottom")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    return _save(plt, fig, path, title)
