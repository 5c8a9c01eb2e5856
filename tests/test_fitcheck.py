"""Memory fit check. Sizes are bytes (Python ints/floats, no JAX arrays); exact comparisons are
stated as such, published sizes are compared with a relative tolerance."""
from __future__ import annotations

import math
import re

import pytest

from lasa_jax.infra import fitcheck as fc
from lasa_jax.presets import KNOWN_MODELS
from lasa_jax.model.config import ModelConfig

GiB = 1024 ** 3

# Sizes the model cards / release notes state, in billions of parameters.
PUBLISHED_B = {"llama3.1-8b": 8.03, "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.8,
               "qwen3-8b": 8.2, "qwen3-14b": 14.8, "qwen3-32b": 32.8}

TINY = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, intermediate_size=128)


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_known_models_match_published_sizes(name):
    # Tolerance 1 % relative: published sizes are rounded to 2-3 significant digits.
    got = KNOWN_MODELS[name].num_params() / 1e9
    assert got == pytest.approx(PUBLISHED_B[name], rel=0.01)


def _hf_param_count(m: ModelConfig) -> int:
    """Parameters of the transformers model with these facts, built on the meta device (no
    memory). Count = 1-layer model + (L-1) * (2-layer minus 1-layer), since only layers repeat."""
    import torch
    import transformers
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[m.family]

    def count(layers: int) -> int:
        cfg = cls(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                  head_dim=m.head_dim, intermediate_size=m.intermediate_size,
                  tie_word_embeddings=m.tie_embeddings)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in model.parameters())

    one, two = count(1), count(2)
    return one + (m.num_layers - 1) * (two - one)


@pytest.mark.parametrize("name", ["llama3.1-8b", "qwen2.5-7b", "qwen3-32b"])
def test_params_term_is_exact(name):
    # Exact (integer-valued float) equality: params in bf16 (2 bytes) split over fsdp*tensor,
    # with the parameter count taken from the transformers model, not from our formula.
    model = KNOWN_MODELS[name]
    hf = _hf_param_count(model)
    assert model.num_params() == hf
    for mesh in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1},
                 {"data": 1, "fsdp": 4, "tensor": 2}):
        est = fc.estimate(model, stage="align", mesh_shape=mesh, batch_size=16, seq_len=512,
                          remat="full")
        shards = mesh["fsdp"] * mesh["tensor"]
        assert est.breakdown["params"] == hf * 2 / shards
        assert est.breakdown["gradients"] == hf * 2 / shards
        assert est.breakdown["optimizer"] == 2 * hf * 4 / shards  # AdamW: 2 fp32 moments
    f32 = fc.estimate(model, stage="features", mesh_shape={"data": 8, "fsdp": 1, "tensor": 1},
                      param_dtype="float32", batch_size=8, seq_len=128)
    assert f32.breakdown["params"] == hf * 4  # replicated over data


def test_reference_copy_only_when_per_step():
    kw = dict(stage="align", mesh_shape={"data": 1, "fsdp": 8, "tensor": 1}, batch_size=16,
              seq_len=512, remat="full")
    model = KNOWN_MODELS["qwen2.5-7b"]
    pre = fc.estimate(model, reference="precomputed", **kw)
    per = fc.estimate(model, reference="per_step", **kw)
    assert "reference_params" not in pre.breakdown
    assert per.breakdown["reference_params"] == pre.breakdown["params"]


def test_kv_cache_matches_known_llama3_figure():
    # LLaMA-3-8B keeps 128 KiB of bf16 K/V per token (2 * 32 layers * 8 kv heads * 128 * 2 B),
    # a widely quoted figure; 4 sequences x 8192 tokens = 4 GiB. Exact.
    est = fc.estimate(KNOWN_MODELS["llama3.1-8b"], stage="generate",
                      mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, batch_size=4, seq_len=512,
                      kv_cache_len=8192)
    assert est.breakdown["kv_cache"] == 4 * 8192 * 128 * 1024
    # Tensor parallelism splits kv heads 8 ways; 16 does not divide 8 heads, and
    # lasa_jax.infra.mesh then replicates them, so the cache is whole on every device.
    t8 = fc.estimate(KNOWN_MODELS["llama3.1-8b"], stage="generate",
                     mesh_shape={"data": 1, "fsdp": 1, "tensor": 8}, batch_size=4, seq_len=512,
                     kv_cache_len=8192)
    assert t8.breakdown["kv_cache"] == est.breakdown["kv_cache"] / 8
    t16 = fc.estimate(KNOWN_MODELS["llama3.1-8b"], stage="generate",
                      mesh_shape={"data": 1, "fsdp": 1, "tensor": 16}, batch_size=4,
                      seq_len=512, kv_cache_len=8192)
    assert t16.breakdown["kv_cache"] == est.breakdown["kv_cache"]


