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
    # Exact (integer-valued float) equality, with the parameter count taken from the transformers
    # model, not from our formula: align holds float32 masters (4 bytes) and two float32 AdamW
    # moments, a bf16 compute copy and bf16 gradients (2 bytes each), split over fsdp*tensor.
    model = KNOWN_MODELS[name]
    hf = _hf_param_count(model)
    assert model.num_params() == hf
    for mesh in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1},
                 {"data": 1, "fsdp": 4, "tensor": 2}):
        # 512 sequences of 512 tokens: the backward phase (activations) is the peak.
        est = fc.estimate(model, stage="align", mesh_shape=mesh, batch_size=512, seq_len=512,
                          remat="full")
        shards = mesh["fsdp"] * mesh["tensor"]
        assert "params" not in est.breakdown  # the base weights are released before training
        assert est.breakdown["master_params"] == hf * 4 / shards
        assert est.breakdown["optimizer"] == 2 * hf * 4 / shards
        assert est.breakdown["compute_params"] == hf * 2 / shards
        assert est.breakdown["gradients"] == hf * 2 / shards
        assert "gradient_accumulator" not in est.breakdown  # one micro-batch
        acc = fc.estimate(model, stage="align", mesh_shape=mesh, batch_size=512, seq_len=512,
                          remat="full", grad_accum=4)
        assert acc.breakdown["gradient_accumulator"] == hf * 4 / shards
        # Masters in the compute dtype (no mixed precision): no separate compute copy.
        same = fc.estimate(model, stage="align", mesh_shape=mesh, batch_size=512, seq_len=512,
                           remat="full", master_dtype="bfloat16")
        assert "compute_params" not in same.breakdown and same.breakdown["optimizer"] == 2 * hf * 2 / shards
    f32 = fc.estimate(model, stage="features", mesh_shape={"data": 8, "fsdp": 1, "tensor": 1},
                      param_dtype="float32", batch_size=8, seq_len=128)
    assert f32.breakdown["params"] == hf * 4  # replicated over data


def test_reference_copy_only_when_per_step():
    # Pure data parallelism (no FSDP gathers): the reference is one whole copy in the param
    # dtype (bf16, 2 bytes). Exact.
    kw = dict(stage="align", mesh_shape={"data": 8, "fsdp": 1, "tensor": 1}, batch_size=16,
              seq_len=512, remat="full")
    model = KNOWN_MODELS["qwen2.5-7b"]
    pre = fc.estimate(model, reference="precomputed", **kw)
    per = fc.estimate(model, reference="per_step", **kw)
    assert "reference_params" not in pre.breakdown
    assert per.breakdown["reference_params"] == model.num_params() * 2


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
    backward = lambda **k: fc.estimate(model, **kw, **k).phases["backward"]
    saved = {r: backward(mesh_shape=one, remat=r)["saved_activations"] for r in fc.REMAT_POLICIES}
    assert saved["full"] < saved["dots_no_batch"] < saved["dots"] < saved["none"]
    # full remat keeps only each layer's input: layers * B * T * d * 2 bytes. Exact.
    assert saved["full"] == 36 * 32 * 512 * 4096 * 2
    # Batch sharding over data*fsdp divides every per-token term (exact for divisible batches).
    whole = backward(mesh_shape=one, remat="dots")["loss_working_set"]
    dp = backward(mesh_shape={"data": 8, "fsdp": 1, "tensor": 1}, remat="dots")
    assert dp["saved_activations"] == saved["dots"] / 8
    assert dp["loss_working_set"] == whole / 8
    # Under FSDP the loss also holds the LM head gathered whole (bf16, untied 151936 x 4096).
    fs = backward(mesh_shape={"data": 2, "fsdp": 4, "tensor": 1}, remat="dots")
    assert fs["saved_activations"] == saved["dots"] / 8
    assert fs["loss_working_set"] == whole / 8 + 151936 * 4096 * 2
    # Micro-batches: activations are those of one micro-batch.
    assert backward(mesh_shape=one, remat="dots", grad_accum=4)["saved_activations"] == saved["dots"] / 4
    # The breakdown is the larger phase: replicated weights (pure data parallelism) make the
    # update (bf16 gradients + their float32 cast, 6 bytes per parameter) the peak.
    upd = fc.estimate(model, mesh_shape={"data": 8, "fsdp": 1, "tensor": 1}, remat="full", **kw)
    assert upd.breakdown["gradients_float32"] == model.num_params() * 4
    assert upd.total == pytest.approx(sum(upd.breakdown.values()))


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


