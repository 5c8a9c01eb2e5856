"""Latent-KTO training loop (lasa_jax.stages.align), 8 simulated CPU devices. float32 except the
mixed-precision tests (bf16 weights and compute, float32 masters: the paper configs' flags).

References: an independent single-device step (plain full-batch forward, jax.grad of kto_loss,
optax.chain(clip_by_global_norm, adamw(warmup_cosine_decay_schedule))), an all-float32 run for
the bf16 one, torch's float32 -> bfloat16 rounding for the bf16 export, and transformers'
LlamaForCausalLM for the export. Tolerances are stated per test.

Every run here uses the same batch shapes and optimiser settings, so the compiled step is shared
through a per-session JAX compilation cache (the first compile dominates on a small CPU).
"""
import gc
import json
import os
import signal
import weakref
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lasa_jax.config import base_config
from lasa_jax.context import Context, resolve_data_path
from lasa_jax.data.readers import FIXTURES_DIR, read_kto_pairs, read_parallel
from lasa_jax.errors import NonFiniteLoss
from lasa_jax.infra.mesh import make_mesh
from lasa_jax.method.kto import alignment_loss, completion_logps, kto_loss
from lasa_jax.method.kto_data import AlignBatches, KTOBatches
from lasa_jax.method.trainer import Trainer, batch_shapes, reference_logps
from lasa_jax.model.lm import load_model
from lasa_jax.model.tiny import make_tiny_checkpoint
from lasa_jax.stages import align as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
# One layout for every test: 16 items per step in 2 micro-batches of 8 (divisible by every mesh).
# The alignment term is on in every test (2 parallel queries x 3 languages per step, layer 1).
ALIGN = dict(batch_size=16, grad_accum=2, max_length=256, max_prompt_length=160, learning_rate=1e-3,
             warmup_steps=0, weight_decay=0.01, z_mode="label", tensorboard=False, lambda_align=0.5,
             align_layer=1, align_batch_queries=2)
