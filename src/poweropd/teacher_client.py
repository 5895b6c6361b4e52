"""The trainer's side of a served teacher (model_pair.teacher_backend=server): an HTTP
client of a vLLM OpenAI-compatible server that scores rollouts as prompt log-probs.

One scoring request is a `POST /v1/completions` whose `prompt` is a list of token-id lists
(the rollouts, never re-tokenised text), with `max_tokens=1` and `prompt_logprobs=k`: the
server returns, for every prompt position j > 0, the log-prob of token j given tokens < j
and the top-k of that distribution. In vLLM 0.32 these are log_softmax of the raw logits at
temperature 1 in either of the `--logprobs-mode` settings that return log-probs: prompt
tokens never pass through the sampler's processors (temperature, top-k/top-p, penalties), so
`raw_logprobs` and `processed_logprobs` agree; the logits modes return logits instead, which
`check_logprobs` refuses. The launcher (poweropd.serve) pins `--logprobs-mode raw_logprobs`.

Requests go out `concurrency` at a time, `rollouts_per_request` rollouts each. A refused
connection, a timeout, 408/429 or a 5xx is retried after backoff_s, 2 backoff_s, ... (capped
at 30 s), at most max_retries times; then `TeacherUnavailable` stops the run (the trainer
checkpoints the last finished update first, so the same command resumes). A request that
times out is retried only while the server's /health still answers: a busy server gets its
retries, a hung one stops the run after one timeout. Any other 4xx is
the request's own fault and is reported at once, in one line, with the server's message.

Start-up checks, all through the server's own endpoints and before any weights load:
`/v1/models` (it answers; its model and max_model_len), `/tokenize` (the student's tokenizer
and the server's give the same ids on a probe text), a completion with `allowed_token_ids`
at the edge of the student's vocabulary (the teacher has exactly as many logits), and one
with `prompt_logprobs=k` (k within the server's --max-logprobs, and the values are
log-probabilities).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from poweropd.errors import ConfigError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
HEALTH_TIMEOUT_S = 5.0  # after a request times out: does the server still answer /health?
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)
SERVE_HINT = "python -m poweropd.serve teacher model_pair=<pair>"


class TeacherFailure(ConfigError):
    """The teacher could not score an update (reported in one line; the trainer checkpoints
    the last finished update first)."""


class TeacherUnavailable(TeacherFailure):
    """The teacher server stopped answering: retries ran out."""


class TeacherRequestError(TeacherFailure):
    """The teacher server refused a request (4xx): retrying would not help."""


@dataclass
class ClientStats:
    """What the client did since the last `take`: requests, retries, per-request latencies."""

    requests: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)  # requests finish on the pool's threads

    def answered(self, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.latencies.append(seconds)

    def retried(self) -> None:
        with self.lock:
            self.retries += 1

    def take(self) -> dict:
        with self.lock:
            out = {"teacher/requests": self.requests, "teacher/retries": self.retries}
            if self.latencies:
                out["teacher/request_latency_mean_s"] = sum(self.latencies) / len(self.latencies)
                out["teacher/request_latency_max_s"] = max(self.latencies)
            self.requests, self.retries, self.latencies = 0, 0, []
        return out


class _Retryable(Exception):
    """A failure worth another attempt (carries a one-line description)."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class TeacherClient:
    """A vLLM server's completions, tokenize and models endpoints, with bounded retries."""

    def __init__(self, url: str, settings):
        self.url = url.rstrip("/")
        self.settings = settings
        self.stats = ClientStats()
        self.model: str | None = None
        self.max_model_len: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="teacher")
        self._closing = threading.Event()  # set by close(): requests still retrying give up
        # Straight to the server, whatever http_proxy says: a cluster's proxy cannot reach a
        # teacher on a compute node (and 127.0.0.1 is never behind one).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- HTTP ---------------------------------------------------------------------------

    def _once(self, path: str, body: dict | None, timeout: float):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            message = _server_message(exc)
            if exc.code in RETRIED_STATUS:
                raise _Retryable(f"HTTP {exc.code}: {message}") from None
            raise TeacherRequestError(
                f"the teacher server at {self.url} refused {path} (HTTP {exc.code}): {message}"
            ) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            timed_out = isinstance(reason, TimeoutError)
            raise _Retryable(f"{reason.__class__.__name__}: {reason}".rstrip(": "), timed_out) from None
        except json.JSONDecodeError as exc:
            raise _Retryable(f"an unreadable answer ({exc})") from None

    def call(self, path: str, body: dict | None = None, retries: int | None = None):
        """One request with the configured timeout and bounded, backed-off retries."""
        retries = self.settings.max_retries if retries is None else retries
        started, last = time.perf_counter(), ""
        for attempt in range(retries + 1):
            if attempt:
                self.stats.retried()
                wait = min(self.settings.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                log.warning("teacher server %s: %s; retry %d of %d in %.1f s", self.url, last, attempt, retries, wait)
                if self._closing.wait(wait):
                    break
            t0 = time.perf_counter()
            try:
                out = self._once(path, body, self.settings.timeout_s)
            except _Retryable as exc:
                last = str(exc)
                if exc.timed_out and not self.alive():  # hung, not busy: retrying would only wait again
                    raise TeacherUnavailable(
                        f"the teacher server at {self.url} did not answer within timeout_s={self.settings.timeout_s:g} "
                        f"and its /health does not answer either; restart it ({SERVE_HINT}) and run the same command "
                        "again: the run resumes from its last finished update"
                    ) from None
                continue
            self.stats.answered(time.perf_counter() - t0)
            return out
        raise TeacherUnavailable(
            f"the teacher server at {self.url} did not answer {retries + 1} attempts in "
            f"{time.perf_counter() - started:.0f} s (last: {last}); restart it ({SERVE_HINT}) and run the same "
            "command again: the run resumes from its last finished update"
        )

    def alive(self) -> bool:
        """Whether /health answers within a few seconds (a busy server does, a hung one not)."""
        try:
            with self._opener.open(self.url + "/health", timeout=min(self.settings.timeout_s, HEALTH_TIMEOUT_S)):
                return True
        except (OSError, http.client.HTTPException):
            return False

    # -- start-up checks ----------------------------------------------------------------

    def connect(self, wait_s: float = 0.0) -> dict:
        """The server's model record from /v1/models, waiting up to `wait_s` for it to answer."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                listing = self._once("/v1/models", None, min(self.settings.timeout_s, 10.0))
                break
            except _Retryable as exc:
                if time.monotonic() >= deadline:
                    waited = f" within {wait_s:g} s" if wait_s else ""
                    raise ConfigError(
                        f"no teacher server answers at {self.url}{waited} ({exc}); start one with {SERVE_HINT} and "
                        "pass the URL it prints as model_pair.teacher_url (model_pair.teacher_server.startup_wait_s "
                        "waits for a server that is still starting)"
                    ) from None
                time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        models = listing.get("data") or []
        if not models:
            raise ConfigError(f"the server at {self.url} serves no model (/v1/models is empty)")
        self.model = models[0]["id"]
        self.max_model_len = models[0].get("max_model_len")
        return models[0]

    def check_context(self, max_new_tokens: int) -> None:
        """Refuse a server whose context cannot hold even a completion of max_new_tokens."""
        if self.max_model_len and max_new_tokens + 2 > self.max_model_len:
            raise ConfigError(
                f"the teacher server's max_model_len {self.max_model_len} cannot hold a rollout of "
                f"training.max_new_tokens={max_new_tokens} completion tokens plus its prompt; restart it with a "
                "larger --max-model-len"
            )

    def check_tokenizer(self, tokenizer, probe: str, student: str) -> None:
        """The server's tokenizer must give the student's ids on `probe`."""
        body = {"model": self.model, "prompt": probe, "add_special_tokens": False}
        served = self.call("/tokenize", body, retries=1)["tokens"]
        ours = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if served != ours:
            at = next((i for i, (a, b) in enumerate(zip(served, ours)) if a != b), min(len(served), len(ours)))
            raise ConfigError(
                f"the served teacher ({self.model}) tokenizes differently from the student ({student}): a probe text "
                f"gives {len(served)} ids on the server and {len(ours)} in the student, first differing at id {at}; "
                "serve a teacher that shares the student's tokenizer"
            )

    def check_vocab(self, vocab_size: int, student: str) -> None:
        """The teacher must have exactly `vocab_size` logits (the student's)."""

        def allowed(token_id: int) -> bool:
            body = {"model": self.model, "prompt": [0], "max_tokens": 1, "allowed_token_ids": [token_id]}
            try:
                self.call("/v1/completions", body, retries=1)
                return True
            except TeacherRequestError as exc:
                if "out-of-vocab" not in str(exc):  # vLLM's words for an id beyond the logits
                    raise
                return False

        if not allowed(vocab_size - 1):
            relation = "fewer"
        elif allowed(vocab_size):
            relation = "more"
        else:
            return
        raise ConfigError(
            f"the served teacher ({self.model}) has {relation} logits than the student ({student}, vocabulary size "
            f"{vocab_size}); OPD needs the teacher to score the student's token ids, so serve a teacher of the same "
            "tokenizer family"
        )

    def check_logprobs(self, k: int) -> None:
        """One real scoring request: k within --max-logprobs, and the values are log-probs."""
        body = {"model": self.model, "prompt": [[0, 1, 2, 3]], "max_tokens": 1, "prompt_logprobs": k}
        try:
            out = self.call("/v1/completions", body, retries=1)
        except TeacherRequestError as exc:
            if "max allowed" in str(exc):
                allowed = str(exc).split("max allowed:")[-1].split()[0].strip(" .,()")
                raise ConfigError(
                    f"reward.k={k} is above the {allowed} log-probs the teacher server returns per token "
                    f"(--max-logprobs); restart it with --max-logprobs >= {k} ({SERVE_HINT} "
                    f"--max-logprobs {k}) or lower reward.k"
                ) from None
            raise
        entries = [entry for entry in out["choices"][0]["prompt_logprobs"][1:] if entry]
        largest = max((e["logprob"] for entry in entries for e in entry.values()), default=math.nan)
        mass = max((sum(math.exp(e["logprob"]) for e in entry.values()) for entry in entries), default=math.nan)
        if not (largest <= 1e-4 and mass <= 1 + 1e-3):
            raise ConfigError(
                f"the teacher server returns scores that are not log-probabilities (largest {largest:.3g}, top-{k} "
                f"probability mass {mass:.3g}); it was started with a logits mode: restart it with --logprobs-mode "
                f"raw_logprobs ({SERVE_HINT} does)"
            )

    # -- scoring ------------------------------------------------------------------------

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[list]:
        """The prompt_logprobs list of each sequence (entry j: {token id: {logprob, rank}} for
        token j, None for j = 0), requests in flight `concurrency` at a time."""
        if self.max_model_len:
            longest = max((len(s) for s in sequences), default=0)
            if longest >= self.max_model_len:  # the one generated token must fit as well
                raise TeacherRequestError(
                    f"a rollout of {longest} tokens does not fit the teacher server's max_model_len "
                    f"{self.max_model_len} (it needs one more); restart it with --max-model-len >= {longest + 1} "
                    "or lower training.max_new_tokens"
                )
        size = self.settings.rollouts_per_request
        chunks = [sequences[i : i + size] for i in range(0, len(sequences), size)]

        def score(chunk: list[list[int]]) -> list:
            body = {
                "model": self.model,
                "prompt": chunk,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": k,
            }
            choices = sorted(self.call("/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise TeacherRequestError(
                    f"the teacher server at {self.url} answered {len(choices)} choices for {len(chunk)} prompts"
                )
            return [c["prompt_logprobs"] for c in choices]

        out = []
        for part in self._pool.map(score, chunks):
            out.extend(part)
        return out

    def close(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _server_message(exc: urllib.error.HTTPError) -> str:
    """The error message of a vLLM error response, on one line."""
    try:
        payload = json.loads(exc.read() or b"{}")
        message = payload.get("error", {}).get("message") or payload.get("message") or payload.get("detail")
    except (json.JSONDecodeError, AttributeError, OSError):
        message = None
    return " ".join(str(message or exc.reason).split())[:300]
