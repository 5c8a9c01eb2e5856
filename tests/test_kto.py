"""Stage 3 losses against independent references.

KTO: TRL 1.16 has no standalone `kto_loss`; the formula lives inline in
`trl.trainer.kto_trainer.KTOTrainer._compute_loss`. We call that real method with a stub `self`
(beta, loss_type, weights, an identity accelerator) and a stub model whose "log_probs" are the
random per-sequence log-probs, so TRL's own code computes the loss, the KL reference point and the
metrics. Inputs are float64 NumPy draws cast to float32 for both sides; tolerance 1e-6 absolute.
"""

import collections
import functools
import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lasa_jax.method.kto import alignment_loss, completion_logps, kto_loss, token_logps

import trl
import trl.trainer.kto_trainer as trl_kto

jax.config.update("jax_platforms", "cpu")

# The reference is a private method of TRL's trainer; pyproject pins trl to the minor release whose
# internals this stub reproduces. If it moves, fail here, loudly, rather than compare with nothing.
TRL_PINNED = "1.16"


class _Model:
    """Stands in for the causal LM: returns fixed per-sequence log-probs as a (B, 1) 'per-token' tensor."""

    training = True

    def __init__(self, main_logps, kl_logps):
        self.main, self.kl = main_logps, kl_logps

    def __call__(self, input_ids, labels=None, **_):
        # Main sequences are all-zero ids, KL sequences all-one ids (see _trl_batch).
        logps = self.kl if bool(input_ids[0, 0] == 1) else self.main
        b = logps.shape[0]
        return types.SimpleNamespace(
            log_probs=logps[:, None], entropy=torch.zeros(b, 1), mean_logits=torch.zeros(b, 1)
        )


def test_trl_reference_is_the_pinned_one():
    assert trl.__version__.startswith(TRL_PINNED + "."), (
        f"trl {trl.__version__} installed; the KTO parity tests reproduce trl {TRL_PINNED}'s private "
        "KTOTrainer._compute_loss: re-check the stub below against the new version, then update the pin")
    params = list(inspect.signature(trl_kto.KTOTrainer._compute_loss).parameters)
    assert params[:4] == ["self", "model", "inputs", "return_outputs"], params
    assert callable(trl_kto.KTOTrainer._compute_kl_logps)


def _trl_loss(policy, ref, policy_kl, ref_kl, desirable, beta, wd, wu):
    """Run TRL's KTOTrainer._compute_loss on the given per-sequence log-probs; returns (loss, metrics, grad)."""
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    stub = types.SimpleNamespace(
        beta=beta,
        loss_type="kto",
        desirable_weight=wd,
        undesirable_weight=wu,
        accelerator=acc,
        calculate_KL=True,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    pol = torch.tensor(policy, dtype=torch.float32, requires_grad=True)
    model = _Model(pol, torch.tensor(policy_kl, dtype=torch.float32))
    stub.model = model
    stub._compute_kl_logps = functools.partial(trl_kto.KTOTrainer._compute_kl_logps, stub)
    b = len(policy)
    batch = {
        "input_ids": torch.zeros(b, 2, dtype=torch.long),
        "attention_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * b),
        "KL_input_ids": torch.ones(b, 2, dtype=torch.long),
        "KL_attention_mask": torch.ones(b, 2, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1]] * b),
        "label": torch.tensor(desirable, dtype=torch.bool),
        "ref_logps": torch.tensor(ref, dtype=torch.float32),
        "ref_KL_logps": torch.tensor(ref_kl, dtype=torch.float32),
    }
    loss = trl_kto.KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return float(loss.detach()), metrics, pol.grad.numpy()


def _draw(rng, b, kl_shift):
    policy = rng.normal(-40, 8, b)
    ref = policy + rng.normal(0, 5, b)
    ref_kl = rng.normal(-60, 8, b)
    policy_kl = ref_kl + rng.normal(kl_shift, 3, b)
    desirable = rng.random(b) < 0.5
    desirable[:2] = [True, False]
    return [x.astype(np.float32) for x in (policy, ref, policy_kl, ref_kl)] + [desirable]


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # positive KL estimate, and one clamped to 0
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.3, 0.7)])
def test_kto_loss_matches_trl(kl_shift, beta, wd, wu):
    """float32; loss, z_ref, rewards and d loss/d policy equal TRL's within 1e-6 absolute."""
    rng = np.random.default_rng(0)
    policy, ref, policy_kl, ref_kl, desirable = _draw(rng, 16, kl_shift)
    want_loss, want_m, want_grad = _trl_loss(policy, ref, policy_kl, ref_kl, desirable, beta, wd, wu)

    def f(p):
        return kto_loss(p, ref, policy_kl, ref_kl, jnp.asarray(desirable), beta=beta,
                        desirable_weight=wd, undesirable_weight=wu)

    (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(policy))
    assert abs(float(loss) - want_loss) < 1e-6
    assert abs(float(m["z_ref"]) - want_m["kl"]) < 1e-6
    assert (float(m["z_ref"]) == 0.0) == (kl_shift < 0)
    assert abs(float(m["rewards/chosen"]) - want_m["rewards/chosen"]) < 1e-5 * max(1, abs(want_m["rewards/chosen"]))
    assert abs(float(m["rewards/rejected"]) - want_m["rewards/rejected"]) < 1e-5 * max(1, abs(want_m["rewards/rejected"]))
    assert abs(float(m["rewards/margins"]) - want_m["rewards/margins"]) < 1e-5 * max(1, abs(want_m["rewards/margins"]))
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-7)
    assert int(m["count/chosen"]) == desirable.sum() and int(m["count/rejected"]) == (~desirable).sum()


