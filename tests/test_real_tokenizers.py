"""The real tokenizers and chat templates of the paper models (Llama-3.1-Instruct, Qwen2.5-Instruct,
Qwen3; tests/fixtures/real_tokenizers) on tiny random models of the real vocab_size
(tests/real_models.py).

References: transformers' ``apply_chat_template(..., tokenize=True)`` for every templated encoding,
TRL's own KTO tokenisation (``KTOTrainer._prepare_dataset``) for KTO items and their label
masks, transformers' ``generate`` for stopping at the eos ids, llama.cpp's reference
tokenisations for the tokenizers themselves. All comparisons are exact (integer ids); models run
in float32 on CPU."""
import json
import os
import subprocess
import sys
import tempfile
import types

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from authors_files import cli_overrides, fixture, lay_out
from lasa_jax.data.readers import read_eval_prompts, read_kto_pairs
from lasa_jax.method import gate
from lasa_jax.method.gate import PREFIX_SEPARATOR, REFUSAL_PREFIX, split_reasoning
from lasa_jax.method.judges import GuardJudge
from lasa_jax.method.kto_data import encode_item
from lasa_jax.model.generate import eos_ids_of, generate
from lasa_jax.model.lm import load_model
from real_models import FAMILIES, TOKENIZERS, make_real_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEN = ["en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"]
BOS = {"llama3_1_instruct": 128000}
PREFIX = REFUSAL_PREFIX + PREFIX_SEPARATOR


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {f: make_real_model(f, str(tmp_path_factory.mktemp(f))) for f in FAMILIES}


@pytest.fixture(scope="module")
def prompts():
    """One MultiJail-1k prompt per language (the authors' evaluation file)."""
    got = read_eval_prompts(fixture("examples/multijail_1k.json"), TEN)
    first = {}
    for p in got:
        first.setdefault(p.language, p.text)
    return [first[lang] for lang in TEN]


def _hf_ids(tok, messages, gen, **kw):
    ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False, **kw)
    return list(ids)


def _thinking_cases():
    return [(f, False) for f in FAMILIES] + [("qwen3", True)]


def test_tokenizers_match_llama_cpp_reference(model_dirs):
    """The shared tokenizers themselves: llama.cpp's ids for its 46 test strings (the README says
    Llama matches 45, the Qwen files 46)."""
    for family, need in (("llama3_1_instruct", 45), ("qwen2_5_instruct", 46), ("qwen3", 46)):
        tok = transformers.AutoTokenizer.from_pretrained(model_dirs[family])
        base = os.path.join(TOKENIZERS, family, "reference_tokenization")
        # llama.cpp's format: every string followed by "\n__ggml_vocab_test__\n".
        texts = open(base + ".inp", encoding="utf-8").read().split("\n__ggml_vocab_test__\n")[:-1]
        ids = [[int(x) for x in line.split()] for line in open(base + ".out", encoding="utf-8").read().split("\n")]
        ok = sum(tok(t, add_special_tokens=False)["input_ids"] == i for t, i in zip(texts, ids))
        assert len(texts) == 46 and ok >= need, (family, ok)


