"""Every OPD objective in one registry: what it needs from the teacher, the loss of one
micro-batch, its name in tables and its tag in directory names.

The trainer (`poweropd.train.opd_update`) asks an objective two things and shares the
rest (sampling, masking, the normaliser N, backward, clipping, stepping, statistics):

    objective.teacher        what the teacher provides for every valid completion token
                               "logprobs"  lT_N, its log-prob of the sampled token
                               "topk"      lT_N plus its top-k log-probs and ids [N, k]
                               "hidden"    its final hidden states [N, D_T]; the objective
                                           runs the teacher's lm-head itself, chunk by chunk
    objective.micro_loss(scorer, micro)   -> MicroLoss: the micro-batch's share of the loss
                                           (its backward is the gradient) and per-token stats

Two kinds of loss (docs/objectives.md has each objective's formula and KL direction):

    policy gradient  loss = -sum_t w_t sg[A_t] lS_t, with A_t the entry's per-token `reward`
                     (a pure function in poweropd.rewards), z-scored over the batch,
                     discounted (reward-to-go) or mixed with a task reward when asked. With
                     none of those the reward is formed inside the fused lm-head kernel.
    own loss         an entry's `loss`: a divergence over the vocabulary (full_vocab, jsd,
                     topk_kl) or an estimator back-propagated directly (kl_loss).

w_t is the token's loss weight (1/N for the global token mean of docs/reference.md §1).

Adding an objective is one function here (a reward, or a loss), one `register(...)` entry
and one `conf/reward/<name>.yaml`; docs/objectives.md walks through an example.

This module imports no other harness module but the kernels and the pure reward
functions, so the config schema can validate names and knobs against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from poweropd import rewards
from poweropd.errors import ConfigError
from poweropd.logprobs import full_vocab_kl, generalized_jsd, sampled_logprobs, sampled_pg_loss, topk_forward_kl

TEACHER_NEEDS = ("logprobs", "topk", "hidden")
# Knobs that act on a per-token reward: an objective lists the ones it composes with.
REWARD_KNOBS = ("normalize", "gamma", "task_weight")


# ----------------------------------------------------------------------------------------
# What an objective's loss receives and returns


@dataclass
class TeacherOut:
    """The teacher's side of one micro-batch, as its objective asked for it (N valid tokens)."""

    lT_N: torch.Tensor | None = None  # log-prob of each sampled token ("logprobs", "topk")
    topk: tuple[torch.Tensor, torch.Tensor] | None = None  # ([N, k] log-probs, [N, k] ids) ("topk")
    hidden_ND: torch.Tensor | None = None  # final hidden states ("hidden")

    def finite_N(self) -> torch.Tensor:
        """Tokens whose teacher values are all finite (bool [N])."""
        if self.lT_N is not None:
            return torch.isfinite(self.lT_N)
        return torch.isfinite(self.hidden_ND).all(-1)

    def keep(self, ok_N: torch.Tensor) -> TeacherOut:
        """The same record restricted to the tokens `ok_N`."""
        return TeacherOut(
            None if self.lT_N is None else self.lT_N[ok_N],
            None if self.topk is None else tuple(x[ok_N] for x in self.topk),
            None if self.hidden_ND is None else self.hidden_ND[ok_N],
        )


@dataclass
class MicroBatch:
    """One micro-batch of whole rollouts as an objective's loss sees it."""

    inputs: tuple  # (input_ids_BS, attention_mask_BS, prompt_len, mask_BT): the scorer's arguments
    teacher: TeacherOut
    weights_N: torch.Tensor  # loss weight of each valid token (sums to 1 over the batch for token_mean)
    rc: object  # the run's RewardConfig
    chunk: int  # tokens per lm-head chunk
    teacher_head_VD: torch.Tensor | None = None  # the teacher's lm-head weight ("hidden" objectives)
    moments: torch.Tensor | None = None  # z-score moments of the whole batch; None: from this micro-batch
    task_N: torch.Tensor | None = None  # task advantage of each token's rollout (task_weight > 0)
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # sum over processes

    @property
    def mask_BT(self) -> torch.Tensor:
        return self.inputs[3]