def test_activation_terms_follow_remat_and_batch_sharding():
    model = KNOWN_MODELS["qwen3-8b"]
    kw = dict(stage="align", batch_size=32, seq_len=512)
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    saved = {r: fc.estimate(model, mesh_shape=one, remat=r, **kw).breakdown["saved_activations"]
             for r in fc.REMAT_POLICIES}
    assert saved["full"] < saved["dots_no_batch"] < saved["dots"] < saved["none"]
    # full remat keeps only each layer's input: layers * B * T * d * 2 bytes. Exact.
    assert saved["full"] == 36 * 32 * 512 * 4096 * 2
    # Batch sharding over data*fsdp divides every per-token term (exact for divisible batches).
    dp = fc.estimate(model, mesh_shape={"data": 2, "fsdp": 4, "tensor": 1}, remat="dots", **kw)
    assert dp.breakdown["saved_activations"] == saved["dots"] / 8
    assert dp.breakdown["logits"] == fc.estimate(
        model, mesh_shape=one, remat="dots", **kw).breakdown["logits"] / 8


def test_32b_on_one_16gib_device_is_refused_with_a_mesh_suggestion():
    est = fc.estimate(KNOWN_MODELS["qwen2.5-32b"], stage="align",
                      mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, batch_size=16, seq_len=512,
                      remat="none", reference="per_step")
    with pytest.raises(fc.FitError) as info:
        fc.check_fit(est, 16 * GiB)
    msg = str(info.value)
    assert "per device" in msg and "16.0 GiB" in msg
    assert "biggest term: optimizer" in msg
    assert "--config.mesh.fsdp=" in msg and "--config.mesh.tensor=" in msg
    assert "--config.model.remat=" in msg
    assert fc.suggest(est, 16 * GiB) is None  # one device: no other mesh exists


def test_32b_features_message_names_a_mesh_on_the_same_devices():
    est = fc.estimate(KNOWN_MODELS["qwen3-32b"], stage="features",
                      mesh_shape={"data": 8, "fsdp": 1, "tensor": 1}, batch_size=64, seq_len=256)
    with pytest.raises(fc.FitError, match=r"Try --config\.mesh\.data=\d+ --config\.mesh\.fsdp="):
        fc.check_fit(est, 16 * GiB)


def test_feasible_runs_are_accepted():
    tiny = fc.estimate(TINY, stage="align", mesh_shape={"data": 1, "fsdp": 1, "tensor": 1},
                       batch_size=4, seq_len=64, remat="none", reference="per_step")
    fc.check_fit(tiny, 16 * GiB)
    feats = fc.estimate(KNOWN_MODELS["llama3.1-8b"], stage="features",
                        mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, batch_size=32,
                        seq_len=256)
    fc.check_fit(feats, 80 * 10 ** 9)  # an 80 GB GPU
    assert 15 * GiB < feats.total < 20 * GiB  # ~15 GiB of bf16 weights plus one layer's work
    fc.check_fit(feats, None)  # CPU: unknown limit, nothing to check


