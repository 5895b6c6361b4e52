"""The device check (python -m poweropd.bench device) and the GPU-only checks behind it.

On a CPU the device command runs at reduced shapes and is tested whole here; the `gpu` tests
(python -m pytest -m gpu) run the same pieces on CUDA and skip, saying so, without one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from poweropd.bench import device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_kernel_check_finds_fp32_kernels_exact():
    """On the CPU the kernels run in fp32: against naive autograd they agree to rounding."""
    row = device.kernel_exactness(tokens=48, vocab=300, hidden=16, chunk=16, device="cpu")
    assert row["dtype"] == "float32"
    assert row["logprob_max_abs_err"] < 1e-5
    assert row["power_loss_grad_rel_err"] < 1e-4
    assert row["full_vocab_kl_rel_err"] < 1e-4 and row["full_vocab_grad_rel_err"] < 1e-4


def test_the_kernel_check_sees_a_wrong_kernel(monkeypatch):
    import poweropd.logprobs as logprobs

    right = logprobs.sampled_pg_loss

    def ten_percent_off(*args, **kwargs):
        loss, *rest = right(*args, **kwargs)
        return (loss * 1.1, *rest)

    monkeypatch.setattr(logprobs, "sampled_pg_loss", ten_percent_off)
    row = device.kernel_exactness(tokens=48, vocab=300, hidden=16, chunk=16, device="cpu")
    assert row["power_loss_grad_rel_err"] == pytest.approx(0.1, rel=1e-3)


def test_the_device_table_compares_each_part_with_its_reference():
    rows = [
        {"part": "kernels", "dtype": "bfloat16", "tokens": 8, "vocab": 151936, "hidden": 4, "part_s": 1.0,
         "logprob_max_abs_err": 0.01, "power_loss_grad_rel_err": 0.001, "full_vocab_kl_rel_err": 0.002,
         "full_vocab_grad_rel_err": 0.003},
        {"part": "update", "shapes": "qwen3-4b-0.6b", "batch": 32, "response": 1024, "step_s": 8.0,
         "peak_mem_gb": 55.0, "part_s": 40.0},
        {"part": "rollout", "engine": "vllm", "skipped": "ImportError: no vllm", "part_s": 1.0},
    ]  # fmt: skip
    text = device.table(rows)
    assert "paper Table 4: 9.03 s, 60.72 GiB" in text and "naive fp32 autograd" in text
    assert "not run: ImportError: no vllm" in text


@pytest.mark.e2e
@pytest.mark.vllm
def test_the_device_command_runs_every_part_on_the_cpu(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "device.json"
    cmd = [sys.executable, "-m", "poweropd.bench", "device", "--cpu", "--json", str(out), "--port", "8337"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["kernels", "update", "rollout", "rollout", "teacher", "teacher"]
    assert not [r for r in rows if "skipped" in r], rows
    assert {r["engine"] for r in rows if r["part"] == "rollout"} == {"hf", "vllm"}
    assert {r["backend"] for r in rows if r["part"] == "teacher"} == {"hf", "server"}
    assert all(r["tokens_per_s"] > 0 for r in rows if r["part"] in ("rollout", "teacher"))
    update = next(r for r in rows if r["part"] == "update")
    assert update["step_s"] > 0 and update["n_tokens"] == update["batch"] * update["response"]


# ----------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@needs_cuda
def test_bf16_kernels_on_cuda_stay_close_to_fp32():
    row = device.kernel_exactness(tokens=2048, vocab=151936, hidden=1024, chunk=1024, device="cuda")
    assert row["dtype"] == "bfloat16"
    assert row["logprob_max_abs_err"] < 0.1  # bf16 products, fp32 accumulation and normalisers
    assert row["power_loss_grad_rel_err"] < 0.02 and row["full_vocab_grad_rel_err"] < 0.02


@pytest.mark.gpu
@needs_cuda
def test_one_update_of_a_qwen3_shaped_pair_on_cuda():
    from poweropd.bench.step import case

    row = case("power", "mini", batch=4, prompt=64, response=128, chunk=1024, micro=0, repeats=1, device="cuda",
               generate_rollouts=True)  # fmt: skip
    assert row["step_s"] > 0 and 0 < row["peak_mem_gb"] < torch.cuda.get_device_properties(0).total_memory / 2**30


@pytest.mark.gpu
@pytest.mark.vllm
@needs_cuda
def test_the_vllm_cuda_engine_syncs_and_sleeps(micro_pair, tmp_path):
    pytest.importorskip("vllm")
    from poweropd.config import VLLMConfig
    from poweropd.engines import make_engine
    from poweropd.generation import SamplingParams

    cfg, pair = micro_pair
    student = pair.student.to("cuda")
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    engine = make_engine(
        "vllm", stop_ids=pair.stop_ids, pad_id=pair.pad_id, model=student, model_path=str(folder),
        dtype="float32", vllm=VLLMConfig(gpu_memory_utilization=0.2), sleep=True,
    )  # fmt: skip
    try:
        before = engine.generate([[1, 2, 3]] * 4, SamplingParams(8, greedy=True))
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > free_awake  # sleep gave memory back
        assert engine.sync(student) >= 0  # wakes and reloads
        after = engine.generate([[1, 2, 3]] * 4, SamplingParams(8, greedy=True))
        assert torch.equal(before.completion_ids_BT.cpu(), after.completion_ids_BT.cpu())
    finally:
        engine.close()
