"""The toy task: short multi-step arithmetic word problems with a `\\boxed{}` answer.

    Bo has 4 bags of 12 pens, loses 9 and buys 15 more. How many now?
    ->  4*12=48. 48-9=39. 39+15=54. \\boxed{54}

Problems are drawn from a seeded stream and assigned to a split by a stable hash of
the problem text, so the train / val / test splits never share a problem and every
split is the same on every machine. Everything here is plain Python (no torch).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterator

NAMES = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
OBJECTS = ["apples", "pens", "cards", "coins", "eggs", "shells", "books", "beads", "cups"]
ADD_VERBS = ["buys", "finds", "gets"]
SUB_VERBS = ["loses", "sells", "gives away"]

TASK_VERSION = 1  # bump whenever the generator changes: it is part of the toy pair's cache key

# Share of the hash space (out of 100) that each split owns.
SPLITS = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}
MAX_VALUE = 999  # every intermediate result stays in [0, MAX_VALUE]

# The characters of the toy tokenizer: all the task produces, plus enough of plain
# ASCII that any short English prompt can be written with it.
ALPHABET = string.ascii_letters + string.digits + " \n.,:;?!'\"+-*/=^()[]{}<>$%&#_|\\"


def _split_of(problem: str) -> str:
    bucket = int(hashlib.md5(problem.encode()).hexdigest(), 16) % 100
    for name, owned in SPLITS.items():
        if bucket in owned:
            return name
    raise AssertionError("unreachable: SPLITS covers 0..99")


def _one_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """Draw one problem: (problem text, chain-of-thought steps, answer)."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    steps: list[str] = []
    if rng.random() < 0.4:
        bags, each = rng.randint(2, 9), rng.randint(2, 9)  # the one-digit times table
        value = bags * each
        clauses = [f"{name} has {bags} bags of {each} {obj}"]
        steps.append(f"{bags}*{each}={value}")
        n_ops = rng.choice([1, 1, 2])
    else:
        value = rng.randint(10, 99)
        clauses = [f"{name} has {value} {obj}"]
        n_ops = rng.choice([1, 2, 2])
    ops: list[str] = []
    for _ in range(n_ops):
        kind = rng.choices(["add", "sub", "double"], weights=[4, 4, 1])[0]
        if kind == "double" and value * 2 <= MAX_VALUE:
            ops.append("doubles them")
            steps.append(f"{value}*2={value * 2}")
            value *= 2
        elif kind == "sub" and value >= 2:
            amount = rng.randint(1, min(value, 99))
            ops.append(f"{rng.choice(SUB_VERBS)} {amount}")
            steps.append(f"{value}-{amount}={value - amount}")
            value -= amount
        else:
            amount = rng.randint(1, min(99, MAX_VALUE - value))
            ops.append(f"{rng.choice(ADD_VERBS)} {amount} more")
            steps.append(f"{value}+{amount}={value + amount}")
            value += amount
    if len(ops) == 1:
        text = f"{clauses[0]} and {ops[0]}."
    else:
        text = f"{clauses[0]}, " + ", ".join(ops[:-1]) + f" and then {ops[-1]}."
    return f"{text} How many now?", steps, value


def solution_text(steps: list[str], answer: int) -> str:
    return ". ".join(steps) + f". \\boxed{{{answer}}}"


# How a response begins: the toy analogue of a Base student's habits against an instruct
# teacher's. The student's SFT corpus opens nearly every answer with a filler phrase; the
# teacher's opens almost every answer straight with the first step and has seen each phrase
# only rarely (enough to carry on correctly after one). So teacher and student disagree most
# about how a response begins, as a Qwen3 Base student and its instruct teacher do in the
# paper. Openings carry no arithmetic: they change neither the answer nor the grading.
OPENINGS = ("So: ", "Let me see. ", "Working: ", "Ok, ", "Well then. ", "Right, ", "Hmm... ", "First: ")


def with_opening(solution: str, rng: random.Random, rate: float) -> str:
    """`solution`, opened with one of OPENINGS with probability `rate`."""
    if rng.random() < rate:
        return rng.choice(OPENINGS) + solution
    return solution


def opening_of(response: str) -> str | None:
    """The opening phrase a response starts with (None: it starts with the first step)."""
    return next((o for o in OPENINGS if response.startswith(o)), None)


def iter_problems(split: str, seed: int = 0) -> Iterator[dict]:
    """Endless stream of unique problems of one split, as benchmark-style rows."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; valid splits: {', '.join(SPLITS)}")
    rng = random.Random(f"poweropd-toy-{seed}")
    seen: set[str] = set()
    index = 0
    while True:
        problem, steps, answer = _one_problem(rng)
        if problem in seen or _split_of(problem) != split:
            continue
        seen.add(problem)
        yield {
            "id": f"toy-{split}-{index}",
            "problem": problem,
            "answer": str(answer),
            "solution": solution_text(steps, answer),
        }
        index += 1


def make_problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """The first `n` problems of a split (deterministic for a given seed)."""
    stream = iter_problems(split, seed)
    return [next(stream) for _ in range(n)]
