"""SSI gating: the refusal prefix, the text a model continues, and SSI-gated generation.

The prefix is LASA's condition (docs/LASA_METHOD.md, stage 3): when z = 1 the string ``REFUSAL_PREFIX``
plus ``PREFIX_SEPARATOR`` is placed right after the chat template's generation prompt. Training
(``kto_data.encode_item``), inference (``prompt_ids``/``respond``), the judges (a reply that
repeats the prefix) and the toy world all import it from here; it is written nowhere else.

The separator is a newline: LLaMA-3/Qwen pre-tokenisers split a newline from the following word,
so the completion starts on a token boundary and the prompt ends exactly where inference stops
feeding text. (The authors tokenise the prefix separately and glue the ids with no separator,
which no string tokenisation reproduces.)

The generation prompt is the template's, with ``config.model.enable_thinking`` passed to it
(``LanguageModel.chat_template_kwargs``): for Qwen3 with thinking off (the paper's setting) it
ends in the template's empty ``<think>\n\n</think>\n\n`` block, so the prefix and the reply come
after it, as in training, where Qwen3's template writes the same block before an assistant turn.
With thinking on, the prefix precedes the model's own reasoning block, and ``respond`` moves a
reasoning block (``<think>...</think>``) out of the response into ``reasoning``, so the judge
never sees it.

Decision: a generated record's ``response`` is what the model GENERATED, without the forced
prefix, and that is what the judge sees. The prefix is input, not output; the refusal-phrase
lists contain it (a reply that repeats it is a refusal), so judging prefix + continuation would
make every flagged prompt a refusal by construction and measure the SSI instead of the model.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from lasa_jax.method.probe import SSIArtifact, load_artifact
from lasa_jax.model.features import FEATURE_KINDS, extract_features
from lasa_jax.model.generate import eos_ids_of, generate
from lasa_jax.model.lengths import PromptBound, limit_for, template_tail
from lasa_jax.model.lm import LanguageModel, chat_text

REFUSAL_PREFIX = (
    "Harmful query detected. I should refuse this request and provide a safe response in the user's language."
)
PREFIX_SEPARATOR = "\n"


def assistant_prefix_text(tokenizer, prompt, prefix: str | None, **template_kwargs) -> str:
    """The text a model sees before its answer: the templated prompt (a user turn's text, or a
    conversation as ``(role, content)`` pairs), the generation prompt, then the prefix."""
    messages = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    text = chat_text(tokenizer, messages, add_generation_prompt=True, **template_kwargs)
    if prefix:
        text += prefix + PREFIX_SEPARATOR
    return text


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a decoded reply: a ``<think>...</think>`` block (Qwen3 with
    thinking on) is the reasoning, what follows it the answer; a block never closed leaves no
    answer. A reply without the block is all answer."""
    head = text.lstrip()
    if "</think>" in text:
        reasoning, _, answer = text.partition("</think>")
        return reasoning.replace("<think>", "", 1).strip(), answer.lstrip("\n")
    if head.startswith("<think>"):
        return head[len("<think>"):].strip(), ""
    return None, text


def prompt_ids(lm: LanguageModel, prompts: Sequence[str], flags: Sequence[bool],
               bound: PromptBound | None = None) -> list[list[int]]:
    """Token ids the model continues: chat template with generation prompt, plus the refusal
    prefix and its separator where flagged. Tokenised without added special tokens, since the
    template writes them (as in training's ``encode_item``). ``bound`` cuts a long prompt from
    the left, never into the template's tail or the prefix."""
    if len(prompts) != len(flags):
        raise ValueError(f"prompt_ids: {len(prompts)} prompts but {len(flags)} flags")
    if lm.tokenizer is None:
        raise ValueError("prompt_ids: this model was loaded without a tokenizer")
    texts = [assistant_prefix_text(lm.tokenizer, p, REFUSAL_PREFIX if f else None, **lm.chat_template_kwargs)
             for p, f in zip(prompts, flags)]
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if bound is None:
        return ids
    return bound.apply(prompts, ids, lambda i: template_tail(lm.tokenizer, texts[i], prompts[i]))


