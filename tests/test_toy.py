"""The toy world: task, tokenizer, and (slow) the default pair's accuracy contract."""

from __future__ import annotations

import json
import re

import pytest

from poweropd.grading import extract_boxed
from poweropd.toy.task import ALPHABET, OPENINGS, make_problems, opening_of
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


def test_student_and_teacher_corpora_open_their_answers_differently():
    """The Base-like student's SFT answers open with a filler phrase; the teacher's almost
    never do: where the two disagree most is how a response begins."""
    from poweropd.toy.build import opening_share, sft_corpus
    from poweropd.toy.spec import ToyPairSpec

    spec = ToyPairSpec()
    teacher = [response for _, response in sft_corpus(spec, "teacher", 4000)]
    student = [response for _, response in sft_corpus(spec, "student", 4000)]
    assert opening_share(student) > 0.85 and opening_share(teacher) < 0.08
    assert opening_share(teacher) > 0.02  # the teacher has seen each phrase, so it can carry on after one
    assert {opening_of(r) for r in student} == {*OPENINGS, None}
    # Openings carry no arithmetic: stripped of it, every answer is the task's own solution.
    rows = make_problems("train", 4000, seed=spec.seed + 2)
    for row, response in zip(rows, student):
        opening = opening_of(response) or ""
        assert response[len(opening) :] == row["solution"]
        assert extract_boxed(response) == row["answer"]


def test_curve_points_end_at_the_stop():
    from poweropd.toy.build import curve_points

    assert curve_points(900) == [225, 450, 675, 900]
    assert curve_points(3) == [1, 2, 3]


@pytest.mark.slow
def test_default_toy_pair_meets_its_accuracy_contract(tmp_path):
    """The real default build (about 9 minutes): teacher >= 85% greedy on held-out problems,
    student between 25% and 40% and still climbing along its own SFT curve, head_dim >= 32
    for both (vLLM's CPU attention backend refuses 16). Uses conf/model_pair/toy.yaml."""
    from conftest import make_config
    from transformers import AutoConfig

    from poweropd.toy.build import ensure_toy_pair

    spec = make_config([]).model_pair.toy
    root = ensure_toy_pair(spec, tmp_path)
    report = json.loads((root / "build.json").read_text())
    assert report["teacher"]["greedy_accuracy"] >= 0.85, report
    assert 0.25 <= report["student"]["greedy_accuracy"] <= 0.40, report
    curve = [report["student"]["sft_curve"][k] for k in sorted(report["student"]["sft_curve"], key=int)]
    assert curve[-1] > curve[0] and curve[-1] >= max(curve[:-1]) - 0.02, curve  # stopped on the way up
    assert spec.student.sft_steps < spec.student.schedule_steps  # its schedule goes on past the stop
    assert report["teacher"]["greedy_accuracy_after_openings"] >= 0.6, report
    for role in ("teacher", "student"):
        assert AutoConfig.from_pretrained(root / role).head_dim >= 32


# ----------------------------------------------------------------------------------------
# The shipped pair: the same toy world on every machine


def test_shipped_pair_matches_its_manifest_and_the_default_spec():
    """Every file of src/poweropd/toy/pair hashes as SHA256SUMS says, the manifest lists every
    file, the pair is the one the default conf/model_pair/toy.yaml spec describes, and the
    wheel's package-data patterns carry each file."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    from conftest import ROOT, make_config

    from poweropd.toy.shipped import SHIPPED_DIR, check_manifest, read_manifest, sha256_of, shipped_key
    from poweropd.toy.spec import cache_key

    assert check_manifest() == []
    manifest = read_manifest(SHIPPED_DIR)
    assert {"teacher/model.safetensors", "student/model.safetensors", "build.json"} <= set(manifest)
    for role in ("teacher", "student"):
        weights = SHIPPED_DIR / role / "model.safetensors"
        assert weights.stat().st_size > 100_000  # real weights, not a Git LFS pointer
        assert sha256_of(weights) == manifest[f"{role}/model.safetensors"]
    spec = make_config([]).model_pair.toy
    assert shipped_key() == cache_key(spec)
    from poweropd.toy.spec import ToyPairSpec

    assert cache_key(ToyPairSpec()) == shipped_key()  # the benchmarks build their config from the dataclass
    build = json.loads((SHIPPED_DIR / "build.json").read_text())
    assert build["spec"] == json.loads(json.dumps(spec.__dict__, default=lambda o: o.__dict__))
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "poweropd.toy"
    ]
    for name in [*manifest, "SHA256SUMS"]:
        assert any(fnmatch.fnmatch(f"pair/{name}", p) for p in patterns), name


def test_default_spec_uses_the_shipped_pair_and_any_other_spec_the_cache(tmp_path):
    from conftest import make_config

    from poweropd.models import resolve_paths
    from poweropd.toy.shipped import SHIPPED_DIR, shipped_pair

    cfg = make_config([f"model_pair.cache_dir={tmp_path}"]).model_pair
    assert resolve_paths(cfg) == (str(SHIPPED_DIR / "teacher"), str(SHIPPED_DIR / "student"))
    assert not list(tmp_path.iterdir())  # nothing built, nothing written
    other = make_config(["model_pair.toy.seed=1"]).model_pair.toy
    assert shipped_pair(other) is None  # another spec: built into the cache by ensure_toy_pair


def test_a_damaged_shipped_pair_is_refused_in_one_line(tmp_path):
    import shutil

    from conftest import make_config

    from poweropd.errors import ConfigError
    from poweropd.toy.shipped import SHIPPED_DIR, shipped_pair

    copy = tmp_path / "pair"
    shutil.copytree(SHIPPED_DIR, copy)
    spec = make_config([]).model_pair.toy
    assert shipped_pair(spec, copy) == copy
    weights = copy / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        shipped_pair(spec, copy)
    message = str(err.value)
    assert "\n" not in message and "student/model.safetensors has another sha256" in message
    assert "use_shipped_pair=false" in message
    (copy / "student" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="student/model.safetensors missing"):
        shipped_pair(spec, copy)


def test_ship_writes_a_pair_and_a_manifest_that_sha256sum_reads(tmp_path):
    import shutil
    import subprocess

    from poweropd.toy.shipped import SHIPPED_DIR, check_manifest, ship

    built = tmp_path / "built"
    shutil.copytree(SHIPPED_DIR, built)
    (built / "SHA256SUMS").unlink()
    target = ship(built, tmp_path / "pkg" / "pair")
    assert check_manifest(target) == []
    assert (target / "SHA256SUMS").read_text() == (SHIPPED_DIR / "SHA256SUMS").read_text()
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=target).returncode == 0


@pytest.mark.e2e
def test_rebuild_replaces_a_cached_pair_with_a_fresh_build(tmp_path):
    """`python -m poweropd.toy.build build` (here: its `rebuild` on a tiny spec) builds again
    even when the key is cached, and leaves exactly one folder and its lock."""
    from conftest import tiny_toy_spec

    from poweropd.toy.build import ensure_toy_pair, rebuild

    spec = tiny_toy_spec()
    first = ensure_toy_pair(spec, tmp_path)
    (first / "marker").write_text("from the first build")
    again = rebuild(spec, tmp_path)
    assert again == first and not (again / "marker").exists() and (again / "build.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, f"{first.name}.lock"])