LANGUAGES = "en,zh,it"
# One-step comparisons: Adam's first update is lr * g / (|g| + eps), so a gradient entry that is
# rounding noise in both runs can move by up to 2 lr; lr = 1e-4 keeps that below the 1e-5
# tolerance while a wrong gradient still moves entries by ~1e-4. (The learning rate is an input
# of the compiled step, so this shares the compilation with every other test.)
STEP = dict(learning_rate=1e-4)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                  "jax_persistent_cache_min_compile_time_secs",
                                                  "jax_persistent_cache_min_entry_size_bytes")}
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield cache
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0, **TINY)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Four mild safety pairs and their four benign twins, English, from the project fixture."""
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    fixture = os.path.join(FIXTURES_DIR, "kto_pairs.json")
    if os.path.exists(fixture):
        with open(fixture, encoding="utf-8") as f:
            records = [r for r in json.load(f) if r.get("language") == "en"]
        records = ([r for r in records if r["source"] == "safety"][:4]
                   + [r for r in records if r["source"] == "general"][:4])
    else:
        records = [{"prompt": f"Write a fake review number {i}.", "chosen": "Sorry, I can't help with that.",
                    "rejected": "Sure, here it is: [placeholder]", "source": "safety", "harmful": True, "idx": i}
                   for i in range(4)]
        records += [{"prompt": f"Write an honest review number {i}.", "chosen": "Here is an honest review.",
                     "rejected": "No. Do it yourself.", "source": "general", "harmful": False, "idx": i}
                    for i in range(4)]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def make_config(workdir, model, pairs, dtype="float32", **align):
    c = base_config()
    c.workdir, c.progress, c.seed = str(workdir), False, 0
    c.model.path, c.model.dtype, c.model.param_dtype = model, dtype, dtype
    c.data.kto_pairs = pairs
    c.data.languages = LANGUAGES
    for k, v in {**ALIGN, **align}.items():
        setattr(c.align, k, v)
    return c


def make_data(lm, pairs, total_steps=4, **align):
    c = make_config("unused", "", pairs, **align)
    a = c.align
    items = train.make_items(read_kto_pairs(pairs), a, seed=0)
    data = KTOBatches(items, lm.tokenizer, batch_size=a.batch_size, grad_accum=a.grad_accum,
                            max_steps=total_steps, max_length=a.max_length,
                            max_prompt_length=a.max_prompt_length, pad_id=lm.pad_id, row_multiple=8)
    queries = read_parallel(resolve_data_path(c.data.parallel_prompts), LANGUAGES.split(","))
    parallel = AlignBatches(lm, queries, queries_per_step=a.align_batch_queries, seed=0, batch_multiple=8)
    return a, data, parallel


def make_trainer(lm, a, data, per_step=False):
    return Trainer(lm, a, total_steps=data.total_steps, per_step_reference=per_step,
                         lambda_align=a.lambda_align, align_layer=a.align_layer)


def batch_at(data, parallel, s):
    return {**data.host_batch(s), **parallel.host_batch(s)}


def host_copy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# ----------------------------------------------------------------------------- one step

@pytest.fixture(scope="module")
def one_step(tiny, pairs_file):
    """Start point, data and the independent single-device reference after one optimiser step."""
    lm = load_model(tiny)
    a, data, parallel = make_data(lm, pairs_file, **STEP)
    base = host_copy(lm.params)
    # The policy starts away from the reference so that rewards and z_ref are not all zero.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(base))))
    start = jax.tree.map(lambda x: x + 0.05 * np.asarray(jax.random.normal(next(keys), x.shape)), base)

    # The independent reference sees the items one per padded row (TRL's layout), not packed.
    idx = data.indices(0)
    full = {**data.padded(idx), **{"kl_" + k: v for k, v in data.padded(idx, kl=True).items()},
            "desirable": np.asarray([data.items[i].desirable for i in idx])}
    host = data.host_batch(0)
    assert host["tokens"].shape[:2] == (2, data.step_rows[0][0]) and (data.step_rows % 8 == 0).all()

    def logps(p, prefix=""):
        out = lm.module.apply({"params": p}, full[prefix + "tokens"], full[prefix + "attention_mask"])
        return completion_logps(out.logits, full[prefix + "tokens"], full[prefix + "loss_mask"])

    ref, ref_kl = jax.jit(lambda p: (logps(p), logps(p, "kl_")))(base)
    ref, ref_kl = np.asarray(ref), np.asarray(ref_kl)

    al = parallel.host_batch(0)
    assert al["align_valid"].sum() == 2 * 3 and len(set(al["align_groups"][al["align_valid"]])) == 2
    last = al["align_mask"].shape[1] - 1 - np.argmax(al["align_mask"][:, ::-1], axis=1)

    def loss_fn(p):
        pol_kl = jax.lax.stop_gradient(logps(p, "kl_"))
        kto, metrics = kto_loss(logps(p), ref, pol_kl, ref_kl, full["desirable"], beta=a.beta)
        # Features from the full hidden-state capture, read at the last real token here.
        hidden = lm.module.apply({"params": p}, al["align_tokens"], al["align_mask"], capture="full").hidden
        feats = hidden[a.align_layer][np.arange(len(last)), last]
        align = alignment_loss(feats, al["align_groups"], al["align_valid"])
        return kto + a.lambda_align * align, {**metrics, "align_loss": align}

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(start)
    decay = jax.tree_util.tree_map_with_path(
        lambda path, x: "norm" not in jax.tree_util.keystr(path) or "kernel" in jax.tree_util.keystr(path), start)
    tx = optax.chain(optax.clip_by_global_norm(a.grad_clip),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0.0, a.learning_rate, 0, 4, 0.0),
                                 weight_decay=a.weight_decay, mask=decay))
    updates, _ = tx.update(grads, tx.init(start), start)
    expected = host_copy(optax.apply_updates(start, updates))
    assert metrics["z_ref"] > 0 and abs(float(metrics["rewards/margins"])) > 0  # a non-trivial point
    return dict(lm=lm, data=data, parallel=parallel, base=base, start=start, ref=ref, ref_kl=ref_kl, loss=float(loss),
                metrics=host_copy(metrics), expected=expected)


def step_on_mesh(tiny, one_step, mesh):
    lm = load_model(tiny, mesh=mesh)
    data = one_step["data"]
    trainer = make_trainer(lm, make_config("unused", "", "", **STEP).align, data)
    # The precomputed reference of our pipeline must equal the plain full-batch forward
    # (sums of ~250 float32 log-probs of size ~1: relative 1e-6).
    items, kl = reference_logps(trainer, lm.params, data)
    np.testing.assert_allclose(items[data.indices(0)], one_step["ref"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(kl[0], one_step["ref_kl"], rtol=1e-6, atol=0)
    data.ref_logps, data.ref_kl_logps = items, kl
    params, opt_state = trainer.init_state(jax.device_put(one_step["start"], trainer.param_shardings))
    params, _, metrics = trainer.step(params, opt_state, batch_at(data, one_step["parallel"], 0), 0)
    return host_copy(params), host_copy(metrics)


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), pytest.param((8, 1, 1), marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device_reference(tiny, one_step, shape):
    """(data, fsdp, tensor) mesh over 8 devices, packed rows in 2 micro-batches, vs the plain
    single-device step on one padded row per item (full-batch jax.grad + optax AdamW): params
    within 1e-5, loss within 1e-6, metrics within 1e-5 relative (float32; lr 1e-4, so a wrong
    gradient or schedule moves params by ~1e-4). Rewards are beta times differences of sums of
    20-66 log-probs of about -5.5 each (|sum| up to ~360); the packed sum adds them in another
    order, so they round differently at the 1e-7 relative level of those sums."""
    params, metrics = step_on_mesh(tiny, one_step, make_mesh(*shape))
    assert max_diff(params, one_step["start"]) > 5e-5  # the step moved the params
    assert max_diff(params, one_step["expected"]) <= 1e-5
    assert abs(float(metrics["loss"]) - one_step["loss"]) <= 1e-6
    assert float(one_step["metrics"]["align_loss"]) > 1e-3
    for k in ("z_ref", "rewards/chosen", "rewards/rejected", "rewards/margins", "align_loss"):
        want = float(one_step["metrics"][k])
        assert abs(float(metrics[k]) - want) <= 1e-5 * max(1.0, abs(want)), k


def test_batch_shapes_describe_the_host_batches(one_step):
    """What a benchmark lowers the step with (trainer.batch_shapes) is what training feeds it."""
    data, parallel = one_step["data"], one_step["parallel"]
    host = batch_at(data, parallel, 0)
    al = parallel.host_batch(0)["align_tokens"].shape
    rows, kl_rows = data.step_rows[0]
    want = batch_shapes(16, 2, data.width, rows=rows, kl_rows=kl_rows, precomputed="ref_logps" in host,
                        align_rows=al[0], align_length=al[1])
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in host.items()} == \
           {k: (v.shape, np.dtype(v.dtype)) for k, v in want.items()}


def test_precomputed_and_per_step_reference_give_the_same_losses(tiny, pairs_file):
    """Three steps each; losses, z_ref and margins agree within 1e-6, params within 1e-6 (float32)."""
    results = {}
    for mode in ("precomputed", "per_step"):
        lm = load_model(tiny, mesh=make_mesh(1, 8, 1))
        a, data, parallel = make_data(lm, pairs_file)
        trainer = make_trainer(lm, a, data, per_step=mode == "per_step")
        ref = None
        if mode == "precomputed":
            data.ref_logps, data.ref_kl_logps = reference_logps(trainer, lm.params, data)
        else:
            ref = lm.params  # frozen: init_state copies, so the steps never donate it
        params, opt = trainer.init_state(lm.params)
        rows = []
        for s in range(3):
            params, opt, m = trainer.step(params, opt, batch_at(data, parallel, s), s, ref)
            rows.append([float(m[k]) for k in ("loss", "z_ref", "rewards/margins")])
        results[mode] = (np.asarray(rows), host_copy(params))
    (r1, p1), (r2, p2) = results["precomputed"], results["per_step"]
    assert r1[-1, 0] != r1[0, 0]  # training changed the loss, so the comparison is not trivial
    np.testing.assert_allclose(r1, r2, atol=1e-6, rtol=0)
    assert max_diff(p1, p2) <= 1e-6


# ----------------------------------------------------------------------------- runs

RUN = dict(max_steps=6, checkpoint_every=2, keep_checkpoints=2)
_SCRIPT = """
import json, os, signal, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from lasa_jax.config import base_config
from lasa_jax.context import Context
from lasa_jax.stages import align as train
spec = json.loads(sys.argv[2])
c = base_config()
for section, fields in spec["config"].items():
    for k, v in fields.items():
        setattr(c if section == "" else c[section], k, v)
