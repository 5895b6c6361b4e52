"""Every config, preset and README command composes; bad input fails with one clear line."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from conftest import CONF_DIR, ROOT, compose, make_config

from poweropd.cli import check_overrides, cli_overrides, group_options
from poweropd.errors import ConfigError
from poweropd.objectives import objective_names


def test_defaults_compose_to_the_toy_vanilla_run():
    cfg = make_config([])
    assert cfg.model_pair.kind == "toy" and cfg.reward.name == "vanilla" and cfg.reward.normalize == "none"
    assert cfg.training.max_grad_norm == 1.0 and cfg.reward.stop_token == "mask"
    assert cfg.reward.loss_agg == "token_mean" and cfg.logger.name == "local"


@pytest.mark.parametrize("group", ["model_pair", "reward", "method", "training", "logger", "experiment"])
def test_every_group_option_composes(group):
    options = group_options(CONF_DIR, group)
    assert options, f"conf/{group} is empty"
    for option in options:
        overrides = [f"{group}={option}"]
        if option == "custom":
            overrides += ["model_pair.teacher=org/teacher", "model_pair.student=org/student"]
        make_config(overrides)


def test_reward_group_covers_every_method():
    assert set(group_options(CONF_DIR, "reward")) == set(objective_names())
    for name in objective_names():
        assert make_config([f"reward={name}"]).reward.name == name


def test_paper_settings_follow_reference():
    cfg = make_config(["model_pair=qwen3_4b_0.6b", "training=paper", "reward=power", "reward.alpha=500"])
    t, m = cfg.training, cfg.model_pair
    assert (t.steps, t.batch_size, t.lr, t.max_new_tokens) == (1500, 32, 5e-7, 1024)
    assert (t.temperature, t.top_p, t.top_k, t.weight_decay, t.warmup_steps) == (1.0, 0.95, 20, 0.0, 0)
    assert t.lr_schedule == "constant" and t.max_grad_norm == 1.0 and t.gradient_checkpointing
    assert (t.val_every, t.val_size, t.val_temperature, t.val_max_new_tokens) == (30, 100, 0.6, 4096)
    assert (m.teacher, m.student, m.enable_thinking) == ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B-Base", False)
    assert m.student_dtype == "float32" and m.teacher_dtype == "auto" and t.mixed_precision == "auto"
    assert cfg.reward.alpha == 500
    qwen = [p for p in group_options(CONF_DIR, "model_pair") if p.startswith("qwen3")]
    pair_cfgs = [make_config([f"model_pair={p}"]).model_pair for p in qwen]
    pairs = {f"{p.teacher}->{p.student}" for p in pair_cfgs}
    assert pairs == {f"Qwen/Qwen3-{t}->Qwen/Qwen3-{s}-Base" for t in ("4B", "8B") for s in ("0.6B", "1.7B")}


def readme_commands() -> list[list[str]]:
    """Every `python run.py ...` line of the README, as override lists (sweeps expanded)."""
    text = (ROOT / "README.md").read_text()
    code = "\n".join(text.split("```")[1::2])  # fenced code blocks only
    commands = []
    for line in code.splitlines():
        match = re.search(r"(?:python|accelerate launch(?: [-\w=]+)*) run\.py(.*?)(?:\s+#.*)?$", line.strip())
        if not match:
            continue
        args = [a for a in shlex.split(match.group(1)) if a != "\\"]
        commands.append(args)
    return commands


def test_readme_has_run_commands():
    assert len(readme_commands()) >= 5


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a) or "(defaults)")
def test_readme_command_composes(args):
    overrides = cli_overrides(args)
    check_overrides(overrides, CONF_DIR)
    sweep = [o for o in overrides if "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[")]
    plain = [o for o in overrides if o not in sweep]
    variants = [plain]
    for o in sweep:  # expand comma sweeps one key at a time
        key, values = o.split("=", 1)
        variants = [v + [f"{key}={x}"] for v in variants for x in values.split(",")]
    for variant in variants:
        make_config([v for v in variant if not v.startswith("hydra.")])


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["reward.alhpa=5"],
            r"unknown config key 'reward.alhpa' \(did you mean 'reward.alpha'\?\); "
            r"valid keys under reward: alpha, beta, clip_high",
        ),
        (["reward=powr"], r"unknown reward 'powr'; valid: box_cox, clip, full_vocab, jsd, kl_loss, power, tanh, "),
        (["model_pair=qwen4"], r"unknown model_pair 'qwen4'; valid: custom, qwen3_4b_0.6b"),
        (["reward.alpha=abc"], r"reward.alpha='abc' has the wrong type: expected float"),
        (["training.steps=1.5"], r"training.steps=1.5 has the wrong type: expected int"),
        (["trainig.steps=3"], r"unknown config key 'trainig.steps' \(did you mean 'training'\?\)"),
        (["reward.alpha.x=3"], r"config key 'reward.alpha' has no sub-keys"),
        (["-m", "reward=power,tahn"], r"unknown reward 'tahn'"),
    ],
)
def test_bad_overrides_fail_with_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        check_overrides(cli_overrides(overrides), CONF_DIR)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["reward=power", "reward.alpha=0"], "reward.alpha must be > 0"),
        (["reward=power", "reward.alpha=-3"], "reward.alpha must be > 0"),
        (["reward=clip", "reward.clip_low=1", "reward.clip_high=-1"], "clip_low"),
        (["reward=tanh", "reward.tau=0"], "reward.tau must be > 0"),
        (["reward=vanilla", "reward.normalize=zscore"], "never normalises"),
        (["training.top_p=1.5"], r"training.top_p must be in \(0, 1\]"),
        (["training.batch_size=6", "training.rollouts_per_prompt=4"], "multiple of"),
        (["model_pair=custom"], "model_pair.teacher"),
    ],
)
def test_bad_values_fail_with_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_config(overrides)
    assert "\n" not in str(info.value)


def test_compose_keeps_the_schema_strict():
    """A key that a YAML file or an override adds is refused."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="alhpa"):
        compose(["reward.alhpa=1"])
    # Hydra lets `+key=` append past the schema; the conversion to dataclasses does not.
    with pytest.raises(ConfigError, match="unknown config key 'reward.bogus'"):
        make_config(["+reward.bogus=1"])
    with pytest.raises(ConfigError, match="unknown config key 'model_pair.toy.teacher.depth'"):
        make_config(["+model_pair.toy.teacher.depth=3"])


@pytest.mark.e2e
def test_run_py_reports_bad_input_in_one_line(tmp_path):
    """The real entry point: exit code 2, one `error:` line, no traceback, nothing written."""
    cases = [
        (["reward.alhpa=5"], "did you mean 'reward.alpha'"),
        (["reward=power", "reward.alpha=-1"], "reward.alpha must be > 0"),
    ]
    for args, expected in cases:
        proc = subprocess.run(
            [sys.executable, "run.py", *args, f"output_root={tmp_path}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
