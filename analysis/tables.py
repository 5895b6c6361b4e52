"""The paper's tables from a RunSet: Tables 2/3 (benchmarks) and Table 4 (efficiency).

Tables 2/3: one row per configuration (seeds averaged: "mean ± std" when there are two or
more), columns = benchmarks x (Avg, Pass, Len) + Mean, from each run's
`eval/<suite>.json`. In every Avg and Pass column the best value is bold and the second
best underlined, among the trained methods (reference rows such as the teacher are shown
but not ranked; Len is not ranked, since shorter is not better by itself). A missing cell
is "-" and a note says which run lacks which result and the command that fills it.

Table 4: TFLOPs per update from the FLOPs model (poweropd.flops) for each pair's
architecture, and the measured median step time and peak memory of sampled-token vs
full-vocab runs, with the reductions in percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from analysis.labels import method_sort_key
from poweropd.flops import arch_of, update_flops

METRICS = (("avg_at_n", "Avg"), ("pass_at_n", "Pass"), ("length", "Len"))
RANKED = ("avg_at_n", "pass_at_n")


@dataclass
class Table:
    title: str
    columns: list[str]  # column groups (benchmark labels + "Mean")
    rows: list[dict]  # {"label", "reference", "seeds", (col, metric): (mean, std, n)}
    notes: list[str] = field(default_factory=list)


def suites_in(runs: pd.DataFrame) -> list[str]:
    suites = {c.split(".")[1] for c in runs.columns if c.startswith("eval.") and c.count(".") >= 3}
    return sorted(suites, key=lambda s: (s != "math7", s))


def benchmarks_of(runs: pd.DataFrame, suite: str) -> list[str]:
    from poweropd.benchmarks import SUITES

    present = []
    for c in runs.columns:
        parts = c.split(".")
        if c.startswith(f"eval.{suite}.") and len(parts) == 4 and parts[2] != "mean" and parts[2] not in present:
            present.append(parts[2])
    return list(SUITES[suite]) if suite in SUITES else present


def _label_of(bench: str) -> str:
    from poweropd.benchmarks import BENCHMARKS

    return BENCHMARKS[bench].label if bench in BENCHMARKS else bench


def results_table(runs: pd.DataFrame, suite: str) -> Table:
    """Tables 2/3 for one evaluation suite (finished runs and reference models)."""
    benches = benchmarks_of(runs, suite)
    usable = runs[runs["finished"]]
    columns = [*benches, "mean"]
    table = Table(
        f"Benchmark results ({suite}): Avg@n / Pass@n in %, Len in tokens",
        [_label_of(b) for b in benches] + ["Mean"],
        [],
    )
    missing: dict[str, list[str]] = {}
    order = sorted(
        usable["label"].unique(),
        key=lambda lab: (usable[usable["label"] == lab]["kind"].iloc[0] != "reference", method_sort_key(lab)),
    )
    for label in order:
        part = usable[usable["label"] == label]
        row = {"label": label, "reference": part["kind"].iloc[0] == "reference", "seeds": len(part)}
        for bench, col_label in zip(columns, table.columns):
            for metric, _ in METRICS:
                name = f"eval.{suite}.{bench}.{metric}"
                values = []
                for _, run in part.iterrows():
                    value = run.get(name)
                    if _missing(value):
                        missing.setdefault(run["run_dir"], []).append(col_label)
                    else:
                        values.append(float(value))
                if values:
                    scale = 100.0 if metric in RANKED else 1.0
                    mean = sum(values) / len(values) * scale
                    std = _std([v * scale for v in values]) if len(values) > 1 else 0.0
                    row[(col_label, metric)] = (mean, std, len(values))
        table.rows.append(row)
    for run_dir, cols in missing.items():
        cols = sorted(set(cols), key=cols.index)
        table.notes.append(
            f"`{run_dir}`: no {suite} result for {', '.join(cols)} "
            f'(fill it with `python evaluate.py run_dir={run_dir} eval.suite={suite}`); those cells show "-" '
            "and a mean over seeds uses the runs that have the result"
        )
    return table


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ranks(table: Table) -> dict[tuple, dict[str, int]]:
    """(column, metric) -> {row label: 1 (best) or 2 (second best)}, over non-reference rows.
    Ties share a rank."""
    out = {}
    ranked_rows = [r for r in table.rows if not r["reference"]]
    for col in table.columns:
        for metric in RANKED:
            values = sorted({round(r[(col, metric)][0], 6) for r in ranked_rows if (col, metric) in r}, reverse=True)
            marks = {}
            for r in ranked_rows:
                if (col, metric) in r:
                    v = round(r[(col, metric)][0], 6)
                    if values and v == values[0]:
                        marks[r["label"]] = 1
                    elif len(values) > 1 and v == values[1]:
                        marks[r["label"]] = 2
            out[(col, metric)] = marks
    return out


def _cell(row: dict, col: str, metric: str) -> str:
    if (col, metric) not in row:
        return "-"
    mean, std, n = row[(col, metric)]
    digits = 0 if metric == "length" else 1
    text = f"{mean:.{digits}f}"
    if n > 1:
        text += f" ± {std:.{digits}f}"
    return text


def to_markdown(table: Table) -> str:
    marks = ranks(table)
    head = ["Method", "seeds"] + [f"{c} {short}" for c in table.columns for _, short in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = [row["label"] + (" (reference)" if row["reference"] else ""), str(row["seeds"])]
        for col in table.columns:
            for metric, _ in METRICS:
                text = _cell(row, col, metric)
                rank = marks.get((col, metric), {}).get(row["label"])
                cells.append(f"**{text}**" if rank == 1 else f"<u>{text}</u>" if rank == 2 else text)
        lines.append("| " + " | ".join(cells) + " |")
    legend = "Bold: best, underlined: second best per Avg/Pass column among trained methods."
    notes = "\n".join(f"- {n}" for n in table.notes)
    return "\n".join(lines) + f"\n\n{legend}\n" + (f"\nMissing cells:\n{notes}\n" if notes else "")


def _tex(text: str) -> str:
    text = text.replace("\\", "\\textbackslash{}").replace("&", "\\&").replace("%", "\\%").replace("_", "\\_")
    return text.replace("α=", "$\\alpha$=").replace("±", "$\\pm$")


def to_latex(table: Table) -> str:
    marks = ranks(table)
    ncols = 2 + 3 * len(table.columns)
    spec = "ll" + "rrr" * len(table.columns)
    head1 = " & ".join(["", ""] + [f"\\multicolumn{{3}}{{c}}{{{_tex(c)}}}" for c in table.columns])
    rules = " ".join(f"\\cmidrule(lr){{{3 + 3 * i}-{5 + 3 * i}}}" for i in range(len(table.columns)))
    head2 = " & ".join(["Method", "Seeds"] + [short for _ in table.columns for _, short in METRICS])
    body = []
    for row in table.rows:
        cells = [_tex(row["label"]), str(row["seeds"])]
        for col in table.columns:
            for metric, _ in METRICS:
                text = _tex(_cell(row, col, metric))
                rank = marks.get((col, metric), {}).get(row["label"])
                cells.append(f"\\textbf{{{text}}}" if rank == 1 else f"\\underline{{{text}}}" if rank == 2 else text)
        body.append(" & ".join(cells) + " \\\\")
    lines = [
        f"% {table.title}",
        "% Requires \\usepackage{booktabs}. Bold: best, underlined: second best (Avg/Pass, trained methods).",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        head1 + " \\\\",
        rules,
        head2 + " \\\\",
        "\\midrule",
        *body,
        "\\bottomrule",
        "\\end{tabular}",
    ]
    assert ncols == len(head2.split(" & "))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Table 4: efficiency


def efficiency_rows(runs: pd.DataFrame, prompt_len: int = 128) -> list[dict]:
    """Per model pair with both kinds of runs: TFLOPs per update (FLOPs model; B and T from
    the runs' config, prompt length `prompt_len`), measured median step time and peak memory."""
    done = runs[(runs["kind"] == "run") & runs["finished"]]
    out = []
    if "model_pair.name" not in done:
        return out
    for pair, part in done.groupby("model_pair.name"):
        full = part[part["reward.name"] == "full_vocab"]
        sampled = part[part["reward.name"] != "full_vocab"]
        if full.empty or sampled.empty:
            continue
        first = part.iloc[0]
        teacher = arch_of(str(first.get("summary.teacher", ""))) or arch_of(str(first.get("model_pair.teacher", "")))
        student = arch_of(str(first.get("summary.student", ""))) or arch_of(str(first.get("model_pair.student", "")))
        batch, response = int(first["training.batch_size"]), int(first["training.max_new_tokens"])
        flops = update_flops(teacher, student, batch, prompt_len, response) if teacher and student else None
        for kind, group in (("Full-vocab OPD", full), ("Sampled-token OPD", sampled)):
            tflops = None
            if flops is not None:
                tflops = flops["full_vocab" if kind.startswith("Full") else "sampled_token"] / 1e12
            out.append(
                {
                    "pair": pair,
                    "method": kind,
                    "runs": len(group),
                    "methods": ", ".join(sorted(group["method"].unique(), key=method_sort_key)),
                    "tflops": tflops,
                    "step_time_s": _median(group.get("summary.median_step_time")),
                    "peak_mem_gb": _max(group.get("summary.peak_mem_gb")),
                    "batch": batch,
                    "prompt": prompt_len,
                    "response": response,
                }
            )
    return out


def _median(col) -> float | None:
    values = sorted(v for v in (col if col is not None else []) if not _missing(v))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _max(col) -> float | None:
    values = [v for v in (col if col is not None else []) if not _missing(v)]
    return max(values) if values else None


def reduction(full: float | None, sampled: float | None) -> str:
    if full is None or sampled is None or full == 0:
        return "-"
    return f"↓{100 * (full - sampled) / full:.1f}%"


def efficiency_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No model pair has both a finished full-vocab run and a finished sampled-token run.\n"
    lines = ["| Pair | Method | Runs | TFLOPs/update | Time/step (s) | Peak mem (GB) |", "|---|---|---|---|---|---|"]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        full = next(r for r in rows if r["pair"] == pair and r["method"].startswith("Full"))
        sampled = next(r for r in rows if r["pair"] == pair and not r["method"].startswith("Full"))
        for r in (full, sampled):
            lines.append(
                f"| {pair} | {r['method']} | {r['runs']} | {_fmt(r['tflops'], 4)} | {_fmt(r['step_time_s'], 3)} | "
                f"{_fmt(r['peak_mem_gb'], 3)} |"
            )
        lines.append(
            f"| {pair} | Reduction | | {reduction(full['tflops'], sampled['tflops'])} | "
            f"{reduction(full['step_time_s'], sampled['step_time_s'])} | "
            f"{reduction(full['peak_mem_gb'], sampled['peak_mem_gb'])} |"
        )
    r = rows[0]
    lines.append(
        f"\nTFLOPs from the FLOPs model with B = {r['batch']}, prompt {r['prompt']} tokens, T = {r['response']} "
        "(the runs' batch size and response limit); time and memory are the runs' own medians / peaks "
        "(`summary.json`)."
    )
    return "\n".join(lines) + "\n"


def efficiency_latex(rows: list[dict]) -> str:
    lines = [
        "\\begin{tabular}{llrrr}",
        "\\toprule",
        "Pair & Method & TFLOPs/upd. & Time/step (s) & Peak mem. (GB) \\\\",
    ]
    lines.append("\\midrule")
    for r in rows:
        lines.append(
            f"{_tex(r['pair'])} & {_tex(r['method'])} & {_fmt(r['tflops'], 4)} & {_fmt(r['step_time_s'], 3)} & "
            f"{_fmt(r['peak_mem_gb'], 3)} \\\\"
        )
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"
