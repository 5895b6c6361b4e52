"""The paper's figures (Figs 2a-c, 3, 4, 6) from the loader's DataFrames and run files.

Every `fig*` function draws one figure, saves it as `<out_dir>/<name>.png` (200 dpi) and
`<out_dir>/<name>.pdf`, and returns the written paths; it returns `[]` (and writes nothing)
when its input holds no data for it. Figures are sized for a paper: one column is
`COLUMN_WIDTH` inches wide, a full page width `PAGE_WIDTH`, with 7-9 pt text.

Inputs (the schema of `analysis.load`):

    runs    one row per run: `run_id`, `method` (the paper's label, e.g. "+ Clip",
            "PowerOPD α=500"), `group` (runs that differ only in seed share it), and
            optionally `label` (the method plus what tells groups of one method apart),
            `kind` ("reference" rows have no curves and are skipped), `reward.name`,
            `reward.alpha`.
    curves  long table `run_id`, `step`, `metric`, `value` (metrics.jsonl of every run).
    dump    the arrays of a run's `reward_dump.npz` (`position`, `teacher_logprob`,
            `student_logprob`, `log_ratio`, optionally `reward`).

Curves are drawn per group: the line is the mean over the group's seeds at each step,
the shaded band the min-max over seeds where a group has two or more of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Colormap, Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.labels import POWER_PREFIX, baseline_of, label_alpha, method_sort_key  # noqa: E402

COLUMN_WIDTH = 3.3  # inches, one column of a two-column paper
PAGE_WIDTH = 6.8  # inches, the full text width
PNG_DPI = 200

PAPER_RC: dict[str, object] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.1,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    # TrueType fonts in the PDF: editable text, and accepted by paper submission checks.
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}

# Baselines get fixed, mutually distinct colours; PowerOPD takes a sequential colormap by
# log10(alpha) over a FIXED alpha range, so one alpha has the same colour in every figure
# whatever other alphas that figure happens to show.
BASELINE_COLORS: dict[str, str] = {
    "Full-vocab": "#222222",
    "Vanilla": "#d62728",
    "+ Clip": "#ff7f0e",
    "+ Tanh": "#e377c2",
    "+ Z-Score": "#8c564b",
    "Teacher": "#7f7f7f",
    "Student": "#bcbd22",
}
POWER_CMAP = "viridis"
POWER_LOG10_ALPHA_RANGE = (-1.0, 3.0)  # alpha 0.1 .. 1000, the paper's sweep; outside is clamped
POWER_CMAP_SPAN = (0.0, 0.85)  # the yellow end of viridis is too light on white
OTHER_COLORS = ("#17becf", "#9467bd", "#1f77b4", "#2ca02c", "#aec7e8", "#ff9896")
LINESTYLES = ("-", "--", ":", "-.")


# ----------------------------------------------------------------------------------------
# Shared helpers: rewards, colours, saving


def power_reward(lT: np.ndarray | float, lS: np.ndarray | float, alpha: float) -> np.ndarray:
    """PowerOPD's token reward pi_T^alpha - pi_theta^alpha = exp(alpha lT) - exp(alpha lS)
    from the teacher's and student's log-probs of the token; in [-1, 1] for log-probs <= 0."""
    lT64, lS64 = np.asarray(lT, dtype=np.float64), np.asarray(lS, dtype=np.float64)
    # exp of alpha times a non-positive log-prob: in [0, 1], never overflows.
    return np.exp(alpha * lT64) - np.exp(alpha * lS64)


def power_color(alpha: float, cmap: str | Colormap = POWER_CMAP) -> tuple[float, float, float, float]:
    """The colour of PowerOPD at `alpha` (position on the colormap by log10(alpha))."""
    lo, hi = POWER_LOG10_ALPHA_RANGE
    frac = (min(max(math.log10(alpha), lo), hi) - lo) / (hi - lo)
    span_lo, span_hi = POWER_CMAP_SPAN
    colormap = plt.get_cmap(cmap) if isinstance(cmap, str) else cmap
    return colormap(span_lo + frac * (span_hi - span_lo))


def method_colors(labels: Iterable[str]) -> dict[str, object]:
    """A colour per method label: fixed colours for the baselines, the `POWER_CMAP` colormap
    by log10(alpha) for PowerOPD, and distinct leftover colours for anything else."""
    colors: dict[str, object] = {}
    others = iter(OTHER_COLORS)
    for label in sorted(set(map(str, labels)), key=method_sort_key):
        base, alpha = baseline_of(label), label_alpha(label)
        if base is not None:
            colors[label] = BASELINE_COLORS[base]
        elif alpha is not None and alpha > 0:
            colors[label] = power_color(alpha)
        else:
            colors[label] = next(others, "#7f7f7f")
    return colors


def method_styles(labels: Iterable[str]) -> dict[str, tuple[object, str]]:
    """(colour, linestyle) per label: labels of one method share its colour, so those after
    the first get other line styles to stay distinguishable."""
    labels = sorted(set(map(str, labels)), key=method_sort_key)
    colors = method_colors(labels)
    used: dict[str, int] = {}
    styles: dict[str, tuple[object, str]] = {}
    for label in labels:
        key = repr(colors[label])
        styles[label] = (colors[label], LINESTYLES[used.get(key, 0) % len(LINESTYLES)])
        used[key] = used.get(key, 0) + 1
    return styles


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write `fig` as PNG and PDF into `out_dir`, close it, and return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        fig.savefig(path, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.02)
        paths.append(path)
    plt.close(fig)
    return paths


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def symlog_threshold(values: np.ndarray, typical: np.ndarray, ratio: float = 50.0) -> float | None:
    """A symlog linear threshold when `values` reach more than `ratio` times the `typical`
    magnitude (a band that the extremes would squash flat on a linear axis), else None."""
    values, typical = np.abs(_finite(values)), np.abs(_finite(typical))
    typical = typical[typical > 0]
    if values.size == 0 or typical.size == 0:
        return None
    scale = float(np.median(typical))
    if values.max() <= ratio * scale:
        return None
    # A round number at or above the typical magnitude: the percentile band stays in the linear
    # part of the axis, the extremes go on the log part, and the tick labels stay readable.
    return 10.0 ** math.ceil(math.log10(scale))


# ----------------------------------------------------------------------------------------
# Curves: mean over the seeds of each group


@dataclass
class GroupCurve:
    """One group's metric over steps: mean over its seeds, and min/max over them."""

    label: str
    method: str
    n_runs: int
    frame: pd.DataFrame  # index step; columns mean, lo, hi, n (seeds with a value at that step)


