"""Loading a teacher/student pair and scoring token ids with it.

Every pair, the embedded toy one included, loads through AutoTokenizer and
AutoModelForCausalLM. Before any weights are read the pair is checked: the teacher must
score the student's exact token ids, so tokenizers and vocabulary sizes must agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from poweropd.config import ModelPairConfig
from poweropd.errors import ConfigError
from poweropd.hf_engine import neutralize_generation_defaults
from poweropd.logprobs import sampled_logprobs, teacher_topk
from poweropd.objectives import TeacherOut

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """A dtype setting (auto | float32 | bfloat16 | float16): auto is bf16 on GPU, fp32 on CPU."""
    return DTYPES.get(dtype) or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


@dataclass
class ModelPair:
    teacher: nn.Module | None  # None when the teacher runs elsewhere (model_pair.teacher_backend=vllm|server)
    student: nn.Module
    tokenizer: object  # the student's tokenizer (its chat template builds every prompt)
    stop_ids: list[int]
    pad_id: int
    teacher_path: str
    student_path: str


def resolve_paths(cfg: ModelPairConfig) -> tuple[str, str]:
    """Hub ids / local directories of (teacher, student). The default toy spec is the pair
    shipped with the package; any other toy spec is built into the cache on first use."""
    if cfg.kind == "toy":
        from poweropd.toy.shipped import shipped_pair

        root = shipped_pair(cfg.toy) if cfg.use_shipped_pair else None
        if root is None:
            from poweropd.toy.build import ensure_toy_pair

            root = ensure_toy_pair(cfg.toy, cfg.cache_dir)
        return str(root / "teacher"), str(root / "student")
    return cfg.teacher, cfg.student


def _hub_kwargs(cfg: ModelPairConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def check_pair(teacher_path: str | None, student_path: str, cfg: ModelPairConfig):
    """Refuse pairs whose teacher cannot score the student's token ids. Returns the
    student's tokenizer. Reads configs and tokenizers only, no weights. `teacher_path`
    None (a served teacher): the student alone is checked here, the teacher through the
    server's endpoints (poweropd.teacher_client)."""
    kwargs = _hub_kwargs(cfg)
    roles = (("teacher", teacher_path), ("student", student_path)) if teacher_path else (("student", student_path),)
    for role, path in roles:
        if looks_local(path) and not local_path_exists(path):
            raise ConfigError(f"no model at {path} (model_pair.{role}); give an existing folder or a hub id")
    try:
        tok_s = AutoTokenizer.from_pretrained(student_path, **kwargs)
        conf_s = AutoConfig.from_pretrained(student_path, **kwargs)
        if teacher_path:
            tok_t = AutoTokenizer.from_pretrained(teacher_path, **kwargs)
            conf_t = AutoConfig.from_pretrained(teacher_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"could not load the model pair ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
            "check model_pair.teacher / model_pair.student, network access or HF_HOME"
        ) from None
    if not teacher_path:
        _check_logits(("student", conf_s))
        return tok_s
    vs, vt = _vocab_size(conf_s), _vocab_size(conf_t)
    if vs != vt:
        raise ConfigError(
            f"model_pair vocabularies differ: teacher {teacher_path} has {vt} logits, student "
            f"{student_path} has {vs}; OPD needs the teacher to score the student's token ids, "
            "so pick a teacher and student from the same tokenizer family"
        )
    if tok_s.get_vocab() != tok_t.get_vocab():
        only_s = len(set(tok_s.get_vocab().items()) - set(tok_t.get_vocab().items()))
        raise ConfigError(
            f"model_pair tokenizers differ: {only_s} token->id entries of the student ({student_path}) "
            f"are not in the teacher's ({teacher_path}); pick a pair that shares one tokenizer"
        )
    _check_logits(("teacher", conf_t), ("student", conf_s))
    return tok_s


def _check_logits(*named_configs) -> None:
    for name, conf in named_configs:
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(conf, attr, None) not in (None, 1.0):
                raise ConfigError(
                    f"the {name}'s config sets {attr}; the chunked log-prob kernels assume "
                    "logits = hidden @ lm_head.T, so this architecture is not supported"
                )


def vocab_size_of(path: str, cfg: ModelPairConfig) -> int:
    """Logits of the model at `path` (its config's vocab_size), read without weights."""
    return _vocab_size(AutoConfig.from_pretrained(path, **_hub_kwargs(cfg)))


def _vocab_size(conf) -> int:
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    return int(text.vocab_size)


def stop_token_ids(tokenizer, names: list[str]) -> list[int]:
    ids = []
    vocab = tokenizer.get_vocab()
    for name in names:
        if name in vocab:
            ids.append(vocab[name])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError(
            f"none of model_pair.stop_tokens {names} is in the student's vocabulary and it has no "
            "eos token; set model_pair.stop_tokens to the tokens that end a response"
        )
    return ids