def test_suggestion_is_the_cheapest_fitting_mesh():
    # 8B full fine-tuning on 8 x 80 GB: pure data parallelism replicates 16 B/param of weights,
    # gradients and AdamW state (~120 GiB), so it must be sharded.
    est = fc.estimate(KNOWN_MODELS["llama3.1-8b"], stage="align",
                      mesh_shape={"data": 8, "fsdp": 1, "tensor": 1}, batch_size=16,
                      seq_len=512, remat="none")
    device = 80 * 10 ** 9
    budget = 0.9 * device
    assert est.total > budget
    best = fc.suggest(est, device)
    assert best is not None and best.total <= budget and best.num_devices == 8
    # Brute force over every (data, fsdp, tensor) and remat with the documented preference:
    # least recompute, then smallest tensor, then smallest fsdp.
    fitting = []
    for data in range(1, 9):
        for fsdp in range(1, 9):
            for tensor in range(1, 9):
                if data * fsdp * tensor != 8 or 16 % (data * fsdp) or 32 % tensor:
                    continue
                for rank, remat in enumerate(["none", "dots", "dots_no_batch", "full"]):
                    e = fc.estimate(est.model, stage="align",
                                    mesh_shape={"data": data, "fsdp": fsdp, "tensor": tensor},
                                    batch_size=16, seq_len=512, remat=remat)
                    if e.total <= budget:
                        fitting.append(((rank, tensor, fsdp), e))
    want = min(fitting, key=lambda x: x[0])[1]
    assert (best.mesh_shape, best.settings["remat"]) == (want.mesh_shape, want.settings["remat"])
    with pytest.raises(fc.FitError, match=re.escape(best.flags())):
        fc.check_fit(est, device)


def test_bad_input():
    with pytest.raises(ValueError, match="stage='train'"):
        fc.estimate(TINY, stage="train", mesh_shape={}, batch_size=1, seq_len=1)
    with pytest.raises(ValueError, match="remat='some'"):
        fc.estimate(TINY, stage="align", mesh_shape={}, batch_size=1, seq_len=1, remat="some")
    with pytest.raises(ValueError, match="unknown axes"):
        fc.estimate(TINY, stage="align", mesh_shape={"model": 2}, batch_size=1, seq_len=1)
    with pytest.raises(ValueError, match="unknown dtype"):
        fc.estimate(TINY, stage="align", mesh_shape={}, batch_size=1, seq_len=1,
                    param_dtype="bf16")


def test_table_and_device_memory():
    est = fc.estimate(KNOWN_MODELS["qwen2.5-14b"], stage="align",
                      mesh_shape={"data": 1, "fsdp": 8, "tensor": 1}, batch_size=16, seq_len=512)
    text = str(est)
    assert "params" in text and "optimizer" in text and text.rstrip().endswith("GiB per device")
    total_line = [ln for ln in text.splitlines() if ln.strip().startswith("total")][0]
    assert float(total_line.split()[1]) == pytest.approx(est.total / GiB, abs=0.006)
    limit = fc.device_memory_bytes()
    assert limit is None or limit > 0  # None on CPU, where JAX reports no limit
    assert math.isclose(sum(est.breakdown.values()), est.total)


# Compiling takes seconds per policy: "none" (where the formula is most detailed) by default.
@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_activation_estimate_tracks_xla_buffer_assignment(remat):
    # Independent reference: XLA's own temp-buffer size for grad(loss) of the project's decoder,
    # compiled (not run) on CPU in float32. The formula is a back-of-envelope model, so the
    # tolerance is a ratio band of [0.7, 1.4] on the activation terms (saved + logits + workspace).
    import jax
    import jax.numpy as jnp
    from lasa_jax.model.transformer import Transformer

    m = ModelConfig(family="qwen2", vocab_size=2048, hidden_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=64, intermediate_size=512, qkv_bias=True)
    B, T = 4, 128
    module = Transformer(m, dtype=jnp.float32, param_dtype=jnp.float32, remat=remat,
                         attention_impl="xla")
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((B, 4), jnp.int32)))

    def loss(p, tokens):
        return jax.nn.log_softmax(module.apply(p, tokens).logits).mean()

    compiled = jax.jit(jax.grad(loss)).lower(
        params, jax.ShapeDtypeStruct((B, T), jnp.int32)).compile()
    xla_temp = compiled.memory_analysis().temp_size_in_bytes
    est = fc.estimate(m, stage="align", mesh_shape={}, param_dtype="float32",
                      compute_dtype="float32", batch_size=B, seq_len=T, remat=remat)
    ours = sum(est.breakdown[k] for k in ("saved_activations", "logits", "workspace"))
    assert 0.7 <= ours / xla_temp <= 1.4, (ours / 2**20, xla_temp / 2**20)
