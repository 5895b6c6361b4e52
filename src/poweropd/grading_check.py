"""Acceptance check of the grader on the local benchmark files: `python -m poweropd.grading_check --data-dir DIR`.

For every row of each benchmark file (JSON Lines with `answer`, optional `solution` and OlympiadBench fields):

* self       the reference wrapped as `\\boxed{<answer>}` and as a model writes it
             (`The answer is $\\boxed{<answer>}$.`), graded against the reference: must be 100%.
* solution   (MATH-500, Minerva) the full reference solution graded against the reference: must be >= 99%.
* perturbed  a WRONG answer made from the reference, graded against it: must be graded incorrect >= 99%.
             The perturbation acts on the normalised reference (so that a unit, a degree sign or a thousands
             separator cannot absorb it) and changes its value:
               - the last number N in it (digits, optional decimal part) becomes N+1; on Minerva rows, graded
                 with a 1% relative tolerance, it becomes 2N+1 so that the change exceeds the tolerance
                 (N+1 on 671.02 would be a 0.15% change, i.e. an equally correct answer);
               - without digits: a choice letter moves to the next letter (E -> A); otherwise the first `-`
                 becomes `+`, else the first `+` becomes `-`, else `+1` is appended.
             A perturbation that leaves the normalised text unchanged would be reported as an error.

Each row's meta is its OlympiadBench fields plus `benchmark` (which switches on the Minerva tolerance).
Prints one table row per benchmark with timeouts, worker calls and time; exits 1 if a threshold fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from decimal import Decimal
from pathlib import Path

from poweropd.grading import Grade, Grader, normalize_answer

BENCHMARKS = ("gsm8k", "math500", "amc23", "aime24", "aime25", "minerva", "olympiadbench")
SOLUTION_BENCHMARKS = ("math500", "minerva")
META_FIELDS = ("answer_type", "is_multiple_answer", "unit")
TOLERANT_BENCHMARKS = ("minerva",)

SELF_MIN = 100.0
SOLUTION_MIN = 99.0
PERTURBED_MIN = 99.0

_NUMBER_RE = re.compile(r"\d*\.\d+|\d+")
_CHOICE_RE = re.compile(r"\(?([A-E])\)?")


def default_data_dir() -> Path | None:
    """`$POWEROPD_DATA` (the folder the harness reads local benchmark files from), if set."""
    env = os.environ.get("POWEROPD_DATA")
    return Path(env) if env else None


def load_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def row_meta(benchmark: str, row: dict) -> dict:
    meta = {"benchmark": benchmark}
    meta.update({k: row[k] for k in META_FIELDS if row.get(k) is not None})
    return meta


def perturb_answer(answer: str, meta: dict | None = None) -> str:
    """A wrong answer derived from reference `answer` (rules in the module docstring)."""
    norm = normalize_answer(answer, meta)
    tolerant = (meta or {}).get("benchmark") in TOLERANT_BENCHMARKS
    numbers = list(_NUMBER_RE.finditer(norm))
    if numbers:
        last = numbers[-1]
        value = Decimal(last.group())
        new = 2 * value + 1 if tolerant else value + 1
        return norm[: last.start()] + str(new) + norm[last.end() :]
    choice = _CHOICE_RE.fullmatch(norm)
    if choice:
        letter = choice.group(1)
        return norm.replace(letter, "ABCDE"[("ABCDE".index(letter) + 1) % 5])
    if "-" in norm:
        return norm.replace("-", "+", 1)
    if "+" in norm:
        return norm.replace("+", "-", 1)
    return norm + "+1"


def _check(
    grader: Grader, items: list[tuple[str, str, dict]], want_correct: bool
) -> tuple[int, int, list[tuple[tuple, Grade]]]:
    """(passed, timeouts, failures) for `items` graded with `grader`."""
    grades = grader.grade_many(items)
    failures = [(item, g) for item, g in zip(items, grades) if g.correct != want_correct]
    timeouts = sum(g.status == "timeout" for g in grades)
    return len(items) - len(failures), timeouts, failures


def _pct(passed: int, total: int) -> float:
    return 100.0 * passed / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--timeout", type=float, default=5.0, help="per-answer time bound of the grader (s)")
    parser.add_argument("--limit", type=int, default=0, help="rows per file (0: all)")
    parser.add_argument("--show-failures", type=int, default=5, help="failures printed per check")
    parser.add_argument("--benchmarks", nargs="*", default=list(BENCHMARKS))
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("give --data-dir DIR (or set POWEROPD_DATA): the folder holding <benchmark>.jsonl")

    header = f"{'benchmark':<14}{'rows':>6}{'self %':>9}{'solution %':>12}{'perturbed-incorrect %':>23}"
    header += f"{'timeouts':>10}{'worker':>8}{'time s':>8}"
    lines, problems, notes = [header, "-" * len(header)], [], []
    total_grades, start_all = 0, time.perf_counter()
    with Grader(timeout_s=args.timeout) as grader:
        for name in args.benchmarks:
            path = args.data_dir / f"{name}.jsonl"
            if not path.exists():
                problems.append(f"{name}: missing {path}")
                continue
            rows = load_rows(path)
            if args.limit:
                rows = rows[: args.limit]
            start, calls_before = time.perf_counter(), grader.worker_calls
            metas = [row_meta(name, row) for row in rows]

            self_items = []
            for row, meta in zip(rows, metas):
                self_items.append((f"\\boxed{{{row['answer']}}}", row["answer"], meta))
                self_items.append((f"The answer is $\\boxed{{{row['answer']}}}$.", row["answer"], meta))
            self_ok, timeouts, self_fail = _check(grader, self_items, True)

            sol_ok = sol_total = 0
            sol_fail: list = []
            if name in SOLUTION_BENCHMARKS:
                sol_items = [(row["solution"], row["answer"], meta) for row, meta in zip(rows, metas)]
                sol_total = len(sol_items)
                sol_ok, t, sol_fail = _check(grader, sol_items, True)
                timeouts += t

            pert_items = []
            for row, meta in zip(rows, metas):
                wrong = perturb_answer(row["answer"], meta)
                if wrong == normalize_answer(row["answer"], meta):
                    problems.append(f"{row['id']}: perturbation left {row['answer']!r} unchanged")
                pert_items.append((f"The answer is $\\boxed{{{wrong}}}$.", row["answer"], meta))
            pert_ok, t, pert_fail = _check(grader, pert_items, False)
            timeouts += t

            elapsed = time.perf_counter() - start
            total_grades += len(self_items) + sol_total + len(pert_items)
            self_pct, pert_pct = _pct(self_ok, len(self_items)), _pct(pert_ok, len(pert_items))
            sol_pct = _pct(sol_ok, sol_total) if sol_total else None
            sol_txt = f"{sol_pct:.2f}" if sol_pct is not None else "-"
            lines.append(
                f"{name:<14}{len(rows):>6}{self_pct:>9.2f}{sol_txt:>12}{pert_pct:>23.2f}"
                f"{timeouts:>10}{grader.worker_calls - calls_before:>8}{elapsed:>8.1f}"
            )
            if self_pct < SELF_MIN:
                problems.append(f"{name}: self {self_pct:.2f}% < {SELF_MIN}%")
            if sol_pct is not None and sol_pct < SOLUTION_MIN:
                problems.append(f"{name}: solution {sol_pct:.2f}% < {SOLUTION_MIN}%")
            if pert_pct < PERTURBED_MIN:
                problems.append(f"{name}: perturbed-incorrect {pert_pct:.2f}% < {PERTURBED_MIN}%")
            for label, fails in (("self", self_fail), ("solution", sol_fail), ("perturbed", pert_fail)):
                for (response, reference, _), g in fails[: args.show_failures]:
                    shown = response if len(response) < 120 else "..." + response[-117:]
                    notes.append(f"  {name} {label}: ref={reference!r} response={shown!r} -> {g.status}")

    elapsed_all = time.perf_counter() - start_all
    print("\n".join(lines))
    rate = total_grades / elapsed_all
    print(f"{total_grades} grades in {elapsed_all:.1f} s ({rate:.0f}/s), timeout {args.timeout} s per answer")
    if notes:
        print("failures (first few per check):")
        print("\n".join(notes))
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("all thresholds met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
