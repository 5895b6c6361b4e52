"""The shape of the code base: no import cycle in src/, one engine factory, the objective
registry as the one place an objective is declared (a throwaway objective trains through it),
conf/method/ and conf/experiment/ as the two preset groups, and enable_thinking honoured."""

from __future__ import annotations

import ast
import dataclasses
import shutil

import pytest
import torch
from conftest import CONF_DIR, MICRO_PAIR, ROOT, make_config
from test_trainer import make_rollouts, make_run, sample_completions

from poweropd import objectives
from poweropd.errors import ConfigError
from poweropd.objectives import Objective, method_label, method_tag, register
from poweropd.train import opd_update

SRC = ROOT / "src" / "poweropd"


# ----------------------------------------------------------------------------------------
# Imports


def module_imports() -> dict[str, set[str]]:
    """poweropd module -> the poweropd modules it imports anywhere (lazy imports included)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from poweropd import rewards`
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = found
    # the package itself (an empty __init__) is imported by every `from poweropd import x`
    return {m: {d for d in deps if d in graph and d not in (m, "poweropd")} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():  # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_src_counting_lazy_imports():
    graph = module_imports()
    assert "poweropd.train" in graph and "poweropd.objectives" in graph["poweropd.train"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_one_engine_factory_and_engines_never_import_back():
    graph = module_imports()
    importers = {m for m, deps in graph.items() if {"poweropd.hf_engine", "poweropd.vllm_engine"} & deps}
    # the factory builds engines; models / evaluation / benchmarks take only HF helpers or vLLM checks
    assert "poweropd.engines" in importers
    for engine in ("poweropd.hf_engine", "poweropd.vllm_engine"):
        assert not {"poweropd.engines", "poweropd.train", "poweropd.evaluation"} & graph[engine]
    assert not {m for m in graph["poweropd.generation"] if m.startswith("poweropd.")}
    for path in SRC.rglob("*.py"):  # nothing builds an engine class directly but the factory
        text = path.read_text(encoding="utf-8")
        if path.name not in ("engines.py", "hf_engine.py", "vllm_engine.py"):
            assert "HFEngine(" not in text and "VLLMEngine(" not in text, path


def test_objective_registry_has_no_harness_imports_but_kernels_and_rewards():
    deps = module_imports()["poweropd.objectives"]
    assert deps <= {"poweropd.rewards", "poweropd.logprobs", "poweropd.errors"}, deps


# ----------------------------------------------------------------------------------------
# Adding an objective: one function and one registry entry (plus its YAML file)


def doubled_log_ratio(lT_BT, lS_BT, mask_BT, cfg):
    return 2.0 * (lT_BT - lS_BT) * mask_BT


@pytest.fixture
def throwaway():
    entry = register(
        Objective(
            "throwaway", lambda r: f"Throwaway ×{r['tau']:g}", lambda r: f"throw{r['tau']:g}", reward=doubled_log_ratio
        )
    )
    yield entry
    objectives.REGISTRY.pop("throwaway")


def test_a_registered_objective_trains_one_micro_step(tmp_path, toy_cache, throwaway):
    """A throwaway objective r = 2 (lT - lS): its update is twice vanilla's, through both the
    fused kernel and the micro-batched policy-gradient path, and its label and directory tag
    are the entry's."""
    completions = None
    results = {}
    for name, extra in (("vanilla", []), ("throwaway", []), ("throwaway_micro", ["training.micro_batch_size=2"])):
        run = make_run(tmp_path / name, toy_cache, *extra)
        run.cfg.reward = dataclasses.replace(run.cfg.reward, name=name.split("_")[0])
        if name == "throwaway_micro":
            run.cfg.reward = dataclasses.replace(run.cfg.reward, gamma=1e-30)  # the non-fused path
        completions = completions or sample_completions(run, [5, 1, 10, 4], [True, True, False, True])
        metrics, tokens = opd_update(run, make_rollouts(run, completions))
        results[name] = (metrics, tokens, run.optimizer.grads)
    base = results["vanilla"]
    for name in ("throwaway", "throwaway_micro"):
        metrics, tokens, grads = results[name]
        assert metrics["loss"] == pytest.approx(2 * base[0]["loss"], rel=1e-5)
        torch.testing.assert_close(tokens["reward"], 2 * base[1]["reward"], rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, base[2]):
            torch.testing.assert_close(g, 2 * g0, rtol=1e-4, atol=1e-7)
    assert make_config(MICRO_PAIR).reward.label == "Vanilla"
    assert method_label({"name": "throwaway", "tau": 3.0}) == "Throwaway ×3"
    assert method_tag({"name": "throwaway", "tau": 3.0, "gamma": 0.5}) == "throw3_g0.5"


def test_a_registered_objective_composes_from_its_yaml_file(tmp_path, throwaway):
    from hydra import compose, initialize_config_dir

    from poweropd.cli import check_overrides
    from poweropd.config import register_configs, to_config

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "reward" / "throwaway.yaml").write_text("name: throwaway\ntau: 2.0\n")
    check_overrides(["reward=throwaway"], conf)
    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["reward=throwaway"]))
    assert cfg.reward.name == "throwaway" and cfg.reward.label == "Throwaway ×2"
    objectives.REGISTRY.pop("throwaway")
    with pytest.raises(ConfigError, match="reward='throwaway' is not valid; choose one of: vanilla"):
        dataclasses.replace(cfg.reward)
    objectives.REGISTRY["throwaway"] = throwaway  # the fixture removes it again


