"""The benchmark registry: local files, hub mapping, sizes, and one-line data errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from poweropd.benchmarks import BENCHMARKS, SUITES, get_benchmark, hub_row, load_benchmark, read_jsonl, suite_benchmarks
from poweropd.config import VAL_DATA
from poweropd.errors import ConfigError

SHARED_DATA = Path(os.environ.get("POWEROPD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PAPER_SIZES = {
    "gsm8k": 1319,
    "math500": 500,
    "amc23": 40,
    "aime24": 30,
    "aime25": 30,
    "minerva": 272,
    "olympiadbench": 675,
}


def write_rows(path: Path, n: int, name: str = "b") -> Path:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"{name}-{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n")
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_the_paper_suite_has_seven_benchmarks_of_the_published_sizes():
    assert SUITES["math7"] == tuple(PAPER_SIZES)
    assert {name: BENCHMARKS[name].size for name in PAPER_SIZES} == PAPER_SIZES
    assert [b.name for b in suite_benchmarks("math7")] == list(PAPER_SIZES)
    assert [b.name for b in suite_benchmarks("math7", ["aime24"])] == ["aime24"]
    assert [b.name for b in suite_benchmarks("gsm8k")] == ["gsm8k"]


def test_validation_sources_in_the_config_are_registry_names():
    for name in VAL_DATA:
        if name not in ("toy", "none"):
            assert get_benchmark(name).hub is not None


def test_unknown_names_fail_with_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        get_benchmark("gsm9k")
    assert "gsm8k" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        suite_benchmarks("math8")
    assert "math7" in one_line(exc)


def test_local_files_load_and_the_size_is_checked(tmp_path):
    write_rows(tmp_path / "amc23.jsonl", 40, "amc23")
    rows = load_benchmark("amc23", str(tmp_path))
    assert len(rows) == 40 and rows[0] == {"id": "amc23-0", "problem": "What is 0+1?", "answer": "1"}
    write_rows(tmp_path / "aime24.jsonl", 29, "aime24")
    with pytest.raises(ConfigError) as exc:
        load_benchmark("aime24", str(tmp_path))
    message = one_line(exc)
    assert "29" in message and "30" in message and "aime24.jsonl" in message and "limit" in message


def test_limit_is_the_only_way_to_run_fewer(tmp_path, caplog):
    write_rows(tmp_path / "aime24.jsonl", 29, "aime24")
    with caplog.at_level(logging.WARNING):
        rows = load_benchmark("aime24", str(tmp_path), limit=5)
    assert [r["id"] for r in rows] == [f"aime24-{i}" for i in range(5)]
    assert "expected 30" in caplog.text


def test_the_data_folder_can_come_from_the_environment(tmp_path, monkeypatch):
    write_rows(tmp_path / "aime25.jsonl", 30, "aime25")
    monkeypatch.setenv("POWEROPD_DATA", str(tmp_path))
    assert len(load_benchmark("aime25")) == 30


def test_partial_training_prompts_warn_instead_of_failing(tmp_path, caplog):
    write_rows(tmp_path / "deepscaler_train.jsonl", 12, "deepscaler")
    with caplog.at_level(logging.WARNING):
        assert len(load_benchmark("deepscaler_train", str(tmp_path))) == 12
    assert "40315" in caplog.text


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "b", "problem": "p"\n', "x.jsonl:2: malformed JSON"),
        ('{"id": "a", "problem": "p", "answer": "1"}\n[1, 2]\n', "x.jsonl:2: expected a JSON object"),
        ('{"id": "a", "problem": "", "answer": "1"}\n', "x.jsonl:1: missing or empty field(s) problem"),
        ('{"id": "a", "problem": "p", "answer": "1"}\n{"id": "a", "problem": "q", "answer": "2"}\n', "duplicate id"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        read_jsonl(path)
    assert expected in one_line(exc)


def test_numeric_answers_become_text(tmp_path):
    (tmp_path / "x.jsonl").write_text(
        '{"id": 7, "problem": "p", "answer": 27.0}\n{"id": "b", "problem": "q", "answer": 0}\n'
    )
    rows = read_jsonl(tmp_path / "x.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [("7", "27"), ("b", "0")]


def test_hub_rows_map_onto_the_local_format():
    gsm = hub_row(get_benchmark("gsm8k"), {"question": "Q?", "answer": "2 * 3 = <<2*3=6>>6\n#### 1,006"}, 3)
    assert (gsm["id"], gsm["problem"], gsm["answer"]) == ("gsm8k-3", "Q?", "1,006")
    assert gsm["solution"].startswith("2 * 3")
    amc = hub_row(get_benchmark("amc23"), {"id": 11, "question": "A?", "answer": 27.0}, 0)
    assert (amc["problem"], amc["answer"]) == ("A?", "27")
    oly = hub_row(
        get_benchmark("olympiadbench"),
        {"id": 2231, "question": "O?", "final_answer": ["$69$,$84$"], "is_multiple_answer": True},
        5,
    )
    assert (oly["answer"], oly["source_id"], oly["is_multiple_answer"]) == ("69$,$84", 2231, True)
    math = hub_row(
        get_benchmark("math500"), {"problem": "M?", "answer": "\\frac{1}{2}", "unique_id": "test/x/1.json"}, 0
    )
    assert (math["answer"], math["source_id"]) == ("\\frac{1}{2}", "test/x/1.json")


def test_an_unreachable_hub_is_one_line_with_the_way_out(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.delenv("POWEROPD_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError) as exc:
        load_benchmark("gsm8k")
    message = one_line(exc)
    assert "openai/gsm8k" in message and "POWEROPD_DATA" in message


def test_toy_splits_are_generated_and_disjoint():
    val, test = load_benchmark("toy_val"), load_benchmark("toy_test")
    assert len(val) == 256 and len(test) == 500
    assert not {r["problem"] for r in val} & {r["problem"] for r in test}
    assert load_benchmark("toy_test", limit=10) == test[:10]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark files are not on this machine")
def test_the_real_files_load_with_their_published_sizes():
    for name, size in PAPER_SIZES.items():
        rows = load_benchmark(name, str(SHARED_DATA))
        assert len(rows) == size and len({r["id"] for r in rows}) == size
    oly = load_benchmark("olympiadbench", str(SHARED_DATA))
    assert sum(bool(r.get("is_multiple_answer")) for r in oly) == 94
