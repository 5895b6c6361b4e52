"""The toy world: task, tokenizer, and (slow) the default pair's accuracy contract."""

from __future__ import annotations

import json
import re

import pytest

from poweropd.grading import extract_boxed
from poweropd.toy.task import ALPHABET, make_problems
from poweropd.toy.tokenizer import build_toy_tokenizer


def test_problems_are_deterministic_and_splits_disjoint():
    a = make_problems("train", 300, seed=0)
    assert a == make_problems("train", 300, seed=0)
    assert a != make_problems("train", 300, seed=1)
    texts = {split: {p["problem"] for p in make_problems(split, 300)} for split in ("train", "val", "test")}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    assert not (texts["val"] & texts["test"])
    assert all(len(t) == 300 for t in texts.values())  # no duplicates inside a split


def test_solutions_are_correct_step_by_step():
    for row in make_problems("val", 500):
        steps = re.findall(r"(\d+)([+\-*])(\d+)=(\d+)", row["solution"])
        assert 1 <= len(steps) <= 4, row
        value = None
        for a, op, b, result in steps:
            a, b, result = int(a), int(b), int(result)
            assert value is None or a == value, row  # each step continues from the last
            assert result == {"+": a + b, "-": a - b, "*": a * b}[op], row
            value = result
        assert extract_boxed(row["solution"]) == row["answer"] == str(value)
        for number in re.findall(r"\d+", row["problem"]):
            assert number in row["solution"], row  # every number of the problem is used


def test_toy_tokenizer_round_trips_and_has_a_chat_template(tmp_path):
    tok = build_toy_tokenizer()
    text = "".join(ALPHABET) + " Bo has 4 bags of 9 pens. \\boxed{36}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    prompt = loaded.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"


@pytest.mark.slow
def test_default_toy_pair_meets_its_accuracy_contract(tmp_path):
    """The real default build (minutes): teacher >= 85% greedy on held-out problems,
    student clearly weaker (10-50%). Uses the default conf/model_pair/toy.yaml spec."""
    from conftest import make_config

    from poweropd.toy.build import ensure_toy_pair

    spec = make_config([]).model_pair.toy
    report = json.loads((ensure_toy_pair(spec, tmp_path) / "build.json").read_text())
    assert report["teacher"]["greedy_accuracy"] >= 0.85, report
    assert 0.10 <= report["student"]["greedy_accuracy"] <= 0.50, report
