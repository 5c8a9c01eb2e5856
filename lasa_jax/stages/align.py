"""Stage 3: Latent-KTO fine-tuning of the base model, with checkpoints, resume, metrics, export.

Reads ``config.data.kto_pairs`` (and ``ssi/`` for ``z_mode = "ssi"``, ``bottleneck/report.json``
and ``config.data.parallel_prompts`` for the alignment term); writes ``align/checkpoints``
(Orbax; a rerun resumes from the latest), ``align/metrics.jsonl`` (+ TensorBoard),
``align/reference-<key>.npz`` (the precomputed reference log-probs), ``align/summary.json`` and the
exported HF checkpoint ``align/hf``. ``train(ctx, "baseline")`` is the same loop for the
baseline arm (``lasa_jax.stages.baseline``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from lasa_jax.data import inputs
from lasa_jax.errors import ArtifactError, ConfigError, NonFiniteLoss
from lasa_jax.infra import checkpoints, fileio, multihost
from lasa_jax.infra.fileio import atomic_write_text, digest
from lasa_jax.infra.mesh import batch_multiple
from lasa_jax.method.gate import load_for_model, ssi_verdicts
from lasa_jax.method.kto_data import DEFAULT_SOURCE_PROBS, AlignBatches, KTOBatches, KTOItem, pairs_to_items
from lasa_jax.method.trainer import Trainer, peak_flops, reference_logps
from lasa_jax.model.checkpoint import stored_dtype, weights_digest

log = logging.getLogger("lasa_jax")

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def run(ctx) -> dict:
    return train(ctx, "align")


# ============================================================================ config -> items

def parse_source_probs(text: str) -> dict[str, float]:
    """``"safety=0.5,general=0"`` -> {...}; sources the spec knows keep their defaults."""
    probs = dict(DEFAULT_SOURCE_PROBS)
    for part in str(text).split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            p = float(value)
        except ValueError:
            p = -1.0
        if not sep or not name.strip() or not 0.0 <= p <= 1.0:
            raise ConfigError(f"config.align.source_probs: {part.strip()!r} is not SOURCE=PROBABILITY in [0, 1]")
        probs[name.strip()] = p
    return probs


def make_items(pairs, acfg, *, seed: int, verdicts=None) -> list[KTOItem]:
    return pairs_to_items(pairs, z_mode=acfg.z_mode, source_probs=parse_source_probs(acfg.source_probs),
                          seed=seed, ssi_verdicts=verdicts)


def baseline_align_config(a):
    """The baseline's stage-3 settings: LASA's data, optimiser and steps with z = 0 for every item
    (no refusal prefix anywhere) and no alignment term, i.e. plain KTO on the same pairs."""
    b = ml_collections.ConfigDict(a.to_dict())
    b.z_mode, b.source_probs, b.lambda_align = "source", "safety=0.0,general=0.0", 0.0
    return b


# ============================================================================ run management

def cached_reference(trainer: Trainer, ref_params, data: KTOBatches, out_dir: str, model_key: str,
                     progress: bool = False) -> str:
    """Fill ``data.ref_*`` from ``out_dir/reference-<hash>.npz`` (data + model), computing it first
    if absent (process 0 decides, so all processes either read it or all compute it)."""
    key = digest(data.key, model_key)
    path = os.path.join(out_dir, f"reference-{key}.npz")
    if multihost.on_primary(lambda: fileio.exists(path)):
        z = fileio.load_arrays(path)
        data.ref_logps, data.ref_kl_logps = z["items"], z["kl"]
        return path
    items, kl = reference_logps(trainer, ref_params, data, progress=progress)
    if multihost.is_primary():
        fileio.save_npz(path, items=items, kl=kl)
    data.ref_logps, data.ref_kl_logps = items, kl
    return path


class _MetricsLog:
    """metrics.jsonl (+ TensorBoard) on process 0. A resumed run first cuts the file back to one
    row per step up to its start step (the last row of a step wins; a line torn by a kill is
    dropped), rewritten atomically, so the log of a resumed run has exactly one row per step. In a
    local folder each row is appended as it comes; in a bucket, where an object cannot be
    appended to, the file is rewritten whole at every checkpoint and at the end."""

    def __init__(self, out_dir, start_step: int, tensorboard: bool):
        self.primary = multihost.is_primary()
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.remote = fileio.is_url(self.path)
        self.lines: list[str] = []
        self.writer = None
        if not self.primary:
            return
        rows: dict[int, str] = {}
        if fileio.exists(self.path):
            for line in fileio.read_text(self.path).splitlines():
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(step, int) and step <= start_step:
                    rows[step] = line + "\n"
        self.lines = [rows[k] for k in sorted(rows)]
        atomic_write_text(self.path, "".join(self.lines))
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.primary:
            return
        self.lines.append(json.dumps(row) + "\n")
        if not self.remote:
            with open(self.path, "a") as f:
                f.write(self.lines[-1])
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(k, v, row["step"])

    def flush(self) -> None:
        if self.primary and self.remote:
            atomic_write_text(self.path, "".join(self.lines))

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def _row(step: int, data: KTOBatches, m: dict, lr: float, tokens: int, seconds: float, peak,
         num_params: int) -> dict:
    tps = tokens / max(seconds, 1e-9)
    epoch, k = data.position(step - 1)
    return {
        "step": step, "epoch": epoch, "step_in_epoch": k,
        "batch": digest(data.indices(step - 1))[:12],
        "loss": float(m["loss"]), "kto_loss": float(m["kto_loss"]), "align_loss": float(m["align_loss"]),
        "rewards/chosen": float(m["rewards/chosen"]), "rewards/rejected": float(m["rewards/rejected"]),
        "rewards/margins": float(m["rewards/margins"]), "z_ref": float(m["z_ref"]),
        "grad_norm": float(m["grad_norm"]), "lr": lr, "tokens": tokens, "tokens_per_s": tps,
        "step_time_s": seconds,
        # Counts the trained tokens only (6 N per token: forward + backward); the no-grad KL and
        # reference forwards are extra work this estimate leaves out.
        "mfu": None if peak is None else 6.0 * num_params * tps / peak,
    }


# TensorBoard event files in a bucket: tensorboardX's uploader per scheme (module, pip package).
_TENSORBOARD_UPLOADERS = {"gs": ("google.cloud.storage", "google-cloud-storage"), "s3": ("boto3", "boto3")}


def check_tensorboard(config) -> None:
    """``config.align.tensorboard`` with a workdir in a bucket needs tensorboardX's uploader for
    that scheme; checked before any stage runs, so a long run does not stop at stage 3."""
    workdir = str(config.workdir)
    if not (config.align.tensorboard and fileio.is_url(workdir)):
        return
    scheme = workdir.split("://", 1)[0]
    module, package = _TENSORBOARD_UPLOADERS.get(scheme, (None, None))
    try:
        found = module is not None and importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (google.cloud)
        found = False
    if not found:
        need = f"pip install {package}" if package else f"tensorboardX cannot write to {scheme}://"
        raise ConfigError(f"config.align.tensorboard: TensorBoard logs in a {scheme}:// workdir need "
                          f"an uploader ({need}); or set --config.align.tensorboard=False")


def train(ctx, stage: str = "align") -> dict:
    """Latent-KTO fine-tuning of the base model into ``WORKDIR/<stage>``; resumes from
    ``<stage>/checkpoints``. ``stage="baseline"`` trains with ``baseline_align_config``."""
    from tqdm.auto import tqdm

    c = ctx.config
    a = c.align if stage == "align" else baseline_align_config(c.align)
    if a.reference not in ("precomputed", "per_step"):
        raise ConfigError(f"config.align.reference must be 'precomputed' or 'per_step', got {a.reference!r}")
    for field in ("master_dtype", "export_dtype"):
        if a[field] not in FLOAT_DTYPES + (("",) if field == "export_dtype" else ()):
            raise ConfigError(f"config.align.{field}={a[field]!r}: expected one of {list(FLOAT_DTYPES)}")
    out_dir = ctx.stage_dir(stage)
    pairs = inputs.kto_data(c)
    pairs_path = c.data.kto_pairs
    ctx.release_base()  # the feature stages' copy; this stage loads (and trains) its own
    lm = ctx.load(stage="align")
    origins = {}
    for p in pairs:
        origins.setdefault(p.prompt, (pairs_path, f"idx {p.idx}" + (f" ({p.language})" if p.language else "")))
    verdicts = None
    if a.z_mode == "ssi":
        artifact = load_for_model(lm, os.path.join(ctx.workdir, "ssi"))
        verdicts = ssi_verdicts(lm, [p.prompt for p in pairs], artifact, batch_size=c.ssi.batch_size_features,
                                progress=c.progress, bound=ctx.prompt_bound(lm, origins))
    items = make_items(pairs, a, seed=c.seed, verdicts=verdicts)
    prompt_bound = ctx.prompt_bound(lm, origins, limit=a.max_prompt_length)
    bm = batch_multiple(lm.mesh)
    data = KTOBatches(items, lm.tokenizer, batch_size=a.batch_size, grad_accum=a.grad_accum, seed=c.seed,
                      epochs=a.epochs, max_steps=a.max_steps, max_length=a.max_length,
                      max_prompt_length=prompt_bound.limit, pad_id=lm.pad_id, row_multiple=bm,
                      step_shapes=a.step_shapes, attention_cost=lm.cfg.attention_cost(),
                      chat_template_kwargs=lm.chat_template_kwargs)
    for text, n in data.truncated.items():
        prompt_bound.note(text, n)
    log.info("%s: %d steps of %d items packed into rows of %d tokens, %.1f %% padding in the first step; "
             "%d step shape(s) (rows per micro-batch, items / KL pairs): %s", stage, data.total_steps,
             a.batch_size, data.width, 100 * data.padding_fraction([0]), len(data.shapes), data.shapes)
    align_data, layer = None, None
    if a.lambda_align > 0:
        layer = ctx.bottleneck_layer(a.align_layer, "config.align.align_layer")
        lm.check_layers([layer], "config.align.align_layer")
        queries = inputs.parallel_prompts(c)
        align_data = AlignBatches(lm, queries, queries_per_step=a.align_batch_queries,
                                  seed=c.seed, chat_template=c.data.feature_text == "chat", batch_multiple=bm,
                                  bound=ctx.prompt_bound(lm, limit=a.max_prompt_length))
    total = data.total_steps
    trainer = Trainer(lm, a, total_steps=total, per_step_reference=a.reference == "per_step",
                      lambda_align=a.lambda_align, align_layer=layer)
    base_params = lm.params  # model.param_dtype: the start point and the frozen reference
    lm = lm.with_params(None)
    model_key = _model_key(lm)
    run_key = {"data": data.key, "model": model_key, "total_steps": total, "lambda_align": float(a.lambda_align),
               "align_layer": layer, "master_dtype": trainer.precision["master"]}
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    mngr = checkpoints.manager(ckpt_dir, keep=a.keep_checkpoints, async_save=a.async_checkpoints)
    newest = checkpoints.newest_meta(mngr)
    if newest is not None:  # before the reference pass: checkpoints of another run stop us now
        _check_run_key(ckpt_dir, *newest, run_key)
    ref_path = None
    if a.reference == "precomputed":
        ref_path = cached_reference(trainer, base_params, data, out_dir, model_key, progress=c.progress)

    start, latest = 0, None
    ref_params = base_params if a.reference == "per_step" else None
    resuming = multihost.on_primary(lambda: bool(mngr.all_steps()))  # the same decision everywhere
    params, opt_state = (None, None) if resuming else trainer.init_state(base_params)
    # With a precomputed reference nothing else holds the base weights: they are freed here, so
    # training (and a restore) never has them beside the masters.
    del base_params
    if resuming:
        # The newest step that restores; an unreadable newer one is reported and moved aside.
        latest, state, meta = checkpoints.restore_latest(mngr, _abstract_state(trainer), what=f"{stage} checkpoint")
        _check_run_key(ckpt_dir, latest, meta, run_key)
        params, opt_state = state["params"], state["opt_state"]
        start = int(state["step"])
        log.info("%s: resuming from step %d of %d (%s)", stage, start, total, ckpt_dir)

    metrics_log = _MetricsLog(out_dir, start, bool(a.tensorboard))
    export_dtype = a.export_dtype or stored_dtype(lm.path)
    precision = {**trainer.precision, "export": export_dtype}
    peak = peak_flops(list(lm.mesh.devices.flat))
    last_good = latest
    last_row: dict = {}
    every = max(int(a.checkpoint_every), 1)
    bar = tqdm(total=total, initial=start, desc=stage, disable=not (c.progress and multihost.is_primary()))

    def host_batch(s):
        host = data.host_batch(s)
        if align_data is not None:
            host.update(align_data.host_batch(s))
        return host

    try:
        upcoming = host_batch(start) if start < total else None
        t0 = time.perf_counter()
        for s in range(start, total):
            host = upcoming
            params, opt_state, m = trainer.step(params, opt_state, host, s, ref_params)
            # Tokenise the next batch while the device works on this one.
            upcoming = host_batch(s + 1) if s + 1 < total else None
            m = jax.device_get(m)
            seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            if not (np.isfinite(m["loss"]) and m["params_finite"]):
                mngr.wait_until_finished()
                where = "none" if last_good is None else f"step {last_good} at {os.path.join(ckpt_dir, str(last_good))}"
                raise NonFiniteLoss(f"non-finite loss at step {s + 1}; last good checkpoint: {where} "
                                    f"(loss={float(m['loss'])}, updated params finite: {bool(m['params_finite'])})")
            tokens = int((host["items"] > 0).sum())
            last_row = {**_row(s + 1, data, m, float(trainer.schedule(s)), tokens, seconds, peak, trainer.num_params),
                        "master_dtype": precision["master"], "compute_dtype": precision["compute"]}
            metrics_log.write(last_row)
            bar.update()
            bar.set_postfix(loss=f"{last_row['loss']:.4f}", margin=f"{last_row['rewards/margins']:.3f}")
            if (s + 1) % every == 0 or s + 1 == total:
                checkpoints.save(mngr, s + 1, {"params": params, "opt_state": opt_state,
                                               "step": np.asarray(s + 1, np.int64)},
                                 {"run_key": run_key, "step": s + 1})
                last_good = s + 1
                metrics_log.flush()
                _after_checkpoint(s + 1, mngr)
        mngr.wait_until_finished()
    finally:
        bar.close()
        metrics_log.close()
    mngr.close()

    hf_dir = None
    if a.export:
        # Only now: the final checkpoint is committed, so a crash during export loses nothing.
        hf_dir = os.path.join(out_dir, "hf")
        # From the masters, rounded once to the export dtype (default: the checkpoint's own).
        lm.with_params(params).save(hf_dir, dtype=export_dtype)
    summary = {"steps": total, "resumed_from": start, "precision": precision, "final_loss": last_row.get("loss"),
               "final_margin": last_row.get("rewards/margins"), "checkpoints": ckpt_dir,
               "metrics": metrics_log.path, "reference": ref_path, "hf": hf_dir, "num_items": len(items),
               "prompt_lengths": prompt_bound.report()}
    if multihost.is_primary():
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def _model_key(lm) -> str:
    return digest(weights_digest(lm.path), str(lm.param_dtype), str(lm.dtype))


def _abstract_state(trainer: Trainer) -> dict:
    """The checkpointed state's shapes, dtypes and shardings (what Orbax restores into): the
    master weights and optimiser state in ``align.master_dtype``, and the step."""
    return {"params": trainer.abstract_masters, "opt_state": trainer.abstract_opt_state,
            "step": np.zeros((), np.int64)}


def export_status(ctx, stage: str = "align") -> str | None:
    """What ``WORKDIR/<stage>`` offers the evaluate stage: "hf" (an export), "checkpoint" (a run
    that trained to its last step but has no export: ``align.export=False``, or killed while
    exporting) or None (neither). A run that stopped before its last step is an ``ArtifactError``:
    evaluating it would silently evaluate a half-trained model. Reads only small metadata."""
    out_dir = os.path.join(ctx.workdir, stage)
    hf_dir, ckpt_dir = os.path.join(out_dir, "hf"), os.path.join(out_dir, "checkpoints")
    if fileio.exists(os.path.join(hf_dir, "config.json")):
        return "hf"
    if not fileio.as_path(ckpt_dir).is_dir():
        return None
    mngr = checkpoints.manager(ckpt_dir, keep=ctx.config.align.keep_checkpoints, async_save=False)
    try:
        if not mngr.all_steps():
            return None
        newest = checkpoints.newest_meta(mngr)
    finally:
        mngr.close()
    total = ((newest or (0, {}))[1].get("run_key") or {}).get("total_steps")
    if newest is None or newest[0] != total:
        where = "no readable step" if newest is None else f"step {newest[0]} of {total}"
        raise ArtifactError(f"{hf_dir}: not found, and {ckpt_dir} holds {where}: the {stage} stage did not "
                            f"finish; rerun it (--config.stages={stage},evaluate)")
    return "checkpoint"


def finished_export(ctx, stage: str = "align") -> str | None:
    """``WORKDIR/<stage>/hf`` for the evaluate stage, exported now from the final checkpoint when
    only that exists (``export_status``); None when the stage left neither."""
    status = export_status(ctx, stage)
    out_dir = os.path.join(ctx.workdir, stage)
    hf_dir, ckpt_dir = os.path.join(out_dir, "hf"), os.path.join(out_dir, "checkpoints")
    if status != "checkpoint":
        return hf_dir if status == "hf" else None
    a = ctx.config.align if stage == "align" else baseline_align_config(ctx.config.align)
    mngr = checkpoints.manager(ckpt_dir, keep=a.keep_checkpoints, async_save=False)
    step, meta = checkpoints.newest_meta(mngr)
    ctx.release_base()
    lm = ctx.load(stage="align")
    if meta["run_key"].get("model") != _model_key(lm):
        raise ArtifactError(f"{ckpt_dir}: step {step} was trained from another base model than "
                            f"{lm.path}; rerun the {stage} stage")
    trainer = Trainer(lm, a, total_steps=step, per_step_reference=False)
    abstract = _abstract_state(trainer)
    lm = lm.with_params(None)  # free the base weights before the trained ones arrive
    restored, state, _ = checkpoints.restore_latest(mngr, abstract, what=f"{stage} checkpoint")
    mngr.close()
    if restored != step:  # the final step did not restore and an earlier one did
        raise ArtifactError(f"{hf_dir}: not found, and the final step of {ckpt_dir} does not restore; rerun the "
                            f"{stage} stage (it resumes from step {restored})")
    log.warning("%s: %s missing; exporting it from the final checkpoint (step %d)", stage, hf_dir, step)
    lm.with_params(state["params"]).save(hf_dir, dtype=a.export_dtype or stored_dtype(lm.path))
    return hf_dir


def _check_run_key(ckpt_dir: str, step: int, meta: dict, run_key: dict) -> None:
    differs = sorted(k for k in run_key if (meta.get("run_key") or {}).get(k) != run_key[k])
    if differs:
        raise ConfigError(f"{ckpt_dir}: checkpoint step {step} belongs to a different run "
                          f"(differs in {', '.join(differs)}); use a fresh workdir or delete the checkpoints")


def _after_checkpoint(step: int, mngr) -> None:
    """Hook for tests (crash injection after a checkpoint is issued); does nothing by default."""
