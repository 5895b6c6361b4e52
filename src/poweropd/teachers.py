"""Where the teacher runs (model_pair.teacher_backend). Every backend gives the trainer the
same thing, per micro-batch: a TeacherOut of what the objective asked for
(poweropd.objectives.TEACHER_NEEDS) on exactly the token ids the student sampled.

    hf      the teacher is an HF model in the trainer process (poweropd.models.score_teacher):
            every need, including "hidden" for the vocabulary objectives (full_vocab, jsd)
    vllm    an in-process vLLM engine holds the teacher; the trainer never loads its weights
    server  a vLLM server elsewhere (poweropd.teacher_client); the trainer never loads its
            weights, and one server can score for every run of a sweep

vllm and server score a rollout as prompt log-probs: the rollout's unpadded prompt and its
completion up to the last token in the loss are one prompt, `max_tokens=1`,
`prompt_logprobs=k` (0 for the sampled token alone). Entry j of the answer is the teacher's
log_softmax at temperature 1 of the logits after tokens < j, at token j, plus its top-k;
entry P_b + t is completion token t of a rollout with P_b prompt tokens. Positions follow
the tokens (no left padding), as the in-process path's position ids do. The answers come
back in the order of the loss mask (row-major), the order of every other per-token tensor.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from poweropd.objectives import TeacherOut
from poweropd.teacher_client import TeacherFailure

log = logging.getLogger(__name__)

PROBE_IDS = 256  # vocabulary entries spread over the vocabulary, decoded into the tokenizer probe text
PROBE_LAST = 64  # and the last ids, where related tokenizers differ (Qwen2.5 vs Qwen3: <think>, tool tokens)
SERVER_NEG_INF = -9999.0  # a vLLM server writes a log-prob of -inf as this (clamp_prompt_logprobs)


# ----------------------------------------------------------------------------------------
# Rollouts as prompts, answers as TeacherOut


def scoring_prompts(
    input_ids_BS, attention_mask_BS, prompt_len: int, mask_BT
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt of each rollout with a loss token, its scored positions): the prompt is the
    unpadded prompt tokens followed by the completion up to its last loss token; positions
    index that prompt, one per loss token, in the loss mask's order."""
    prompts, positions = [], []
    for ids_S, attn_S, m_T in zip(input_ids_BS.tolist(), attention_mask_BS.tolist(), mask_BT.tolist()):
        valid_t = [t for t, m in enumerate(m_T) if m]
        if not valid_t:
            continue
        prompt = [tok for tok, a in zip(ids_S[:prompt_len], attn_S[:prompt_len]) if a]
        completion = ids_S[prompt_len : prompt_len + valid_t[-1] + 1]
        prompts.append(prompt + completion)
        positions.append([len(prompt) + t for t in valid_t])
    return prompts, positions


def _entry_items(entry) -> list[tuple[int, float, int]]:
    """(token id, log-prob, rank) of one prompt_logprobs position, from a server's JSON
    ({"id": {"logprob", "rank"}}) or vLLM's Logprob objects ({id: Logprob})."""
    out = []
    for key, value in entry.items():
        if isinstance(value, dict):
            logprob, rank = value.get("logprob"), value.get("rank")
        else:
            logprob, rank = value.logprob, value.rank
        logprob = -math.inf if logprob is None or logprob <= SERVER_NEG_INF else float(logprob)
        out.append((int(key), logprob, int(rank or 0)))
    return out


def parse_answers(sequences, positions, answers, k: int, device) -> tuple[torch.Tensor, tuple | None]:
    """lT_N (and the top-k ([N, k] log-probs, [N, k] ids) when k > 0) of the scored positions."""
    lT, vals, idx = [], [], []
    for seq, pos, entries in zip(sequences, positions, answers):
        for j in pos:
            items = _entry_items(entries[j])
            token = seq[j]
            lT.append(next(lp for tok, lp, _ in items if tok == token))
            if k:
                top = sorted((it for it in items if 1 <= it[2] <= k), key=lambda it: it[2])[:k]
                if len(top) < k:  # should not happen: the server returns k ranked entries
                    raise ValueError(f"the teacher returned {len(top)} ranked log-probs where reward.k={k} were asked")
                vals.append([lp for _, lp, _ in top])
                idx.append([tok for tok, _, _ in top])
    lT_N = torch.tensor(lT, dtype=torch.float32, device=device)
    if not k:
        return lT_N, None
    vals_NK = torch.tensor(vals, dtype=torch.float32, device=device).reshape(-1, k)
    idx_NK = torch.tensor(idx, dtype=torch.long, device=device).reshape(-1, k)
    return lT_N, (vals_NK, idx_NK)


