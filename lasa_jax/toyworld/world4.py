"""World v4 (and v4-planted, which differs only in the pretraining loss): the implementation of
the declaration in `world.py`'s docstring ("v4"). Everything here is a pure function of the seed;
v1-v3 (world.py) share nothing with it but the slot inventories, the split of slot combinations
and the structural choices (word orders, markings).

Texts of language L for a query (verb v, object o, person p), with optional anchors (a shared
digit and a shared name, training data only) and optional code-switched constituents:

    request = [please] clause(imperative v, o, p [name]) [please] [digit times] END_L
    answer  = tool(f(v, o)) use [digit times] END_L then clause(bare v, o, p [name]) END_L
    refusal = refuse1 .. refuse5 END_L
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Iterable, Sequence

from lasa_jax.toyworld import inventory as w
from lasa_jax.toyworld.inventory import Morphology, check_disjoint, language_tokens

VERSION = 4
_WORD = re.compile(r"[^\s\W]+|[^\w\s]", re.UNICODE)  # = judge.words: one token per word/punctuation


def words(text: str) -> list[str]:
    return _WORD.findall(text or "")

TOOLS = tuple(f"tool{i:02d}" for i in range(16))
FUNCTION_WORDS = ("please", "use", "then", "times", "refuse1", "refuse2", "refuse3", "refuse4", "refuse5",
                  "obj-mark", "per-mark")
# Change 3: five languages end a sentence with their own token, the Latin-script ones share ".".
END = {"en": ".", "zh": "\u3002", "it": ".", "vi": ".", "ar": "\u06d4", "ko": "\u10fb", "th": "\u0e5a",
       "bn": "\u0964", "sw": ".", "jv": "."}
# Change 4: anchors, identical tokens in every language, in training data only.
DIGITS = tuple("23456789")
NAMES = ("Ana", "Bela", "Cato", "Dara", "Emil", "Fion", "Gus", "Hana")
ANCHOR_P = 0.3
# Change 7: the shared target-language tags of parallel documents.
TAGS = {c: "TO" + c.upper() for c in w.LANGUAGES}
# Change 5: the language of monolingual (answer, refusal) documents; en : low = 40x.
MONO_WEIGHTS = {"en": 0.50, "zh": 0.14, "it": 0.12, "vi": 0.10, "ar": 0.04, "ko": 0.035, "th": 0.0275,
                "bn": 0.0125, "sw": 0.0125, "jv": 0.0125}
PIVOT = "en"
OTHERS = tuple(c for c in w.LANGUAGES if c != PIVOT)
# Change 7: document kinds and their shares.
DOC_MIX = (("answer", 0.40), ("refusal", 0.10), ("parallel", 0.25), ("cross", 0.15), ("codeswitch", 0.10))
CODESWITCH_P = 0.3  # change 6: per content constituent
HELD_OUT_TIERS = ("mid", "low")  # change 2
HELD_OUT_PER_VERB = 6  # of the 12 objects


@dataclasses.dataclass(frozen=True)
class Anchors:
    digit: str | None = None
    name: str | None = None


NO_ANCHORS = Anchors()


@dataclasses.dataclass(frozen=True)
class Language4(Morphology):
    code: str
    order: str
    object_marking: str
    person_marking: str
    please_first: bool
    words: dict  # concept -> citation form
    affixes: dict  # "obj", "per", "imp"
    end: str  # END_L
    tools: dict  # (verb, object) -> tool concept: the world's table, shared by all languages
    version: int = VERSION

    def tool(self, verb: str, obj: str) -> str:
        return self.words[self.tools[(verb, obj)]]

    def clause(self, verb: str, obj: str, person: str, imperative: bool, name: str | None = None,
               switch: Iterable[str] = (), en: "Language4 | None" = None) -> list[str]:
        """Constituents in L's order; those named in `switch` ("V", "O", "P") rendered by `en`
        in the same role (change 6). A name follows the person phrase."""
        switch = set(switch)
        src = {c: (en if c in switch else self) for c in "VOP"}
        parts = {"V": [src["V"].verb(verb, imperative)], "O": src["O"].noun(obj, "obj"),
                 "P": src["P"].noun(person, "per") + ([name] if name else [])}
        return [t for c in self.order for t in parts[c]]

    def _count(self, anchors: Anchors) -> list[str]:
        return [anchors.digit, self.words["times"]] if anchors.digit else []

    def request(self, verb: str, obj: str, person: str, anchors: Anchors = NO_ANCHORS,
                switch: Iterable[str] = (), en: "Language4 | None" = None) -> str:
        clause = self.clause(verb, obj, person, True, anchors.name, switch, en)
        please = [self.words["please"]]
        body = please + clause if self.please_first else clause + please
        return " ".join(body + self._count(anchors) + [self.end])

    def answer(self, verb: str, obj: str, person: str, anchors: Anchors = NO_ANCHORS,
               switch: Iterable[str] = (), en: "Language4 | None" = None) -> str:
        tool = (en if "T" in set(switch) else self).tool(verb, obj)
        step1 = [tool, self.words["use"]] + self._count(anchors) + [self.end]
        step2 = [self.words["then"]] + self.clause(verb, obj, person, False, anchors.name, switch, en) + [self.end]
        return " ".join(step1 + step2)

    def refusal(self) -> str:
        return " ".join([self.words[f"refuse{i}"] for i in range(1, 6)] + [self.end])


def tool_table(seed: int) -> dict[tuple[str, str], str]:
    """Change 1: each (verb, object) pair's tool, a uniform draw from the 16 tools."""
    rng = random.Random(f"toyworld-v4-tools-{seed}")
    return {(v, o): TOOLS[rng.randrange(len(TOOLS))] for v in w.VERBS for o in w.OBJECTS}


