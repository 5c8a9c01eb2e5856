"""The LASA authors' data files laid out as in their repository (names and line endings), from the
samples in tests/fixtures/authors_data (see its README and MANIFEST.txt)."""
from __future__ import annotations

import os

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "authors_data")
# repository path -> (fixture file, CRLF in the repository)
FILES = {
    "data/safety_train_translated.json": ("data/safety_train_translated.sample.json", False),
    "data/ssi/unsafe_train.json": ("data/ssi/unsafe_train.sample.json", True),
    "data/ssi/harmbench_training.json": ("data/ssi/harmbench_training.sample.json", True),
    "data/training/mixed_dpo_ultra_safety_converted.json": ("data/training/mixed_dpo_ultra_safety_converted.sample.json", True),
    "data/ultrafeedback/monolingual_first1000_en.json": ("data/ultrafeedback/monolingual_first1000_en.sample.json", False),
    "data/ultrafeedback/monolingual_first1000_jw.json": ("data/ultrafeedback/monolingual_first1000_jw.sample.json", False),
    "examples/multijail_1k.json": ("examples/multijail_1k.json", False),
}


def fixture(name: str) -> str:
    return os.path.join(FIXTURE, name)


def lay_out(root: str, *, crlf: bool = True) -> str:
    """Write the files under ``root`` with the repository's names; the repository's CRLF files
    get CRLF line endings (the samples were stored with LF). Returns ``root``."""
    for dest, (src, is_crlf) in FILES.items():
        with open(fixture(src), "rb") as f:
            raw = f.read()
        assert b"\r" not in raw
        if crlf and is_crlf:
            raw = raw.replace(b"\n", b"\r\n")
        path = os.path.join(root, dest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(raw)
    return root


def cli_overrides(root: str) -> list[str]:
    """The issue's command line for the authors' files."""
    return [f"--config.data.parallel_prompts={root}/data/safety_train_translated.json",
            f"--config.data.ssi_prompts={root}/data/ssi/unsafe_train.json",
            f"--config.data.ssi_benign={root}/data/ultrafeedback/monolingual_first1000_{{lang}}.json",
            f"--config.data.kto_pairs={root}/data/training/mixed_dpo_ultra_safety_converted.json",
            f"--config.data.eval_harmful={root}/examples/multijail_1k.json"]