def load_for_model(lm: LanguageModel, directory: str) -> SSIArtifact:
    """The SSI artifact in ``directory``, checked against the model it will score with
    (architecture fingerprint, width, layer range)."""
    return load_artifact(directory, model_fingerprint=lm.fingerprint, hidden_size=lm.cfg.hidden_size,
                         num_layers=lm.cfg.num_layers)


def score_prompts(lm: LanguageModel, artifact: SSIArtifact, prompts: Sequence[str], batch_size: int = 16,
                  progress: bool = False, bound: PromptBound | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probs, verdicts) for raw prompts: ``lm``'s feature read the way the artifact was trained
    (raw or chat-templated text, at its layer) through the shared feature function; verdict =
    p > threshold. Batching and padding side do not change the scores."""
    if not prompts:
        return np.zeros(0), np.zeros(0, bool)
    feats = extract_features(lm, list(prompts), [artifact.layer], batch_size=batch_size,
                             chat_template=artifact.meta["feature"] == FEATURE_KINDS["chat"],
                             bound=bound, progress=progress)[0]
    probs = artifact.probs(feats)
    return probs, probs > artifact.threshold


def ssi_verdicts(lm: LanguageModel, prompts: Sequence[str], artifact: SSIArtifact, *, batch_size: int = 16,
                 progress: bool = False, bound: PromptBound | None = None) -> dict[str, bool]:
    """The SSI's verdict on each distinct prompt under ``lm`` (the base model, for stage 3's
    ``z_mode = "ssi"``), read exactly as inference reads it."""
    unique = sorted(set(prompts))
    _, verdicts = score_prompts(lm, artifact, unique, batch_size, progress, bound)
    return dict(zip(unique, (bool(v) for v in verdicts)))


def respond(lm: LanguageModel, prompts: Sequence[str], languages: Sequence[str], artifact=None, *,
            max_new_tokens: int = 512, batch_size: int = 16, temperature: float = 0.0,
            top_p: float = 1.0, key: jax.Array | None = None, eos_ids: Sequence[int] | None = None,
            bound: PromptBound | None = None, feature_bound: PromptBound | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    """One record per prompt: ``prompt, language, response, reasoning, ssi_prob, ssi_flagged,
    prefix_used, n_new_tokens, stop`` ("eos" or "length"). Without an artifact the SSI fields
    are None and no prefix is used. ``response`` excludes the prefix and any reasoning block
    (``reasoning``, None when there is none; see the module docstring).

    ``bound`` limits the prompts a reply continues (default: the model's context less
    ``max_new_tokens``), ``feature_bound`` the prompts the SSI reads (default: the context)."""
    if len(prompts) != len(languages):
        raise ValueError(f"respond: {len(prompts)} prompts but {len(languages)} languages")
    if bound is None:
        bound = PromptBound(limit_for(lm.cfg.max_position_embeddings, reserve=max_new_tokens))
    if artifact is not None:
        probs, flags = score_prompts(lm, artifact, prompts, batch_size, progress, feature_bound)
    else:
        probs, flags = [None] * len(prompts), [False] * len(prompts)
    eos = list(eos_ids_of(lm) if eos_ids is None else eos_ids)
    ids = generate(lm, prompt_ids(lm, prompts, flags, bound), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, key=key, eos_ids=eos,
                   batch_size=batch_size, progress=progress)
    texts = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    out = []
    for p, lang, prob, flag, new, text in zip(prompts, languages, probs, flags, ids, texts):
        reasoning, text = split_reasoning(text)
        out.append({
            "prompt": p, "language": lang, "response": text, "reasoning": reasoning,
            "ssi_prob": None if prob is None else float(prob),
            "ssi_flagged": None if artifact is None else bool(flag),
            "prefix_used": bool(flag),
            "n_new_tokens": len(new),
            "stop": "eos" if new and new[-1] in eos else "length",
        })
    return out
