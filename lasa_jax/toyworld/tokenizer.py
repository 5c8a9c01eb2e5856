"""A word-level tokenizer for the toy world, with LLaMA-3-style chat special tokens.

One token per surface word (inflected forms are separate tokens, as a real tokenizer would mostly
make them for an unseen morphology), punctuation split off, whitespace dropped. It is a
`PreTrainedTokenizerFast`, saved with `save_pretrained`, so the pipeline loads it with
`AutoTokenizer.from_pretrained` like any checkpoint's tokenizer; offsets are exact, which stage 3's
loss masks rely on.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lasa_jax.model.tokenizers import LLAMA3_CHAT_TEMPLATE

BOS, EOS_TEXT, HEADER_START, HEADER_END, EOT, PAD, UNK = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|finetune_right_pad_id|>", "<|unk|>")
SPECIALS = (BOS, EOS_TEXT, HEADER_START, HEADER_END, EOT, PAD, UNK)

# The LLaMA-3 chat layout, shared with the project's byte-level test tokenizer.
CHAT_TEMPLATE = LLAMA3_CHAT_TEMPLATE


def _pre_tokenizer():
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Punctuation(behavior="isolated")])


def words_of(texts: Iterable[str]) -> set[str]:
    pre = _pre_tokenizer()
    return {w for t in texts for w, _ in pre.pre_tokenize_str(t)}


def build_word_tokenizer(words: Iterable[str], *, pad_to_multiple_of: int = 64) -> PreTrainedTokenizerFast:
    """Vocabulary: the special tokens (ids 0..6), then `words` sorted, then padding entries so the
    embedding has a round size. Plain encoding prepends BOS (as LLaMA does); the chat template
    writes BOS itself, so templated text is encoded with add_special_tokens=False."""
    words = sorted(set(words) - set(SPECIALS))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab[w] = len(vocab)
    for i in range(-len(vocab) % pad_to_multiple_of):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens([t for t in SPECIALS] + [t for t in vocab if t.startswith("<|reserved_")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, bos_token=BOS,
                                   eos_token=EOT, pad_token=PAD, unk_token=UNK, model_max_length=1 << 16,
                                   clean_up_tokenization_spaces=False)
