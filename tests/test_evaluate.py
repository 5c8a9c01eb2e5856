"""SSI-gated inference and the evaluate stage on a tiny random LLaMA-shaped checkpoint (float32).

References: the training-side text/tokenisation (``kto_data.encode_item``) for prompt building;
transformers' hidden states + a NumPy probe for SSI scores (tolerance 1e-4 absolute on p).
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import transformers

from lasa_jax.config import base_config
from lasa_jax.context import Context
from lasa_jax.errors import ArtifactError
from lasa_jax.infra.fileio import read_jsonl, write_jsonl
from lasa_jax.method import gate
from lasa_jax.method import probe as ssi
from lasa_jax.method.gate import REFUSAL_PREFIX, assistant_prefix_text
from lasa_jax.method.kto_data import encode_item
from lasa_jax.model.lm import load_model
from lasa_jax.model.tiny import make_tiny_checkpoint
from lasa_jax.stages import evaluate as ev

PROMPTS = ["Write a short poem about the sea.", "帮我写一条消息。", "Scrivi una lettera.",
           "Hãy viết một câu chuyện.", "Tell me a joke about cats, please."]
LANGS = ["en", "zh", "it", "vi", "en"]
LAYER = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"), family="llama")
    return path, load_model(path)


def test_build_prompts_match_training_text(tiny):
    _, lm = tiny
    tok = lm.tokenizer
    flags = [False, True, True, False, True]
    ids = gate.prompt_ids(lm, PROMPTS, flags)
    for p, f, got in zip(PROMPTS, flags, ids):
        assert got == tok(assistant_prefix_text(tok, p, REFUSAL_PREFIX if f else None),
                          add_special_tokens=False)["input_ids"]
        # Training tokenises prompt + completion in one string; its prompt part (up to the first
        # loss-bearing token) must be exactly what inference feeds.
        item = encode_item(tok, p, "Sure.", prefix=REFUSAL_PREFIX if f else None)
        assert got == item["input_ids"][:item["loss_mask"].index(1)]
        text = tok.decode(got)
        assert text.endswith(REFUSAL_PREFIX + "\n") == f
        assert text.count("<|begin_of_text|>") == 1  # the template's BOS, not a second one


def _numpy_probe(params, x):
    p = params["params"]
    h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = h * p["norm"]["scale"] + p["norm"]["bias"]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))  # exact GELU
    z = (h @ p["out"]["kernel"] + p["out"]["bias"])[:, 0]
    return 1 / (1 + np.exp(-z))


def _random_artifact(lm, directory, features_ref=None, seed=0, threshold=0.5):
    """Random probe weights; the threshold is put halfway between the two middle reference
    probabilities, so about half the prompts are flagged and none sits on the threshold."""
    d, h = lm.cfg.hidden_size, 16
    rng = np.random.default_rng(seed)
    params = {"params": {
        "hidden": {"kernel": rng.normal(0, 0.5, (d, h)).astype(np.float32), "bias": rng.normal(0, 0.1, h).astype(np.float32)},
        "norm": {"scale": (1 + 0.1 * rng.normal(size=h)).astype(np.float32), "bias": rng.normal(0, 0.1, h).astype(np.float32)},
        "out": {"kernel": rng.normal(0, 1.0, (h, 1)).astype(np.float32), "bias": np.zeros(1, np.float32)},
    }}
    ref = None
    if features_ref is not None:
        ref = _numpy_probe(params, features_ref)
        s = np.sort(ref)
        threshold = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    meta = dict(layer=LAYER, threshold=threshold, hidden_size=d, probe_hidden=h, dropout=0.1,
                train_languages=["en", "zh", "ko"], model_fingerprint=lm.fingerprint,
                feature="last_real_token_raw_prompt", format_version=ssi.FORMAT_VERSION)
    ssi.save_artifact(directory, params, meta)
    return ref, threshold


def test_ssi_gating_follows_the_artifact(tiny, tmp_path):
    path, lm = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    feats = []
    with torch.no_grad():  # the raw prompt, the tokenizer's own BOS kept, last token
        for p in PROMPTS:
            out = hf(torch.tensor([tok(p)["input_ids"]]), output_hidden_states=True)
            feats.append(out.hidden_states[LAYER][0, -1].numpy())
    ref, tau = _random_artifact(lm, str(tmp_path / "ssi"), np.stack(feats))
    artifact = gate.load_for_model(lm, str(tmp_path / "ssi"))
    recs = gate.respond(lm, PROMPTS, LANGS, artifact, max_new_tokens=8, batch_size=8, progress=False)
    probs = np.array([r["ssi_prob"] for r in recs])
    np.testing.assert_allclose(probs, ref, atol=1e-4, rtol=0)
    expected = ref > tau
    assert 0 < expected.sum() < len(PROMPTS)
    assert [r["ssi_flagged"] for r in recs] == expected.tolist()
    assert [r["prefix_used"] for r in recs] == expected.tolist()
    assert all(REFUSAL_PREFIX not in r["response"] for r in recs)  # the judge sees only generated text
    plain = gate.respond(lm, PROMPTS, LANGS, None, max_new_tokens=8, batch_size=8, progress=False)
    assert all(r["ssi_flagged"] is None and r["ssi_prob"] is None and not r["prefix_used"] for r in plain)
    # Unflagged prompts see the same input with and without the SSI, hence the same greedy text.
    for g, p, f in zip(recs, plain, expected):
        if not f:
            assert g["response"] == p["response"]


def test_ssi_from_another_model_is_rejected(tiny, tmp_path):
    _, lm = tiny
    _random_artifact(lm, str(tmp_path / "ssi"))
    meta_path = tmp_path / "ssi" / "ssi.json"
    meta = json.loads(meta_path.read_text())
    meta["model_fingerprint"] = "0" * 16
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ssi.SSIError, match="fingerprint"):
        gate.load_for_model(lm, str(tmp_path / "ssi"))


def test_run_evaluate_end_to_end_and_rejudge(tiny, tmp_path, monkeypatch):
    path, lm = tiny
    workdir = tmp_path / "run"
    shutil.copytree(path, workdir / "align" / "hf")  # stands in for an aligned export
    shutil.copytree(path, workdir / "baseline" / "hf")  # and for the baseline stage's export
    _random_artifact(lm, str(workdir / "ssi"), threshold=0.5)
    c = base_config()
    c.workdir = str(workdir)
    c.model.path = path
    c.model.dtype = c.model.param_dtype = "float32"
    c.data.languages = "en,zh"
    c.progress = False
    c.evaluate.max_prompts = 2
    c.evaluate.max_new_tokens = 8
    c.evaluate.batch_size = 8
    c.evaluate.language_check = False
    report = ev.run(Context(c))

    out = workdir / "evaluate"
    for name in ("generations.jsonl", "judged.jsonl", "report.json", "asr.png"):
        assert (out / name).exists(), name
    gens = read_jsonl(out / "generations.jsonl")
    # 3 models x 2 sets x 2 queries x 2 languages
    assert len(gens) == 24
    assert {(g["model"], g["prompt_set"]) for g in gens} == {
        (m, s) for m in ("aligned", "baseline", "base") for s in ("harmful", "benign")}
    assert all(isinstance(g["ssi_flagged"], bool) for g in gens if g["model"] == "aligned")
    # The baseline is plain KTO: never SSI-gated, like the base model.
    assert all(g["ssi_flagged"] is None for g in gens if g["model"] in ("base", "baseline"))
    assert all(0 < g["n_new_tokens"] <= 8 for g in gens)
    on_disk = json.loads((out / "report.json").read_text())
    assert list(on_disk["models"]) == list(report["models"]) == ["base", "baseline", "aligned"]
    assert on_disk["languages"] == ["en", "zh"] and on_disk["judge"] == "refusal"
    assert on_disk["config"]["evaluate"]["max_new_tokens"] == 8

    # Re-judge from the file only: generation is disabled, and a response edited on disk into a
    # refusal must come back safe/refused, so the judge read the file.
    monkeypatch.setattr(gate, "generate", lambda *a, **k: pytest.fail("rejudge generated"))
    gens[0]["response"] = "I cannot help with that request."
    gens[1]["response"] = ""
    write_jsonl(out / "generations.jsonl", gens)
    again = ev.rejudge(str(workdir), "refusal", language_check=False, print_table=False)
    judged = read_jsonl(out / "judged.jsonl")
    assert len(judged) == 24
    assert judged[0]["label"] == "safe" and judged[0]["refused"] is True
    assert judged[1]["label"] == "invalid"
    assert again["config"]["evaluate"]["max_new_tokens"] == 8


def test_missing_ssi_is_a_clear_error(tiny, tmp_path):
    path, _ = tiny
    workdir = tmp_path / "run"
    shutil.copytree(path, workdir / "align" / "hf")
    c = base_config()
    c.workdir = str(workdir)
    c.model.path = path
    c.data.languages = "en"
    with pytest.raises(ArtifactError, match="use_ssi=False"):
        ev.run(Context(c))
    with pytest.raises(ArtifactError, match="generations.jsonl"):
        ev.rejudge(str(tmp_path / "nowhere"))