kill_at = spec.get("kill_at")
if kill_at:
    def crash(step, mngr):
        if step == kill_at:  # the save of this checkpoint may still be in flight
            os.kill(os.getpid(), signal.SIGKILL)
    train._after_checkpoint = crash
print(json.dumps(train.run(Context(c))))
"""


def _spec(c):
    return {"": {"workdir": c.workdir, "progress": False, "seed": c.seed},
            "model": {k: c.model[k] for k in ("path", "dtype", "param_dtype")},
            "data": {"kto_pairs": c.data.kto_pairs, "languages": c.data.languages}, "align": c.align.to_dict()}


def _subprocess(cache, c, kill_at=None):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", _SCRIPT, cache, json.dumps({"config": _spec(c), "kill_at": kill_at})],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _metrics(workdir):
    with open(os.path.join(workdir, "align", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _hf_tensors(workdir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "align", "hf", "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny, pairs_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = train.run(Context(make_config(workdir, tiny, pairs_file, **RUN)))
    return str(workdir), summary


def test_killed_run_resumes_to_the_same_parameters(tiny, pairs_file, tmp_path, uninterrupted, compile_cache):
    """SIGKILL right after the second checkpoint is issued, then resume: the same data order
    (per-step batch digests and epoch positions) and final params within 1e-6 (float32)."""
    ref_dir, ref_summary = uninterrupted
    c = make_config(tmp_path, tiny, pairs_file, **RUN)
    killed = _subprocess(compile_cache, c, kill_at=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not os.path.exists(tmp_path / "align" / "hf")
    resumed = _subprocess(compile_cache, c)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] in (2, 4) and summary["steps"] == 6

    got, want = _metrics(tmp_path), _metrics(ref_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [(r["epoch"], r["step_in_epoch"], r["batch"]) for r in got] == \
           [(r["epoch"], r["step_in_epoch"], r["batch"]) for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], atol=1e-6, rtol=0)
    a, b = _hf_tensors(tmp_path), _hf_tensors(ref_dir)
    assert a.keys() == b.keys()
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6


def test_run_writes_metrics_checkpoints_and_reference(uninterrupted):
    workdir, summary = uninterrupted
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 7)) and summary["steps"] == 6
    for r in rows:
        assert r["align_loss"] > 0 and abs(r["loss"] - (r["kto_loss"] + 0.5 * r["align_loss"])) < 1e-6
        assert np.isfinite([r[k] for k in ("loss", "kto_loss", "rewards/chosen", "rewards/rejected",
                                           "rewards/margins", "z_ref", "grad_norm", "lr", "tokens_per_s")]).all()
        assert r["mfu"] is None  # no peak-FLOPs entry for CPU
    # Warm-up 0 then cosine to 0 over 6 steps: lr of step s (1-based) is lr * (1 + cos(pi (s-1) / 6)) / 2.
    want_lr = [1e-3 * (1 + np.cos(np.pi * s / 6)) / 2 for s in range(6)]
    np.testing.assert_allclose([r["lr"] for r in rows], want_lr, rtol=1e-5)
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "align", "checkpoints")) if d.isdigit())
    assert ckpts == [4, 6]  # keep_checkpoints = 2
    assert os.path.exists(summary["reference"])


def test_exported_model_loads_in_transformers_and_matches_our_logits(tiny, uninterrupted):
    """align/hf in transformers (float32) vs our forward with the final Orbax params: logits within 1e-4."""
    import orbax.checkpoint as ocp
    import torch
    import transformers
    workdir, _ = uninterrupted
    mngr = ocp.CheckpointManager(os.path.join(workdir, "align", "checkpoints"), item_names=("state", "meta"))
    state = mngr.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    lm = load_model(tiny)
    params = jax.tree.map(np.asarray, state["params"])
    assert max_diff(params, host_copy(lm.params)) > 1e-4  # trained away from the base
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.cfg.vocab_size, (2, 40))
    mask = np.ones((2, 40), bool)
    mask[1, 30:] = False
    ours = np.asarray(lm.module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask)).logits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "align", "hf"),
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4, rtol=0)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, pairs_file, tmp_path, monkeypatch):
    """A NaN in the reference log-probs of step 3's KL pairs makes step 3's loss NaN."""
    real = train.reference_logps

    def corrupted(*args, **kw):
        items, kl = real(*args, **kw)
        kl[2, 0] = np.nan
        return items, kl

    monkeypatch.setattr(train, "reference_logps", corrupted)
    c = make_config(tmp_path, tiny, pairs_file, max_steps=5, checkpoint_every=1, keep_checkpoints=5)
    ckpt_dir = os.path.join(str(tmp_path), "align", "checkpoints")
    with pytest.raises(NonFiniteLoss,
                       match=rf"non-finite loss at step 3; last good checkpoint: step 2 at {ckpt_dir}/2"):
        train.run(Context(c))
    assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [1, 2]
    assert not os.path.exists(tmp_path / "align" / "hf")
    assert [r["step"] for r in _metrics(str(tmp_path))] == [1, 2]


@pytest.mark.slow
def test_loss_falls_and_margin_rises_over_50_steps(tiny, pairs_file, tmp_path):
    """Toy preference set (8 pairs), 50 full-batch steps: mean loss of the last 5 steps below the
    first 5, reward margin above 0 and above its start."""
    c = make_config(tmp_path, tiny, pairs_file, max_steps=50, checkpoint_every=50, export=False)
    train.run(Context(c))
    rows = _metrics(str(tmp_path))
    loss = np.array([r["loss"] for r in rows])
    kto = np.array([r["kto_loss"] for r in rows])
    margin = np.array([r["rewards/margins"] for r in rows])
    assert loss[-5:].mean() < loss[:5].mean() - 0.05 and kto[-5:].mean() < kto[:5].mean() - 0.05
    assert margin[-5:].mean() > margin[:5].mean() + 0.1 and margin[-1] > 0


def test_baseline_items_are_lasa_items_without_the_prefix(pairs_file):
    """The baseline stage trains on LASA's items (same prompts, completions, labels, order) with
    z = 0 everywhere, and without the alignment term, whatever the run's align settings."""
    c = make_config("unused", "", pairs_file, source_probs="safety=1.0,general=0.0", lambda_align=0.5)
    pairs = read_kto_pairs(pairs_file)
    lasa = train.make_items(pairs, c.align, seed=0)
    b = train.baseline_align_config(c.align)
    base = train.make_items(pairs, b, seed=0)
    assert any(it.z for it in lasa) and not any(it.z for it in base)
    strip = lambda items: [(it.prompt, it.completion, it.desirable, it.source) for it in items]
    assert strip(lasa) == strip(base)
    assert b.lambda_align == 0.0 and c.align.lambda_align == 0.5  # the run's config is untouched
    assert b.learning_rate == c.align.learning_rate and b.epochs == c.align.epochs