def _legend_labels(runs: pd.DataFrame) -> pd.Series:
    """Legend label per run: `label` when the loader gave one, else the method; numbered when
    one label would still cover several groups."""
    labels = (runs["label"] if "label" in runs else runs["method"]).astype(str)
    groups = runs["group"].astype(str) if "group" in runs else labels
    out = labels.copy()
    for label in labels.unique():
        keys = list(dict.fromkeys(groups[labels == label]))
        if len(keys) > 1:
            for i, key in enumerate(keys, start=1):
                out[(labels == label) & (groups == key)] = f"{label} #{i}"
    return out


def _curve_runs(runs: pd.DataFrame | None) -> pd.DataFrame:
    if runs is None or runs.empty or "run_id" not in runs or "method" not in runs:
        return pd.DataFrame(columns=["run_id", "method", "legend"])
    part = runs[runs["kind"] != "reference"] if "kind" in runs else runs
    part = part.copy()
    part["legend"] = _legend_labels(part)
    return part


def group_curves(runs: pd.DataFrame, curves: pd.DataFrame, metric: str) -> list[GroupCurve]:
    """`metric` per group of `runs`, in paper order: the mean over the group's runs at each
    step (a run missing a step simply does not count there), and the min and max over them."""
    runs = _curve_runs(runs)
    if runs.empty or curves is None or curves.empty or not {"run_id", "step", "metric", "value"} <= set(curves):
        return []
    part = curves[(curves["metric"] == metric) & curves["run_id"].isin(runs["run_id"])]
    part = part[np.isfinite(part["value"].astype(float))]
    if part.empty:
        return []
    wide = part.pivot_table(index="step", columns="run_id", values="value", aggfunc="last").sort_index()
    out = []
    for legend, members in runs.groupby("legend", sort=False):
        cols = [r for r in members["run_id"] if r in wide.columns]
        if not cols:
            continue
        values = wide[cols]
        frame = pd.DataFrame(
            {"mean": values.mean(axis=1), "lo": values.min(axis=1), "hi": values.max(axis=1), "n": values.count(axis=1)}
        )
        frame = frame[frame["n"] > 0]
        out.append(GroupCurve(str(legend), str(members["method"].iloc[0]), len(cols), frame))
    return sorted(out, key=lambda g: method_sort_key(g.label))


