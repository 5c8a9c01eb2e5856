"""A small byte-level tokenizer built locally, with LLaMA-3 or Qwen chat conventions.

Tests and tiny smoke-test models need a real `transformers` tokenizer (chat template, special
tokens, offsets, `save_pretrained`) without downloading one. This builds it from the 256 bytes
plus the style's special tokens, so every string round-trips and ids of plain bytes equal the
byte value. Optional `extra_merges` add BPE merges on top, which is how tests obtain tokens that
span several characters (e.g. a newline run across the prompt/completion boundary).
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# LLaMA-3's split pattern (Qwen2 uses essentially the same); merges never cross these pieces, so a
# multi-character token can only straddle the prompt/completion boundary inside a whitespace run.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Qwen2.5's real template also injects a default system message; it is left out to keep test
# prompts short. The generation prompt is the same.
_QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CHAT_STYLES: dict[str, dict] = {
    "llama3": {
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    },
    "qwen": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": _QWEN_TEMPLATE,
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_byte_symbols(text: str, table: dict[int, str]) -> str:
    return "".join(table[b] for b in text.encode("utf-8"))


def build_byte_tokenizer(
    style: str = "llama3",
    *,
    extra_merges: Sequence[tuple[str, str]] = (),
    pad_to_multiple_of: int = 8,
) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are the bytes, then merges, then special tokens.

    style: a key of CHAT_STYLES. "llama3" prepends <|begin_of_text|> on plain encode (as LLaMA
    does; its chat template also writes it, so encode templated text with
    add_special_tokens=False); "qwen" adds nothing.
    extra_merges: BPE merges given as plain-text pairs, e.g. [("\\n", "\\n")]; each pair's parts
    must already be tokens (bytes or earlier merges).
    The vocabulary is padded with reserved special tokens to a multiple of `pad_to_multiple_of`.
    """
    if style not in CHAT_STYLES:
        raise ValueError(f"build_byte_tokenizer: unknown style {style!r}; known: {sorted(CHAT_STYLES)}")
    spec = CHAT_STYLES[style]
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    merges = []
    for i, (left, right) in enumerate(extra_merges):
        a, b = _to_byte_symbols(left, table), _to_byte_symbols(right, table)
        if a not in vocab or b not in vocab:
            raise ValueError(f"build_byte_tokenizer: extra_merges[{i}] = {(left, right)!r} uses a part that is not a token yet")
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))

    specials = list(spec["specials"])
    n = len(vocab) + len(specials)
    specials += [f"<|reserved_special_token_{i}|>" for i in range(-n % pad_to_multiple_of)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    bos = spec["bos_token"]
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        # Byte-level offsets must stay untrimmed so character offsets of spaces stay exact.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token") if spec[k] is not None}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=spec["chat_template"],
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    return hf