# ----------------------------------------------------------------------------- mixed precision

# The paper's learning rate with its configs' dtype flags (bf16 weights and compute): an update
# of ~1e-6 is ~1/100 of a bf16 step for a weight of size ~0.02, so only float32 masters keep it.
PAPER = dict(learning_rate=1e-6, warmup_steps=0, max_steps=6, checkpoint_every=2, keep_checkpoints=2,
             async_checkpoints=False)


@pytest.fixture(scope="module")
def tiny_bf16(tiny, tmp_path_factory):
    """The tiny checkpoint stored in bf16 (as the paper models are), so a float32 run starts
    from exactly the weights a bf16 run does."""
    out = str(tmp_path_factory.mktemp("tiny_bf16") / "model")
    load_model(tiny).save(out, dtype="bfloat16")
    return out


def _final_params(workdir, stage="align"):
    import orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(os.path.join(workdir, stage, "checkpoints"), item_names=("state", "meta"))
    state = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    return jax.tree.map(np.asarray, state["params"])


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


@pytest.fixture(scope="module")
def bf16_run(tiny_bf16, pairs_file, tmp_path_factory):
    """bf16 weights and compute, default master dtype, lr 1e-6, 6 steps, uninterrupted."""
    workdir = tmp_path_factory.mktemp("bf16")
    summary = train.run(Context(make_config(workdir, tiny_bf16, pairs_file, dtype="bfloat16", **PAPER)))
    return str(workdir), summary