@dataclass
class MicroLoss:
    """What one micro-batch's loss gives back; the per-token tensors are over its N tokens."""

    loss: torch.Tensor  # scalar; its backward is this micro-batch's share of the gradient
    lS_N: torch.Tensor  # the student's log-prob of each sampled token
    lT_N: torch.Tensor  # the teacher's
    reward_N: torch.Tensor | None = None  # the per-token reward (sampled-token objectives)
    kl_N: torch.Tensor | None = None  # the per-token divergence (vocabulary objectives)
    entropy_N: torch.Tensor | None = None  # the student's policy entropy at each position (no grad)


Knobs = Mapping[str, object]  # a reward section: {"name": ..., "alpha": ..., ...}


@dataclass(frozen=True)
class Objective:
    """One `reward=` option."""

    name: str
    label: Callable[[Knobs], str]  # the name in tables and legends ("PowerOPD α=500")
    tag: Callable[[Knobs], str]  # the short name in directory names ("power500")
    teacher: str = "logprobs"  # one of TEACHER_NEEDS
    reward: rewards.RewardFn | None = None  # per-token reward: trained by `policy_gradient`
    loss: Callable[[Objective, torch.nn.Module, MicroBatch], MicroLoss] | None = None  # or its own loss
    composes: tuple[str, ...] = REWARD_KNOBS  # which of REWARD_KNOBS may be switched on
    check: Callable[[object], None] | None = None  # further one-line refusals of a RewardConfig
    paper: bool = False  # one of the paper's rows (Tables 2/3): its figures and claims

    def micro_loss(self, scorer: torch.nn.Module, micro: MicroBatch) -> MicroLoss:
        return (self.loss or policy_gradient)(self, scorer, micro)

    def raw_reward(self, rc, lT_N: torch.Tensor, lS_N: torch.Tensor) -> torch.Tensor:
        """The entry's reward of valid tokens (1-D, fp32), before any batch normalisation."""
        lT_N = lT_N.float()
        return self.reward(lT_N, lS_N.float(), torch.ones_like(lT_N), rc)


REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add an objective (a new name, or replacing one of the same name)."""
    if objective.teacher not in TEACHER_NEEDS:
        raise ValueError(f"objective {objective.name!r}: teacher={objective.teacher!r}; valid: {TEACHER_NEEDS}")
    if objective.reward is None and objective.loss is None:
        raise ValueError(f"objective {objective.name!r} needs a reward or a loss")
    REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in REGISTRY:
        raise ConfigError(f"reward={name!r} is not valid; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def objective_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def paper_objectives() -> tuple[str, ...]:
    return tuple(name for name, o in REGISTRY.items() if o.paper)


def get_reward(name: str) -> rewards.RewardFn:
    """The per-token reward function of a sampled-token objective."""
    objective = REGISTRY.get(name)
    if objective is None or objective.reward is None:
        valid = ", ".join(n for n, o in REGISTRY.items() if o.reward is not None)
        raise KeyError(f"unknown reward {name!r}; valid: {valid} (the others are losses)")
    return objective.reward


# ----------------------------------------------------------------------------------------
# The shared policy-gradient loss and its helpers


def fusable(rc) -> bool:
    """Rewards that need only their own token are formed inside the fused lm-head kernel
    (gradient built in the forward, nothing recomputed); z-scored ones wait for the batch
    moments, discounted / task-mixed ones for the whole rollout."""
    return rc.normalize == "none" and not rc.gamma and not rc.task_weight


def policy_gradient(objective: Objective, scorer: torch.nn.Module, micro: MicroBatch) -> MicroLoss:
    """loss = -sum_t w_t sg[A_t] lS_t with A_t = the (normalised, discounted, task-mixed) reward."""
    rc, lT_N = micro.rc, micro.teacher.lT_N
    if fusable(rc):

        def reward_fn(lS_C: torch.Tensor, rows: slice) -> torch.Tensor:
            return objective.raw_reward(rc, lT_N[rows], lS_C)

        def head(h_ND, w_VD, targets_N):
            return sampled_pg_loss(h_ND, w_VD, targets_N, micro.weights_N, reward_fn, micro.chunk, entropy=True)

        loss, lS_N, r_N, ent_N = scorer(*micro.inputs, head=head)
        return MicroLoss(loss, lS_N, lT_N, reward_N=r_N, entropy_N=ent_N)
    lS_N, ent_N = student_logprobs(scorer, micro)
    r_N = token_rewards(objective, rc, lT_N, lS_N.detach(), micro.moments, micro.reduce)
    adv_N = advantages(r_N, micro.mask_BT, rc, micro.task_N)
    return MicroLoss(-(adv_N * lS_N * micro.weights_N).sum(), lS_N, lT_N, reward_N=r_N, entropy_N=ent_N)


def student_logprobs(scorer: torch.nn.Module, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(differentiable lS_N, entropy_N) of the micro-batch's valid tokens, from one chunked head pass."""

    def head(h_ND, w_VD, targets_N):
        return sampled_logprobs(h_ND, w_VD, targets_N, micro.chunk, entropy=True)

    return scorer(*micro.inputs, head=head)