@pytest.mark.parametrize("family,thinking", _thinking_cases())
def test_every_templated_encoding_equals_hf(model_dirs, prompts, family, thinking):
    """Features (feature_text=chat), SSI gating and generation prompts, KTO items and guard
    prompts all equal apply_chat_template(tokenize=True): one BOS, never two."""
    kw = {"enable_thinking": thinking}
    lm = load_model(model_dirs[family], chat_template_kwargs=kw)
    tok = lm.tokenizer
    users = [[{"role": "user", "content": p}] for p in prompts]
    ref = [_hf_ids(tok, m, True, **kw) for m in users]
    assert lm.token_ids(prompts, chat_template=True) == ref  # features, SSI scoring with feature_text=chat
    assert gate.prompt_ids(lm, prompts, [False] * len(prompts)) == ref  # generation prompts, unflagged
    prefix_ids = tok(PREFIX, add_special_tokens=False)["input_ids"]
    assert gate.prompt_ids(lm, prompts, [True] * len(prompts)) == [r + prefix_ids for r in ref]
    reply = "Sorry, I can't help with that."
    for m, p in zip(users, prompts):
        item = encode_item(tok, p, reply, prefix=None, template_kwargs=kw, max_length=10**6, max_prompt_length=10**6)
        assert item["input_ids"] == _hf_ids(tok, m + [{"role": "assistant", "content": reply}], False, **kw)
    # Guard prompts: the guard's own template (defaults), encoded as evaluate's judge factory does.
    judge = GuardJudge(tokenizer=tok, generate_fn=lambda texts, n: [""] * len(texts))
    guard_text = [judge.guard_prompt(p, reply) for p in prompts]
    assert lm.token_ids(guard_text, add_special_tokens=False) == [
        _hf_ids(tok, m + [{"role": "assistant", "content": reply}], True) for m in users]
    for ids in ref:
        if family in BOS:
            assert ids[0] == BOS[family] and ids.count(BOS[family]) == 1
        else:
            assert 151643 not in ids  # Qwen has no BOS; <|endoftext|> never enters a prompt
    text = tok.decode(ref[0])
    if family == "llama3_1_instruct":  # the template's date/system header is part of every prompt
        assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" in text
    if family == "qwen2_5_instruct":  # and Qwen2.5's default system prompt
        assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_qwen3_prefix_after_the_empty_think_block(model_dirs, prompts):
    from lasa_jax.config import base_config
    assert base_config().model.enable_thinking is False
    off = load_model(model_dirs["qwen3"], chat_template_kwargs={"enable_thinking": False})
    on = load_model(model_dirs["qwen3"], chat_template_kwargs={"enable_thinking": True})
    tok = off.tokenizer
    head = "<|im_start|>assistant\n"
    text_off = tok.decode(gate.prompt_ids(off, prompts[:1], [True])[0])
    text_on = tok.decode(gate.prompt_ids(on, prompts[:1], [True])[0])
    assert text_off.endswith(head + "<think>\n\n</think>\n\n" + PREFIX)
    assert text_on.endswith(head + PREFIX)
    # The template's own default is thinking ON: without the setting the prefix would precede <think>.
    default = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                      tokenize=False)
    assert default.endswith(head)
    # Training puts the prefix at the same place, and the reply after it carries the loss.
    item = encode_item(tok, prompts[0], "Maaf.", prefix=REFUSAL_PREFIX, template_kwargs={"enable_thinking": False})
    ids, mask = np.array(item["input_ids"]), np.array(item["loss_mask"], bool)
    assert tok.decode(ids[~mask]).endswith("<think>\n\n</think>\n\n" + PREFIX)
    assert tok.decode(ids[mask]) == "Maaf.<|im_end|>\n"


def test_reasoning_block_never_reaches_the_judge():
    assert split_reasoning("<think>\nweigh it\n</think>\n\nI can't help.") == ("weigh it", "I can't help.")
    assert split_reasoning("<think>\nstill thinking") == ("still thinking", "")
    assert split_reasoning("Plain answer.") == (None, "Plain answer.")