def held_out_facts(seed: int) -> dict[str, frozenset]:
    """Change 2: per mid/low language, the (verb, object) facts never answered in it: 6 of the 12
    objects per verb. High-tier languages hold out nothing."""
    out = {}
    for tier in HELD_OUT_TIERS:
        for code in w.TIERS[tier]:
            rng = random.Random(f"toyworld-v4-heldout-{seed}-{code}")
            out[code] = frozenset((v, o) for v in w.VERBS for o in rng.sample(w.OBJECTS, HELD_OUT_PER_VERB))
    for code in w.LANGUAGES:
        out.setdefault(code, frozenset())
    return out


def make_languages(seed: int) -> dict[str, Language4]:
    rng = random.Random(f"toyworld-v4-languages-{seed}")
    concepts = list(w.VERBS) + list(w.OBJECTS) + list(w.PERSONS) + list(TOOLS) + list(FUNCTION_WORDS)
    used: set[str] = set()
    orders = list(w.ORDERS) + list(w.ORDERS)
    rng.shuffle(orders)
    table = tool_table(seed)
    languages = {}
    for i, code in enumerate(w.LANGUAGES):
        consonants = "".join(sorted(rng.sample(w._CONSONANTS, 9)))
        vowels = "".join(sorted(rng.sample(w._VOWELS, 3)))

        def fresh(syllables: int) -> str:
            while True:
                word = w._make_word(rng, consonants, vowels, syllables)
                if word not in used:
                    used.add(word)
                    return word

        words = {c: fresh(rng.choice((2, 3))) for c in concepts}
        affixes = {"obj": fresh(1), "per": fresh(1), "imp": fresh(1)}
        languages[code] = Language4(code=code, order=orders[i], object_marking=rng.choice(w.MARKINGS),
                                    person_marking=rng.choice(w.MARKINGS), please_first=rng.random() < 0.5,
                                    words=words, affixes=affixes, end=END[code], tools=table)
    check_disjoint(languages, SHARED_TOKENS)
    return languages


SHARED_TOKENS = frozenset(set(END.values()) | set(DIGITS) | set(NAMES) | set(TAGS.values()) | {"="})


