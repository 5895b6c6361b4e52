"""Hooks of the poweropd lm-eval tasks: rows from poweropd's registry, poweropd's grader."""

from __future__ import annotations

import json

import datasets

from poweropd.benchmarks import load_benchmark
from poweropd.grading import Grader

_GRADER: Grader | None = None


def load_rows(benchmark: str, data_dir: str | None = None, limit: int | None = None, instruction: str = "", **_):
    """The benchmark's rows (the same loader evaluate.py's hf backend uses) as a test split."""
    rows = load_benchmark(benchmark, data_dir, limit)
    # Extra fields (answer_type, is_multiple_answer, unit...) inform the grader; they travel
    # as one JSON string so that rows of different shapes fit one Arrow table.
    table = [
        {"id": r["id"], "answer": r["answer"], "prompt": r["problem"] + instruction, "row_json": json.dumps(r)}
        for r in rows
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(table)})


def process_results(doc: dict, results: list) -> dict:
    """Avg@n and Pass@n of one problem from its n responses, graded by poweropd.grading."""
    global _GRADER
    if _GRADER is None:
        _GRADER = Grader()
    responses = results[0] if results and isinstance(results[0], list) else results
    row = json.loads(doc["row_json"])
    grades = _GRADER.grade_many([(text, row["answer"], row) for text in responses])
    correct = sum(g.correct for g in grades)
    return {"avg_at_n": correct / len(grades), "pass_at_n": float(correct > 0)}
