"""The MultiJail languages, their resource tiers, and one normaliser for language labels.

Data in the wild labels languages three ways: ISO 639-1 codes (MultiJail CSV columns), English
names (the authors' JSON `translations` keys: "Chinese", "Javanese", ...) and odd codes (the
authors write Javanese as "jw", Google Translate's legacy code). Everything inside lasa_jax uses
the ISO 639-1 code, so every reader passes labels through `normalize_language`.
"""

from __future__ import annotations

from typing import Iterable

from lasa_jax.errors import UnknownLanguage

MULTIJAIL_LANGUAGES = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")

HIGH_RESOURCE = ("en", "zh", "it", "vi")
MID_RESOURCE = ("ar", "ko", "th")
LOW_RESOURCE = ("bn", "sw", "jv")
LANGUAGE_TIERS = {"high": HIGH_RESOURCE, "mid": MID_RESOURCE, "low": LOW_RESOURCE}

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "it": "Italian",
    "vi": "Vietnamese",
    "ar": "Arabic",
    "ko": "Korean",
    "th": "Thai",
    "bn": "Bengali",
    "sw": "Swahili",
    "jv": "Javanese",
}

# Aliases seen in the authors' data and common tooling. Keys are lower-case with "_" folded to
# "-". Traditional-Chinese tags (zh-tw, zh-hant) are deliberately absent: MultiJail's zh is
# Simplified, and silently merging the two would corrupt per-language results.
_ALIASES = {
    "jw": "jv",
    "zh-cn": "zh",
    "zh-hans": "zh",
    "zh-sg": "zh",
    "bangla": "bn",
    "kiswahili": "sw",
    # ISO 639-2/3 codes, as written by some translation pipelines.
    "eng": "en",
    "zho": "zh",
    "chi": "zh",
    "ita": "it",
    "vie": "vi",
    "ara": "ar",
    "kor": "ko",
    "tha": "th",
    "ben": "bn",
    "swa": "sw",
    "swh": "sw",
    "jav": "jv",
}
for _code, _name in LANGUAGE_NAMES.items():
    _ALIASES[_code] = _code
    _ALIASES[_name.lower()] = _code


def normalize_language(name: str, extra: Iterable[str] = ()) -> str:
    """Map a language label to its ISO 639-1 code.

    Accepts ISO codes, the English names used as keys in the authors' JSON, and the aliases
    above (e.g. "jw" -> "jv", "zh-CN" -> "zh"), case-insensitively. Codes outside MultiJail are
    accepted only when listed in `extra` (e.g. `extra=("fr",)`), so a typo never becomes a new
    language silently.
    """
    if not isinstance(name, str):
        raise UnknownLanguage(f"language must be a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    extras = {e.strip().lower() for e in extra}
    if key in extras:
        return key
    known = ", ".join(MULTIJAIL_LANGUAGES)
    raise UnknownLanguage(
        f"unknown language {name!r} (known: {known}, their English names, jw, zh-cn; "
        f"pass other codes explicitly as extra languages)"
    )


def language_tier(code: str) -> str:
    """'high', 'mid' or 'low' for a MultiJail language (after normalisation)."""
    code = normalize_language(code)
    for tier, codes in LANGUAGE_TIERS.items():
        if code in codes:
            return tier
    raise AssertionError("unreachable: every MultiJail language has a tier")