# ----------------------------------------------------------------------------------------
# Backends


class HFTeacher:
    """The teacher model in the trainer process; `root` is its FSDP2 root when it is sharded
    over the processes (poweropd.sharding.shard_teacher)."""

    name = "hf"

    def __init__(self, model, root=None):
        self.model, self.root = model, root
        self.seconds = 0.0
        self._gathered_head = None

    @property
    def head_VD(self) -> torch.Tensor:
        """The lm-head weight the vocabulary objectives multiply: a sharded teacher's is the
        one gathered by the last `score` that asked for hidden states."""
        if self.root is None:
            return self.model.get_output_embeddings().weight
        return self._gathered_head

    def score(self, need: str, micro_inputs: list[tuple], chunk: int, k: int = 0) -> list[TeacherOut]:
        from poweropd.models import score_teacher

        started = time.perf_counter()
        if self.root is None:
            out = [score_teacher(self.model, need, *inputs, chunk, k) for inputs in micro_inputs]
        else:  # every process scores its own rollouts; each forward all-gathers the layers it runs
            from poweropd.sharding import full_tensor

            out = [self.root(need, *inputs, chunk, k) for inputs in micro_inputs]
            self._gathered_head = None  # the previous update's, before gathering anew
            if need == "hidden":
                self._gathered_head = full_tensor(self.model.get_output_embeddings().weight)
        self.seconds += time.perf_counter() - started
        return out

    def metrics(self) -> dict:
        out, self.seconds = {"teacher/seconds": self.seconds}, 0.0
        return out

    def release(self) -> None:
        """The update no longer needs the gathered head: free it before generation."""
        self._gathered_head = None

    def close(self) -> None:
        pass


class PromptLogprobTeacher:
    """A teacher that scores rollouts as prompt log-probs (the vllm and server backends);
    subclasses provide `_answers(prompts, k)`."""

    name = "prompt_logprobs"
    head_VD = None  # no teacher weights here: the vocabulary objectives are refused by the config

    def __init__(self):
        self.seconds, self.tokens = 0.0, 0

    def release(self) -> None:
        pass

    def score(self, need: str, micro_inputs: list[tuple], chunk: int, k: int = 0) -> list[TeacherOut]:
        if need == "hidden":  # the config refuses this combination; a direct caller gets told too
            raise ValueError(f"teacher_backend={self.name} cannot give the teacher's hidden states")
        k = k if need == "topk" else 0
        started = time.perf_counter()
        per_micro = [scoring_prompts(*inputs) for inputs in micro_inputs]
        prompts = [p for ps, _ in per_micro for p in ps]
        try:
            answers = self._answers(prompts, k) if prompts else []
            outs, at = [], 0
            for (ps, pos), inputs in zip(per_micro, micro_inputs):
                lT_N, topk = parse_answers(ps, pos, answers[at : at + len(ps)], k, inputs[0].device)
                at += len(ps)
                outs.append(TeacherOut(lT_N=lT_N, topk=topk))
        except TeacherFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to score leaves the weights as they were
            first = (str(exc).splitlines() or [exc.__class__.__name__])[0][:300]
            raise TeacherFailure(
                f"the {self.name} teacher could not score this update ({exc.__class__.__name__}: {first})"
            ) from exc
        self.seconds += time.perf_counter() - started
        self.tokens += sum(len(p) for p in prompts)
        return outs

    def _answers(self, prompts: list[list[int]], k: int) -> list[list]:
        raise NotImplementedError

    def metrics(self) -> dict:
        out = {"teacher/seconds": self.seconds}
        if self.seconds:
            out["teacher/prompt_tokens_per_s"] = self.tokens / self.seconds
        self.seconds, self.tokens = 0.0, 0
        return out