def _plot_group(ax: plt.Axes, g: GroupCurve, style: tuple[object, str], scale: float = 1.0, smooth: int = 1) -> None:
    color, linestyle = style
    frame = g.frame
    mean = frame["mean"] * scale
    if smooth > 1:
        mean = mean.rolling(smooth, min_periods=1).mean()
    ax.plot(frame.index, mean, color=color, linestyle=linestyle, label=g.label)
    if g.n_runs >= 2:
        lo, hi = frame["lo"] * scale, frame["hi"] * scale
        if smooth > 1:
            lo, hi = lo.rolling(smooth, min_periods=1).mean(), hi.rolling(smooth, min_periods=1).mean()
        ax.fill_between(frame.index, lo, hi, color=color, alpha=0.18, linewidth=0)


def _seed_note(groups: Sequence[GroupCurve]) -> str:
    seeds = sorted({g.n_runs for g in groups})
    if seeds == [1]:
        return "one seed per method"
    if max(seeds) >= 2:
        return "line: mean over seeds; band: min-max over seeds"
    return ""


def _figure_legend(fig: plt.Figure, axes: Sequence[plt.Axes], ncol: int = 4) -> None:
    """One legend under the panels (panels stay uncluttered at paper size)."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(labels)))


# ----------------------------------------------------------------------------------------
# Fig 2: the log-ratio reward before and during training


def _dump_log_ratio(dump: Mapping[str, np.ndarray]) -> np.ndarray | None:
    if "log_ratio" in dump:
        return np.asarray(dump["log_ratio"], dtype=np.float64)
    if "teacher_logprob" in dump and "student_logprob" in dump:
        return np.asarray(dump["teacher_logprob"], np.float64) - np.asarray(dump["student_logprob"], np.float64)
    return None


def fig2a_reward_histogram(
    dump: Mapping[str, np.ndarray] | None,
    out_dir: str | Path,
    alphas: Sequence[float] = (5.0,),
    name: str = "fig2a_reward_histogram",
) -> list[Path]:
    """Fig 2a: distribution of the token-level rewards of pre-training rollouts.

    Reads a reward dump (`log_ratio`, or `teacher_logprob` - `student_logprob`). Left panel:
    histogram of the log-ratio log pi_T - log pi_theta of every dumped token (log-count axis),
    its minimum marked. Right panel (when the dump has both log-probs and `alphas` is not
    empty): the PowerOPD reward exp(alpha lT) - exp(alpha lS) of the same tokens, one step
    histogram per alpha on [-1, 1]. Two panels because the ranges differ by orders of magnitude.
    """
    if dump is None:
        return []
    log_ratio = _dump_log_ratio(dump)
    if log_ratio is None or _finite(log_ratio).size == 0:
        return []
    log_ratio = _finite(log_ratio)
    has_lp = "teacher_logprob" in dump and "student_logprob" in dump
    alphas = [float(a) for a in alphas] if has_lp else []
    with plt.rc_context(PAPER_RC):
        ncols = 2 if alphas else 1
        fig, axes = plt.subplots(
            1, ncols, figsize=(PAGE_WIDTH if alphas else COLUMN_WIDTH, 2.2), layout="constrained", squeeze=False
        )
        ax = axes[0, 0]
        lo, hi = float(log_ratio.min()), float(log_ratio.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 100)
        ax.hist(log_ratio, bins=bins, color=BASELINE_COLORS["Vanilla"], alpha=0.75, histtype="stepfilled")
        ax.set_yscale("log")
        ax.set_xlabel(r"log-ratio reward $\log\pi_T - \log\pi_\theta$")
        ax.set_ylabel("tokens")
        ax.set_title(f"(a) log-ratio, {log_ratio.size:,} tokens", loc="left")
        # The heavy negative tail is the point of the figure: mark and print its end.
        ax.axvline(lo, color="#444444", linestyle=":", linewidth=0.8)
        ax.annotate(
            f"min = {lo:.1f}",
            xy=(lo, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=7,
        )
        if alphas:
            ax = axes[0, 1]
            lT = np.asarray(dump["teacher_logprob"], dtype=np.float64)
            lS = np.asarray(dump["student_logprob"], dtype=np.float64)
            ok = np.isfinite(lT) & np.isfinite(lS)
            power_bins = np.linspace(-1.0, 1.0, 101)  # the power reward's whole range, shared by all alphas
            for alpha in sorted(alphas):
                r = power_reward(lT[ok], lS[ok], alpha)
                ax.hist(r, bins=power_bins, histtype="step", color=power_color(alpha), label=f"α={alpha:g}")
            ax.set_yscale("log")
            ax.set_xlim(-1.0, 1.0)
            ax.set_xlabel(r"PowerOPD reward $\pi_T^\alpha - \pi_\theta^\alpha$ (same tokens)")
            ax.set_ylabel("tokens")
            ax.set_title("(b) PowerOPD, bounded in [-1, 1]", loc="left")
            ax.legend(loc="upper left")
        return save_figure(fig, out_dir, name)


def position_stats(dump: Mapping[str, np.ndarray] | None, min_count: int = 10) -> pd.DataFrame:
    """Per token position of a reward dump: `count` and mean/min/max of `log_ratio` (and of
    `reward` when the dump has it), as columns `log_ratio_mean`, `log_ratio_min`, ...; positions
    with fewer than `min_count` tokens are dropped (their extremes are single-token noise)."""
    if dump is None or "position" not in dump:
        return pd.DataFrame(columns=["position", "count"])
    frame = pd.DataFrame({"position": np.asarray(dump["position"], dtype=np.int64)})
    log_ratio = _dump_log_ratio(dump)
    values = [] if log_ratio is None else ["log_ratio"]
    if log_ratio is not None:
        frame["log_ratio"] = log_ratio
    if "reward" in dump:
        frame["reward"] = np.asarray(dump["reward"], dtype=np.float64)
        values.append("reward")
    if frame.empty:
        return pd.DataFrame(columns=["position", "count"])
    grouped = frame.groupby("position", sort=True)
    out = pd.DataFrame({"count": grouped.size()})
    for value in values:
        agg = grouped[value].agg(["mean", "min", "max"])
        for stat in ("mean", "min", "max"):
            out[f"{value}_{stat}"] = agg[stat]
    out = out[out["count"] >= min_count].reset_index()
    return out


def fig2b_position_extremes(
    dump: Mapping[str, np.ndarray] | None,
    out_dir: str | Path,
    min_count: int = 10,
    name: str = "fig2b_position_extremes",
) -> list[Path]:
    """Fig 2b: where the extreme rewards sit in a response.

    Reads a reward dump (`position`, `log_ratio`, optionally `reward`). Per token position
    (0 = first response token): mean, min and max of the log-ratio over all dumped tokens at
    that position, positions with fewer than `min_count` tokens left out. A second panel shows
    the same for the run's own `reward` when the dump has it (it has none for full_vocab).
    """
    stats = position_stats(dump, min_count)
    values = [v for v in ("log_ratio", "reward") if f"{v}_mean" in stats]
    if stats.empty or not values:
        return []
    titles = {"log_ratio": r"(a) log-ratio $\log\pi_T - \log\pi_\theta$", "reward": "(b) the run's reward"}
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            1, len(values), figsize=(PAGE_WIDTH if len(values) == 2 else COLUMN_WIDTH, 2.2), layout="constrained"
        )
        axes = np.atleast_1d(axes)
        for ax, value in zip(axes, values):
            x = stats["position"].to_numpy()
            color = BASELINE_COLORS["Vanilla"] if value == "log_ratio" else "#1f77b4"
            ax.fill_between(x, stats[f"{value}_min"], stats[f"{value}_max"], color=color, alpha=0.15, linewidth=0)
            ax.plot(x, stats[f"{value}_max"], color=color, linewidth=0.7, label="max")
            ax.plot(x, stats[f"{value}_min"], color=color, linewidth=0.7, linestyle="--", label="min")
            ax.plot(x, stats[f"{value}_mean"], color="black", linewidth=0.9, label="mean")
            ax.axhline(0.0, color="#999999", linewidth=0.5)
            ax.set_xlabel(f"token position (positions with < {min_count} tokens dropped)")
            ax.set_ylabel("reward")
            ax.set_title(titles[value], loc="left")
        _figure_legend(fig, [axes[0]], ncol=3)  # below the panels: inside, it would hide extremes
        return save_figure(fig, out_dir, name)


def fig2c_reward_band(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    out_dir: str | Path,
    metric_prefix: str = "log_ratio",
    name: str = "fig2c_reward_band",
    sharey: bool = True,
) -> list[Path]:
    """Fig 2c: do extreme rewards persist during training?

    Reads the per-step curves `{metric_prefix}/min`, `/max`, `/p5`, `/p95` (and `/mean` when
    logged): one panel per method (group), each statistic averaged over the group's seeds;
    thin lines are the batch min and max, the band the 5th-95th percentile, the dashed line
    the mean. With `sharey` all panels share one y scale (so methods compare at a glance);
    the axis is symlog when the extremes exceed the percentile band by orders of magnitude.
    Use `metric_prefix="reward"` for each run's own (transformed) reward; full_vocab runs
    have no `reward/*` and are left out of that version.
    """
    stats = {s: group_curves(runs, curves, f"{metric_prefix}/{s}") for s in ("min", "max", "p5", "p95", "mean")}
    by_label = {s: {g.label: g for g in groups} for s, groups in stats.items()}
    labels = [g.label for g in stats["min"] if all(g.label in by_label[s] for s in ("max", "p5", "p95"))]
    if not labels:
        return []

    def panel_values(label: str, names: tuple[str, str]) -> np.ndarray:
        return np.concatenate([by_label[s][label].frame["mean"].to_numpy() for s in names])

    # Shared y: one symlog decision for all panels. Own y: each panel decides for itself (a
    # bounded reward next to the raw log-ratio should not inherit the latter's log axis).
    if sharey:
        shared = symlog_threshold(
            np.concatenate([panel_values(lab, ("min", "max")) for lab in labels]),
            np.concatenate([panel_values(lab, ("p5", "p95")) for lab in labels]),
        )
        linthresh = dict.fromkeys(labels, shared)
    else:
        linthresh = {
            lab: symlog_threshold(panel_values(lab, ("min", "max")), panel_values(lab, ("p5", "p95"))) for lab in labels
        }
    styles = method_styles(labels)
    ncols = min(3, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(PAGE_WIDTH if ncols > 1 else COLUMN_WIDTH, 0.4 + 1.7 * nrows),
            layout="constrained",
            sharex=True,
            sharey=sharey,
            squeeze=False,
        )
        for ax in axes.flat[len(labels) :]:
            ax.set_visible(False)
        for i, (ax, label) in enumerate(zip(axes.flat, labels)):
            color = styles[label][0]
            lo, hi = by_label["min"][label].frame["mean"], by_label["max"][label].frame["mean"]
            p5, p95 = by_label["p5"][label].frame["mean"], by_label["p95"][label].frame["mean"]
            both = p5.index.intersection(p95.index)
            ax.fill_between(both, p5[both], p95[both], color=color, alpha=0.35, linewidth=0)
            ax.plot(hi.index, hi, color=color, linewidth=0.7)
            ax.plot(lo.index, lo, color=color, linewidth=0.7, linestyle="--")
            if label in by_label["mean"]:
                mean = by_label["mean"][label].frame["mean"]
                ax.plot(mean.index, mean, color="black", linewidth=0.7, linestyle=":")
            ax.axhline(0.0, color="#999999", linewidth=0.5)
            if linthresh[label] is not None:
                ax.set_yscale("symlog", linthresh=linthresh[label])
            seeds = by_label["min"][label].n_runs
            ax.set_title(label + (f" ({seeds} seeds, mean)" if seeds > 1 else ""), loc="left")
            ax.grid(True, axis="y")
            if i + ncols >= len(labels):  # nothing drawn below this panel: it carries the x axis
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("training step")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i % ncols == 0 or not sharey:
                log = " (symlog)" if linthresh[label] is not None else ""
                ax.set_ylabel(metric_prefix.replace("_", "-") + log)
        # The legend explains line styles, which are the same in every panel: draw it in grey.
        keys = [
            Patch(color="#888888", alpha=0.35, linewidth=0, label="p5-p95"),
            Line2D([], [], color="#555555", linewidth=0.7, label="max"),
            Line2D([], [], color="#555555", linewidth=0.7, linestyle="--", label="min"),
        ]
        if by_label["mean"]:
            keys.append(Line2D([], [], color="black", linewidth=0.7, linestyle=":", label="mean"))
        fig.legend(handles=keys, loc="outside lower center", ncol=len(keys))
        return save_figure(fig, out_dir, name)


# ----------------------------------------------------------------------------------------
# Figs 3, 4: accuracy and response length; Fig 6: gradient norm


def _select(runs: pd.DataFrame, methods: Sequence[str] | None) -> pd.DataFrame:
    if runs is None or runs.empty or methods is None:
        return runs
    wanted = set(map(str, methods))
    keep = runs["method"].astype(str).isin(wanted)
    if "label" in runs:
        keep |= runs["label"].astype(str).isin(wanted)
    return runs[keep]


def _accuracy_length(
    runs: pd.DataFrame, curves: pd.DataFrame, out_dir: str | Path, name: str, title: str | None = None
) -> list[Path]:
    accuracy = group_curves(runs, curves, "val/accuracy")
    length_metric = "val/response_length"
    length = group_curves(runs, curves, length_metric)
    if not length:  # no validation lengths logged: the training rollouts' mean length
        length_metric = "response_length"
        length = group_curves(runs, curves, length_metric)
    if not accuracy and not length:
        return []
    styles = method_styles([g.label for g in accuracy + length])
    # Accuracy is logged as a fraction; the paper prints percent.
    acc_max = max((g.frame["mean"].max() for g in accuracy), default=0.0)
    scale = 100.0 if acc_max <= 1.0 else 1.0
    with plt.rc_context(PAPER_RC):
        fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 2.5), layout="constrained")
        for g in accuracy:
            _plot_group(ax_acc, g, styles[g.label], scale=scale)
        for g in length:
            _plot_group(ax_len, g, styles[g.label])
        ax_acc.set_ylabel("accuracy (%)" if scale == 100.0 else "accuracy")
        ax_len.set_ylabel("tokens")
        ax_acc.set_title("(a) validation accuracy", loc="left")
        ax_len.set_title(
            "(b) mean validation response length"
            if length_metric.startswith("val/")
            else "(b) mean rollout length (training batches)",
            loc="left",
        )
        for ax in (ax_acc, ax_len):
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True)
        if not accuracy:
            ax_acc.text(0.5, 0.5, "no val/accuracy logged", transform=ax_acc.transAxes, ha="center")
        note = _seed_note(accuracy + length)
        if title or note:
            fig.suptitle(" — ".join(t for t in (title, note) if t), fontsize=7)
        _figure_legend(fig, [ax_acc, ax_len], ncol=4)
        return save_figure(fig, out_dir, name)


def fig3_accuracy_length(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    out_dir: str | Path,
    name: str = "fig3_accuracy_length",
    methods: Sequence[str] | None = None,
) -> list[Path]:
    """Fig 3: validation accuracy and mean response length vs training step, per method.

    Reads `val/accuracy` and `val/response_length` (else the training `response_length`).
    One line per method (group): the mean over its seeds, with a min-max band over seeds
    when it has two or more. `methods` (method or legend labels) picks the methods to show,
    e.g. the baselines and one PowerOPD alpha as in the paper; None shows every run.
    """
    return _accuracy_length(_select(runs, methods), curves, out_dir, name)


def fig4_alpha_sweep(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    out_dir: str | Path,
    name: str = "fig4_alpha_sweep",
    baselines: Sequence[str] = (),
    last_frac: float = 0.2,
) -> list[Path]:
    """Fig 4: PowerOPD across alpha. (a) validation accuracy and (b) response length against
    step, one line per alpha coloured along a sequential colormap over log10(alpha) with a
    colorbar (neighbouring alphas stay tellable apart); (c) final accuracy and (d) final
    length against alpha (mean of the last `last_frac` of each run's points, mean +- std over
    seeds). `baselines` (labels) are drawn in grey for reference, as horizontal lines in (c)
    and (d)."""
    if runs is None or runs.empty or "method" not in runs:
        return []
    if "reward.name" in runs:
        power_mask = runs["reward.name"].astype(str) == "power"
    else:
        power_mask = runs["method"].astype(str).str.startswith(POWER_PREFIX)
    power = _curve_runs(runs[power_mask])
    if power.empty or not (
        group_curves(power, curves, "val/accuracy") or group_curves(power, curves, "response_length")
    ):
        return []
    alpha_of = {}
    for _, row in power.iterrows():
        alpha = row.get("reward.alpha")
        if alpha is None or pd.isna(alpha):
            alpha = float(str(row["method"]).split("α=")[1])
        alpha_of[row["run_id"]] = float(alpha)
    alphas = sorted(set(alpha_of.values()))
    lo, hi = np.log10(min(alphas)), np.log10(max(alphas))
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
    cmap = matplotlib.colormaps["viridis"]
    extra = _curve_runs(_select(runs, baselines) if baselines else runs.iloc[0:0])
    length_metric = "val/response_length"
    if not group_curves(power, curves, length_metric):
        length_metric = "response_length"
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(1, 4, figsize=(PAGE_WIDTH, 2.3), layout="constrained")
        finals: dict[str, dict[float, list[float]]] = {"val/accuracy": {}, length_metric: {}}
        for ax, metric, scale in ((axes[0], "val/accuracy", 100.0), (axes[1], length_metric, 1.0)):
            for g in group_curves(power, curves, metric):
                ids = power[power["legend"] == g.label]["run_id"]
                alpha = next((alpha_of[i] for i in ids if i in alpha_of), None)
                if alpha is None:
                    continue
                ax.plot(g.frame.index, g.frame["mean"] * scale, color=cmap(norm(np.log10(alpha))), lw=1.0)
            for g in group_curves(extra, curves, metric):
                ax.plot(g.frame.index, g.frame["mean"] * scale, color="0.55", ls="--", lw=0.9)
                ax.annotate(g.label, (g.frame.index[-1], g.frame["mean"].iloc[-1] * scale), fontsize=5, color="0.4")
            for run_id, alpha in alpha_of.items():
                part = curves[(curves["run_id"] == run_id) & (curves["metric"] == metric)].sort_values("step")
                part = part[part["step"] > 0]
                if not part.empty:
                    k = max(1, int(round(len(part) * last_frac)))
                    finals[metric].setdefault(alpha, []).append(float(part["value"].iloc[-k:].mean()) * scale)
            ax.set_xlabel("training step")
            ax.grid(True)
        axes[0].set_title("(a) validation accuracy (%)", loc="left")
        axes[1].set_title("(b) response length", loc="left")
        for ax, metric, title in (
            (axes[2], "val/accuracy", "(c) final accuracy (%)"),
            (axes[3], length_metric, "(d) final length"),
        ):
            points = sorted(finals[metric].items())
            if points:
                xs = [a for a, _ in points]
                means = [np.mean(v) for _, v in points]
                stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for _, v in points]
                ax.errorbar(xs, means, yerr=stds, color="0.2", lw=0.9, capsize=2)
                ax.scatter(xs, means, c=[cmap(norm(np.log10(a))) for a in xs], zorder=3, s=14)
            scale = 100.0 if metric == "val/accuracy" else 1.0
            for _, row in extra.drop_duplicates("legend").iterrows():
                ids = extra[extra["legend"] == row["legend"]]["run_id"]
                vals = []
                for run_id in ids:
                    part = curves[(curves["run_id"] == run_id) & (curves["metric"] == metric)].sort_values("step")
                    part = part[part["step"] > 0]
                    if not part.empty:
                        k = max(1, int(round(len(part) * last_frac)))
                        vals.append(float(part["value"].iloc[-k:].mean()) * scale)
                if vals:
                    ax.axhline(np.mean(vals), color="0.55", ls="--", lw=0.9)
            ax.set_xscale("log")
            ax.set_xlabel("α")
            ax.set_title(title, loc="left")
            ax.grid(True)
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:2], shrink=0.9, pad=0.01)
        bar.set_label("log10 α")
        return save_figure(fig, out_dir, name)


def fig6_grad_norm(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    out_dir: str | Path,
    name: str = "fig6_grad_norm",
    smooth: int = 1,
    methods: Sequence[str] | None = None,
) -> list[Path]:
    """Fig 6: the gradient norm before clipping vs training step, per method, log y axis.

    Reads `grad_norm`. One line per method (group), the mean over its seeds (min-max band
    over seeds when there are two or more); `smooth` > 1 applies a trailing rolling mean
    over that many logged steps, and the axis label says so.
    """
    groups = group_curves(_select(runs, methods), curves, "grad_norm")
    # A log axis cannot show zeros; a zero grad norm only happens on an all-masked batch.
    for g in groups:
        g.frame = g.frame[g.frame["mean"] > 0]
    groups = [g for g in groups if not g.frame.empty]
    if not groups:
        return []
    styles = method_styles([g.label for g in groups])
    with plt.rc_context(PAPER_RC):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.6), layout="constrained")
        for g in groups:
            _plot_group(ax, g, styles[g.label], smooth=smooth)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ylabel = "gradient norm (pre-clip)"
        if smooth > 1:
            ylabel += f"\n(rolling mean over {smooth} steps)"
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major")
        _figure_legend(fig, [ax], ncol=3)
        return save_figure(fig, out_dir, name)


ENTROPY_METRIC = "entropy/mean"
ACTIVE_METRIC = "reward/frac_above_0.01"


def fig6_diagnostics(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    out_dir: str | Path,
    name: str = "fig6_diagnostics",
    smooth: int = 5,
    methods: Sequence[str] | None = None,
) -> list[Path]:
    """Beside Fig 6, the two readings the authors' trainer logs: (a) the pre-clip gradient
    norm (log axis), (b) the student's mean policy entropy over the rollout tokens
    (`entropy/mean`, nats) and (c) the share of rollout tokens whose |reward| exceeds 0.01
    (`reward/frac_above_0.01`; sampled-token objectives only: the others have no reward).
    Mean over seeds with a min-max band; (b) and (c) smoothed over `smooth` logged steps."""
    runs = _select(runs, methods)
    panels = [
        ("grad_norm", "(a) gradient norm (pre-clip)", True, 1.0, 1),
        (ENTROPY_METRIC, "(b) policy entropy (nats/token)", False, 1.0, smooth),
        (ACTIVE_METRIC, "(c) tokens with |reward| > 0.01 (%)", False, 100.0, smooth),
    ]
    data = [group_curves(runs, curves, metric) for metric, *_ in panels]
    if not data[1] and not data[2]:
        return []  # runs from before these diagnostics were logged
    styles = method_styles([g.label for groups in data for g in groups])
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH, 2.4), layout="constrained")
        for ax, groups, (metric, title, log_y, scale, k) in zip(axes, data, panels):
            if log_y:
                groups = [g for g in groups if not g.frame[g.frame["mean"] > 0].empty]
                for g in groups:
                    g.frame = g.frame[g.frame["mean"] > 0]
            for g in groups:
                _plot_group(ax, g, styles[g.label], scale=scale, smooth=k)
            if log_y and groups:
                ax.set_yscale("log")
            if not groups:
                ax.text(0.5, 0.5, f"no {metric} logged", transform=ax.transAxes, ha="center", fontsize=7)
            ax.set_title(title, loc="left")
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, which="major")
        if smooth > 1:
            fig.suptitle(f"(b), (c): rolling mean over {smooth} logged steps", fontsize=7)
        _figure_legend(fig, list(axes), ncol=4)
        return save_figure(fig, out_dir, name)


# ----------------------------------------------------------------------------------------
# Optional: position-wise extremes over training (positions.jsonl)


def read_positions(run_dir_or_positions: str | Path) -> list[dict]:
    """The records of a run's `positions.jsonl` (a run directory or the file itself); lines
    that do not parse (a run killed mid-write) are skipped."""
    path = Path(run_dir_or_positions)
    if path.is_dir():
        path = path / "positions.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record and "position" in record:
            records.append(record)
    return records


def fig_position_over_training(
    run_dir_or_positions: str | Path,
    out_dir: str | Path,
    value: str = "log_ratio",
    min_count: int = 10,
    max_steps: int = 5,
    name: str = "fig_position_over_training",
) -> list[Path]:
    """Fig 2b over training: per token position, the min and max of `value` ("log_ratio",
    "reward" or "kl") in the batches recorded in `positions.jsonl`, at up to `max_steps`
    evenly spaced recorded steps (colour = step). Positions with fewer than `min_count`
    tokens in that batch are dropped."""
    records = [r for r in read_positions(run_dir_or_positions) if f"{value}_min" in r]
    if not records:
        return []
    records.sort(key=lambda r: r["step"])
    pick = np.unique(np.linspace(0, len(records) - 1, min(max_steps, len(records))).round().astype(int))
    chosen = [records[i] for i in pick]
    norm = Normalize(vmin=chosen[0]["step"], vmax=max(chosen[-1]["step"], chosen[0]["step"] + 1))
    cmap = plt.get_cmap("plasma")
    with plt.rc_context(PAPER_RC):
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4), layout="constrained")
        drawn = 0
        for record in chosen:
            frame = pd.DataFrame(
                {
                    "position": record["position"],
                    "count": record.get("count", [min_count] * len(record["position"])),
                    "lo": record[f"{value}_min"],
                    "hi": record[f"{value}_max"],
                }
            ).astype(float)
            frame = frame[(frame["count"] >= min_count) & np.isfinite(frame["lo"]) & np.isfinite(frame["hi"])]
            if frame.empty:
                continue
            color = cmap(0.85 * norm(record["step"]))  # the top of plasma is too light on white
            ax.plot(frame["position"], frame["hi"], color=color, linewidth=0.7, label=f"step {record['step']}")
            ax.plot(frame["position"], frame["lo"], color=color, linewidth=0.7, linestyle="--")
            drawn += 1
        if not drawn:
            plt.close(fig)
            return []
        ax.axhline(0.0, color="#999999", linewidth=0.5)
        ax.set_xlabel(f"token position (positions with < {min_count} tokens dropped)")
        ax.set_ylabel(f"{value.replace('_', '-')}: max (solid), min (dashed)")
        ax.legend(loc="lower right", ncol=2)
        return save_figure(fig, out_dir, name)