def token_rewards(objective: Objective, rc, lT_N, lS_N, moments=None, reduce=lambda t: t) -> torch.Tensor:
    """Stop-gradient token rewards, z-scored over the whole batch if asked (`moments` of all
    micro-batches and processes; None with a single micro-batch: from these tokens, summed
    over processes by `reduce`)."""
    r_N = objective.raw_reward(rc, lT_N, lS_N)
    if rc.normalize == "zscore":
        ones_N = torch.ones_like(r_N)
        if moments is None:
            moments = reduce(rewards.masked_moments(r_N, ones_N))
        r_N = rewards.zscore(r_N, ones_N, moments)
    return r_N.detach()


def advantages(r_N: torch.Tensor, m_BT: torch.Tensor, rc, task_N: torch.Tensor | None) -> torch.Tensor:
    """Per-token advantages of one micro-batch of whole rollouts: the reward-to-go of the
    (normalised) rewards, plus task_weight x the rollout's task advantage on every token
    (gamma = 0) or as its terminal reward (gamma > 0, discounted back like any reward)."""
    if not rc.gamma:
        return r_N if task_N is None else r_N + rc.task_weight * task_N
    r_BT = torch.zeros(m_BT.shape, dtype=r_N.dtype, device=r_N.device)
    r_BT[m_BT] = r_N
    if task_N is not None:
        task_BT = torch.zeros_like(r_BT)
        task_BT[m_BT] = task_N
        last_BT = (m_BT.long().cumsum(-1) == m_BT.sum(-1, keepdim=True)) & m_BT  # the last loss token
        r_BT = r_BT + rc.task_weight * task_BT * last_BT
    return rewards.reward_to_go(r_BT, m_BT, rc.gamma)[m_BT]


# ----------------------------------------------------------------------------------------
# Objectives with a loss of their own


def direct_estimator(objective: Objective, scorer: torch.nn.Module, micro: MicroBatch) -> MicroLoss:
    """kl_loss: loss = sum_t w_t k(lT_t, lS_t), back-propagated through lS (k1 / k2 / k3), plus
    the task reward's policy-gradient term when task_weight > 0."""
    rc, lT_N, w_N = micro.rc, micro.teacher.lT_N, micro.weights_N
    lS_N, ent_N = student_logprobs(scorer, micro)
    r_N = token_rewards(objective, rc, lT_N, lS_N.detach())  # -dk/dlS, for the statistics
    loss = (rewards.kl_estimator(lT_N, lS_N, rc.estimator) * w_N).sum()
    if micro.task_N is not None:
        loss = loss - (rc.task_weight * micro.task_N * lS_N * w_N).sum()
    return MicroLoss(loss, lS_N, lT_N, reward_N=r_N, entropy_N=ent_N)


def full_vocab(objective: Objective, scorer: torch.nn.Module, micro: MicroBatch) -> MicroLoss:
    """sum_t w_t KL(P_S || P_T) over the whole vocabulary (reverse KL, the paper's baseline);
    the kernel reads lT off the teacher logits it forms anyway."""

    def head(h_ND, w_VD, targets_N):
        hT_ND, wT_VD = micro.teacher.hidden_ND, micro.teacher_head_VD
        return full_vocab_kl(h_ND, w_VD, hT_ND, wT_VD, targets_N, micro.weights_N, micro.chunk, entropy=True)

    loss, kl_N, lS_N, lT_N, ent_N = scorer(*micro.inputs, head=head)
    return MicroLoss(loss, lS_N, lT_N, kl_N=kl_N, entropy_N=ent_N)


