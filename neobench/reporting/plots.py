"""The leaderboard's PNG plots: scores with intervals, gap closed vs cost, training curves.

label_points places the scatter plots' labels so that every point can be told apart. matplotlib
is imported inside the functions, so only drawing pays for it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from neobench.reporting.selection import REFERENCES, Selection, column_name, gap_closed, headline_metrics, score_cells


def plot(sel: Selection, main: list[str], everyone: list[str], out: Path) -> list[Path]:
    """scores.png (headline metrics with intervals) and the gap closed against memory and time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = headline_metrics(pd.concat([sel.students, sel.references]))
    cells = score_cells(sel, main, columns)
    paths = []
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 0.45 * len(main) + 1.4), sharey=True, squeeze=False)
    for ax, (task, metric) in zip(axes[0], columns):
        ys, xs, errs, colors = [], [], [], []
        for i, label in enumerate(main):
            cell = cells.get((label, task, metric))
            if cell:
                ys.append(i)
                xs.append(cell.mean)
                errs.append(0 if math.isnan(cell.half) else cell.half)
                colors.append("0.55" if label in REFERENCES else "C0")
        ax.errorbar(xs, ys, xerr=errs, fmt="none", ecolor="0.3", capsize=3)
        ax.scatter(xs, ys, c=colors, zorder=3)
        ax.set_title(column_name(task, metric), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(main)), main)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    paths.append(_save(fig, out / "scores.png"))

    for key, xlabel, scale, name in SCATTERS:
        fig, _ = scatter(sel, everyone, columns, key, xlabel, scale)
        paths.append(_save(fig, out / name))
    return paths


def plot_curves(sel: Selection, labels: list[str], curves: pd.DataFrame, out: Path) -> Path | None:
    """training_curves.png: loss, CE and KD per step for each label, mean over its seeds with a min-max band."""
    import matplotlib.pyplot as plt

    runs = sel.students.drop_duplicates("run_id")[["run_id", "label"]]
    data = curves.merge(runs, on="run_id")
    drawn = [l for l in labels if (data["label"] == l).any()]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharex=True)
    for i, label in enumerate(drawn):
        mine = data[data["label"] == label]
        for ax, column in zip(axes, ("loss", "ce", "kd")):
            per_step = mine.dropna(subset=[column]).groupby("step")[column].agg(["mean", "min", "max"])
            if per_step.empty:
                continue
            steps = per_step.index.astype(int)
            ax.plot(steps, per_step["mean"], color=f"C{i}", label=label, lw=1.4)
            ax.fill_between(steps, per_step["min"], per_step["max"], color=f"C{i}", alpha=0.15, lw=0)
    for ax, title in zip(axes, ("loss (the objective)", "CE on response tokens", "KD term")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out / "training_curves.png")


SCATTERS = [
    ("peak_memory_bytes", "peak memory during training (GiB)", 2**30, "score_vs_memory.png"),
    ("train_seconds", "training time (s)", 1, "score_vs_time.png"),
]


def scatter(sel: Selection, everyone: list[str], columns, key: str, xlabel: str, scale: float):
    """Gap closed (with its interval) against a cost column, every point labelled; -> (figure, labels)."""
    import matplotlib.pyplot as plt

    runs = sel.students.drop_duplicates("run_id")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    points = []
    for label in everyone:
        gap = gap_closed(sel, label, columns)
        r = runs[runs["label"] == label]
        if gap is None or r.empty:
            continue
        x = r[key].mean() / scale
        ax.errorbar([x], [100 * gap.mean], yerr=[0 if math.isnan(gap.half) else 100 * gap.half], fmt="o", capsize=3, color="C0")
        points.append((x, 100 * gap.mean, label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("gap closed, untrained → teacher (%)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.15)  # room for the labels of the outermost points
    fig.tight_layout()  # before placing labels: it moves the axes, and with them the points
    return fig, label_points(ax, points)


# Where a label may sit relative to its point: (dx, dy) directions, then alignment. Tried in this
# order, at growing distances, so the same rows always give the same picture.
LABEL_SPOTS = [
    (1, 1, "left", "bottom"), (1, -1, "left", "top"), (-1, 1, "right", "bottom"), (-1, -1, "right", "top"),
    (0, 1, "center", "bottom"), (0, -1, "center", "top"), (1, 0, "left", "center"), (-1, 0, "right", "center"),
    (2, 1, "left", "bottom"), (2, -1, "left", "top"), (-2, 1, "right", "bottom"), (-2, -1, "right", "top"),
    (1, 2, "left", "bottom"), (1, -2, "left", "top"), (-1, 2, "right", "bottom"), (-1, -2, "right", "top"),
]


def label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 8, step: float = 5.0) -> list:
    """Annotate each (x, y, label) so that every point can be told apart.

    A label may cover no other label or point and must stay inside the axes; a leader line
    (drawn beyond the first ring) may cross no label, point or other leader line. Candidates lie
    around the point at 1, 2, ... steps (in points, 1/72 inch); the first free one wins. If none is
    free, the least bad is taken, where covering a label or point counts ten crossed lines.
    """
    from matplotlib.path import Path as Line
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 4.0  # pixels of clearance around a point's marker
    marks = [ax.transData.transform((x, y)) for x, y, _ in points]
    boxes = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in marks]
    leaders: list = []
    annotations = []
    for (x, y, label), own, (px, py) in zip(points, list(boxes), marks):
        best = None
        for ring in range(1, 21):
            for dx, dy, ha, va in LABEL_SPOTS:
                note = ax.annotate(
                    label, (x, y), xytext=(dx * step * ring, dy * step * ring), textcoords="offset points",
                    ha=ha, va=va, fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 1, "shrinkB": 3} if ring > 1 else None,
                )
                note.update_positions(renderer)
                box = Text.get_window_extent(note, renderer).padded(1)  # the text, not its leader line
                leader = Line([(px, py), (box.x0 + box.width / 2, box.y0 + box.height / 2)]) if ring > 1 else None
                clashes = 10 * sum(box.overlaps(other) for other in boxes if other is not own)
                clashes += 10 * (not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1))
                if leader is not None:
                    clashes += sum(leader.intersects_bbox(other) for other in boxes if other is not own)
                    clashes += sum(leader.intersects_path(other) for other in leaders)
                if best is None or clashes < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (clashes, note, box, leader)
                else:
                    note.remove()
                if clashes == 0:
                    break
            if best[0] == 0:
                break
        boxes.append(best[2])
        if best[3] is not None:
            leaders.append(best[3])
        annotations.append(best[1])
    return annotations


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    # No "Software" stamp and a fixed dpi: the same rows give the same bytes.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
