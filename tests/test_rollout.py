"""Rollouts and model pairs: sampling from exactly the configured distribution, scoring
that agrees with generation, completion masks, and pairs loaded from local folders
through the same AutoModel path as hub ids (mismatched pairs refused)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import MICRO_PAIR, make_config

from poweropd.errors import ConfigError
from poweropd.generation import SamplingParams, chat_prompts, completion_masks, left_pad
from poweropd.hf_engine import generate, generation_config
from poweropd.models import StudentScorer, check_pair, load_pair, score_teacher

PROBLEMS = ["Ann has 3 pens and buys 4 more. How many now?", "Bo has 12 cups. How many now?", "Cy?", "Di has 5."]


@pytest.fixture()
def local_pair(micro_pair, tmp_path):
    """The micro pair copied to plain folders, to be loaded as `kind=hf` by path."""
    _, pair = micro_pair
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(pair.teacher_path, teacher)
    shutil.copytree(pair.student_path, student)
    return teacher, student


def hf_config(teacher, student, *extra):
    return make_config(
        [
            "model_pair=custom",
            f"model_pair.teacher={teacher}",
            f"model_pair.student={student}",
            "model_pair.stop_tokens=['<|im_end|>']",
            *extra,
        ]
    )


def test_local_folders_load_like_hub_ids_and_sample_without_hidden_processors(local_pair):
    teacher, student = local_pair
    # A checkpoint whose generation_config.json would change the sampling distribution.
    gen_file = student / "generation_config.json"
    extra = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen_file.write_text(json.dumps({**extra, "repetition_penalty": 1.3, "top_k": 7, "temperature": 0.3}))
    pair = load_pair(hf_config(teacher, student).model_pair, torch.device("cpu"))
    ids, mask = left_pad(chat_prompts(pair.tokenizer, PROBLEMS), pair.pad_id)
    out = pair.student.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=generation_config(SamplingParams(8), pair.stop_ids, pair.pad_id),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    for scores, logits in zip(out.scores, out.logits):  # processed == raw: no processor ran
        torch.testing.assert_close(scores, logits)


def test_scoring_agrees_with_generation(micro_pair):
    """Log-probs from one forward pass over left-padded rollouts equal the log-softmax of
    the logits generate() produced token by token with its KV cache."""
    _, pair = micro_pair
    torch.manual_seed(0)
    ids, mask = left_pad(chat_prompts(pair.tokenizer, PROBLEMS), pair.pad_id)
    out = pair.student.generate(
        input_ids=ids,
        attention_mask=mask,
        generation_config=generation_config(SamplingParams(16), pair.stop_ids, pair.pad_id),
        return_dict_in_generate=True,
        output_logits=True,
    )
    comp = out.sequences[:, ids.shape[1] :]
    valid, _ = completion_masks(comp, pair.stop_ids)
    comp = comp.masked_fill(~valid, pair.pad_id)
    full_ids, full_mask = torch.cat([ids, comp], 1), torch.cat([mask, valid.long()], 1)
    logits_BTV = torch.stack(out.logits, 1)
    expected = torch.log_softmax(logits_BTV.float(), -1).gather(2, comp[..., None]).squeeze(-1)[valid]
    with torch.no_grad():
        got = StudentScorer(pair.student, chunk=5)(full_ids, full_mask, ids.shape[1], valid)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the teacher path uses the same gather / positions
    lT = score_teacher(pair.student, "logprobs", full_ids, full_mask, ids.shape[1], valid, chunk=3).lT_N
    torch.testing.assert_close(lT, expected, rtol=1e-4, atol=1e-4)


def test_generate_masks_everything_after_the_first_stop(micro_pair):
    _, pair = micro_pair
    torch.manual_seed(1)
    prompts = chat_prompts(pair.tokenizer, PROBLEMS * 4)
    rollouts = generate(
        pair.student, prompts, SamplingParams(12, temperature=1.5), pair.stop_ids, pair.pad_id, batch_size=5
    )
    comp, valid = rollouts.completion_ids_BT, rollouts.completion_BT
    P = rollouts.prompt_len
    assert rollouts.input_ids_BS.shape == (16, P + comp.shape[1])
    assert torch.equal(rollouts.attention_mask_BS[:, P:].bool(), valid)
    for row in range(16):
        n = int(valid[row].sum())
        assert valid[row, :n].all() and not valid[row, n:].any()  # one contiguous valid prefix
        if rollouts.stopped_B[row]:
            assert comp[row, n - 1].item() in pair.stop_ids
            assert not any(t in pair.stop_ids for t in comp[row, : n - 1].tolist())
        else:
            assert n == 12  # truncated at max_new_tokens
        assert (comp[row, n:] == pair.pad_id).all()
    prompt_lengths = rollouts.attention_mask_BS[:, :P].sum(-1)
    assert prompt_lengths.tolist() == [len(p) for p in prompts]  # left padding kept every prompt token


def test_mismatched_vocabularies_are_refused(local_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher, student = local_pair
    bigger = tmp_path / "bigger_teacher"
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<extra>"])
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(bigger)
    tok.save_pretrained(bigger)
    with pytest.raises(ConfigError, match="vocabularies differ") as info:
        check_pair(str(bigger), str(student), hf_config(bigger, student).model_pair)
    assert "\n" not in str(info.value)


def test_mismatched_tokenizers_are_refused(local_pair, tmp_path):
    teacher, student = local_pair
    swapped = tmp_path / "swapped_teacher"
    shutil.copytree(teacher, swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, different ids
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        check_pair(str(swapped), str(student), hf_config(swapped, student).model_pair)


def test_missing_model_is_one_clear_line(tmp_path):
    cfg = hf_config(tmp_path / "nope_teacher", tmp_path / "nope_student")
    with pytest.raises(ConfigError, match=f"no model at {tmp_path}/nope_teacher") as info:
        check_pair(cfg.model_pair.teacher, cfg.model_pair.student, cfg.model_pair)
    assert "\n" not in str(info.value) and "hub" in str(info.value)


def test_toy_pair_is_a_qwen3_pair(micro_pair):
    cfg, pair = micro_pair
    assert pair.student.config.model_type == pair.teacher.config.model_type == "qwen3"
    assert pair.student.config.tie_word_embeddings
    assert pair.tokenizer.chat_template and pair.stop_ids == [pair.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    text = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert all(o.startswith("model_pair.toy") for o in MICRO_PAIR) and cfg.model_pair.kind == "toy"


def test_hf_engine_generates_in_the_runs_precision(micro_pair):
    """Under the paper's bf16 setting the rollouts are sampled under bf16 autocast (the
    scorer's precision), not in the fp32 of the master weights."""
    from poweropd.hf_engine import HFEngine

    _, pair = micro_pair
    seen = []
    hook = pair.student.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prompts = chat_prompts(pair.tokenizer, PROBLEMS[:2])
    try:
        bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # what accelerate's autocast gives for bf16
        HFEngine(pair.student, pair.stop_ids, pair.pad_id, autocast=bf16).generate(prompts, SamplingParams(4))
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        HFEngine(pair.student, pair.stop_ids, pair.pad_id).generate(prompts, SamplingParams(4))
        assert seen and set(seen) == {torch.float32}
    finally:
        hook.remove()
    assert next(pair.student.parameters()).dtype == torch.float32  # master weights untouched