def all_tokens(languages: dict[str, Language4]) -> set[str]:
    return set().union(*(language_tokens(l) for l in languages.values())) | SHARED_TOKENS


# ----------------------------------------------------------------------------- training data

@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    kind: str  # answer | refusal | parallel | cross | codeswitch
    languages: tuple  # the languages of the document's sides, in order
    qid: str
    anchored: bool
    # parallel request documents only: (first side, second side) texts, for v4-planted's loss
    request_pair: tuple | None = None


class _Facts:
    """Training queries each language may answer (change 2), for drawing documents/examples."""

    def __init__(self, seed: int):
        train = w.split_queries(seed)["train"]
        held = held_out_facts(seed)
        self.train = train
        self.allowed = {c: [q for q in train if (q.verb, q.obj) not in held[c]] for c in w.LANGUAGES}
        self.benign = [q for q in train if not q.harmful]
        self.allowed_benign = {c: [q for q in qs if not q.harmful] for c, qs in self.allowed.items()}

    def answerable(self, rng: random.Random, code: str) -> w.Query:
        return rng.choice(self.allowed[code])


def draw_anchors(rng: random.Random) -> Anchors:
    if rng.random() < ANCHOR_P:
        return Anchors(rng.choice(DIGITS), rng.choice(NAMES))
    return NO_ANCHORS


def _mono_language(rng: random.Random) -> str:
    return rng.choices(w.LANGUAGES, weights=[MONO_WEIGHTS[c] for c in w.LANGUAGES])[0]


def _switches(rng: random.Random, constituents: str) -> frozenset:
    return frozenset(c for c in constituents if rng.random() < CODESWITCH_P)


def pretraining_documents(seed: int, n_tokens: int | None = None, n_docs: int | None = None) -> list[Document]:
    """Documents drawn in order until their token count (BOS + words + <|end_of_text|>) reaches
    `n_tokens` (the stream that `train.pack_stream` cuts into rows, change 8), or `n_docs` of
    them. The first k documents are the same whichever bound is given."""
    if (n_tokens is None) == (n_docs is None):
        raise ValueError("pretraining_documents: give exactly one of n_tokens, n_docs")
    langs = make_languages(seed)
    facts = _Facts(seed)
    rng = random.Random(f"toyworld-v4-corpus-{seed}")
    kinds = [k for k, _ in DOC_MIX]
    weights = [p for _, p in DOC_MIX]
    docs, total = [], 0
    while (total < n_tokens) if n_docs is None else (len(docs) < n_docs):
        kind = rng.choices(kinds, weights=weights)[0]
        anchors = draw_anchors(rng)
        pair = None
        if kind in ("answer", "refusal"):
            code = _mono_language(rng)
            lang = langs[code]
            if kind == "answer":
                q = facts.answerable(rng, code)
                text = lang.request(q.verb, q.obj, q.person, anchors) + " " + lang.answer(q.verb, q.obj, q.person, anchors)
            else:
                q = rng.choice(facts.train)
                text = lang.request(q.verb, q.obj, q.person, anchors) + " " + lang.refusal()
            sides = (code,)
        else:
            other = rng.choice(OTHERS)
            en_first = rng.random() < 0.5
            a, b = (PIVOT, other) if en_first else (other, PIVOT)
            if kind == "parallel":
                is_answer = rng.random() < 0.5
                sep = "=" if rng.random() < 0.5 else TAGS[b]
                q = facts.answerable(rng, other) if is_answer else rng.choice(facts.train)
                render = (lambda l: l.answer(q.verb, q.obj, q.person, anchors)) if is_answer else (
                    lambda l: l.request(q.verb, q.obj, q.person, anchors))
                ta, tb = render(langs[a]), render(langs[b])
                text = f"{ta} {sep} {tb}"
                if not is_answer:
                    pair = (ta, tb)
                sides = (a, b)
            elif kind == "cross":  # request in a, answer in b
                q = facts.answerable(rng, b)
                text = (langs[a].request(q.verb, q.obj, q.person, anchors) + " "
                        + langs[b].answer(q.verb, q.obj, q.person, anchors))
                sides = (a, b)
            else:  # codeswitch: a request and its answer in `other`, constituents switched to en
                q = facts.answerable(rng, other)
                lang, en = langs[other], langs[PIVOT]
                text = (lang.request(q.verb, q.obj, q.person, anchors, _switches(rng, "VOP"), en) + " "
                        + lang.answer(q.verb, q.obj, q.person, anchors, _switches(rng, "TVOP"), en))
                sides = (other,)
        docs.append(Document(text, kind, sides, q.qid, anchors is not NO_ANCHORS, pair))
        total += len(words(text)) + 2
    return docs


