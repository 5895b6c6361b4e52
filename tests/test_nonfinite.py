"""A non-finite number never reaches the weights: -inf and NaN teacher and student log-probs
injected into the real training loop, for every reward.

Policy under test (poweropd.train): tokens whose teacher log-prob (full-vocab: teacher hidden
state) is not finite leave that update and are counted; a non-finite student log-prob comes
from the student's own forward and reaches every gradient through its backward, so that
update is skipped (gradients dropped, no optimizer step) and logged with its reason; after
`training.max_skipped_updates` skipped updates in a row the run stops with status
"nonfinite", its last good student saved; starting it again resumes from its last good
checkpoint. Checkpoints never hold non-finite weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import MICRO_PAIR, MICRO_TRAINING, make_config

import poweropd.models as models_mod
import poweropd.train as train_mod
from poweropd.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint

REWARDS = ["vanilla", "clip", "tanh", "zscore", "power", "full_vocab"]
BAD = {"-inf": -math.inf, "nan": math.nan}


def _config(tmp_path, toy_cache, reward, *extra):
    return make_config(
        [
            *MICRO_PAIR,
            *MICRO_TRAINING,
            f"model_pair.cache_dir={toy_cache}",
            f"reward={reward}",
            "training.reward_dump_prompts=0",
            *extra,
        ]
    )


class Injector:
    """Counts updates and corrupts teacher outputs / student activations on chosen ones."""

    def __init__(self, monkeypatch, teacher=None, student=None, steps=None):
        self.step, self.teacher, self.student, self.steps = 0, teacher, student, steps
        original_step, original_score, original_setup = (
            train_mod.opd_step,
            models_mod.score_teacher,
            train_mod.setup_run,
        )

        def opd_step(run, rows):
            self.step += 1
            return original_step(run, rows)

        def score_teacher(*args, **kwargs):
            out = original_score(*args, **kwargs)
            if self.active() and self.teacher is not None:
                if out.lT_N is not None:
                    out.lT_N = out.lT_N.clone()
                    out.lT_N[:2] = self.teacher
                else:  # full-vocab: the teacher's hidden states feed its own logits
                    out.hidden_ND = out.hidden_ND.clone()
                    out.hidden_ND[:2] = self.teacher
            return out

        def setup_run(*args, **kwargs):
            run = original_setup(*args, **kwargs)

            def corrupt(module, inputs, output):
                # Only the student's scoring pass (the one with gradients), not its sampling.
                if self.active() and self.student is not None and torch.is_grad_enabled():
                    output = output.clone()
                    output[0] = self.student
                    return output
                return output

            run.student.get_decoder().norm.register_forward_hook(corrupt)
            return run

        monkeypatch.setattr(train_mod, "opd_step", opd_step)
        monkeypatch.setattr(models_mod, "score_teacher", score_teacher)  # the hf teacher backend calls it
        monkeypatch.setattr(train_mod, "setup_run", setup_run)

    def active(self) -> bool:
        return self.steps is None or self.step in self.steps


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _student_finite(run_dir) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("reward", REWARDS)
def test_nonfinite_teacher_tokens_leave_the_update(tmp_path, toy_cache, monkeypatch, reward, bad):
    Injector(monkeypatch, teacher=BAD[bad])
    run_dir = tmp_path / "run"
    summary = train_mod.train(_config(tmp_path, toy_cache, reward), run_dir)
    assert summary["status"] == "finished" and summary["final_student_saved"]
    steps = [r for r in _metrics(run_dir) if r["step"] > 0]
    assert len(steps) == 4
    for row in steps:
        assert row["nonfinite/teacher_tokens"] >= 2, row  # two per micro-batch were corrupted
        assert "skipped" not in row, row  # the update itself went ahead on the other tokens
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), row
        assert all(math.isfinite(v) for k, v in row.items() if isinstance(v, float)), row
    assert _student_finite(run_dir)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("reward", REWARDS)
def test_nonfinite_student_logprobs_skip_the_update(tmp_path, toy_cache, monkeypatch, reward, bad):
    Injector(monkeypatch, student=BAD[bad], steps={2, 3})
    run_dir = tmp_path / "run"
    summary = train_mod.train(_config(tmp_path, toy_cache, reward), run_dir)
    assert summary["status"] == "finished"  # two skipped in a row: under max_skipped_updates=3
    rows = {r["step"]: r for r in _metrics(run_dir)}
    for step in (2, 3):
        assert rows[step]["skipped"] == 1, rows[step]
        assert rows[step]["skip_reason"] in ("nonfinite_loss", "nonfinite_grad_norm")
        assert rows[step]["nonfinite/student_tokens"] >= 1
    for step in (1, 4):
        assert "skipped" not in rows[step] and math.isfinite(rows[step]["grad_norm"])
    assert _student_finite(run_dir)
    assert verify_checkpoint(latest_checkpoint(run_dir), _load_student(run_dir)) is None


def _load_student(run_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "student")


def test_a_skipped_update_leaves_weights_and_optimizer_untouched(tmp_path, toy_cache, monkeypatch):
    Injector(monkeypatch, student=math.nan, steps={2})
    seen = {}
    original = train_mod.opd_update

    def spy(run, rollouts, clock=None, task_correct_B=None):
        before = [p.detach().clone() for p in run.student.parameters()]
        out = original(run, rollouts, clock, task_correct_B)
        seen[len(seen) + 1] = all(torch.equal(a, b) for a, b in zip(before, run.student.parameters()))
        return out

    monkeypatch.setattr(train_mod, "opd_update", spy)
    train_mod.train(_config(tmp_path, toy_cache, "vanilla"), tmp_path / "run")
    assert seen[2] is True and seen[1] is False and seen[3] is False  # only the skipped update changed nothing


@pytest.mark.e2e
def test_persistent_faults_stop_the_run_cleanly_and_it_resumes(tmp_path, toy_cache, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path, toy_cache, "power", "training.steps=6", "training.save_every=1")
    injector = Injector(monkeypatch, student=math.nan, steps={3, 4, 5, 6})
    summary = train_mod.train(cfg, run_dir)
    assert summary["status"] == "nonfinite" and summary["steps"] == 5  # steps 3, 4, 5 skipped: stop
    assert summary["final_student_saved"] and _student_finite(run_dir)
    assert "updates in a row had a non-finite loss or gradient" in caplog.text
    # Step 4's checkpoint was written during the streak: it holds the last good (unchanged) weights.
    assert latest_checkpoint(run_dir).name == "step_000004"
    verify_checkpoint(latest_checkpoint(run_dir), _load_student(run_dir))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "nonfinite"

    injector.steps = set()  # the fault is gone: starting again resumes from step 4
    summary = train_mod.train(cfg, run_dir)
    assert summary["status"] == "finished" and summary["resumed_from_step"] == 4
    assert [r["step"] for r in _metrics(run_dir)] == [0, 1, 2, 3, 4, 5, 6]
    assert (run_dir / "summary.nonfinite.step5.json").is_file()


def test_a_checkpoint_with_nonfinite_weights_does_not_verify(tmp_path, micro_pair):
    cfg, pair = micro_pair
    model = pair.student
    model.save_pretrained(tmp_path)
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "x").write_text("x")
    verify_checkpoint(tmp_path, model)  # a good one passes
    with torch.no_grad():
        broken = type(model)(model.config)
        broken.load_state_dict(model.state_dict())
        next(broken.parameters())[0, 0] = math.nan
    broken.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="non-finite"):
        verify_checkpoint(tmp_path, broken)
    (tmp_path / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="lacks trainer_state.json"):
        verify_checkpoint(tmp_path, broken)
