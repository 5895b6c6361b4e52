"""The served teacher's client and plumbing without vLLM: retries, backoff and their bounds
against a local HTTP server that misbehaves on purpose, the start-up refusals that need no
model, the rollout -> prompt conversion, and the launcher's command. The same paths against
a real `vllm serve` are in tests/test_served_teacher.py."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import make_config

from poweropd.config import TeacherServerConfig
from poweropd.errors import ConfigError
from poweropd.teacher_client import TeacherClient, TeacherRequestError, TeacherUnavailable
from poweropd.teachers import parse_answers, scoring_prompts


class Script:
    """What the fake server answers, request by request: an int is an HTTP error status, a
    float a delay in seconds before a good answer, a dict the JSON body to return."""

    def __init__(self, *steps, default=None):
        self.steps, self.default, self.seen = list(steps), default, []

    def next(self):
        return self.steps.pop(0) if self.steps else self.default


@pytest.fixture
def fake_server():
    servers = []

    def start(script: Script) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                script.seen.append((self.path, json.loads(self.rfile.read(length)) if length else None))
                step = script.next()
                if isinstance(step, float):
                    time.sleep(step)
                    step = {"ok": True}
                if isinstance(step, int):
                    body = json.dumps({"error": {"message": f"scripted failure {step}", "code": step}}).encode()
                    self.send_response(step)
                else:
                    body = json.dumps(step or {"ok": True}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def settings(**kw) -> TeacherServerConfig:
    return TeacherServerConfig(**{"timeout_s": 2.0, "max_retries": 3, "backoff_s": 0.01, **kw})


def test_failures_are_retried_with_backoff_then_answered(fake_server):
    script = Script(503, 502, default={"answer": 1})
    client = TeacherClient(fake_server(script), settings())
    assert client.call("/v1/completions", {"x": 1}) == {"answer": 1}
    assert len(script.seen) == 3 and client.stats.retries == 2
    stats = client.stats.take()
    assert stats["teacher/retries"] == 2 and stats["teacher/requests"] == 1
    assert client.stats.take()["teacher/retries"] == 0  # taken once


def test_retries_are_bounded_and_end_in_one_line(fake_server):
    script = Script(default=503)
    client = TeacherClient(fake_server(script), settings(max_retries=2, backoff_s=0.05))
    started = time.perf_counter()
    with pytest.raises(TeacherUnavailable) as info:
        client.call("/v1/completions", {})
    assert len(script.seen) == 3  # one try and two retries
    assert time.perf_counter() - started >= 0.05 + 0.1  # backed off 0.05 s, then 0.1 s
    message = str(info.value)
    assert "\n" not in message and "did not answer 3 attempts" in message and "resumes" in message


def test_a_request_that_hangs_past_the_timeout_is_retried(fake_server):
    script = Script(1.5, default={"answer": 2})
    client = TeacherClient(fake_server(script), settings(timeout_s=0.3))
    assert client.call("/v1/completions", {}) == {"answer": 2}
    assert client.stats.retries == 1


def test_a_hung_server_stops_the_run_after_one_timeout(fake_server):
    script = Script(default=2.0)  # every request, /health included, hangs for 2 s
    client = TeacherClient(fake_server(script), settings(timeout_s=0.3, max_retries=5, backoff_s=1.0))
    started = time.perf_counter()
    with pytest.raises(TeacherUnavailable, match="/health does not answer"):
        client.call("/v1/completions", {})
    assert time.perf_counter() - started < 1.5  # one timeout and one health probe, no backoff
    assert [path for path, _ in script.seen] == ["/v1/completions", "/health"]


def test_a_bad_request_is_not_retried(fake_server):
    script = Script(default=400)
    client = TeacherClient(fake_server(script), settings())
    with pytest.raises(TeacherRequestError, match="HTTP 400.*scripted failure 400"):
        client.call("/v1/completions", {})
    assert len(script.seen) == 1


def test_nothing_listening_is_refused_in_one_line():
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TeacherClient(f"http://127.0.0.1:{port}", settings())
    with pytest.raises(ConfigError) as info:
        client.connect(wait_s=0)
    message = str(info.value)
    assert "\n" not in message and f"no teacher server answers at http://127.0.0.1:{port}" in message
    assert "python -m poweropd.serve teacher" in message


def test_startup_wait_keeps_asking_until_the_server_answers(fake_server):
    listing = {"data": [{"id": "t", "max_model_len": 64}]}
    script = Script(503, 503, default=listing)
    client = TeacherClient(fake_server(script), settings())
    with pytest.raises(ConfigError, match="no teacher server answers"):
        TeacherClient(client.url, settings()).connect(wait_s=0)  # the first 503: refused at once
    assert client.connect(wait_s=30)["id"] == "t" and client.max_model_len == 64


def test_scores_that_are_logits_are_refused(fake_server):
    logits = {"choices": [{"index": 0, "prompt_logprobs": [None, {"5": {"logprob": 3.2, "rank": 1}}]}]}
    client = TeacherClient(fake_server(Script(default=logits)), settings())
    with pytest.raises(ConfigError, match="not log-probabilities.*--logprobs-mode raw_logprobs"):
        client.check_logprobs(1)


def test_k_above_the_servers_maximum_is_refused(fake_server):
    script = Script(default=400)
    client = TeacherClient(fake_server(script), settings())
    client._once = lambda *a: (_ for _ in ()).throw(  # a vLLM 0.32 refusal, word for word
        TeacherRequestError(
            "the teacher server refused /v1/completions (HTTP 400): Requested prompt logprobs of 100, which is "
            "greater than max allowed: 20 (parameter=prompt_logprobs, value=100)"
        )
    )
    with pytest.raises(ConfigError, match=r"reward.k=100 is above the 20 log-probs.*--max-logprobs 100"):
        client.check_logprobs(100)


@pytest.mark.parametrize("length", [8, 9])
def test_a_rollout_that_does_not_fit_the_servers_context_is_refused(fake_server, length):
    client = TeacherClient(fake_server(Script()), settings())
    client.max_model_len = 8  # a prompt of 8 leaves no room for the one generated token
    with pytest.raises(TeacherRequestError, match=f"rollout of {length} tokens.*max_model_len 8.*>= {length + 1}"):
        client.prompt_logprobs([[1] * length], 0)
    client.check_context(6)
    with pytest.raises(ConfigError, match="max_model_len 8 cannot hold.*max_new_tokens=7"):
        client.check_context(7)


def test_requests_go_straight_to_the_server_whatever_http_proxy_says(fake_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    client = TeacherClient(fake_server(Script(default={"answer": 3})), settings(max_retries=0))
    assert client.call("/v1/completions", {}) == {"answer": 3}


def test_closing_the_client_ends_retries_that_are_waiting(fake_server):
    script = Script(default=503)
    client = TeacherClient(fake_server(script), settings(max_retries=5, backoff_s=5.0))
    started = time.perf_counter()
    threading.Timer(0.3, client.close).start()
    with pytest.raises(TeacherUnavailable):
        client.call("/v1/completions", {})
    assert time.perf_counter() - started < 3  # not the 5 + 10 + ... s of backoff
    assert len(script.seen) == 1


def test_an_unreadable_answer_is_a_teacher_failure_that_keeps_the_last_update(fake_server):
    from poweropd.teacher_client import TeacherFailure
    from poweropd.teachers import ServerTeacher

    missing = {"choices": [{"index": 0, "prompt_logprobs": [None, {"77": {"logprob": -1.0, "rank": 1}}]}]}
    teacher = ServerTeacher(fake_server(Script(default=missing)), settings())
    inputs = (torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.long), 1, torch.tensor([[True]]))
    with pytest.raises(TeacherFailure, match="could not score this update"):
        teacher.score("logprobs", [inputs], chunk=4)  # the answer lacks the sampled token (5)


def test_the_tokenizer_probe_reaches_the_end_of_the_vocabulary_and_every_added_token(micro_pair):
    from poweropd.teachers import tokenizer_probe

    _, pair = micro_pair
    tok = pair.tokenizer
    probe = tokenizer_probe(tok)
    assert all(name in probe for name in tok.get_added_vocab())
    last = tok.decode([len(tok) - 1], skip_special_tokens=False)
    assert last in probe


def test_rollouts_become_unpadded_prompts_scored_at_their_loss_tokens():
    P = 3
    ids = torch.tensor([[0, 7, 8, 1, 2, 3, 4], [9, 9, 9, 5, 6, 0, 0], [0, 0, 4, 1, 1, 1, 1]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    mask = torch.tensor([[True, False, True, False], [True, True, False, False], [False, False, False, False]])
    prompts, positions = scoring_prompts(ids, attn, P, mask)
    # row 0: pad dropped, completion cut after its last loss token (t = 2); row 2 has none
    assert prompts == [[7, 8, 1, 2, 3], [9, 9, 9, 5, 6]]
    assert positions == [[2, 4], [3, 4]]
    answers = [
        [
            None,
            None,
            {"1": {"logprob": -0.5, "rank": 2}, "9": {"logprob": -0.1, "rank": 1}},
            None,
            {"3": {"logprob": -2.0, "rank": 3}, "4": {"logprob": -0.2, "rank": 1}, "6": {"logprob": -0.9, "rank": 2}},
        ],
        [
            None,
            None,
            None,
            {"5": {"logprob": -1.5, "rank": 1}, "2": {"logprob": -1.6, "rank": 2}},
            {"6": {"logprob": -0.3, "rank": 1}, "1": {"logprob": -2.5, "rank": 2}},
        ],
    ]
    lT_N, (vals_NK, idx_NK) = parse_answers(prompts, positions, answers, 2, "cpu")
    assert lT_N.tolist() == pytest.approx([-0.5, -2.0, -1.5, -0.3])
    answers[0][4]["3"]["logprob"] = -9999.0  # how a vLLM server writes -inf
    assert parse_answers(prompts, positions, answers, 2, "cpu")[0][1].item() == -math.inf
    assert idx_NK.tolist() == [[9, 1], [4, 6], [5, 2], [6, 1]]
    assert vals_NK[1].tolist() == pytest.approx([-0.2, -0.9])


@pytest.mark.parametrize("reward", ["full_vocab", "jsd"])
@pytest.mark.parametrize("backend", ["server", "vllm"])
def test_objectives_that_need_the_whole_distribution_are_refused(reward, backend):
    with pytest.raises(ConfigError) as info:
        make_config([f"reward={reward}", f"model_pair.teacher_backend={backend}", "model_pair.teacher_url=http://h:1"])
    message = str(info.value)
    assert "\n" not in message and f"reward={reward} needs the teacher's whole distribution" in message
    assert "reward=topk_kl" in message


def test_a_server_backend_needs_a_url():
    with pytest.raises(ConfigError, match="teacher_url=http://HOST:PORT"):
        make_config(["model_pair.teacher_backend=server"])


def test_where_the_teacher_runs_may_change_on_resume(tmp_path):
    from dataclasses import asdict

    from poweropd.files import write_json_atomic
    from poweropd.tracking import RUN_CONFIG
    from poweropd.train import check_resume_config

    write_json_atomic(tmp_path / RUN_CONFIG, asdict(make_config([])))
    moved = make_config(["model_pair.teacher_backend=server", "model_pair.teacher_url=http://other-node:8000"])
    check_resume_config(moved, tmp_path, True)  # the same teacher, served from elsewhere
    with pytest.raises(ConfigError, match="different config"):
        check_resume_config(make_config(["reward=power"]), tmp_path, True)


def test_the_launcher_pins_the_flags_the_trainer_relies_on():
    from poweropd.serve import pair_config, parse, serve_command

    args = parse(["teacher", "model_pair=qwen3_8b_1.7b", "--port", "8011", "--", "--max-num-seqs", "32"])
    mp = pair_config(args.overrides)
    gpu = serve_command(mp, args, on_gpu=True)
    text = " ".join(gpu)
    for flag in (
        "--logprobs-mode raw_logprobs",
        "--max-logprobs 64",
        "--generation-config vllm",
        "--dtype bfloat16",
        "--served-model-name Qwen/Qwen3-8B",
        "--port 8011",
    ):
        assert flag in text
    assert "Qwen/Qwen3-8B" in gpu and gpu[-2:] == ["--max-num-seqs", "32"]
    assert gpu[gpu.index("--hf-overrides") + 1] == '{"head_dtype": "float32"}'  # fp32 logits from a bf16 model
    cpu = " ".join(serve_command(mp, args, on_gpu=False))
    assert "--dtype float32" in cpu and "--enforce-eager" in cpu and "--gpu-memory-utilization" not in cpu
    assert "--hf-overrides" not in cpu
