"""Sharded execution equals single-device execution (float32, 8 simulated CPU devices).

Tolerance: 1e-5 absolute on logits and on all-layer last-token features."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lasa_jax.infra import mesh as shd
from lasa_jax.model.lm import load_model
from lasa_jax.model.checkpoint import flatten
from tests.hf_models import make_hf_model, save_hf_model

TOL = 1e-5
MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]


@pytest.fixture(scope="module", params=["llama", "qwen3", "gqa_kv2"])
def checkpoint(request, tmp_path_factory):
    if request.param == "llama":
        model = make_hf_model("llama3_f8", num_attention_heads=8, num_key_value_heads=8)
    elif request.param == "qwen3":
        model = make_hf_model("qwen3", num_attention_heads=8, num_key_value_heads=4)
    else:  # 2 KV heads: fewer than a tensor axis of 4 would need; the KV projections replicate
        model = make_hf_model("llama3_f8", num_attention_heads=8, num_key_value_heads=2)
    d = str(tmp_path_factory.mktemp(request.param))
    return save_hf_model(model, d, max_shard_size="200KB")


def _batch(vocab, rng):
    tokens = rng.integers(0, vocab, (8, 96)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[::2, :17] = False   # left padding
    mask[1::4, -23:] = False  # right padding
    return tokens, mask


def test_logits_and_features_equal_single_device(checkpoint):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    tokens, mask = _batch(512, np.random.default_rng(0))
    single = load_model(checkpoint, tokenizer=False)
    ref_logits = np.asarray(single.logits(tokens, mask))
    ref_feats = np.asarray(single.features(tokens, mask))
    for shape in MESHES:
        mesh = shd.make_mesh(*shape)
        lm = load_model(checkpoint, tokenizer=False, mesh=mesh)
        logits = lm.logits(tokens, mask)
        feats = lm.features(tokens, mask)
        np.testing.assert_allclose(np.asarray(logits)[mask], ref_logits[mask], atol=TOL, rtol=0,
                                   err_msg=f"logits on mesh {shape}")
        np.testing.assert_allclose(np.asarray(feats), ref_feats, atol=TOL, rtol=0,
                                   err_msg=f"features on mesh {shape}")


def test_params_are_actually_sharded(checkpoint):
    lm = load_model(checkpoint, tokenizer=False, mesh=shd.make_mesh(1, 4, 2))
    flat = flatten(lm.params)
    q = flat["layers/self_attn/q_proj_kernel"]  # (layers, embed, heads, head_dim)
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 4, q.shape[2] // 2, q.shape[3])
    k = flat["layers/self_attn/k_proj_kernel"]
    kv_heads = k.shape[2]
    expected = "tensor" if kv_heads % 2 == 0 else None
    assert k.sharding.spec == P(None, "fsdp", expected, None)


def test_logical_rules_drop_axes_that_do_not_divide():
    mesh = shd.make_mesh(1, 2, 4)
    # 2 KV heads on a tensor axis of 4: replicated instead of failing.
    assert shd.logical_spec(("layers", "embed", "kv_heads", "head_dim"), (3, 64, 2, 16), mesh) == P(None, "fsdp", None, None)
    assert shd.logical_spec(("vocab", "embed"), (512, 64), mesh) == P("tensor", "fsdp")
    assert shd.logical_spec(("batch", "length"), (8, 10), mesh) == P("fsdp", None)


def test_mesh_shape_errors():
    with pytest.raises(shd.MeshError, match="at most one of data/fsdp/tensor may be -1"):
        shd.resolve_mesh_shape(-1, -1, 1, 8)
    with pytest.raises(shd.MeshError, match="8 devices are not divisible by 3"):
        shd.resolve_mesh_shape(3, -1, 1, 8)
    with pytest.raises(shd.MeshError, match=r"data\*fsdp\*tensor = 4 but there are 8 devices"):
        shd.resolve_mesh_shape(2, 2, 1, 8)
    assert shd.resolve_mesh_shape(2, -1, 2, 8) == (2, 2, 2)


def test_decode_tensor_width_rule():
    GB = 1 << 30
    # Fits in half a device: replicated; else the smallest power-of-two split that does.
    assert shd.decode_tensor_size(10 * GB, 8, 1, 80 * GB) == 1
    assert shd.decode_tensor_size(64 * GB, 8, 1, 80 * GB) == 2
    assert shd.decode_tensor_size(140 * GB, 8, 1, 80 * GB) == 4
    assert shd.decode_tensor_size(10_000 * GB, 8, 1, 80 * GB) == 8
    # Memory unknown (CPU): the training mesh's tensor width.
    assert shd.decode_tensor_size(10 * GB, 8, 2, None) == 2
    mesh = shd.decode_mesh(shd.make_mesh(1, 4, 2), 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