def test_bf16_run_at_lr_1e6_moves_the_masters_like_float32(tiny_bf16, pairs_file, bf16_run, tmp_path):
    """Same start (a bf16 checkpoint), same data, 6 steps at lr 1e-6. float32 run: weights and
    compute float32. The bf16 run's update must touch >= 95 % of the entries the float32 run's
    does, with cosine >= 0.9 to it; bf16 masters (the old behaviour) must not (< 50 %)."""
    workdir, summary = bf16_run
    assert summary["precision"] == {"master": "float32", "optimizer_state": "float32", "compute": "bfloat16",
                                    "gradient_accumulation": "float32", "reference": "bfloat16",
                                    "export": "bfloat16"}
    assert {(r["master_dtype"], r["compute_dtype"]) for r in _metrics(workdir)} == {("float32", "bfloat16")}
    start = _flat(host_copy(load_model(tiny_bf16).params))  # bf16 values, exactly, in float32
    f32_dir = tmp_path / "f32"
    train.run(Context(make_config(f32_dir, tiny_bf16, pairs_file, dtype="float32", export=False, **PAPER)))
    d32 = _flat(_final_params(str(f32_dir))) - start
    d16 = _flat(_final_params(workdir)) - start
    moved = d32 != 0
    assert moved.mean() > 0.5  # unused embedding rows get no gradient in either run
    assert (d16[moved] != 0).mean() >= 0.95
    cosine = d16 @ d32 / (np.linalg.norm(d16) * np.linalg.norm(d32))
    assert cosine >= 0.9, cosine
    old_dir = tmp_path / "bf16_masters"
    train.run(Context(make_config(old_dir, tiny_bf16, pairs_file, dtype="bfloat16", export=False,
                                  master_dtype="bfloat16", **PAPER)))
    d_old = _flat(_final_params(str(old_dir))) - start
    assert (d_old[moved] != 0).mean() < 0.5