def _trl_rows(tok, examples, template_kwargs):
    """TRL's KTO tokenisation of unpaired conversational examples, by TRL's own code."""
    from trl import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer

    ds = datasets.Dataset.from_list([{**e, "chat_template_kwargs": template_kwargs} for e in examples])
    args = KTOConfig(output_dir=tempfile.mkdtemp(), max_length=None, report_to=[], use_cpu=True, bf16=False)
    stub = types.SimpleNamespace(_tokenizer=tok, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    return list(KTOTrainer._prepare_dataset(stub, ds, tok, args, "train"))


@pytest.mark.parametrize("family", FAMILIES)
def test_kto_label_masks_match_trl_in_ten_languages(model_dirs, family):
    """Every KTO item equals TRL's tokenisation of the same conversational example, prompt and
    completion split where TRL splits them; with the refusal prefix, the prefix's tokens sit
    between the two and carry no loss. Pairs: the project's fixture pairs (2 per language, all
    ten languages) and the authors' conversational file."""
    kw = {"enable_thinking": False}
    tok = transformers.AutoTokenizer.from_pretrained(model_dirs[family])
    ours = read_kto_pairs(os.path.join(ROOT, "lasa_jax", "data", "fixtures", "kto_pairs.json"))
    picked = [p for lang in TEN for p in [q for q in ours if q.language == lang][:2]]
    pairs = picked + read_kto_pairs(fixture("data/training/mixed_dpo_ultra_safety_converted.sample.json"))
    assert {p.language for p in picked} == set(TEN)
    examples, items = [], []
    for p in pairs:
        msgs = [{"role": r, "content": c} for r, c in p.prompt_messages]
        for completion, label in ((p.chosen, True), (p.rejected, False)):
            examples.append({"prompt": msgs, "completion": [{"role": "assistant", "content": completion}],
                             "label": label})
            items.append((p.prompt_messages, completion))
    trl_rows = _trl_rows(tok, examples, kw)
    assert len(trl_rows) == len(items)
    prefix_ids = tok(PREFIX, add_special_tokens=False)["input_ids"]
    for (messages, completion), row in zip(items, trl_rows):
        p_ids, c_ids = row["prompt_ids"], row["completion_ids"]
        plain = encode_item(tok, messages, completion, prefix=None, template_kwargs=kw,
                            max_length=10**6, max_prompt_length=10**6)
        assert plain["input_ids"] == p_ids + c_ids
        assert plain["loss_mask"] == [0] * len(p_ids) + [1] * len(c_ids)
        flagged = encode_item(tok, messages, completion, prefix=REFUSAL_PREFIX, template_kwargs=kw,
                              max_length=10**6, max_prompt_length=10**6)
        assert flagged["input_ids"] == p_ids + prefix_ids + c_ids
        assert flagged["loss_mask"] == [0] * (len(p_ids) + len(prefix_ids)) + [1] * len(c_ids)


def _always_emit(lm, token: int):
    """Weights under which greedy decoding emits ``token`` at every step: the blocks write nothing
    (o_proj, down_proj = 0), so the final state is the embedding, whose dimension 0 is 1 for every
    token; the final norm keeps only that dimension and the head maps it to ``token`` alone."""
    p = jax_to_np(lm.params)
    p["embed_tokens"][:, 0] = 1.0
    p["layers"]["self_attn"]["o_proj_kernel"][:] = 0.0
    p["layers"]["mlp"]["down_proj_kernel"][:] = 0.0
    p["norm"]["scale"][:] = 0.0
    p["norm"]["scale"][0] = 1.0
    p["lm_head"][:] = 0.0
    p["lm_head"][0, token] = 1.0
    return lm.with_params(jax.tree.map(jnp.asarray, p))


def jax_to_np(tree):
    return jax.tree.map(lambda x: np.array(x, np.float32), tree)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_every_eos_id_of_the_real_generation_config(model_dirs, family, tmp_path):
    lm = load_model(model_dirs[family])
    with open(os.path.join(TOKENIZERS, family, "generation_config.json")) as f:
        listed = json.load(f)["eos_token_id"]
    assert eos_ids_of(lm) == sorted(set(listed) | {lm.tokenizer.eos_token_id})
    prompt = [lm.token_ids(["Hi"], chat_template=True)[0]]
    for token in listed + [100]:  # every listed eos id, then one ordinary token
        forced = _always_emit(lm, token)
        got = generate(forced, prompt, max_new_tokens=4, progress=False)[0]
        out = str(tmp_path / f"m{token}")
        forced.save(out)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=4, do_sample=False,
                          pad_token_id=lm.pad_id)[0, len(prompt[0]):].tolist()
        assert got == ref == ([token] if token in listed else [token] * 4), (family, token)


@pytest.mark.slow  # measured on the shared 2-core box: llama 220 s, qwen2.5 209 s, qwen3 188 s
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_on_the_authors_files(model_dirs, family, tmp_path):
    """The issue's command line: the tiny config, --config.model.path at a real-tokenizer model,
    and the authors' files as published (CRLF where the repository has it), every stage. Their
    benign SSI files exist for en and jw only, hence data.languages=en,jv."""
    root = lay_out(str(tmp_path / "authors"))
    cmd = [sys.executable, "-m", "lasa_jax.main", "--config=configs/tiny.py", f"--config.workdir={tmp_path / 'run'}",
           f"--config.model.path={model_dirs[family]}", *cli_overrides(root),
           "--config.data.languages=en,jv", "--config.ssi.train_languages=en", "--config.progress=False",
           "--config.bottleneck.max_queries=8", "--config.bottleneck.bootstrap_draws=20",
           "--config.align.batch_size=2", "--config.align.max_steps=2", "--config.align.max_length=96",
           "--config.align.max_prompt_length=64", "--config.align.checkpoint_every=2",
           "--config.evaluate.max_new_tokens=8", "--config.evaluate.max_prompts=2", "--config.evaluate.batch_size=4",
           "--config.mesh.fsdp=1"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": ROOT}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert report["languages"] == ["en", "jv"] and set(report["models"]) == {"aligned", "base"}
    gens = [json.loads(line) for line in (run / "evaluate" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * 2 * 2 * 2  # 2 models x (harmful, benign) x 2 languages x 2 prompts
    ssi = json.loads((run / "ssi" / "report.json").read_text())
    assert ssi["layer"] >= 1
    assert json.loads((run / "align" / "summary.json").read_text())["num_items"] == 56