def jsd(objective: Objective, scorer: torch.nn.Module, micro: MicroBatch) -> MicroLoss:
    """sum_t w_t JSD_beta(P_T, P_S) over the whole vocabulary (TRL's generalised JSD)."""

    def head(h_ND, w_VD, targets_N):
        hT_ND, wT_VD = micro.teacher.hidden_ND, micro.teacher_head_VD
        beta = micro.rc.beta
        return generalized_jsd(h_ND, w_VD, hT_ND, wT_VD, targets_N, micro.weights_N, beta, micro.chunk, entropy=True)

    loss, kl_N, lS_N, lT_N, ent_N = scorer(*micro.inputs, head=head)
    return MicroLoss(loss, lS_N, lT_N, kl_N=kl_N, entropy_N=ent_N)


def topk_kl(objective: Objective, scorer: torch.nn.Module, micro: MicroBatch) -> MicroLoss:
    """sum_t w_t sum_{v in top-k of P_T} P_T(v) (log P_T(v) - log P_S(v)) (verl's forward KL)."""
    vals_NK, idx_NK = micro.teacher.topk

    def head(h_ND, w_VD, targets_N):
        return topk_forward_kl(h_ND, w_VD, vals_NK, idx_NK, targets_N, micro.weights_N, micro.chunk, entropy=True)

    loss, kl_N, lS_N, ent_N = scorer(*micro.inputs, head=head)
    return MicroLoss(loss, lS_N, micro.teacher.lT_N, kl_N=kl_N, entropy_N=ent_N)


# ----------------------------------------------------------------------------------------
# Refusals beyond the knobs' own ranges (RewardConfig.__post_init__ calls check_composition)


def check_composition(rc) -> None:
    """Refuse, in one line, a reward knob that the objective cannot act on."""
    objective = get_objective(rc.name)
    off = {"normalize": "none", "gamma": 0.0, "task_weight": 0.0}
    for key in REWARD_KNOBS:
        if key in objective.composes or getattr(rc, key) == off[key]:
            continue
        if objective.reward is None:
            why = "is a divergence over the vocabulary with no per-token reward"
            fix = "use a sampled-token objective (vanilla, power, ...) for it"
        else:
            why = "back-propagates its estimator directly (no reward)"
            fix = "use reward=vanilla with it for the policy-gradient form"
        raise ConfigError(f"reward={rc.name} {why}, so reward.{key}={getattr(rc, key)} does not apply; {fix}")
    if objective.check is not None:
        objective.check(rc)


def _vanilla_check(rc) -> None:
    if rc.normalize != "none":
        raise ConfigError(
            "reward=vanilla never normalises (reward.normalize must be none); use reward=zscore "
            "for the z-scored log-ratio"
        )


def _zscore_check(rc) -> None:
    if rc.normalize != "zscore":
        raise ConfigError("reward=zscore needs reward.normalize=zscore; use reward=vanilla for the raw log-ratio")


# ----------------------------------------------------------------------------------------
# Labels and tags


def _num(value) -> str:
    return f"{float(value):g}"


def method_label(reward: Knobs) -> str:
    """The name of a method in tables and legends, from a reward section ({"name": ...,
    "alpha": ...} or flat "reward.*" keys): the entry's label, plus " γ=..." / " + task ..."
    when those are on. A name no longer registered is shown as itself."""
    r = {k.removeprefix("reward."): v for k, v in dict(reward).items()}
    objective = REGISTRY.get(str(r.get("name")))
    text = objective.label(r) if objective else str(r.get("name", "?"))
    if float(r.get("gamma") or 0):
        text += f" γ={_num(r['gamma'])}"
    if float(r.get("task_weight") or 0):
        text += f" + task {_num(r['task_weight'])}"
    reduction = [name for key, value, name in _REDUCTIONS if r.get(key) == value]
    if reduction:
        text += f" ({', '.join(reduction)})"
    return text


# Loss reductions other than the paper's (§1: global token mean, terminal stop token masked):
# (reward key, value, words in the label, suffix of the directory tag)
_REDUCTIONS = (("loss_agg", "seq_mean", "seq-mean"), ("stop_token", "raw", "stop kept"))
_REDUCTION_TAGS = {"seq-mean": "_seqmean", "stop kept": "_keepstop"}


