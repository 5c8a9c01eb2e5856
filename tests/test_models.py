"""Model ports against transformers' PyTorch models (float32, CPU).

Tolerance: 1e-4 absolute on logits and on every HF hidden state (observed ~2e-6)."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lasa_jax.model.lm import load_model, pad_batch
from lasa_jax.model.checkpoint import CheckpointError
from lasa_jax.model.config import ConfigError, from_hf_dict
from tests.hf_models import make_hf_model, save_hf_model

TOL = 1e-4
SEQ = 320  # long prompts: rope bugs hide in short ones; > original_max_position_embeddings


@pytest.fixture(scope="module", params=["llama3_f8", "llama3_f32_tied", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    directory = str(tmp_path_factory.mktemp(request.param))
    # qwen2 goes through the sharded-index path.
    save_hf_model(model, directory, max_shard_size="100KB" if request.param == "qwen2" else None)
    return request.param, model, directory


def _mixed_padding_batch(rng, vocab):
    """Row 0 left-padded, row 1 right-padded, row 2 unpadded."""
    lengths = [SEQ - 45, SEQ - 30, SEQ]
    seqs = [rng.integers(0, vocab, n).tolist() for n in lengths]
    tokens = np.zeros((3, SEQ), np.int64)
    mask = np.zeros((3, SEQ), bool)
    tokens[0, 45:], mask[0, 45:] = seqs[0], True
    tokens[1, :SEQ - 30], mask[1, :SEQ - 30] = seqs[1], True
    tokens[2], mask[2] = seqs[2], True
    return seqs, tokens, mask


def test_logits_and_hidden_states_match_transformers(checkpoint):
    name, hf, directory = checkpoint
    lm = load_model(directory, tokenizer=False)
    rng = np.random.default_rng(0)
    _, tokens, mask = _mixed_padding_batch(rng, lm.cfg.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                 output_hidden_states=True)
    out = lm.module.apply({"params": lm.params}, jnp.asarray(tokens), jnp.asarray(mask), capture="full")
    np.testing.assert_allclose(np.asarray(out.logits)[mask], ref.logits.numpy()[mask], atol=TOL, rtol=0)
    assert len(ref.hidden_states) == lm.cfg.num_layers + 1
    for k, h in enumerate(ref.hidden_states):
        np.testing.assert_allclose(np.asarray(out.hidden[k])[mask], h.numpy()[mask], atol=TOL, rtol=0,
                                   err_msg=f"{name}: hidden_states[{k}]")


def test_padded_rows_equal_unpadded_and_features_pick_last_real_token(checkpoint):
    name, hf, directory = checkpoint
    lm = load_model(directory, tokenizer=False)
    seqs, tokens, mask = _mixed_padding_batch(np.random.default_rng(1), lm.cfg.vocab_size)
    feats = np.asarray(lm.features(tokens, mask))  # (L+1, 3, d)
    logits = np.asarray(lm.logits(tokens, mask))
    for i, seq in enumerate(seqs):
        alone = np.asarray(seq)[None]
        with torch.no_grad():
            ref = hf(torch.tensor(alone), output_hidden_states=True)
        ref_last = np.stack([h[0, -1].numpy() for h in ref.hidden_states])
        np.testing.assert_allclose(feats[:, i], ref_last, atol=TOL, rtol=0, err_msg=f"{name} row {i}")
        np.testing.assert_allclose(logits[i][mask[i]], ref.logits[0].numpy(), atol=TOL, rtol=0)


def test_packed_features_equal_each_prompt_alone_in_transformers(checkpoint):
    """Sequence packing (several prompts per row, segments kept apart, positions restarting):
    every prompt's per-layer feature equals transformers' hidden states of that prompt run
    alone (float32, atol 1e-4). Lengths up to SEQ so that rope positions past the original
    context are exercised inside a row, not only at its start."""
    from lasa_jax.model.packing import pack
    name, hf, directory = checkpoint
    lm = load_model(directory, tokenizer=False)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, lm.cfg.vocab_size, n).tolist() for n in (SEQ, 7, 130, 1, 64, 200, 33, 90)]
    batches = pack(seqs, rows=2, pad_id=0)
    assert any(len({r for _, r, _ in b.items}) < len(b.items) for b in batches)  # rows hold several
    seen = set()
    for b in batches:
        feats = np.asarray(lm.packed_features(b))
        for i, r, k in b.items:
            with torch.no_grad():
                ref = hf(torch.tensor([seqs[i]]), output_hidden_states=True)
            ref_last = np.stack([h[0, -1].numpy() for h in ref.hidden_states])
            np.testing.assert_allclose(feats[:, r, k], ref_last, atol=TOL, rtol=0, err_msg=f"{name} prompt {i}")
            seen.add(i)
    assert seen == set(range(len(seqs)))


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
    name, _, directory = checkpoint
    lm = load_model(directory, tokenizer=False)
    out = lm.save(str(tmp_path / "new" / "parent" / "export"), max_shard_bytes=200_000)
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, lm.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ref = hf2(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lm.logits(tokens, np.ones_like(tokens, bool))), ref, atol=TOL, rtol=0)
    reloaded = load_model(out, tokenizer=False)
    from lasa_jax.model.checkpoint import flatten
    fa, fb = flatten(lm.params), flatten(reloaded.params)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_bf16_load_casts_tensor_by_tensor(checkpoint):
    _, _, directory = checkpoint
    lm = load_model(directory, dtype="bfloat16", tokenizer=False)
    leaf = lm.params["layers"]["mlp"]["up_proj_kernel"]
    assert leaf.dtype == jnp.bfloat16
    out = lm.logits(np.ones((1, 8), np.int32), np.ones((1, 8), bool))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("llama_bad"))
    save_hf_model(make_hf_model("llama3_f8"), d, max_shard_size="100KB")
    return d


def _copy(src, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_file_is_named(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    victim = sorted(f for f in os.listdir(d) if f.startswith("model-"))[1]
    os.remove(os.path.join(d, victim))
    with pytest.raises(CheckpointError, match=victim):
        load_model(d, tokenizer=False)


def test_wrong_tensor_shape_is_reported(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg_path = os.path.join(d, "config.json")
    raw = json.load(open(cfg_path))
    raw["intermediate_size"] = 96  # every MLP tensor now mismatches
    json.dump(raw, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj\.weight: shape \[128, 64\] != expected \[96, 64\]"):
        load_model(d, tokenizer=False)


def test_missing_and_unexpected_tensors_listed_together(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    raw = json.load(open(os.path.join(d, "config.json")))
    raw["num_hidden_layers"] = 4  # layer 3 missing
    raw["tie_word_embeddings"] = True  # lm_head now unexpected
    json.dump(raw, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError) as e:
        load_model(d, tokenizer=False)
    msg = str(e.value)
    assert "model.layers.3.mlp.up_proj.weight" in msg and "unexpected tensors: ['lm_head.weight']" in msg
    assert "\n" not in msg


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    raw = make_hf_model("qwen2").config.to_dict()
    raw["architectures"] = ["Qwen2ForCausalLM"]
    json.dump(raw, open(d / "config.json", "w"))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        load_model(str(d), tokenizer=False)


@pytest.mark.parametrize("patch,field", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_knob": 3}, "some_new_knob"),
])
def test_unsupported_configs_name_the_field(patch, field):
    raw = make_hf_model("qwen2").config.to_dict()
    raw["architectures"] = ["Qwen2ForCausalLM"]
    raw.update(patch)
    with pytest.raises(ConfigError, match=field) as e:
        from_hf_dict(raw, where="x/config.json")
    assert str(e.value).startswith("x/config.json") and "\n" not in str(e.value)


def test_v4_and_v5_rope_layouts_read_the_same():
    v5 = make_hf_model("llama3_f8").config.to_dict()
    v5["architectures"] = ["LlamaForCausalLM"]
    v4 = dict(v5)
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope
    a, b = from_hf_dict(v5), from_hf_dict(v4)
    assert a == b and a.rope.kind == "llama3" and a.rope.factor == 8.0


def test_config_checkpoint_mismatch_is_an_error(llama_dir):
    with pytest.raises(ConfigError, match="num_layers: config says 32, checkpoint has 3"):
        load_model(llama_dir, tokenizer=False, expect={"num_layers": 32, "hidden_size": 64})


def test_layer_out_of_range(llama_dir):
    lm = load_model(llama_dir, tokenizer=False)
    with pytest.raises(ValueError, match=r"layer\(s\) \[4\] out of range: this model has layers 0..3"):
        lm.features(np.ones((1, 4), np.int32), np.ones((1, 4), bool), [1, 4])


def test_pad_batch_left_and_right():
    tokens, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, padding_side="left", pad_to_multiple=4, batch_multiple=4)
    assert tokens.shape == (4, 4)
    np.testing.assert_array_equal(tokens[:2], [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask[:2], [[0, 1, 1, 1], [0, 0, 0, 1]])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.0)])
def test_cudnn_mask_form_equals_dense_mask(family, dtype, tol, monkeypatch):
    """``attention_impl="cudnn"`` expresses right padding as causal + per-row lengths (the only
    mask forms cuDNN's kernel takes). The XLA implementation accepts that form too: on CPU, with
    cudnn swapped for xla, its logits at real tokens equal the dense-mask path's (float32: 1e-5
    absolute; bf16: the same bf16 ops on the same values, so exactly equal)."""
    import jax
    from lasa_jax.model.tiny import tiny_model_config
    from lasa_jax.model.transformer import Transformer, init_params
    cfg = tiny_model_config(family, 256)
    params = init_params(cfg, jax.random.key(1), dtype=dtype)
    lengths = [48, 30, 7, 1]
    tokens, mask = pad_batch([list(range(1, n + 1)) for n in lengths], 0, padding_side="right", length=48)
    dense = Transformer(cfg, dtype=dtype, param_dtype=dtype).apply({"params": params}, tokens, mask).logits
    calls = []
    real_attention = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kw):
        calls.append((implementation, "mask" in kw, kw.get("query_seq_lengths") is not None))
        return real_attention(*args, implementation="xla" if implementation == "cudnn" else implementation, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    lengths_form = Transformer(cfg, dtype=dtype, param_dtype=dtype, attention_impl="cudnn").apply(
        {"params": params}, tokens, mask).logits
    assert calls and all(c == ("cudnn", False, True) for c in calls)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(lengths_form)[real], np.asarray(dense)[real], atol=tol, rtol=0)
