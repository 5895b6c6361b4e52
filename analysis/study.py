"""The toy study's protocol in numbers: the shared learning rate, its robustness, and every
ordering claim with its uncertainty.

    python -m analysis.study choose-lr outputs/toy_study/calibration     # prints the table, then the lr
    python -m analysis.report outputs/toy_study/runs outputs/toy_study/evals \
        --calibration outputs/toy_study/calibration --out docs/toy_study   # the whole report

Protocol (the paper's: one learning rate shared by every method):
- calibration: six objectives x several learning rates, one seed, scored on the VALIDATION
  split only: a run's score is the mean of its last three in-training validations (less noise
  than the last one alone). The chosen learning rate maximises the mean score over the six.
- study: every method at that learning rate, three seeds, evaluated on the 500 toy test
  problems with 8 samples each. Every number is a mean +- std over seeds.
- an ordering claim "A > B" is given two ways: whether it holds on every seed (seed i of A
  against seed i of B: same prompts, same sampling seed), and a 95% paired bootstrap interval
  of the Avg@8 difference, resampling test problems (the seeds' per-problem accuracies are
  averaged first, so the interval is about the methods, not one seed's luck).
- "the best PowerOPD" is the alpha with the best mean final validation accuracy, so the test
  split never chooses anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.labels import method_sort_key
from analysis.load import RunSet, load_runs

VAL_LAST = 3  # validations averaged into a run's final validation score
TEST_SUITE, TEST_BENCH = "toy", "toy_test"


# ----------------------------------------------------------------------------------------
# Calibration: validation accuracy against learning rate


def final_val(curves: pd.DataFrame, run_id: str, last: int = VAL_LAST) -> float | None:
    """Mean of a run's last `last` in-training validations (step 0, before training, excluded)."""
    part = curves[(curves["run_id"] == run_id) & (curves["metric"] == "val/accuracy") & (curves["step"] > 0)]
    if part.empty:
        return None
    return float(part.sort_values("step")["value"].iloc[-last:].mean())


def calibration_frame(runset: RunSet) -> pd.DataFrame:
    """One row per calibration run that ended (finished, or stopped because the policy
    collapsed: that is the learning rate's failure, not a missing number): method, reward
    name, lr, seed, final validation, status."""
    rows = []
    for _, run in runset.runs.iterrows():
        if run.get("kind") != "run" or run.get("status") not in ("finished", "collapsed"):
            continue
        score = final_val(runset.curves, run["run_id"])
        if score is None:
            continue
        rows.append(
            {
                "method": run["method"],
                "reward": run.get("reward.name"),
                "lr": float(run["training.lr"]),
                "seed": run.get("seed"),
                "final_val": score,
                "initial_val": run.get("summary.val_accuracy_initial"),
                "status": run.get("status"),
            }
        )
    return pd.DataFrame(rows, columns=["method", "reward", "lr", "seed", "final_val", "initial_val", "status"])


def lr_table(frame: pd.DataFrame) -> pd.DataFrame:
    """method x lr -> final validation accuracy (mean over seeds), plus the row "Mean"."""
    table = frame.pivot_table(index="method", columns="lr", values="final_val", aggfunc="mean")
    table = table.loc[sorted(table.index, key=method_sort_key)]
    table.loc["Mean"] = table.mean(axis=0)
    return table


def choose_lr(frame: pd.DataFrame) -> float:
    """The learning rate with the best mean final validation accuracy over the methods.
    Only learning rates every method ran at compete (a half-finished sweep cannot win)."""
    table = frame.pivot_table(index="method", columns="lr", values="final_val", aggfunc="mean")
    complete = table.dropna(axis=1)
    if complete.empty:
        raise ValueError("no learning rate has a finished calibration run for every method")
    means = complete.mean(axis=0)
    return float(means.idxmax())


