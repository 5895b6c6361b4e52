"""Tests of the answer grader: extraction, equivalence rules, untrusted input, benchmark samples."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from poweropd.grading import (
    MAX_ANSWER_CHARS,
    STATUSES,
    Grade,
    Grader,
    answers_match,
    extract_answer,
    extract_boxed,
    normalize_answer,
)
from poweropd.grading_check import BENCHMARKS, main, perturb_answer, row_meta

DATA_DIR = Path(os.environ.get("POWEROPD_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
PWNED = Path("/tmp/pwned_grader")
TIMEOUT_S = 1.0
MARGIN_S = 5.0  # worker restart (a fresh interpreter importing sympy) on a slow, loaded machine


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TIMEOUT_S) as g:
        yield g


def _pid_alive(pid: int) -> bool:
    """Whether `pid` still exists in any state (a zombie included), via /proc."""
    return Path(f"/proc/{pid}").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------------

EXTRACTION = [
    ("plain", "so \\boxed{5}.", "5"),
    ("nested braces", "$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
    ("set braces", "\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("fbox", "hence \\fbox{7}", "7"),
    ("space before brace", "\\boxed {8}", "8"),
    ("bare token", "The answer is $\\boxed 5$.", "5"),
    ("bare token then text", "\\boxed 42 is it", "42"),
    ("last of several", "\\boxed{1} then \\boxed{2}", "2"),
    ("last of boxed and fbox", "\\fbox{1} \\boxed{2} \\fbox{3}", "3"),
    ("other macro skipped", "\\boxed{4} see \\boxedanswer", "4"),
    ("box beats ####", "#### 5\nso \\boxed{6}", "6"),
    ("#### fallback", "12 + 30 = 42\n#### 1,234\n", "1,234"),
    ("last ####, first line", "#### 5\n#### 6 \nmore text", "6"),
    ("empty box", "\\boxed{}", ""),
    # Closing braces in a later 4096-character chunk than the opening one (the chunk-skipping path).
    ("long content", "\\boxed{" + "a" * 5000 + "} tail", "a" * 5000),
    ("long nested content", "\\boxed{" + "{a}" * 3000 + "}" + "}" * 10, "{a}" * 3000),
    ("deep then close", "\\boxed{" + "{" * 5000 + "}" * 5000 + "}x", "{" * 5000 + "}" * 5000),
    ("none", "no final answer here", None),
    ("empty text", "", None),
    ("unterminated", "so \\boxed{5", None),
    ("unterminated last box", "\\boxed{1} and finally \\boxed{2", None),
    ("empty ####", "####   \n", None),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in EXTRACTION], ids=[c[0] for c in EXTRACTION])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a \\boxed{x^{2}} b", "x^{2}"), ("\\boxed{1}\\boxed{2}", "2"), ("\\fbox{3}", None), ("\\boxed 5", None)],
)
def test_extract_boxed_keeps_its_behaviour(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
        "\\boxed{" + "{}" * 1_000_000 + "}",
        "x" * 5_000_000 + "\\boxed{1}",
        "{" * 100_000,
        "\\boxed{" + "{" * 1_000_000,
        "\\boxedx" * 200_000 + "\\fbox{1}",
    ],
    ids=["100k nested", "1M pairs", "5 MB prefix", "unbalanced", "1M unclosed", "200k false boxes"],
)
def test_extraction_is_fast_on_huge_inputs(text):
    start = time.perf_counter()
    extract_answer(text)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------------------------------

MULTI = {"is_multiple_answer": True}
MINERVA = {"benchmark": "minerva"}

TRUE_POSITIVES = [
    # (prediction, reference, meta)
    ("2125", "2,125", None),
    ("2,125", "2125", None),
    ("1450000", "1,450,000", None),
    ("10080", "10,\\!080", None),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100", None),
    ("10000", "10\\,000", None),
    ("32348", "\\$32,\\!348", None),
    ("25", "025", None),
    ("025", "25", None),
    ("Evelyn", "\\text{Evelyn}", None),
    ("\\textbf{East}", "\\text{east}", None),
    ("864", "864 \\mbox{ inches}^2", None),
    ("15", "15\\mbox{ cm}^2", None),
    ("5.4", "5.4 \\text{ cents}", None),
    ("5 \\text{ cm}", "5", None),
    ("5 \\text{ apples}", "5", None),
    ("\\frac{\\pi}{2}\\text{ radians}.", "\\frac{\\pi}{2}", None),
    ("60 km/h", "60", None),
    ("18 dollars", "18", None),
    ("\\$18.90", "18.9", None),
    ("90", "90^\\circ", None),
    ("90^{\\circ}", "90", None),
    ("90\\degree", "90^\\circ", None),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", None),
    ("50\\%", "50", None),
    ("50", "50\\%", None),
    ("\\dfrac{33}{100}", "0.33", None),
    ("\\tfrac{1}{2}", "\\frac12", None),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", None),
    ("10,\\!080", "10080", None),
    ("$5$", "5", None),
    ("5.", "5", None),
    ("x = 5", "5", None),
    ("5", "x=5", None),
    ("f(x) = 2x", "2x", None),
    ("k=1", "k = 1", None),
    ("(1, 3]", "(1,3]", None),
    ("[2, \\infty)", "[2,\\infty)", None),
    ("[-2,7]", "x \\in [-2,7]", None),
    ("(-\\infty,0)\\cup\\{1\\}", "(-\\infty, 0) \\cup\\{1\\}", None),
    ("2, 1", "1, 2", MULTI),
    ("84, 69", "69$,$84", MULTI),
    ("\\{1,2\\}", "1,2", MULTI),
    ("x=1, x=2", "1,2", MULTI),
    ("(2,1),(1,1)", "(1,1), (2,1)", MULTI),
    ("f(n)=n, g(n)=1", "f(n)=n$, $g(n)=1", None),
    ("-2,1", "1,-2", None),
    ("1, 2", "(1,2)", None),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}", None),
    ("4.5\\times 10^{33}", "4.5e33", None),
    ("4.5\\cdot10^{33}", "4.5e33", None),
    ("4.46e33", "4.5e33", None),
    ("4.5e33", "4.5 \\times 10^{33}", None),
    ("0.6", "0.5978", MINERVA),
    ("672", "671.02", {"id": "minerva-3"}),
    ("\\arcsin(10/13)", "np.arcsin(10/13)", MINERVA),
    ("B", "\\text{(B)}", None),
    ("(B)", "B", None),
    ("\\text{(B)}", "(B)", None),
    ("(B) 12", "\\text{(B)}", None),
    ("\\frac12", "\\frac{1}{2}", None),
    ("0.5", "\\frac{1}{2}", None),
    ("1/2", "\\frac{1}{2}", None),
    ("\\frac{9}{5}", "1\\frac{4}{5}", None),
    ("137.5", "137 \\frac{1}{2}", None),
    ("0.333333", "\\frac{1}{3}", None),
    ("\\sqrt2", "\\sqrt{2}", None),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", None),
    ("2", "\\sqrt{4}", None),
    ("\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", None),
    ("52_{8}", "52_8", None),
    ("52", "52_8", None),
    ("2x - y + 3 = 0", "y = 2x + 3", None),
    ("k\\ge2", "k \\geqslant 2", None),
    ("\\frac{600}{7} \\text{ km/h}", "\\frac{600}{7}", {"unit": "km/h"}),
    ("166 cm^2", "166", {"unit": "$cm^2$"}),
    ("4.2\\%", "4.2", {"unit": "%"}),
    ("45 \\text{ minutes}", "45", {"unit": "minute"}),
    ("-q+p", "p - q", None),
]

FALSE_POSITIVES = [
    ("-2", "2", None),
    ("2", "-2", None),
    ("2", "1/2", None),
    ("1/2", "2", None),
    ("(2,1)", "(1,2)", None),
    ("(1,2)", "(2,1)", {"answer_type": "Tuple"}),
    ("2, 1", "(1,2)", None),
    ("x-1", "x+1", None),
    ("x+1", "x-1", None),
    ("[1,3]", "(1,3)", None),
    ("(1,3)", "[1,3]", None),
    ("", "5", None),
    ("   ", "5", None),
    ("5", "50", None),
    ("50", "5", None),
    ("0.1", "10\\%", None),
    ("A", "a", None),
    ("a", "A", None),
    ("A", "5", None),
    ("5", "\\text{(A)}", None),
    ("(C)", "\\text{(B)}", None),
    ("12", "1,2", None),
    ("1,2", "12", None),
    ("1, 2", "12", None),
    ("100,200", "100200", MULTI),
    ("1,2,2", "1,2", None),
    ("2, 3", "2,3,4", MULTI),
    ("(1,8,19), (2,7,13), (4,5,8)", "(1,8,19), (2,7,13), (4,5,7)", MULTI),
    ("6", "6m", None),
    ("\\frac{37}{4}", "\\frac{37}{4} m", None),
    ("LRMC", "SRMC=LRMC", None),
    ("5x - 7y + 11z", "5x - 7y + 11z + 4 = 0", None),
    ("x=1", "y=1", None),
    ("1001", "10^{3}", None),
    ("0.6", "0.5978", None),
    ("3.20", "3.21", None),
    ("0.3333", "\\frac{1}{3}", None),
    ("4.5e34", "4.5e33", None),
    ("4e33", "4.5e33", MINERVA),
    ("\\frac{9}{5}", "\\frac{4}{5}", None),
    ("\\frac{4}{5}", "1\\frac{4}{5}", None),
    ("2n", "2", None),
    ("2", "2n", None),
    ("52_9", "52_8", None),
    ("42", "52_8", None),
    ("\\frac{1}{3} E_1+\\frac{2}{3} E_5", "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}", MINERVA),
    ("2^{1010}", "2^{1009}", None),
    ("\\text{Navin}", "\\text{Evelyn}", None),
    ("\\sqrt{3}", "\\sqrt{2}", None),
    ("(1,3)", "(1,3]", None),
]


@pytest.mark.parametrize(("pred", "ref", "meta"), TRUE_POSITIVES, ids=[f"{p}=={r}" for p, r, _ in TRUE_POSITIVES])
def test_equivalent_answers_match(pred, ref, meta):
    assert answers_match(pred, ref, meta) is True


@pytest.mark.parametrize(("pred", "ref", "meta"), FALSE_POSITIVES, ids=[f"{p}!={r}" for p, r, _ in FALSE_POSITIVES])
def test_different_answers_do_not_match(pred, ref, meta):
    assert answers_match(pred, ref, meta) is False


@pytest.mark.e2e
def test_grader_agrees_with_answers_match_on_the_tables(grader):
    items = [(f"Final: $\\boxed{{{p}}}$", r, m) for p, r, m in TRUE_POSITIVES + FALSE_POSITIVES if p.strip()]
    grades = grader.grade_many(items)
    expected = [True] * len(TRUE_POSITIVES) + [False] * sum(1 for p, _, _ in FALSE_POSITIVES if p.strip())
    assert [g.correct for g in grades] == expected
    assert {g.status for g in grades} <= {"correct", "incorrect"}


def test_normalize_answer_examples():
    assert normalize_answer("\\$32,\\!348") == "32348"
    assert normalize_answer("69$,$84", MULTI) == "69,84"
    assert normalize_answer("\\frac{270}7\\text{ degrees}") == "\\frac{270}7"
    assert normalize_answer("\\left( 3, \\dfrac{\\pi}{2} \\right)") == "( 3, \\frac{\\pi}{2} )"


# ---------------------------------------------------------------------------------------------------------------------
# Grader: statuses, untrusted input, time bound, worker life cycle
# ---------------------------------------------------------------------------------------------------------------------


def test_grade_statuses(grader):
    assert grader.grade("so \\boxed{\\frac{2}{4}}", "0.5") == Grade("\\frac{2}{4}", True, "correct")
    assert grader.grade("so \\boxed{3}", "4") == Grade("3", False, "incorrect")
    assert grader.grade("I don't know", "4") == Grade(None, False, "no_answer")
    assert grader.grade("\\boxed{ }", "4").status == "no_answer"
    assert grader.grade("\\boxed{4", "4").status == "no_answer"
    assert set(STATUSES) == {"correct", "incorrect", "no_answer", "timeout"}


def test_easy_answers_never_reach_the_worker(grader):
    before = grader.worker_calls
    items = [(f"so \\boxed{{{i:,}}}", str(i + (i % 3 == 0)), None) for i in range(3000)]
    items += [(f"\\boxed{{\\frac{{{i}}}{{{2 * i}}}}}", "0.5", None) for i in range(1, 500)]
    grades = grader.grade_many(items)
    assert grader.worker_calls == before
    assert sum(g.correct for g in grades) == 2000 + 499


def test_overlong_answer_is_incorrect_without_parsing(grader):
    before = grader.worker_calls
    grade = grader.grade("\\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}", "1")
    assert grade.status == "incorrect" and grader.worker_calls == before


INJECTIONS = [
    "\\boxed{__import__('os').system('touch /tmp/pwned_grader')}",
    "\\boxed{eval(\"__import__('os').system('touch /tmp/pwned_grader')\")}",
    "#### __import__('os').system('touch /tmp/pwned_grader')",
    "The final answer is __import__('os').system('touch /tmp/pwned_grader') \\boxed{x = __import__('os').system('touch "
    "/tmp/pwned_grader')}",
]


@pytest.mark.parametrize("response", INJECTIONS)
def test_model_output_is_never_executed(grader, response):
    PWNED.unlink(missing_ok=True)
    extracted = extract_answer(response)
    assert extracted is not None
    for ref in ("0", "x", "\\frac{1}{2}", "__import__('os').system('ls')"):
        answers_match(extracted, ref)
        answers_match(ref, extracted)
        assert grader.grade(response, ref).status in ("incorrect", "timeout")
    assert not PWNED.exists()


PATHOLOGICAL = [
    ("exponent tower", "\\boxed{2^{2^{2^{99999}}}}"),
    ("factorial of a tower", "\\boxed{10^{10^{10^{10}}}!}"),
    ("power tower of nines", "$\\boxed{9^{9^{9^{9}}}}$"),
    ("huge power", "\\boxed{10^{10^{9}}}"),
    ("100k nested braces", "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}"),
    ("900 nested braces", "\\boxed{" + "{" * 900 + "1" + "}" * 900 + "}"),
    ("600 nested parentheses", "\\boxed{" + "(" * 600 + "1" + ")" * 600 + "}"),
    ("5 MB string", "y" * 5_000_000 + "\\boxed{" + "x" * 5_000_000 + "}"),
    ("5 MB without answer", "z" * 5_000_000),
]


@pytest.mark.parametrize("response", [c[1] for c in PATHOLOGICAL], ids=[c[0] for c in PATHOLOGICAL])
@pytest.mark.e2e
def test_pathological_inputs_are_time_bounded(grader, response):
    start = time.perf_counter()
    grade = grader.grade(response, "1")
    elapsed = time.perf_counter() - start
    assert grade.status in ("timeout", "incorrect", "no_answer")
    assert not grade.correct
    assert elapsed < TIMEOUT_S + MARGIN_S
    # The grader (with a restarted worker if needed) still grades normally; `\sqrt{4}` needs the worker.
    assert grader.grade("so \\boxed{\\sqrt{4}}", "2") == Grade("\\sqrt{4}", True, "correct")


@pytest.mark.e2e
def test_timeout_kills_and_reaps_the_worker(grader):
    grader.grade("\\boxed{\\sqrt{9}}", "3")  # make sure a worker is running
    pid = grader._worker.proc.pid
    before = grader.timeouts
    grade = grader.grade("\\boxed{2^{2^{2^{99999}}}}", "5")
    assert grade == Grade("2^{2^{2^{99999}}}", False, "timeout")
    assert grader.timeouts == before + 1
    assert not _pid_alive(pid)
    assert grader.grade("\\boxed{\\sqrt{9}}", "3").correct


@pytest.mark.e2e
def test_graders_can_be_created_repeatedly_without_leftover_processes():
    pids = []
    for _ in range(3):
        with Grader(timeout_s=5.0) as g:
            assert g.grade("\\boxed{\\sqrt{16}}", "4").correct
            pids.append(g._worker.proc.pid)
        assert g._worker is None
    assert len(set(pids)) == 3
    assert not any(_pid_alive(pid) for pid in pids)
    g = Grader()
    assert g.grade("\\boxed{\\sqrt{16}}", "4").correct
    g.close()
    assert g.grade("\\boxed{\\sqrt{25}}", "5").correct  # a closed grader starts a new worker on demand
    g.close()


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark data (skipped where /work/shared/data is absent)
# ---------------------------------------------------------------------------------------------------------------------


def _rows(name: str, limit: int | None = None) -> list[dict]:
    path = DATA_DIR / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path}")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


@pytest.mark.parametrize(
    ("answer", "meta", "expected"),
    [
        ("025", {"benchmark": "aime24"}, "26"),
        ("2,125", {"benchmark": "gsm8k"}, "2126"),
        ("0.5978", {"benchmark": "minerva"}, "2.1956"),
        ("4.5e33", {"benchmark": "minerva"}, "4.5e67"),
        ("\\text{(C)}", {"benchmark": "math500"}, "(D)"),
        ("p - q", {"benchmark": "math500"}, "p + q"),
        ("\\text{Evelyn}", {"benchmark": "math500"}, "Evelyn+1"),
    ],
)
def test_perturbation_changes_the_value(answer, meta, expected):
    wrong = perturb_answer(answer, meta)
    assert wrong == expected
    assert not answers_match(wrong, answer, meta)


@pytest.mark.parametrize("name", BENCHMARKS)
@pytest.mark.e2e
def test_sample_self_check_and_perturbation(name, grader):
    rows = _rows(name, limit=50)
    items, wrong = [], []
    for row in rows:
        meta = row_meta(name, row)
        items.append((f"\\boxed{{{row['answer']}}}", row["answer"], meta))
        items.append((f"The answer is $\\boxed{{{row['answer']}}}$.", row["answer"], meta))
        wrong.append((f"\\boxed{{{perturb_answer(row['answer'], meta)}}}", row["answer"], meta))
    assert [g.status for g in grader.grade_many(items)] == ["correct"] * len(items)
    assert not any(g.correct for g in grader.grade_many(wrong))
    if name in ("math500", "minerva"):
        solutions = [(row["solution"], row["answer"], row_meta(name, row)) for row in rows]
        assert all(g.correct for g in grader.grade_many(solutions))


def test_acceptance_script_fails_loudly(tmp_path, capsys):
    # An unbalanced reference cannot be boxed and read back, so the self check must fail, and so must main().
    rows = [{"id": "gsm8k-0", "problem": "?", "answer": "7"}, {"id": "gsm8k-1", "problem": "?", "answer": "\\{"}]
    (tmp_path / "gsm8k.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert main(["--data-dir", str(tmp_path), "--benchmarks", "gsm8k"]) == 1
    out = capsys.readouterr().out
    assert "gsm8k: self 50.00% < 100.0%" in out
    assert main(["--data-dir", str(tmp_path), "--benchmarks", "math500"]) == 1  # a missing file fails too


@pytest.mark.slow
def test_full_acceptance_run(capsys):
    if not DATA_DIR.exists():
        pytest.skip(f"benchmark data not found at {DATA_DIR}")
    assert main(["--data-dir", str(DATA_DIR)]) == 0, capsys.readouterr().out
