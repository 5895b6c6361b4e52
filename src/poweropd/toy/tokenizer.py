"""A character-level tokenizer for the toy world, saved as an ordinary HF tokenizer.

It has the Qwen3 chat markup (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) and a chat
template of the same shape as Qwen3's, so the toy pair goes through exactly the same
`AutoTokenizer` / `apply_chat_template` path as the real Qwen3 pairs.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from poweropd.toy.task import ALPHABET

PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK]
# Whole-word tokens for the chat roles keep the template short.
ROLE_TOKENS = ["system", "user", "assistant"]

# Same layout as Qwen3's template: one `<|im_start|>role\ncontent<|im_end|>\n` block per
# message, then `<|im_start|>assistant\n` for the generation prompt. The toy models never
# think, so `enable_thinking` is accepted and ignored.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ROLE_TOKENS)}
    for char in ALPHABET:
        vocab.setdefault(char, len(vocab))
    # A BPE model with no merges is a pure character model; Fuse joins characters back.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    core.add_tokens(ROLE_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )
