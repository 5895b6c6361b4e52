"""The benchmark scripts run end to end at tiny sizes and write what they measured
(their numbers are printed and kept, never asserted: speed lives in the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import MICRO_PAIR, ROOT

from poweropd.bench import kernels, step


def bench(tmp_path, *args):
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "poweropd.bench", *args, "--cpu", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    markdown = out.with_suffix(".md").read_text()
    name = {"logprobs": "kernels"}.get(args[0], args[0])  # the command is recorded under its current name
    assert result["command"].startswith(f"python -m poweropd.bench {name} ") and result["machine"]["torch"]
    assert result["table"] in markdown and result["command"] in markdown
    return result


@pytest.mark.e2e
def test_kernel_benchmark_runs_small_and_writes_json_and_markdown(tmp_path):
    result = bench(tmp_path, "kernels", "--tokens", "64", "--vocab", "500", "--hidden", "8", "--chunk", "16")
    assert {(r["kind"], r["tokens"]) for r in result["rows"]} == {("naive", 64), ("chunked", 64), ("fused", 64)}
    assert all(r["time_s"] > 0 and r["peak_mem_gb"] > 0 for r in result["rows"])


@pytest.mark.e2e
def test_old_benchmark_name_still_works(tmp_path):
    result = bench(tmp_path, "logprobs", "--tokens", "32", "--vocab", "300", "--hidden", "8", "--kinds", "chunked")
    assert [r["kind"] for r in result["rows"]] == ["chunked"]


@pytest.mark.e2e
def test_step_benchmark_compares_both_methods_on_the_same_rollouts(tmp_path):
    result = bench(tmp_path, "step", "--shapes", "tiny", "--batch", "2", "--response", "12", "--prompt", "6")
    by = {r["reward"]: r for r in result["rows"]}
    assert set(by) == {"power", "full_vocab"}
    for row in by.values():
        assert row["step_s"] >= row["update_s"] > 0
        assert row["n_generated"] == by["power"]["n_generated"]  # the same rollouts for both methods
    assert "| sampled / full-vocab |" in result["table"]


@pytest.mark.e2e
def test_scaling_benchmark_reports_time_beside_flops(tmp_path):
    result = bench(
        tmp_path,
        "scaling",
        "--shapes",
        "tiny",
        "--lengths",
        "8",
        "16",
        "--batches",
        "2",
        "4",
        "--response",
        "8",
        "--batch",
        "2",
        "--prompt",
        "4",
        "--repeats",
        "1",
    )
    rows = result["rows"]
    assert [(r["series"], r["batch"], r["response"]) for r in rows] == [
        ("length", 2, 8),
        ("length", 2, 16),
        ("batch", 2, 8),
        ("batch", 4, 8),
    ]
    assert [r["n_tokens"] for r in rows] == [16, 32, 16, 32]
    # the FLOPs column is the model's: doubling the batch doubles it exactly
    assert rows[3]["executed_tflops"] == pytest.approx(2 * rows[2]["executed_tflops"])
    assert rows[1]["executed_tflops"] > rows[0]["executed_tflops"]


@pytest.mark.e2e
def test_overhead_benchmark_times_both_loops(tmp_path, toy_cache):
    # the micro pair: build it through a normal run first, then point the benchmark at it
    from conftest import make_config

    from poweropd.models import load_pair

    cfg = make_config(MICRO_PAIR + [f"model_pair.cache_dir={toy_cache}"])
    load_pair(cfg.model_pair, __import__("torch").device("cpu"))
    result = bench(
        tmp_path,
        "overhead",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--batch",
        "4",
        "--max-new-tokens",
        "8",
        "--cache-dir",
        str(toy_cache),
        "--toy",
        *MICRO_PAIR,
    )
    by = {r["kind"]: r for r in result["rows"]}
    assert set(by) == {"harness", "bare"}
    assert all(r["steps"] == 2 and r["median_step_s"] > 0 for r in by.values())
    assert "harness / bare" in result["table"]


def test_tables_say_what_was_skipped():
    rows = [
        {"kind": "naive", "tokens": 65536, "skipped": "needs ~111 GB"},
        {"kind": "chunked", "tokens": 65536, "time_s": 2.0, "growth_mem_gb": 1.2},
        {"kind": "naive", "tokens": 1024, "time_s": 1.0, "growth_mem_gb": 2.0},
        {"kind": "chunked", "tokens": 1024, "time_s": 1.1, "growth_mem_gb": 0.5},
    ]
    table = kernels.table(rows)
    assert "| 1024 | 1.000 | 1.100 | 2.00 | 0.50 | 1.10x | 4.00x lower |" in table
    assert "skipped (needs ~111 GB)" in table
    step_rows = [{"reward": "power", "skipped": "CUDA out of memory"}, {"reward": "full_vocab", "skipped": "x"}]
    assert "skipped (CUDA out of memory)" in step.step_table(step_rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kernels", "--tokens", "0"], "argument --tokens: must be >= 1 (got 0)"),
        (["step", "--batch", "eight"], "argument --batch: 'eight' is not a whole number"),
        (["overhead", "--toy", "teacher.layrs=1"], "the toy pair has no field 'teacher.layrs'"),
    ],
)
@pytest.mark.e2e
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, "-m", "poweropd.bench", *args, "--cpu", "--json", str(tmp_path / "out.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.e2e
def test_teacher_benchmark_scores_with_the_trainers_code_path(tmp_path):
    result = bench(
        tmp_path,
        "teacher",
        "--shapes",
        "tiny",
        "--backends",
        "hf",
        "--rollouts",
        "2",
        "--prompt-len",
        "4",
        "--completion-len",
        "8",
        "--repeats",
        "1",
        "--k",
        "4",
    )
    (row,) = result["rows"]
    assert row["backend"] == "hf" and row["k"] == 4 and row["tokens_per_update"] == 2 * 8
    assert row["tokens_per_s"] > 0 and row["peak_rss_gb"] >= row["rss_before_teacher_gb"] > 0
    assert "| hf | 4 |" in result["table"]


def test_the_servers_memory_is_summed_over_its_process_tree():
    import os

    from poweropd.bench.teacher import process_tree_peak_gb

    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(30)"])
    try:
        import time

        time.sleep(1.5)
        alone = process_tree_peak_gb(child.pid)
        assert alone > 0.19  # the child's 200 MiB
        assert process_tree_peak_gb(os.getpid()) >= alone  # this process and its child
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("tied", [True, False])
def test_the_memory_models_parameter_counts_are_the_models_own(tied):
    import torch

    from poweropd.bench.memory import count_params
    from poweropd.flops import Arch

    arch = Arch(48, 3, 96, 4, 2, 16, 300)
    model = step.build_model(arch, torch.float32, "cpu", seed=0)
    model.config.tie_word_embeddings = tied
    if not tied:  # an untied head: its own tensor
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    counted = count_params(arch, tied=tied)
    assert counted.total == sum(p.numel() for p in model.parameters())
    assert counted.layer == sum(p.numel() for p in model.model.layers[0].parameters())


def test_the_memory_model_shards_state_and_teacher_over_fsdp2_processes():
    from poweropd.bench.memory import GIB, Params, predict

    student, teacher = Params(root=10**8, layer=10**8, layers=10), Params(root=10**8, layer=4 * 10**8, layers=10)
    ddp, fsdp = predict(student, teacher, 8, "ddp"), predict(student, teacher, 8, "fsdp2")
    assert ddp["student_state_gb"] == pytest.approx((16 + 4) * student.total / GIB)  # + DDP's gradient buckets
    assert fsdp["student_state_gb"] == pytest.approx(16 * student.total / 8 / GIB)
    assert fsdp["teacher_gb"] == pytest.approx(ddp["teacher_gb"] / 8)
    assert fsdp["device_peak_gb"] < ddp["device_peak_gb"] and fsdp["gathered_gb"] > 0 == ddp["gathered_gb"]


@pytest.mark.e2e
def test_memory_benchmark_prints_the_table_of_the_papers_pairs(tmp_path):
    result = bench(tmp_path, "memory", "--processes", "2")
    pairs = {(r["pair"], r["parallel"]) for r in result["rows"] if r["kind"] == "model"}
    assert ("8b_from_32b", "fsdp2") in pairs and ("qwen3_4b_0.6b", "ddp") in pairs and len(pairs) == 10
    disk = {r["student"]: r for r in result["rows"] if r["kind"] == "disk"}
    assert set(disk) == {"Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B-Base"}
    assert disk["Qwen/Qwen3-0.6B-Base"]["checkpoint_gb"] == pytest.approx(12 * 0.596e9 / 1e9, rel=0.01)