def method_tag(reward: Knobs) -> str:
    """Short method name for directory names (`power500`, `jsd0.5`, plus `_g0.9` / `_task0.5`);
    conf/config.yaml calls it as ${method_tag:${reward}}."""
    r = {k.removeprefix("reward."): v for k, v in dict(reward).items()}
    objective = REGISTRY.get(str(r.get("name")))
    tag = objective.tag(r) if objective else str(r.get("name"))
    if float(r.get("gamma") or 0):
        tag += f"_g{_num(r['gamma'])}"
    if float(r.get("task_weight") or 0):
        tag += f"_task{_num(r['task_weight'])}"
    for key, value, name in _REDUCTIONS:
        if r.get(key) == value:
            tag += _REDUCTION_TAGS[name]
    return tag


def _fixed(text: str) -> Callable[[Knobs], str]:
    return lambda r: text


# ----------------------------------------------------------------------------------------
# The registry: the paper's six (Tables 2/3), then the objectives beyond it. The order is the
# order of `reward=` choices in messages; tables sort by analysis.load.method_sort_key.

register(
    Objective(
        "vanilla", _fixed("Vanilla"), _fixed("vanilla"), reward=rewards.log_ratio, check=_vanilla_check, paper=True
    )
)


def _clip_label(r: Knobs) -> str:
    lo, hi = float(r.get("clip_low", -1.0)), float(r.get("clip_high", 1.0))
    if (lo, hi) == (-1.0, 1.0):  # the paper's bounds: the row's plain name
        return "+ Clip"
    return f"+ Clip ±{_num(hi)}" if lo == -hi else f"+ Clip [{_num(lo)}, {_num(hi)}]"


def _clip_tag(r: Knobs) -> str:
    lo, hi = float(r.get("clip_low", -1.0)), float(r.get("clip_high", 1.0))
    if (lo, hi) == (-1.0, 1.0):
        return "clip"
    return f"clip{_num(hi)}" if lo == -hi else f"clip{_num(lo)}_{_num(hi)}"


def _tanh_label(r: Knobs) -> str:
    tau = float(r.get("tau", 1.0))
    return "+ Tanh" if tau == 1.0 else f"+ Tanh τ={_num(tau)}"


def _tanh_tag(r: Knobs) -> str:
    tau = float(r.get("tau", 1.0))
    return "tanh" if tau == 1.0 else f"tanh{_num(tau)}"


register(Objective("clip", _clip_label, _clip_tag, reward=rewards.clipped_log_ratio, paper=True))
register(Objective("tanh", _tanh_label, _tanh_tag, reward=rewards.tanh_log_ratio, paper=True))
# the z-score baseline normalises the log-ratio over the batch (normalize=zscore)
register(
    Objective(
        "zscore", _fixed("+ Z-Score"), _fixed("zscore"), reward=rewards.log_ratio, check=_zscore_check, paper=True
    )
)
register(
    Objective(
        "power",
        lambda r: f"PowerOPD α={_num(r.get('alpha', 5.0))}",
        lambda r: f"power{_num(r.get('alpha', 5.0))}",
        reward=rewards.power,
        paper=True,
    )
)
register(
    Objective(
        "full_vocab", _fixed("Full-vocab"), _fixed("full_vocab"), "hidden", loss=full_vocab, composes=(), paper=True
    )
)
register(
    Objective(
        "box_cox",
        lambda r: f"Box-Cox α={_num(r.get('alpha', 5.0))}",
        lambda r: f"boxcox{_num(r.get('alpha', 5.0))}",
        reward=rewards.box_cox,
    )
)
register(
    Objective(
        "jsd",
        lambda r: f"JSD β={_num(r.get('beta', 0.5))}",
        lambda r: f"jsd{_num(r.get('beta', 0.5))}",
        "hidden",
        loss=jsd,
        composes=(),
    )
)
register(
    Objective(
        "topk_kl",
        lambda r: f"Top-k KL k={int(r.get('k', 64))}",
        lambda r: f"topk{int(r.get('k', 64))}",
        "topk",
        loss=topk_kl,
        composes=(),
    )
)
# kl_loss's "reward" is the per-token weight -dk/dlS its gradient puts on grad lS (for the
# statistics and heatmaps); its loss is the estimator itself.
register(
    Objective(
        "kl_loss",
        lambda r: f"KL {r.get('estimator', 'k3')} loss",
        lambda r: f"kl_{r.get('estimator', 'k3')}",
        reward=rewards.kl_estimator_weight,
        loss=direct_estimator,
        composes=("task_weight",),
    )
)