def _xla_and_estimate(*, dtype, mesh_shape, remat="full", batch=16, grad_accum=1, seq=128,
                      reference="precomputed"):
    """Compile the real align step (lasa_jax.method.trainer, shapes only) for a small qwen2-style
    model on the 8 simulated devices; return XLA's memory analysis and the fit check's estimate."""
    from lasa_jax.config import base_config
    from lasa_jax.infra.mesh import make_mesh
    from lasa_jax.method.trainer import Trainer, abstract_model, batch_shapes

    m = ModelConfig(family="qwen2", vocab_size=8192, hidden_size=512, num_layers=4, num_heads=8,
                    num_kv_heads=2, head_dim=64, intermediate_size=1536, qkv_bias=True)
    lm = abstract_model(m, make_mesh(*mesh_shape), dtype=dtype, param_dtype=dtype, remat=remat)
    a = base_config().align
    a.batch_size, a.grad_accum, a.reference = batch, grad_accum, reference
    trainer = Trainer(lm, a, total_steps=10, per_step_reference=reference == "per_step")
    shapes = batch_shapes(batch, grad_accum, seq, precomputed=reference == "precomputed")
    stats = trainer.lower(shapes).compile().memory_analysis()
    est = fc.estimate(m, stage="align", mesh_shape=dict(zip(fc.MESH_AXES, mesh_shape)), param_dtype=dtype,
                      compute_dtype=dtype, batch_size=batch, seq_len=seq, remat=remat, reference=reference,
                      master_dtype="float32", grad_accum=grad_accum)
    return stats, est, shapes


def _xla_total(stats) -> int:
    # Outputs aliased to donated arguments (the masters and moments) are the same buffers.
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


# The paper configs' policy (FSDP over every device, remat "full", one micro-batch, precomputed
# reference) by default; remat "none" with two micro-batches is opt-in (another minute).
@pytest.mark.parametrize("remat, grad_accum", [("full", 1), pytest.param("none", 2, marks=pytest.mark.slow)])
def test_align_estimate_matches_xla_memory_analysis(remat, grad_accum):
    """Independent reference: XLA's buffer assignment for the compiled align step on a (1, 8, 1)
    mesh, per device. float32 compute (and masters): XLA's CPU backend upcasts bf16 matmul
    operands to float32, so a bf16 program is not what an accelerator runs; in float32 it is.
    Tolerance: the estimate within 15 % of arguments + outputs - aliased outputs + temporaries
    (XLA packs buffers with some fragmentation; the estimate counts live bytes)."""
    stats, est, _ = _xla_and_estimate(dtype="float32", mesh_shape=(1, 8, 1), remat=remat,
                                      grad_accum=grad_accum, batch=16 * grad_accum)
    xla = _xla_total(stats)
    assert 0.85 <= est.total / xla <= 1.15, (est.total / 2**20, xla / 2**20, str(est))


def test_mixed_precision_state_is_what_xla_holds():
    """bf16 compute, float32 masters: XLA's argument bytes per device are the masters and both
    AdamW moments in float32 (the fit check's master_params + optimizer) plus the batch, and
    the outputs alias them (donated). Tolerance 0.5 %: the norm scales and q/k/v biases (7,680
    of 20.4M parameters) are replicated, not sharded, which the estimate ignores (+0.26 %)."""
    import math

    stats, est, shapes = _xla_and_estimate(dtype="bfloat16", mesh_shape=(1, 8, 1))
    batch = sum(math.prod(s.shape) * s.dtype.itemsize for s in shapes.values()) / 8
    state = est.breakdown["master_params"] + est.breakdown["optimizer"]
    assert state == 12 * est.model.num_params() / 8  # 4 + 2 x 4 bytes per parameter, 8 shards
    assert stats.argument_size_in_bytes == pytest.approx(state + batch, rel=5e-3)
    assert stats.alias_size_in_bytes == pytest.approx(state, rel=5e-3)
    # A bf16-master run would hold half: the dtypes are really what the trainer allocates.
    assert est.breakdown["compute_params"] == 2 * est.model.num_params() / 8


def test_attention_cost_of_llama3_8b_from_its_published_shape():
    """ModelConfig.attention_cost, which sizes packed KTO rows: for Llama-3.1-8B, from the model
    card's 8,030,261,248 parameters, hand-derived: attention per key 4 * 32 heads * 128 * 32
    layers FLOPs; matmul FLOPs per token 2 * (8,030,261,248 - 128,256 * 4,096), all weights but
    the input embedding table. Tolerance 1e-6 relative (float arithmetic)."""
    want = 4 * 32 * 128 * 32 / (2 * (8_030_261_248 - 128_256 * 4_096 - 4_096))  # - the final norm
    assert math.isclose(KNOWN_MODELS["llama3.1-8b"].attention_cost(), want, rel_tol=1e-6)
    # At 512 keys attention is ~2 % of an 8B token's FLOPs; at a toy shape it dominates.
    assert 0.01 < 512 * want < 0.03 and TINY.attention_cost() * 192 > 0.5
