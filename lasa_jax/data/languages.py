"""Language codes: the MultiJail ten and their tiers, any other ISO 639-1 language, and one
normaliser for the labels data files use.

Data in the wild labels languages several ways: ISO 639-1 codes (MultiJail CSV columns), English
names (the authors' JSON `translations` keys: "Chinese", "Javanese", ...), ISO 639-2/3 codes and
legacy codes (the authors write Javanese as "jw", Google Translate's old code). Everything inside
lasa_jax uses the lower-case ISO 639-1 code, optionally with a region or script subtag
("pt-br", "zh-tw"); every reader passes labels through `normalize_language`.
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

# Every ISO 639-1 code with its English name ("code Name|..."): a code outside this table is a
# typo unless the caller lists it in `extra`.
_ISO_639_1 = (
    "aa Afar|ab Abkhazian|ae Avestan|af Afrikaans|ak Akan|am Amharic|an Aragonese|ar Arabic|"
    "as Assamese|av Avaric|ay Aymara|az Azerbaijani|ba Bashkir|be Belarusian|bg Bulgarian|bi Bislama|"
    "bm Bambara|bn Bengali|bo Tibetan|br Breton|bs Bosnian|ca Catalan|ce Chechen|ch Chamorro|"
    "co Corsican|cr Cree|cs Czech|cu Church Slavic|cv Chuvash|cy Welsh|da Danish|de German|dv Divehi|"
    "dz Dzongkha|ee Ewe|el Greek|en English|eo Esperanto|es Spanish|et Estonian|eu Basque|fa Persian|"
    "ff Fulah|fi Finnish|fj Fijian|fo Faroese|fr French|fy Western Frisian|ga Irish|gd Scottish Gaelic|"
    "gl Galician|gn Guarani|gu Gujarati|gv Manx|ha Hausa|he Hebrew|hi Hindi|ho Hiri Motu|hr Croatian|"
    "ht Haitian|hu Hungarian|hy Armenian|hz Herero|ia Interlingua|id Indonesian|ie Interlingue|ig Igbo|"
    "ii Sichuan Yi|ik Inupiaq|io Ido|is Icelandic|it Italian|iu Inuktitut|ja Japanese|jv Javanese|"
    "ka Georgian|kg Kongo|ki Kikuyu|kj Kuanyama|kk Kazakh|kl Kalaallisut|km Khmer|kn Kannada|ko Korean|"
    "kr Kanuri|ks Kashmiri|ku Kurdish|kv Komi|kw Cornish|ky Kyrgyz|la Latin|lb Luxembourgish|lg Ganda|"
    "li Limburgish|ln Lingala|lo Lao|lt Lithuanian|lu Luba-Katanga|lv Latvian|mg Malagasy|mh Marshallese|"
    "mi Maori|mk Macedonian|ml Malayalam|mn Mongolian|mr Marathi|ms Malay|mt Maltese|my Burmese|na Nauru|"
    "nb Norwegian Bokmal|nd North Ndebele|ne Nepali|ng Ndonga|nl Dutch|nn Norwegian Nynorsk|no Norwegian|"
    "nr South Ndebele|nv Navajo|ny Chichewa|oc Occitan|oj Ojibwa|om Oromo|or Oriya|os Ossetian|"
    "pa Punjabi|pi Pali|pl Polish|ps Pashto|pt Portuguese|qu Quechua|rm Romansh|rn Rundi|ro Romanian|"
    "ru Russian|rw Kinyarwanda|sa Sanskrit|sc Sardinian|sd Sindhi|se Northern Sami|sg Sango|si Sinhala|"
    "sk Slovak|sl Slovenian|sm Samoan|sn Shona|so Somali|sq Albanian|sr Serbian|ss Swati|"
    "st Southern Sotho|su Sundanese|sv Swedish|sw Swahili|ta Tamil|te Telugu|tg Tajik|th Thai|"
    "ti Tigrinya|tk Turkmen|tl Tagalog|tn Tswana|to Tonga|tr Turkish|ts Tsonga|tt Tatar|tw Twi|"
    "ty Tahitian|ug Uyghur|uk Ukrainian|ur Urdu|uz Uzbek|ve Venda|vi Vietnamese|vo Volapuk|wa Walloon|"
    "wo Wolof|xh Xhosa|yi Yiddish|yo Yoruba|za Zhuang|zh Chinese|zu Zulu"
)
ISO_639_1 = dict(entry.split(" ", 1) for entry in _ISO_639_1.split("|"))

# Withdrawn or tool-specific codes still found in data: the authors' (and Google Translate's)
# "jw" for Javanese, and the ISO codes replaced in 1989. `legacy_codes` gives the reverse, so
# that a file named with the old code is found for the new one.
_LEGACY = {"jw": "jv", "iw": "he", "in": "id", "ji": "yi", "mo": "ro"}

# Aliases seen in the authors' data and common tooling. Keys are lower-case with "_" folded to
# "-". The Simplified-Chinese tags fold into zh (MultiJail's zh is Simplified); Traditional
# ones (zh-tw, zh-hant) stay distinct codes, since merging them would corrupt per-language results.
_ALIASES = {
    "zh-cn": "zh",
    "zh-hans": "zh",
    "zh-sg": "zh",
    "bangla": "bn",
    "kiswahili": "sw",
    "farsi": "fa",
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
    "spa": "es",
    "fra": "fr",
    "fre": "fr",
    "deu": "de",
    "ger": "de",
    "jpn": "ja",
    "hin": "hi",
    "rus": "ru",
    "por": "pt",
    "ind": "id",
    "tur": "tr",
}
_ALIASES.update(_LEGACY)
for _code, _name in ISO_639_1.items():
    _ALIASES[_code] = _code
    _ALIASES.setdefault(_name.lower(), _code)
for _code, _name in LANGUAGE_NAMES.items():
    _ALIASES[_name.lower()] = _code


def normalize_language(name: str, extra: Iterable[str] = ()) -> str:
    """Map a language label to its ISO 639-1 code (lower case).

    Accepts ISO 639-1 codes, English names ("Javanese"), the aliases above (e.g. "jw" -> "jv",
    "zh-CN" -> "zh", "fra" -> "fr"), case-insensitively, and a code with a region or script
    subtag ("pt-BR" -> "pt-br", kept distinct from "pt"). Anything else is an error unless listed
    in `extra`, so a typo never becomes a new language silently.
    """
    if not isinstance(name, str):
        raise UnknownLanguage(f"language must be a string, got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    extras = {e.strip().lower().replace("_", "-") for e in extra}
    if key in extras:
        return key
    primary, sep, sub = key.partition("-")
    if sep and sub.isalnum() and 2 <= len(sub) <= 4 and primary.isalpha() and len(primary) <= 3 and primary in _ALIASES:
        base = _ALIASES[primary]
        if base in ISO_639_1:
            return f"{base}-{sub}"
    raise UnknownLanguage(
        f"unknown language {name!r} (expected an ISO 639-1 code such as en, fr, ja, its English "
        f"name, or a code with a region such as pt-br)"
    )


def legacy_codes(code: str) -> tuple[str, ...]:
    """Older spellings of an ISO code that file names still use ("jv" -> ("jw",))."""
    return tuple(old for old, new in _LEGACY.items() if new == code)


def language_name(code: str) -> str:
    """English name of a code ("jv" -> "Javanese"); the code itself when the table lacks it."""
    primary = code.partition("-")[0]
    return LANGUAGE_NAMES.get(code) or ISO_639_1.get(code) or ISO_639_1.get(primary, code)


def language_tier(code: str) -> str:
    """'high', 'mid' or 'low' for a MultiJail language (after normalisation); other languages
    have no tier (UnknownLanguage)."""
    code = normalize_language(code)
    for tier, codes in LANGUAGE_TIERS.items():
        if code in codes:
            return tier
    raise UnknownLanguage(f"language {code!r} is not one of the MultiJail languages, which have tiers")