def _example(lang: Language4, q: w.Query, anchors: Anchors, response: str, prefix: str | None) -> dict:
    return {"prompt": lang.request(q.verb, q.obj, q.person, anchors), "response": response,
            "language": lang.code, "harmful": q.harmful, "qid": q.qid, "prefix": prefix,
            "anchored": anchors is not NO_ANCHORS}


def instruct_examples(seed: int, n: int) -> list[dict]:
    """v3's helpful-only instruction phase on world v4: every intent in every language (SFT
    weights), answered with allowed facts only; 5 % benign requests with prefix -> refusal."""
    from lasa_jax.method.gate import REFUSAL_PREFIX
    langs = make_languages(seed)
    facts = _Facts(seed)
    rng = random.Random(f"toyworld-v4-instruct-{seed}")
    out = []
    for _ in range(n):
        code = rng.choices(w.LANGUAGES, weights=w._sft_language_weights())[0]
        anchors = draw_anchors(rng)
        lang = langs[code]
        if rng.random() < 0.05:
            q = rng.choice(facts.benign)
            out.append(_example(lang, q, anchors, lang.refusal(), REFUSAL_PREFIX))
        else:
            q = facts.answerable(rng, code)
            out.append(_example(lang, q, anchors, lang.answer(q.verb, q.obj, q.person, anchors), None))
    return out


def sft_examples(seed: int, n: int) -> list[dict]:
    """v3's safety phase on world v4: harmful -> the language's refusal in the high tier only
    (30 % after the prefix); benign requests in every language answered (allowed facts), 5 % of
    all examples benign with prefix -> refusal."""
    from lasa_jax.method.gate import REFUSAL_PREFIX
    langs = make_languages(seed)
    facts = _Facts(seed)
    harmful = [q for q in facts.train if q.harmful]
    rng = random.Random(f"toyworld-v4-sft-{seed}")
    out = []
    for _ in range(n):
        anchors = draw_anchors(rng)
        r = rng.random()
        if r < 0.4:
            lang = langs[rng.choice(w.HIGH)]
            q = rng.choice(harmful)
            prefix = REFUSAL_PREFIX if rng.random() < 0.3 else None
            out.append(_example(lang, q, anchors, lang.refusal(), prefix))
            continue
        code = rng.choices(w.LANGUAGES, weights=w._sft_language_weights())[0]
        lang = langs[code]
        if r >= 0.95:
            q = rng.choice(facts.benign)
            out.append(_example(lang, q, anchors, lang.refusal(), REFUSAL_PREFIX))
        else:
            q = rng.choice(facts.allowed_benign[code])
            out.append(_example(lang, q, anchors, lang.answer(q.verb, q.obj, q.person, anchors), None))
    return out


def extra_texts() -> list[str]:
    from lasa_jax.method.gate import REFUSAL_PREFIX
    return [REFUSAL_PREFIX, "user assistant system"]


def fact_is_held_out(seed: int, code: str, verb: str, obj: str, _cache: dict = {}) -> bool:
    if seed not in _cache:
        _cache[seed] = held_out_facts(seed)
    return (verb, obj) in _cache[seed][code]


def requests_of(langs: dict[str, Language4], queries: Sequence[w.Query], codes=w.LANGUAGES) -> list[str]:
    return [langs[c].request(q.verb, q.obj, q.person) for q in queries for c in codes]