def load_pair(
    cfg: ModelPairConfig,
    device: torch.device,
    before_weights=None,
    place: bool = True,
    without_weights: frozenset[str] = frozenset(),
) -> ModelPair:
    """The pair's tokenizer and models: the teacher's weights only when it runs in this
    process (teacher_backend=hf). `before_weights(tokenizer)` runs after the checks and
    before any weights load (the served teacher's start-up checks). Dtypes follow `device`;
    `place=False` leaves the weights in CPU memory (FSDP2 moves each process's shards to
    `device` when it shards them). The roles in `without_weights` ("teacher", "student")
    are built from their config on the meta device, reading no weights: under FSDP2 the
    processes other than the main one get their shards by broadcast from it."""
    teacher_path, student_path = resolve_paths(cfg)
    served = cfg.teacher_backend == "server"
    tokenizer = check_pair(None if served else teacher_path, student_path, cfg)
    if before_weights is not None:
        before_weights(tokenizer, teacher_path, student_path)
    on_gpu = device.type == "cuda"
    t_dtype = DTYPES.get(cfg.teacher_dtype) or (torch.bfloat16 if on_gpu else torch.float32)
    s_dtype = DTYPES.get(cfg.student_dtype) or torch.float32
    common = dict(attn_implementation=cfg.attn_implementation, **_hub_kwargs(cfg))
    target = device if place else torch.device("cpu")
    teacher = None
    if cfg.teacher_backend == "hf":
        log.info("loading teacher %s (%s) and student %s (%s)", teacher_path, t_dtype, student_path, s_dtype)
        teacher = _load(teacher_path, t_dtype, common, target, "teacher" in without_weights)
        teacher.eval().requires_grad_(False)
    else:
        log.info("loading student %s (%s); the teacher runs in %s", student_path, s_dtype, cfg.teacher_backend)
    student = _load(student_path, s_dtype, common, target, "student" in without_weights)
    for model in (m for m in (teacher, student) if m is not None):
        neutralize_generation_defaults(model)
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ConfigError("lm_head has a bias; the chunked log-prob kernels do not support it")
        _disable_dropout(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ModelPair(
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        stop_ids=stop_token_ids(tokenizer, list(cfg.stop_tokens)),
        pad_id=pad_id,
        teacher_path=cfg.teacher_url if served else teacher_path,
        student_path=student_path,
    )


def _load(path: str, dtype: torch.dtype, common: dict, target: torch.device, empty: bool) -> nn.Module:
    if not empty:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common).to(target)
    kwargs = {k: v for k, v in common.items() if k != "revision"}
    conf = AutoConfig.from_pretrained(path, revision=common["revision"], trust_remote_code=common["trust_remote_code"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf, dtype=dtype, **kwargs)


def _disable_dropout(model: nn.Module) -> None:
    """docs/reference.md §3: dropout off (the student trains in train mode for gradient checkpointing)."""
    for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if getattr(model.config, attr, None):
            setattr(model.config, attr, 0.0)
    for module in model.modules():
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = 0.0
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def completion_hidden(lm: nn.Module, input_ids_BS, attention_mask_BS, prompt_len: int, mask_BT):
    """Final hidden states that predict the valid completion tokens: [N, D].

    The state at column P - 1 + t predicts completion token t, so the last column is
    never fed. Position ids follow the attention mask, as in generation with left padding.
    """
    ids_BS, attn_BS = input_ids_BS[:, :-1], attention_mask_BS[:, :-1]
    position_ids_BS = (attn_BS.cumsum(-1) - 1).clamp(min=0)
    hidden_BSD = lm.get_decoder()(
        input_ids=ids_BS, attention_mask=attn_BS, position_ids=position_ids_BS, use_cache=False
    ).last_hidden_state
    hidden_BTD = hidden_BSD[:, prompt_len - 1 :]
    return hidden_BTD[mask_BT]


class StudentScorer(nn.Module):
    """The student plus its loss-side lm-head, as one module so that accelerate can wrap
    it (DDP/FSDP see every parameter use inside forward)."""

    def __init__(self, lm: nn.Module, chunk: int):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, input_ids_BS, attention_mask_BS, prompt_len: int, mask_BT, head=None):
        """`head(hidden_ND, weight_VD, targets_N)` on the student's final hidden states of the
        N valid completion positions, its lm-head weight and the sampled tokens: an
        objective's loss kernel (poweropd.objectives). Without one: the sampled tokens'
        log-probs lS_N (differentiable)."""
        hidden_ND = completion_hidden(self.lm, input_ids_BS, attention_mask_BS, prompt_len, mask_BT)
        targets_N = input_ids_BS[:, prompt_len:][mask_BT]
        weight_VD = self.lm.get_output_embeddings().weight
        if head is not None:
            return head(hidden_ND, weight_VD, targets_N)
        return sampled_logprobs(hidden_ND, weight_VD, targets_N, self.chunk)


@torch.no_grad()
def score_teacher(
    teacher: nn.Module, need: str, input_ids_BS, attention_mask_BS, prompt_len: int, mask_BT, chunk: int, k: int = 0
) -> TeacherOut:
    """What an objective needs of the in-process teacher on the very same token ids
    (poweropd.objectives.TEACHER_NEEDS): "logprobs" its log-prob of each sampled token;
    "topk" those plus its top-k log-probs and ids (only [N, k] is kept); "hidden" its final
    hidden states, from which the objective's kernel forms the teacher's logits (and lT)
    itself instead of paying for a second teacher lm-head pass."""
    hidden_ND = completion_hidden(teacher, input_ids_BS, attention_mask_BS, prompt_len, mask_BT)
    if need == "hidden":
        return TeacherOut(hidden_ND=hidden_ND)
    targets_N = input_ids_BS[:, prompt_len:][mask_BT]
    head_VD = teacher.get_output_embeddings().weight
    if need == "topk":
        vals_NK, idx_NK, lT_N = teacher_topk(hidden_ND, head_VD, targets_N, k, chunk)
        return TeacherOut(lT_N=lT_N, topk=(vals_NK, idx_NK))
    return TeacherOut(lT_N=sampled_logprobs(hidden_ND, head_VD, targets_N, chunk))


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("org/name"): absolute, ~, ./ or ../, or
    Windows-style."""
    return str(path).startswith(("/", "~", "./", "../", ".\\")) or str(path) in (".", "..") or ":\\" in str(path)


def local_path_exists(path: str) -> bool:
    return Path(path).expanduser().exists()
