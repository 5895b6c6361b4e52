"""The paper's quantitative claims, each checked against the runs with the numbers behind it.

Every check returns a Claim: the paper's statement, what the runs show (numbers), and a
verdict: "reproduced", "not reproduced" or "no data". A claim that does not reproduce is a
finding; the thresholds below are stated in each claim's text so the reader can judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.load import RunSet


@dataclass
class Claim:
    name: str
    paper: str
    measured: str
    verdict: str  # reproduced | partly reproduced | not reproduced | no data


def load_dump(run_dir: str | Path, problems: list[str] | None = None) -> dict[str, np.ndarray] | None:
    """A run's reward dump, or None when it has none or it does not read back (a truncated
    or corrupt file is listed in `problems`, and the caller picks another run)."""
    path = Path(run_dir) / "reward_dump.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - zipfile / numpy / OS errors all mean "unreadable"
        if problems is not None:
            problems.append(f"{path}: unreadable reward dump ({exc.__class__.__name__}); another run's is used")
        return None


def first_dump(runset: RunSet, prefer: str = "vanilla") -> tuple[str, dict] | None:
    """A pre-training reward dump (all runs of one pair dump the same untrained student;
    a vanilla run's is preferred)."""
    runs = runset.runs[runset.runs["kind"] == "run"]
    if runs.empty:
        return None
    order = sorted((row for _, row in runs.iterrows()), key=lambda row: row.get("reward.name") != prefer)
    for row in order:
        dump = load_dump(row["run_dir"], runset.problems)
        if dump is not None and len(dump.get("log_ratio", [])):
            return row["run_id"], dump
    return None


def _final(curves: pd.DataFrame, run_ids, metric: str, last_frac: float = 0.2) -> float | None:
    """Mean of `metric` over the last `last_frac` of each run's steps, averaged over runs."""
    values = []
    for run_id in run_ids:
        part = curves[(curves["run_id"] == run_id) & (curves["metric"] == metric)].sort_values("step")
        if part.empty:
            continue
        k = max(1, int(round(len(part) * last_frac)))
        values.append(part["value"].iloc[-k:].mean())
    return float(np.mean(values)) if values else None


def check_claims(runset: RunSet) -> list[Claim]:
    return [
        heavy_negative_tail(runset),
        early_position_extremes(runset),
        persistent_extremes(runset),
        grad_norm_ratio(runset),
        accuracy_ordering(runset),
        length_vs_alpha(runset),
    ]


def heavy_negative_tail(runset: RunSet) -> Claim:
    paper = "Before training the token-level log-ratio has a heavy negative tail (down to about -50 for Qwen3)."
    found = first_dump(runset)
    if found is None:
        return Claim("heavy negative tail", paper, "no reward dump found", "no data")
    run_id, dump = found
    lr = dump["log_ratio"]
    lo, hi = float(lr.min()), float(lr.max())
    p01, p999 = np.percentile(lr, [0.1, 99.9])
    measured = (
        f"{run_id}: {lr.size} tokens; min {lo:.2f}, max {hi:.2f}; 0.1th percentile {p01:.2f}, 99.9th {p999:.2f}; "
        f"{np.mean(lr < -5) * 100:.2f}% of tokens below -5"
    )
    verdict = "reproduced" if abs(p01) > 2 * abs(p999) and abs(lo) > 2 * abs(hi) else "not reproduced"
    return Claim(
        "heavy negative tail", paper + " Check: |min| > 2 max and |0.1th pct| > 2 |99.9th|.", measured, verdict
    )


def early_position_extremes(runset: RunSet, min_count: int = 10) -> Claim:
    paper = "The most extreme rewards concentrate at early response positions."
    found = first_dump(runset)
    if found is None:
        return Claim("extremes at early positions", paper, "no reward dump found", "no data")
    return early_positions_in_dump(*found, paper, min_count)


def early_positions_in_dump(run_id: str, dump: dict, paper: str, min_count: int = 10) -> Claim:
    lr, pos = dump["log_ratio"], dump["position"]
    cut = np.percentile(lr, 1.0)
    extreme = lr <= cut
    length = np.quantile(pos, 0.95) + 1
    early = pos < max(1, int(length * 0.25))
    share_extreme = float(extreme[early].sum() / max(1, extreme.sum()))
    share_tokens = float(early.mean())
    # Fig 2b's other reading: where teacher and student disagree most on average.
    positions, counts = np.unique(pos, return_counts=True)
    kept = positions[counts >= min_count]
    means = np.array([lr[pos == p].mean() for p in kept])
    worst = int(kept[int(np.argmin(means))]) if len(kept) else -1
    cut_pos = max(1, int(length * 0.25))
    measured = (
        f"{run_id}: {share_extreme * 100:.1f}% of the 1% most negative log-ratios sit in the first quarter of "
        f"positions (< {cut_pos}), which hold {share_tokens * 100:.1f}% of all tokens; "
    )
    if len(kept):
        measured += (
            f"the most negative position-wise mean is at position {worst} ({means.min():.2f}; "
            f"all tokens {lr.mean():.2f})"
        )
    else:
        measured += f"no position has {min_count} tokens for a position-wise mean"
    if share_extreme > 1.5 * share_tokens:
        verdict = "reproduced"
    elif 0 <= worst < cut_pos:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"
    return Claim(
        "extremes at early positions",
        paper + " Check: share of extremes > 1.5x share of tokens (partly: only the most negative mean is early).",
        measured,
        verdict,
    )


def persistent_extremes(runset: RunSet) -> Claim:
    paper = "Extreme (large negative) rewards persist throughout training, not only at the start."
    runs = runset.finished
    vanilla = runs[runs.get("reward.name") == "vanilla"] if "reward.name" in runs else runs.iloc[0:0]
    if vanilla.empty:
        return Claim("extremes persist over training", paper, "no finished vanilla run", "no data")
    first, last = [], []
    for run_id in vanilla["run_id"]:
        part = runset.curves[(runset.curves["run_id"] == run_id) & (runset.curves["metric"] == "log_ratio/min")]
        part = part.sort_values("step")
        if len(part) < 5:
            continue
        k = max(1, len(part) // 5)
        first.append(part["value"].iloc[:k].median())
        last.append(part["value"].iloc[-k:].median())
    if not first:
        return Claim("extremes persist over training", paper, "vanilla runs have too few steps", "no data")
    a, b = float(np.mean(first)), float(np.mean(last))
    measured = (
        f"vanilla per-step minimum log-ratio: median {a:.2f} over the first fifth of steps, {b:.2f} over the last fifth"
    )
    verdict = "reproduced" if b < 0.5 * a and a < 0 else "not reproduced"
    return Claim(
        "extremes persist over training",
        paper + " Check: last-fifth minimum still < half the first-fifth one.",
        measured,
        verdict,
    )


def grad_norm_ratio(runset: RunSet) -> Claim:
    paper = "PowerOPD's pre-clip gradient norms are far below vanilla OPD's."
    runs = runset.finished
    if "reward.name" not in runs:
        return Claim("gradient norms", paper, "no runs", "no data")
    medians = {}
    for name in ("vanilla", "power"):
        ids = runs[runs["reward.name"] == name]["run_id"]
        part = runset.curves[runset.curves["run_id"].isin(ids) & (runset.curves["metric"] == "grad_norm")]
        if not part.empty:
            medians[name] = float(part["value"].median())
    if len(medians) < 2:
        return Claim("gradient norms", paper, "needs finished vanilla and power runs", "no data")
    ratio = medians["vanilla"] / max(medians["power"], 1e-12)
    measured = (
        f"median grad norm: vanilla {medians['vanilla']:.3g}, PowerOPD (all α) {medians['power']:.3g}: "
        f"{ratio:.1f}x smaller"
    )
    return Claim(
        "gradient norms",
        paper + " Check: at least 2x smaller.",
        measured,
        "reproduced" if ratio >= 2 else "not reproduced",
    )


def accuracy_ordering(runset: RunSet) -> Claim:
    paper = "PowerOPD (best α) >= the post-hoc baselines (clip, tanh, z-score) > vanilla in accuracy."
    runs = runset.finished
    if "reward.name" not in runs:
        return Claim("accuracy ordering", paper, "no runs", "no data")
    score = {}
    for label, part in runs.groupby("label"):
        value = _final(runset.curves, part["run_id"], "val/accuracy")
        if value is not None:
            score[label] = (part["reward.name"].iloc[0], value)
    power = [v for _, (n, v) in score.items() if n == "power"]
    posthoc = [v for _, (n, v) in score.items() if n in ("clip", "tanh", "zscore")]
    vanilla = [v for _, (n, v) in score.items() if n == "vanilla"]
    full = [v for _, (n, v) in score.items() if n == "full_vocab"]
    if not (power and posthoc and vanilla):
        return Claim(
            "accuracy ordering", paper, "needs finished power, post-hoc and vanilla runs with validation", "no data"
        )
    best_power, mean_posthoc, van = max(power), float(np.mean(posthoc)), float(np.mean(vanilla))
    measured = (
        f"final validation accuracy (mean of the last fifth of validations): best PowerOPD {best_power * 100:.1f}%, "
        f"post-hoc mean {mean_posthoc * 100:.1f}%, vanilla {van * 100:.1f}%"
        + (f", full-vocab {np.mean(full) * 100:.1f}%" if full else "")
    )
    ok = best_power >= mean_posthoc > van
    return Claim("accuracy ordering", paper, measured, "reproduced" if ok else "not reproduced")


def length_vs_alpha(runset: RunSet) -> Claim:
    paper = "Larger α gives shorter responses."
    runs = runset.finished
    if "reward.name" not in runs:
        return Claim("length vs alpha", paper, "no runs", "no data")
    power = runs[runs["reward.name"] == "power"]
    points = []
    for alpha, part in power.groupby("reward.alpha"):
        length = _final(runset.curves, part["run_id"], "response_length")
        if length is not None:
            points.append((float(alpha), length))
    if len(points) < 3:
        return Claim("length vs alpha", paper, "needs finished power runs at 3 or more α", "no data")
    points.sort()
    rho = pd.Series([a for a, _ in points]).rank().corr(pd.Series([n for _, n in points]).rank())
    measured = "final mean response length by α: " + ", ".join(f"{a:g}: {n:.1f}" for a, n in points)
    measured += f"; Spearman correlation {rho:.2f}"
    return Claim(
        "length vs alpha",
        paper + " Check: Spearman correlation < -0.5.",
        measured,
        "reproduced" if rho < -0.5 else "not reproduced",
    )


def claims_markdown(claims: list[Claim]) -> str:
    lines = ["| Claim | Paper | Runs | Verdict |", "|---|---|---|---|"]
    for c in claims:
        cells = [text.replace("|", "\\|") for text in (c.name, c.paper, c.measured, c.verdict)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