def lr_markdown(frame: pd.DataFrame, chosen: float | None) -> str:
    table = lr_table(frame)
    lrs = list(table.columns)
    head = "| Method | " + " | ".join(f"lr {lr:g}" + (" (chosen)" if lr == chosen else "") for lr in lrs) + " |"
    lines = [head, "|---|" + "---|" * len(lrs)]
    collapsed = {(r.method, r.lr) for r in frame.itertuples() if r.status == "collapsed"}
    for method, row in table.iterrows():
        best = row.max()
        cells = []
        for lr in lrs:
            value = row[lr]
            text = "-" if pd.isna(value) else f"{value * 100:.1f}"
            text += " (collapsed)" if (method, lr) in collapsed else ""
            cells.append(f"**{text}**" if method != "Mean" and value == best else text)
        name = "**Mean (the selection rule)**" if method == "Mean" else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    start = frame["initial_val"].dropna()
    note = (
        f"\nFinal validation accuracy in % (mean of the last {VAL_LAST} in-training validations; validation split, "
        "one seed). Bold: each method's best learning rate. (collapsed): the run stopped early, every rollout "
        "of several updates in a row being empty; its score is its last validations."
    )
    if not start.empty:
        note += f" Before training: {start.mean() * 100:.1f}%."
    return "\n".join(lines) + "\n" + note + "\n"