def test_registry_refuses_an_objective_without_a_loss_or_with_an_unknown_teacher_need():
    with pytest.raises(ValueError, match="needs a reward or a loss"):
        register(Objective("nothing", str, str))
    with pytest.raises(ValueError, match="teacher="):
        register(Objective("bad", str, str, teacher="logits", reward=doubled_log_ratio))
    assert "nothing" not in objectives.REGISTRY and "bad" not in objectives.REGISTRY


# ----------------------------------------------------------------------------------------
# conf/method/ and conf/experiment/


METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_file_composes_and_is_named_by_its_directory_tag(method):
    from conftest import compose

    cfg = make_config([f"method={method}"])
    assert method_tag(compose([f"method={method}"]).reward) == method
    assert cfg.reward.label == method_label(dataclasses.asdict(cfg.reward))


def test_method_rows_cover_the_papers_tables_and_equal_the_reward_form():
    paper = {"full_vocab", "vanilla", "clip", "tanh", "zscore"} | {
        f"power{a}" for a in (0.1, 0.5, 1, 5, 10, 50, 100, 500)
    }
    assert paper <= set(METHODS)
    with_method = make_config(["experiment=paper_4b_0.6b", "method=power500"])
    with_reward = make_config(["experiment=paper_4b_0.6b", "reward=power", "reward.alpha=500"])
    assert with_method == with_reward
    assert make_config(["method=power50", "reward.alpha=3"]).reward.alpha == 3.0  # knobs go on top


def test_method_and_reward_together_are_refused_in_one_line():
    from poweropd.cli import check_overrides

    with pytest.raises(ConfigError, match="method=power500 already chooses the objective") as err:
        check_overrides(["method=power500", "reward=clip"], CONF_DIR)
    assert "\n" not in str(err.value)
    check_overrides(["method=power500", "reward.alpha=3"], CONF_DIR)  # a knob is fine


def test_experiment_group_holds_only_pair_by_scale_presets():
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())  # comments aside
        assert "/reward" not in text and "reward:" not in text, f"{path.name} chooses an objective; use conf/method/"
    assert {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")} == {
        "paper_4b_0.6b",
        "paper_4b_1.7b",
        "paper_8b_0.6b",
        "paper_8b_1.7b",
        "toy_smoke",
    }


# ----------------------------------------------------------------------------------------
# enable_thinking


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_enable_thinking_reaches_the_chat_template(micro_pair, monkeypatch):
    """A Qwen3-style template that reacts to enable_thinking (False: an empty think block)
    gives different prompt ids for the two settings."""
    from poweropd.generation import chat_prompts

    tok = micro_pair[1].tokenizer
    monkeypatch.setattr(tok, "chat_template", THINKING_TEMPLATE)
    off = tok.decode(chat_prompts(tok, ["2+2?"], enable_thinking=False)[0])
    on = tok.decode(chat_prompts(tok, ["2+2?"], enable_thinking=True)[0])
    assert off.endswith("<think>\n\n</think>\n\n") and on.endswith("assistant\n")
    assert "<think>" not in on


class PromptRecorder:
    """An engine that records the prompts it is asked to complete (and completes nothing)."""

    name = "hf"

    def __init__(self, stop_id):
        self.prompts, self.stop_id = [], stop_id

    def generate(self, prompts, params):
        from poweropd.generation import assemble_rollouts

        self.prompts.extend(prompts)
        return assemble_rollouts(prompts, [[self.stop_id]] * len(prompts), [self.stop_id], 0)


@pytest.mark.parametrize("thinking", [False, True])
def test_training_and_evaluation_prompts_follow_model_pair_enable_thinking(tmp_path, toy_cache, monkeypatch, thinking):
    import poweropd.evaluation as evaluation
    from poweropd.config import EvaluateConfig
    from poweropd.generation import chat_prompts
    from poweropd.train import sample_rollouts, training_sampling

    run = make_run(tmp_path / "run", toy_cache, f"model_pair.enable_thinking={str(thinking).lower()}")
    monkeypatch.setattr(run.pair.tokenizer, "chat_template", THINKING_TEMPLATE)
    run.engine = PromptRecorder(run.pair.stop_ids[0])
    sample_rollouts(run, [{"problem": "2+2?"}], training_sampling(run.cfg.training))
    expected = chat_prompts(run.pair.tokenizer, ["2+2?"], enable_thinking=thinking)
    assert run.engine.prompts == expected

    seen = []
    original = evaluation.chat_prompts
    monkeypatch.setattr(
        evaluation, "chat_prompts", lambda *a, **k: seen.append(a[3:] + tuple(k.values())) or original(*a, **k)
    )
    cfg = EvaluateConfig(model="student", output_root=str(tmp_path / "out"), model_pair=run.cfg.model_pair, seed=0)
    cfg.eval.n, cfg.eval.limit, cfg.eval.max_new_tokens, cfg.eval.batch_size = 1, 2, 4, 2
    evaluation.evaluate(cfg)
    assert seen and all(args[-1] is thinking for args in seen)
