"""How long a prompt may be, and what to do with a longer one.

Every path that tokenises prompts (features for the bottleneck and the SSI, SSI scoring, the
prompts a reply is generated from, the KTO items) feeds the model at most ``limit`` tokens of each:
a longer prompt keeps its last ``limit`` tokens (its end is what a feature reads and what a reply
continues; ``align`` has always cut its prompts this way). Without a bound a 200,000-character
prompt asks the device for terabytes. ``PromptBound`` does the cutting and remembers what it cut,
so each stage reports the count.

A prompt *cannot fit* when the tokens that must follow its text (the chat template's end of turn
and generation prompt, the refusal prefix) already fill the limit: cutting from the left would cut
into them. That is a ``DataError`` naming the prompt's file and record.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from lasa_jax.errors import DataError

EXAMPLES = 10  # truncated prompts named in a report


class PromptBound:
    """At most ``limit`` tokens per prompt. ``origins`` maps a prompt's text to ``(file, record)``
    for reports and errors (texts without one are named by their position)."""

    def __init__(self, limit: int, origins: Mapping[str, tuple[str, str]] | None = None):
        if int(limit) < 1:
            raise ValueError(f"PromptBound: limit must be >= 1, got {limit}")
        self.limit = int(limit)
        self.origins = dict(origins or {})
        self.truncated: dict[str, int] = {}  # text -> its length in tokens before cutting

    def _origin(self, text: str, i: int) -> tuple[str, str]:
        return self.origins.get(text, ("(prompts)", f"prompt {i}"))

    def apply(self, texts: Sequence[str], ids: Sequence[list[int]],
              tail: Callable[[int], int] | None = None) -> list[list[int]]:
        """``ids[i]`` (the tokens of ``texts[i]``) cut to the limit from the left. ``tail(i)`` is
        how many final tokens of ``ids[i]`` follow the prompt's own text (asked only for prompts
        over the limit)."""
        out = []
        for i, (text, x) in enumerate(zip(texts, ids)):
            if len(x) <= self.limit:
                out.append(x)
                continue
            keep = tail(i) if tail is not None else 0
            if keep >= self.limit:
                file, where = self._origin(text, i)
                raise DataError(file, where, "prompt", f"{len(x)} tokens, and the {keep} that must follow the "
                                f"text (chat template, refusal prefix) leave no room in the limit of {self.limit}")
            self.truncated.setdefault(text, len(x))
            out.append(list(x[-self.limit:]))
        return out

    def note(self, text: str, n_tokens: int) -> None:
        """Record a prompt another mechanism cut (``align``'s KTO items)."""
        self.truncated.setdefault(text, int(n_tokens))

    def report(self) -> dict:
        """``{"limit", "truncated", "examples"}`` for a stage's report."""
        examples = []
        for text, n in list(self.truncated.items())[:EXAMPLES]:
            file, where = self.origins.get(text, ("(prompts)", "?"))
            examples.append(f"{file}:{where} ({n} tokens)")
        return {"limit": self.limit, "truncated": len(self.truncated), "examples": examples}


def limit_for(max_position_embeddings: int, configured: int = 0, reserve: int = 0) -> int:
    """The prompt limit of a path: the model's context less what the path adds after the prompt
    (``reserve``: the new tokens of a reply), and no more than ``configured`` when that is > 0."""
    limit = int(max_position_embeddings) - int(reserve)
    return min(limit, int(configured)) if configured and configured > 0 else limit


def template_tail(tokenizer, text: str, content: str) -> int:
    """How many tokens of ``tokenizer(text)`` lie after the end of ``content`` inside ``text`` (a
    chat-templated prompt), from character offsets; 0 when the template changed the content
    beyond recognition (then nothing is protected)."""
    needle = content.strip()
    end = text.rfind(needle) + len(needle) if needle and needle in text else -1
    if end < 0:
        return 0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return sum(1 for start, _ in enc["offset_mapping"] if start >= end)