def test_kto_loss_valid_mask_equals_trl_on_unpadded_batch():
    """float32; padding items (valid=False, filled with junk) change nothing: equals TRL on the real items, 1e-6."""
    rng = np.random.default_rng(1)
    policy, ref, policy_kl, ref_kl, desirable = _draw(rng, 12, 1.5)
    n = 9
    want_loss, want_m, _ = _trl_loss(policy[:n], ref[:n], policy_kl[:n], ref_kl[:n], desirable[:n], 0.1, 1.0, 1.0)
    junk = np.float32(1e4)
    args = [np.concatenate([x[:n], np.full(3, junk, np.float32)]) for x in (policy, ref, policy_kl, ref_kl)]
    valid = np.arange(12) < n
    loss, m = kto_loss(*args, jnp.asarray(desirable), valid=jnp.asarray(valid))
    assert abs(float(loss) - want_loss) < 1e-6
    assert abs(float(m["z_ref"]) - want_m["kl"]) < 1e-6
    assert int(m["count/valid"]) == n


def test_z_ref_carries_no_gradient():
    """float32; d loss / d (policy_kl, ref_kl) is exactly 0 and d z_ref / d everything is exactly 0."""
    rng = np.random.default_rng(2)
    policy, ref, policy_kl, ref_kl, desirable = _draw(rng, 8, 3.0)
    d = jnp.asarray(desirable)
    g_loss = jax.grad(lambda a, b: kto_loss(policy, ref, a, b, d)[0], argnums=(0, 1))(policy_kl, ref_kl)
    g_z = jax.grad(lambda p, a: kto_loss(p, ref, a, ref_kl, d)[1]["z_ref"], argnums=(0, 1))(policy, policy_kl)
    for g in (*g_loss, *g_z):
        assert np.all(np.asarray(g) == 0.0)
    assert float(kto_loss(policy, ref, policy_kl, ref_kl, d)[1]["z_ref"]) > 0  # the KL term is live here


def test_token_logps_matches_torch():
    """float32 logits; equals torch.log_softmax + gather within 1e-5; position 0 is 0; bf16 logits upcast."""
    rng = np.random.default_rng(3)
    b, t, v = 3, 7, 11
    logits = rng.normal(0, 3, (b, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    want = torch.log_softmax(torch.tensor(logits[:, :-1]), -1).gather(-1, torch.tensor(tokens[:, 1:, None]).long())[..., 0]
    got = np.asarray(token_logps(jnp.asarray(logits), jnp.asarray(tokens)))
    assert got.dtype == np.float32 and got.shape == (b, t)
    np.testing.assert_array_equal(got[:, 0], 0.0)
    np.testing.assert_allclose(got[:, 1:], want.numpy(), atol=1e-5)
    assert token_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens)).dtype == jnp.float32

    mask = rng.random((b, t)) < 0.5
    want_sum = (want.numpy() * mask[:, 1:]).sum(-1)
    np.testing.assert_allclose(np.asarray(completion_logps(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))),
                               want_sum, atol=1e-4)


def _alignment_reference(h, g, valid):
    """Plain NumPy loop: 1 - cos to the mean of the valid members of the group, averaged over valid rows."""
    out = []
    for i in range(len(h)):
        if not valid[i]:
            continue
        members = [j for j in range(len(h)) if g[j] == g[i] and valid[j]]
        c = np.mean(h[members], axis=0)
        out.append(1 - h[i] @ c / (np.linalg.norm(h[i]) * np.linalg.norm(c)))
    return float(np.mean(out))


def test_alignment_loss_zero_when_languages_agree_and_positive_otherwise():
    """float32; identical features per group (scaled per language) -> 0 within 1e-6; perturbed -> > 1e-3."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(4, 16)).astype(np.float32)
    g = np.repeat(np.arange(4), 5)
    same = base[g] * rng.uniform(0.5, 2, (20, 1)).astype(np.float32)  # cosine ignores scale
    assert abs(float(alignment_loss(jnp.asarray(same), jnp.asarray(g)))) < 1e-6
    noisy = same + rng.normal(0, 0.5, same.shape).astype(np.float32)
    assert float(alignment_loss(jnp.asarray(noisy), jnp.asarray(g))) > 1e-3


def test_alignment_loss_matches_numpy_and_torch_gradient():
    """float32; value vs a NumPy loop within 1e-5 (with a valid mask); gradient vs torch autograd within 1e-5."""
    rng = np.random.default_rng(5)
    h = rng.normal(size=(12, 8)).astype(np.float32)
    g = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    valid = np.ones(12, bool)
    valid[[2, 7, 11]] = False
    h_masked_junk = h.copy()
    h_masked_junk[~valid] = 1e3  # junk in padding rows must not leak into group means
    got = float(alignment_loss(jnp.asarray(h_masked_junk), jnp.asarray(g), jnp.asarray(valid)))
    assert abs(got - _alignment_reference(h.astype(np.float64), g, valid)) < 1e-5

    ht = torch.tensor(h, requires_grad=True)
    loss_t = 0
    for i in np.flatnonzero(valid):
        members = [j for j in range(12) if g[j] == g[i] and valid[j]]
        c = ht[members].mean(0)
        loss_t = loss_t + 1 - torch.nn.functional.cosine_similarity(ht[i], c, dim=0)
    (loss_t / valid.sum()).backward()
    grad = jax.grad(alignment_loss)(jnp.asarray(h), jnp.asarray(g), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(grad), ht.grad.numpy(), atol=1e-5)
    assert np.all(np.asarray(grad)[~valid] == 0)