def test_bf16_export_is_the_masters_rounded_once(bf16_run):
    """align/hf is written in the checkpoint's own dtype (bf16) from the float32 masters: every
    exported weight equals torch's round-to-nearest-even bf16 of the master. Exact."""
    import torch
    from safetensors import safe_open
    workdir, summary = bf16_run
    hf = os.path.join(workdir, "align", "hf")
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with safe_open(os.path.join(hf, "model.safetensors"), framework="numpy") as h:
        assert {h.get_slice(k).get_dtype() for k in h.keys()} == {"BF16"}
    masters = _final_params(workdir)
    rounded = jax.tree.map(lambda m: torch.from_numpy(np.array(m)).to(torch.bfloat16).float().numpy(), masters)
    exported = host_copy(load_model(hf).params)  # read back in float32 (exact for bf16)
    assert max_diff(masters, rounded) > 0  # the masters hold more than bf16 does
    assert max_diff(exported, rounded) == 0


def test_killed_bf16_run_resumes_to_the_same_masters(tiny_bf16, pairs_file, tmp_path, bf16_run, compile_cache):
    """bf16 compute, float32 masters, lr 1e-6: SIGKILL after the second checkpoint, resume.
    The Orbax checkpoint holds the float32 masters and moments, so the final masters equal the
    uninterrupted run's bit for bit (a bf16 checkpoint would lose every update since the last
    bf16 step)."""
    ref_dir, _ = bf16_run
    c = make_config(tmp_path, tiny_bf16, pairs_file, dtype="bfloat16", **PAPER)
    killed = _subprocess(compile_cache, c, kill_at=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _subprocess(compile_cache, c)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from"] in (2, 4)
    got, want = _final_params(str(tmp_path)), _final_params(ref_dir)
    assert {x.dtype for x in jax.tree.leaves(got)} == {np.dtype(np.float32)}
    assert max_diff(got, want) == 0
    assert [r["loss"] for r in _metrics(str(tmp_path))] == [r["loss"] for r in _metrics(ref_dir)]


# ----------------------------------------------------------------------------- memory

def _alive(refs) -> int:
    return sum(r() is not None for r in refs)


def test_feature_stages_model_is_freed_before_align_loads(tiny, pairs_file, tmp_path, monkeypatch):
    """The base model the feature stages used (its jitted feature function compiled, as stage 1
    leaves it) holds no device buffer once align loads its own copy, by reference counting
    alone (the garbage collector is off: a reference cycle would keep the weights)."""
    ctx = Context(make_config(tmp_path, tiny, pairs_file, max_steps=1, checkpoint_every=1, export=False))
    base = ctx.base
    tokens, mask = base.encode(["Hello there"])
    base.features(tokens, mask, layers=[1])
    refs = [weakref.ref(x) for x in jax.tree.leaves(base.params)]
    del base
    seen = []
    real_load = Context.load

    def load(self, path=None, stage="features"):
        if stage == "align":
            seen.append(_alive(refs))
        return real_load(self, path, stage)

    monkeypatch.setattr(Context, "load", load)
    gc.disable()
    try:
        train.run(ctx)
    finally:
        gc.enable()
    assert seen == [0] and len(refs) > 0


def test_resume_restores_without_the_base_weights(tiny, pairs_file, tmp_path, monkeypatch):
    """A resume with a precomputed reference: when the checkpoint is restored, none of the base
    weights align loaded is alive (the masters come from the checkpoint alone). The garbage
    collector is off, so only real references count."""
    c = make_config(tmp_path, tiny, pairs_file, max_steps=4, checkpoint_every=2, export=False,
                    async_checkpoints=False)

    class Crash(Exception):
        pass

    def crash(step, mngr):
        if step == 2:
            raise Crash  # the run dies after its first checkpoint

    monkeypatch.setattr(train, "_after_checkpoint", crash)
    with pytest.raises(Crash):
        train.run(Context(c))
    monkeypatch.setattr(train, "_after_checkpoint", lambda step, mngr: None)

    refs, seen = [], []
    real_load, real_restore = Context.load, train.checkpoints.restore

    def load(self, path=None, stage="features"):
        lm = real_load(self, path, stage)
        if stage == "align":
            refs.extend(weakref.ref(x) for x in jax.tree.leaves(lm.params))
        return lm

    def restore(*args, **kw):
        seen.append(_alive(refs))
        return real_restore(*args, **kw)

    monkeypatch.setattr(Context, "load", load)
    monkeypatch.setattr(train.checkpoints, "restore", restore)
    gc.disable()
    try:
        summary = train.run(Context(c))
    finally:
        gc.enable()
    assert summary["resumed_from"] == 2 and seen == [0] and len(refs) > 0


def test_packed_bf16_log_probs_are_as_close_to_float32_as_padded_ones(tiny_bf16, pairs_file):
    """The paper's condition: bf16 weights and compute. The reference pass's packed log-probs
    (several items per row, 8 devices) against the same bf16 weights computed in float32 one
    item per padded row: their error is bf16 rounding, no larger than that of the unpacked bf16
    forward (within 2x + 0.01 nats; measured 0.009 and 0.004 nats for both) and < 1e-3 of |sum|
    (sums of 110-370 nats). Attention leaking between packed items moves a sum by whole nats."""
    lm16 = load_model(tiny_bf16, mesh=make_mesh(1, 8, 1), dtype="bfloat16")
    lm32 = load_model(tiny_bf16, dtype="float32")
    _, data, _ = make_data(lm16, pairs_file, total_steps=2)
    trainer = make_trainer(lm16, make_config("unused", "", "").align, data)
    items, kl = reference_logps(trainer, lm16.params, data)
    idx = data.indices(0)

    def padded_logps(lm, kl_pairs):
        p = data.padded(idx, kl=kl_pairs)
        logits = lm.module.apply({"params": lm.params}, p["tokens"], p["attention_mask"]).logits
        return np.asarray(completion_logps(logits, p["tokens"], p["loss_mask"] & (np.arange(p["tokens"].shape[1]) > 0)))

    for packed, kl_pairs in ((items[idx], False), (kl[0], True)):
        f32, b16 = padded_logps(lm32, kl_pairs), padded_logps(lm16, kl_pairs)
        err_packed, err_padded = np.abs(packed - f32), np.abs(b16 - f32)
        assert err_packed.max() <= 2 * err_padded.max() + 0.01
        assert (err_packed <= 1e-3 * np.abs(f32)).all()