def fig_lr_robustness(frame: pd.DataFrame, chosen: float | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if frame.empty:
        return []
    table = lr_table(frame).drop(index="Mean")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, row in table.iterrows():
        row = row.dropna()
        ax.plot(row.index, row.values * 100, marker="o", label=method)
    start = frame["initial_val"].dropna()
    if not start.empty:
        ax.axhline(start.mean() * 100, color="grey", ls=":", label="before training")
    if chosen is not None:
        ax.axvline(chosen, color="black", ls="--", lw=0.8, label="chosen lr")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (AdamW, constant)")
    ax.set_ylabel("final validation accuracy (%)")
    ax.set_title("Learning-rate robustness (toy, 200 updates)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "lr_robustness.png", out / "lr_robustness.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------
# Uncertainty of the test results


def per_problem(run_dir: str | Path, suite: str = TEST_SUITE, bench: str = TEST_BENCH) -> pd.Series | None:
    """Per-problem accuracy (correct samples / n) of one evaluated run, indexed by problem id."""
    path = Path(run_dir) / "eval" / suite / f"{bench}.samples.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    frame = pd.DataFrame(records)
    return frame.groupby("id")["correct"].mean()


@dataclass
class Group:
    label: str
    reward: str
    alpha: float | None
    seeds: dict[int, pd.Series]  # seed -> per-problem accuracy
    final_val: float | None  # mean over seeds of the final validation score

    @property
    def per_seed_avg(self) -> dict[int, float]:
        return {s: float(v.mean()) for s, v in self.seeds.items()}

    @property
    def problems(self) -> pd.Series:
        """Per-problem accuracy averaged over seeds."""
        return pd.concat(self.seeds.values(), axis=1).mean(axis=1)


def test_groups(runset: RunSet) -> dict[str, Group]:
    """Every configuration (label) with per-problem test accuracy, trained and reference."""
    groups: dict[str, Group] = {}
    for _, run in runset.runs[runset.runs["finished"]].iterrows():
        acc = per_problem(run["run_dir"])
        if acc is None:
            continue
        label = run["label"]
        reward = run.get("reward.name") if run["kind"] == "run" else "reference"
        alpha = run.get("reward.alpha") if reward == "power" else None
        group = groups.setdefault(label, Group(label, reward, alpha, {}, None))
        seed = 0 if pd.isna(run.get("seed")) else int(run.get("seed"))
        group.seeds[seed] = acc
    for label, group in groups.items():
        ids = runset.runs[(runset.runs["label"] == label) & (runset.runs["kind"] == "run")]["run_id"]
        scores = [s for s in (final_val(runset.curves, i) for i in ids) if s is not None]
        group.final_val = float(np.mean(scores)) if scores else None
    return groups


def paired_bootstrap(a: pd.Series, b: pd.Series, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Avg difference a - b (in points) and its 95% interval, resampling the shared problems."""
    ids = a.index.intersection(b.index)
    diff = (a.loc[ids] - b.loc[ids]).to_numpy() * 100
    rng = np.random.default_rng(seed)
    draws = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


@dataclass
class Ordering:
    claim: str
    a: str
    b: str
    diff: float
    lo: float
    hi: float
    seeds_holding: int
    seeds: int

    @property
    def short_verdict(self) -> str:
        """holds | holds on average | reversed | not resolved (the verdict in one or two words)."""
        if self.lo > 0:
            return "holds" if self.seeds_holding == self.seeds else "holds on average"
        return "reversed" if self.hi < 0 else "not resolved"

    @property
    def verdict(self) -> str:
        if self.lo > 0 and self.seeds_holding == self.seeds:
            return "holds (every seed, interval > 0)"
        if self.lo > 0:
            return f"holds on average (interval > 0; {self.seeds_holding}/{self.seeds} seeds)"
        if self.hi < 0:
            return "reversed (interval < 0)"
        return "not resolved (interval spans 0)"


def compare(claim: str, a: Group, b: Group) -> Ordering:
    diff, lo, hi = paired_bootstrap(a.problems, b.problems)
    pa, pb = a.per_seed_avg, b.per_seed_avg
    if len(pb) == 1:  # a reference (untrained student, teacher): one evaluation for all seeds
        only = next(iter(pb.values()))
        pairs = [(v, only) for v in pa.values()]
    else:
        pairs = [(pa[s], pb[s]) for s in sorted(set(pa) & set(pb))]
    holding = sum(x > y for x, y in pairs)
    return Ordering(claim, a.label, b.label, diff, lo, hi, holding, len(pairs))


def best_by_validation(groups: dict[str, Group], reward: str) -> Group | None:
    pool = [g for g in groups.values() if g.reward == reward and g.final_val is not None]
    return max(pool, key=lambda g: g.final_val) if pool else None


def ordering_claims(groups: dict[str, Group]) -> list[Ordering]:
    """The paper's accuracy orderings, plus "OPD helps at all", on the test split."""
    out: list[Ordering] = []
    power = best_by_validation(groups, "power")
    vanilla = next((g for g in groups.values() if g.reward == "vanilla"), None)
    full = next((g for g in groups.values() if g.reward == "full_vocab"), None)
    student = next((g for g in groups.values() if g.label.startswith("Student")), None)
    posthoc = [g for g in groups.values() if g.reward in ("clip", "tanh", "zscore")]
    scored = [g for g in posthoc if g.final_val is not None]
    best_posthoc = max(scored, key=lambda g: g.final_val) if scored else None
    if power and student:
        out.append(compare("PowerOPD (best α by validation) improves on the untrained student", power, student))
    if full and student:
        out.append(compare("Full-vocab improves on the untrained student", full, student))
    if vanilla and student:
        out.append(compare("Vanilla improves on the untrained student", vanilla, student))
    if power and vanilla:
        out.append(compare("PowerOPD > Vanilla", power, vanilla))
    if power and best_posthoc:
        out.append(compare("PowerOPD > best post-hoc baseline (by validation)", power, best_posthoc))
    for g in sorted(posthoc, key=lambda g: method_sort_key(g.label)):
        if vanilla:
            out.append(compare(f"{g.label} > Vanilla", g, vanilla))
    if power and full:
        out.append(compare("PowerOPD >= Full-vocab (paper: matches or beats it)", power, full))
    return out


def orderings_markdown(orderings: list[Ordering]) -> str:
    if not orderings:
        return "No evaluated runs: run `python evaluate.py sweep_dir=<runs>` first.\n"
    lines = [
        "| Claim | A | B | Avg@8 A - B (points) | 95% paired bootstrap | seeds where A > B | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in orderings:
        lines.append(
            f"| {o.claim} | {o.a} | {o.b} | {o.diff:+.1f} | [{o.lo:+.1f}, {o.hi:+.1f}] | "
            f"{o.seeds_holding}/{o.seeds} | {o.verdict} |"
        )
    return "\n".join(lines) + "\n"


ORDERINGS_NOTE = (
    'Avg@8 on the test split. "Seeds where A > B": seed i of A against seed i of B (same prompts, same '
    "sampling seed; a reference model is one evaluation for all seeds). The interval resamples test problems, "
    "each problem's accuracy averaged over the seeds first. Claims whose methods have fewer than two seeds are "
    "left out.\n"
)


def study_sections(
    main: RunSet,
    calibration_roots: list[Path],
    fig_dir: Path,
    sensitivity_roots: list[Path] | None = None,
) -> tuple[str, dict]:
    """The protocol and calibration sections (with `calibration_roots`), the ordering claims
    (whenever the compared methods have at least two seeds) and the sensitivity table (with
    `sensitivity_roots`) of the report (Markdown), and the numbers behind them."""
    md: list[str] = []
    numbers: dict = {}
    chosen = None
    if calibration_roots:
        md += ["## Protocol\n", __doc__.split("Protocol (", 1)[1].split("\n\n")[0].split("\n", 1)[1] + "\n"]
        cal = calibration_frame(load_runs(calibration_roots))
        if not cal.empty:
            try:
                chosen = choose_lr(cal)
            except ValueError:
                chosen = None
            numbers["calibration"] = lr_table(cal).to_dict()
            numbers["chosen_lr"] = chosen
            md.append("## Calibration: the shared learning rate, and robustness to it\n")
            md.append(lr_markdown(cal, chosen))
            paths = fig_lr_robustness(cal, chosen, fig_dir)
            if paths:
                md.append("![learning-rate robustness](figures/lr_robustness.png)\n")
    lrs = sorted({float(x) for x in main.finished.get("training.lr", pd.Series(dtype=float)).dropna()})
    if chosen is not None and lrs and lrs != [chosen]:
        md.append(f"**Warning**: the study's runs use lr {lrs}, not the calibrated {chosen:g}.\n")
    groups = test_groups(main)
    orderings = [o for o in ordering_claims(groups) if o.seeds >= 2]
    if orderings:
        numbers["orderings"] = [o.__dict__ | {"verdict": o.verdict} for o in orderings]
        md.append("## Ordering claims on the test split, with their uncertainty\n")
        md.append(ORDERINGS_NOTE)
        md.append(orderings_markdown(orderings))
    if sensitivity_roots:
        variants = [variant_of(main, Path(root)) for root in sensitivity_roots]
        text, rows = sensitivity_markdown(groups, orderings, variants)
        md.append(text)
        numbers["sensitivity"] = rows
    return "\n".join(md), numbers


# ----------------------------------------------------------------------------------------
# Sensitivity: the same claims, with some rows run another way


@dataclass
class Variant:
    """The runs of one sensitivity sweep, and how they differ from the study's rows."""

    name: str  # the sweep folder's name
    groups: dict[str, Group]
    changes: dict[str, str]  # group label -> "reward.tau 1.0 -> 5.0, ..." against the study's row
    training_changed: bool  # it changes training settings (sampling, ...), not only a reward's knobs
    replaces: dict[str, str] = None  # group label -> the label of the study's row it stands for

    def claim_key(self, claim: str) -> str:
        """The study's wording of one of this variant's claims ("+ Clip ±5 > Vanilla" is the
        study's "+ Clip > Vanilla" made with the authors' clip)."""
        for label, base in sorted((self.replaces or {}).items(), key=lambda kv: -len(kv[0])):
            if label != base:
                claim = claim.replace(label, base)
        return claim


CONFIG_PREFIXES = ("reward.", "training.")


def _group_config(runs: pd.DataFrame) -> dict:
    """The reward and training settings of a group's first run (seed and output keys aside)."""
    from analysis.load import NOT_CONFIG

    first = runs.iloc[0]
    return {
        k: first[k]
        for k in runs.columns
        if k.startswith(CONFIG_PREFIXES) and not k.startswith(NOT_CONFIG) and not pd.isna(first[k])
    }


def variant_of(main: RunSet, root: Path) -> Variant:
    """Load one sensitivity sweep and describe each of its methods against the study's row of
    the same objective (same alpha for PowerOPD)."""
    sens = load_runs([root])
    groups = {label: g for label, g in test_groups(sens).items() if g.reward != "reference"}
    base_runs = main.finished
    changes, replaces, training_changed = {}, {}, False
    for label, group in groups.items():
        mine = sens.finished[sens.finished["label"] == label]
        same = base_runs[base_runs.get("reward.name", pd.Series(dtype=str)) == group.reward]
        if group.reward == "power" and "reward.alpha" in same:
            same = same[same["reward.alpha"].astype(float) == float(group.alpha)]
        if mine.empty or same.empty:
            changes[label] = "no counterpart among the study's rows"
            continue
        replaces[label] = str(same.iloc[0]["label"])
        a, b = _group_config(same), _group_config(mine)
        diff = [k for k in sorted(set(a) | set(b)) if not _same(a.get(k), b.get(k))]
        changes[label] = ", ".join(f"{k} {_show(a.get(k))} → {_show(b.get(k))}" for k in diff) or "no difference"
        training_changed |= any(k.startswith("training.") for k in diff)
    return Variant(Path(root).name, groups, changes, training_changed, replaces)


def _same(a, b) -> bool:
    """Config values equal, with 0 and 0.0 alike (a column with gaps is read back as floats)."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def merged_groups(main_groups: dict[str, Group], variant: Variant) -> dict[str, Group]:
    """The groups a variant's claims are made on. A variant that only re-runs some objectives
    another way replaces the study's rows of those objectives and keeps the others; one that
    changes training settings is compared with the reference models only (mixing sampling
    settings inside one claim would say nothing about either)."""
    replaced = {g.reward for g in variant.groups.values()}
    if variant.training_changed:
        kept = {label: g for label, g in main_groups.items() if g.reward == "reference"}
    else:
        kept = {label: g for label, g in main_groups.items() if g.reward not in replaced}
    return {**kept, **variant.groups}


def _cell(o: Ordering | None, base: Ordering | None) -> str:
    if o is None:
        return "-"
    text = f"{o.diff:+.1f} [{o.lo:+.1f}, {o.hi:+.1f}], {o.seeds_holding}/{o.seeds}: {o.short_verdict}"
    if base is not None and (o.a, o.b) != (base.a, base.b):
        text += f" ({o.a} vs {o.b})"
    if base is not None and base.short_verdict != o.short_verdict:
        return f"**{text} (changed)**"
    return text


def sensitivity_markdown(
    main_groups: dict[str, Group], main_orderings: list[Ordering], variants: list[Variant]
) -> tuple[str, list[dict]]:
    """One table: every ordering claim as the study ran it and under each variant (its A and B
    may be other rows: the variant's own). A cell whose verdict differs from the study's is
    marked (changed)."""
    per_variant = [
        {v.claim_key(o.claim): o for o in ordering_claims(merged_groups(main_groups, v)) if o.seeds >= 2}
        for v in variants
    ]
    claims = list(dict.fromkeys([o.claim for o in main_orderings] + [c for os in per_variant for c in os]))
    base = {o.claim: o for o in main_orderings}
    head = "| Claim | as the study ran it | " + " | ".join(f"`{v.name}`" for v in variants) + " |"
    lines = [head, "|---|---|" + "---|" * len(variants)]
    rows, changed = [], {v.name: [] for v in variants}
    for claim in claims:
        found = [os.get(claim) for os in per_variant]
        if all(o is None for o in found):
            continue
        for v, o in zip(variants, found):
            if o is not None and claim in base and o.short_verdict != base[claim].short_verdict:
                changed[v.name].append(claim)
        cells = [_cell(base.get(claim), None)] + [_cell(o, base.get(claim)) for o in found]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
        rows.append(
            {
                "claim": claim,
                "study": base[claim].__dict__ | {"verdict": base[claim].verdict} if claim in base else None,
                **{v.name: (o.__dict__ | {"verdict": o.verdict}) if o else None for v, o in zip(variants, found)},
            }
        )
    md = [
        "## Sensitivity: the same claims with the baselines run the authors' way, and with truncated sampling\n",
        "Each column re-runs some rows another way (same pair, budget, learning rate and seeds) and makes every "
        "claim again with them; a cell is Avg@8 A - B in points [95% paired bootstrap], seeds where A > B, "
        "verdict, and the rows compared when they are not the study's. **(changed)**: the verdict differs "
        "from the study's.\n",
    ]
    for v in variants:
        scope = (
            "training settings change, so its claims compare its own rows with the reference models only"
            if v.training_changed
            else "the rows it re-runs replace the study's rows of the same objective; every other row is the study's"
        )
        md.append(f"- `{v.name}` ({scope}):")
        md += [f"  - {label}: {change}" for label, change in v.changes.items()]
    md.append("")
    md.append("\n".join(lines) + "\n")
    changes = [f"`{name}`: " + "; ".join(claims) for name, claims in changed.items() if claims]
    if changes:
        md.append("Verdicts that change: " + ". ".join(changes) + ".\n")
    elif rows:
        md.append("No claim changes its verdict.\n")
    return "\n".join(md), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pick = sub.add_parser("choose-lr", help="print the calibration table, then the chosen learning rate")
    pick.add_argument("dirs", nargs="+", type=Path)
    pick.add_argument("--json", type=Path, default=None, help="also write the table and the choice here")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist; run the calibration sweep first", file=sys.stderr)
        return 2
    frame = calibration_frame(load_runs(args.dirs))
    try:
        chosen = choose_lr(frame)
    except ValueError as exc:
        print(f"error: {exc}; run `python run.py -cd sweeps -cn toy_calibration` to finish it", file=sys.stderr)
        return 2
    print(lr_markdown(frame, chosen))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        table = lr_table(frame)
        args.json.write_text(
            json.dumps(
                {
                    "chosen_lr": chosen,
                    "final_val": {m: {f"{k:g}": v for k, v in r.items()} for m, r in table.iterrows()},
                },
                indent=2,
            )
        )
    print(f"{chosen:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