class ServerTeacher(PromptLogprobTeacher):
    """A vLLM server at `url` (poweropd.teacher_client)."""

    name = "server"

    def __init__(self, url: str, settings):
        from poweropd.teacher_client import TeacherClient

        super().__init__()
        self.client = TeacherClient(url, settings)

    def connect(
        self, tokenizer, vocab_size: int, student: str, k: int, wait_s: float = 0.0, max_new_tokens: int = 1
    ) -> dict:
        """The start-up checks (poweropd.teacher_client), before any weights load."""
        info = self.client.connect(wait_s)
        self.client.check_context(max_new_tokens)
        self.client.check_tokenizer(tokenizer, tokenizer_probe(tokenizer), student)
        self.client.check_vocab(vocab_size, student)
        self.client.check_logprobs(k)
        self.client.stats.take()  # the start-up probes are not an update's requests
        log.info("teacher served by %s (%s, max_model_len %s)", self.client.url, info["id"], info.get("max_model_len"))
        return info

    def _answers(self, prompts, k):
        return self.client.prompt_logprobs(prompts, k)

    def metrics(self) -> dict:
        return {**super().metrics(), **self.client.stats.take()}

    def close(self) -> None:
        self.client.close()


class VLLMTeacher(PromptLogprobTeacher):
    """An in-process vLLM engine on the teacher's checkpoint (the trainer holds no copy)."""

    name = "vllm"

    def __init__(self, model_path: str, *, dtype: str, k: int, seed: int, trust_remote_code: bool, options):
        from poweropd.vllm_engine import import_vllm, memory_options

        super().__init__()
        vllm = import_vllm()
        on_cuda = torch.cuda.is_available()
        kwargs = dict(
            model=model_path,
            skip_tokenizer_init=True,  # token ids in, log-probs out
            dtype=dtype,
            seed=seed,
            generation_config="vllm",
            trust_remote_code=trust_remote_code,
            disable_log_stats=True,
            max_logprobs=max(k, 1),
            logprobs_mode="raw_logprobs",  # log_softmax of the raw logits (prompt tokens skip the sampler anyway)
            **memory_options(options, on_cuda),
        )
        if dtype != "float32":  # the lm-head's logits in fp32, as the in-process kernels form them
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:  # the CPU worker resets the process's thread count; the trainer keeps its own
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    def _answers(self, prompts, k):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [out.prompt_logprobs for out in outputs]

    def close(self) -> None:
        del self.llm


def tokenizer_probe(tokenizer) -> str:
    """A text whose tokenisation tells tokenizers apart: chat markup, digits, spacing, and the
    decoded text of PROBE_IDS vocabulary entries spread over the whole vocabulary."""
    size = len(tokenizer)
    step = max(size // PROBE_IDS, 1)
    ids = list(range(0, size, step))[:PROBE_IDS] + list(range(max(size - PROBE_LAST, 0), size))
    spread = tokenizer.decode(ids, skip_special_tokens=False)
    added = "".join(tokenizer.get_added_vocab())  # every special and added token, as text
    return "<|im_start|>user\nWhat is 12 + 345?  Ünïcödé ∑ 数学\t\n<|im_end|>\n<|im_start|>assistant\n" + spread + added


def open_teacher(cfg, tokenizer, teacher_path: str, student_path: str, seed: int = 0):
    """The vllm or server backend of a run's config (`cfg`: a poweropd.config.Config), checked
    and ready, before the student's weights load."""
    from poweropd.models import vocab_size_of
    from poweropd.objectives import get_objective

    mp = cfg.model_pair
    k = cfg.reward.k if get_objective(cfg.reward.name).teacher == "topk" else 0
    if mp.teacher_backend == "server":
        teacher = ServerTeacher(mp.teacher_url, mp.teacher_server)
        try:
            vocab = vocab_size_of(student_path, mp)
            wait_s, max_new = mp.teacher_server.startup_wait_s, cfg.training.max_new_tokens
            teacher.connect(tokenizer, vocab, student_path, max(k, 1), wait_s, max_new)
        except BaseException:
            teacher.close()
            raise
        from poweropd.serve import served_name

        if teacher.client.model != served_name(mp):
            log.warning(
                "the server at %s serves %r, not the pair's teacher %r: make sure it is the teacher you mean",
                mp.teacher_url,
                teacher.client.model,
                served_name(mp),
            )
        return teacher
    from transformers import AutoConfig

    from poweropd.vllm_engine import check_engine_model

    model_config = AutoConfig.from_pretrained(
        teacher_path, revision=mp.revision, trust_remote_code=mp.trust_remote_code
    )
    check_engine_model(model_config, "cuda" if torch.cuda.is_available() else "cpu", "model_pair.teacher_backend")
    dtype = mp.teacher_dtype if mp.teacher_dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    return VLLMTeacher(
        teacher_path, dtype=dtype, k=k, seed=seed, trust_remote_code=mp.trust_remote_code, options=mp.teacher_vllm
    )
