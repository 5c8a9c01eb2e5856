"""The Safety Semantic Interpreter (SSI): an MLP probe on bottleneck features, its training,
threshold, per-language metrics and its artifact on disk.

Works on cached features only: ``features`` (N, d) float, ``labels`` (N,) with 1 = harmful,
``languages`` (N,) language codes. Feature extraction lives elsewhere.

Choices this module makes (see docs/LASA_METHOD.md, Stage 2):
- Model selection, learning-rate plateau and early stopping all watch the **validation loss**
  (mean BCE); a "gain" is a strictly lower loss than the best so far. Loss rather than accuracy
  because validation sets are small (10 % of three languages) and accuracy then moves in coarse
  steps with many ties, which makes plateau detection noisy.
- The learning rate is multiplied by ``lr_factor`` once ``lr_patience`` consecutive epochs pass
  without a gain, and that counter restarts; training stops once ``early_stop_patience`` epochs
  pass without a gain. (torch's ReduceLROnPlateau waits one epoch longer: patience + 1.)
- The last partial minibatch is kept and masked, so every item is seen every epoch.
- A prompt is flagged harmful when p > tau (strictly), everywhere: sweep, metrics, verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from lasa_jax.config import default_ssi_config
from lasa_jax.errors import SSIError
from lasa_jax.infra import fileio
from lasa_jax.infra.fileio import atomic_write
from lasa_jax.model.features import FEATURE_KINDS

FORMAT_VERSION = 1
WEIGHTS_FILE = "ssi.safetensors"
META_FILE = "ssi.json"
CRITERIA = ("accuracy", "f1", "balanced_accuracy", "tpr_at_fpr")
ALL_SEEN = "all_seen"
ALL_HELDOUT = "all_heldout"
# Fields a run config may embed next to ours (used by the feature-extraction side).
_TOLERATED_FIELDS = ("layer", "batch_size_features")
_META_FIELDS = ("layer", "threshold", "hidden_size", "probe_hidden", "dropout",
                "train_languages", "model_fingerprint", "feature", "format_version")


def _as_config(cfg: Any) -> ml_collections.ConfigDict:
    """Accepts a ConfigDict, a dataclass or a mapping; fills defaults; rejects unknown fields."""
    if cfg is None:
        return default_ssi_config()
    if isinstance(cfg, ml_collections.ConfigDict):
        given = cfg.to_dict()
    elif dataclasses.is_dataclass(cfg):
        given = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping):
        given = dict(cfg)
    else:
        raise SSIError(f"ssi config: expected ConfigDict, dataclass or mapping, got {type(cfg).__name__}")
    out = default_ssi_config()
    for key, value in given.items():
        if key in _TOLERATED_FIELDS:
            continue
        if key not in out:
            raise SSIError(f"ssi config: unknown field {key!r} (known: {', '.join(sorted(out))})")
        try:
            out[key] = tuple(value) if key == "train_languages" else value
        except TypeError as e:  # ConfigDict refuses type changes, e.g. a string for a float
            raise SSIError(f"ssi config: field {key!r}: {e}") from None
    if out.criterion not in CRITERIA:
        raise SSIError(f"ssi config: criterion {out.criterion!r} not in {CRITERIA}")
    if not 0.0 < out.val_fraction < 1.0:
        raise SSIError(f"ssi config: val_fraction must be in (0, 1), got {out.val_fraction}")
    if out.batch_size < 1 or out.max_epochs < 1:
        raise SSIError("ssi config: batch_size and max_epochs must be >= 1")
    if not 0.0 <= out.dropout < 1.0:
        raise SSIError(f"ssi config: dropout must be in [0, 1), got {out.dropout}")
    if not out.train_languages:
        raise SSIError("ssi config: train_languages is empty")
    return out


# ----------------------------------------------------------------------------- model

def _torch_linear_bias_init(fan_in: int):
    # torch.nn.Linear draws its bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); matching it keeps
    # the probe's starting point comparable to the authors' PyTorch probe.
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# Same as torch's kaiming_uniform(a=sqrt(5)) for Linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Probe(nn.Module):
    """Linear(d, H) -> LayerNorm(H) -> GELU (exact) -> Dropout -> Linear(H, 1)."""

    hidden: int = -1
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        d = x.shape[-1]
        h_dim = d if self.hidden == -1 else self.hidden
        h = nn.Dense(h_dim, kernel_init=_torch_linear_kernel_init,
                     bias_init=_torch_linear_bias_init(d), name="hidden")(x)
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(h)  # torch's LayerNorm eps
        h = nn.gelu(h, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        z = nn.Dense(1, kernel_init=_torch_linear_kernel_init,
                     bias_init=_torch_linear_bias_init(h_dim), name="out")(h)
        return z[..., 0]


# ----------------------------------------------------------------------------- split

def split_train_val(labels, languages, train_languages: Sequence[str], val_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of the training languages by (language, label); the rest is held out.

    Each (language, label) group sends round(val_fraction * n) items to validation, at least one
    when the group has two or more, so every training language has both classes in validation.
    Returns sorted int64 index arrays (train, val, heldout).
    """
    labels = np.asarray(labels)
    languages = np.asarray(languages).astype(str)
    if labels.ndim != 1 or languages.shape != labels.shape:
        raise SSIError(f"ssi split: labels {labels.shape} and languages {languages.shape} must be "
                       "1-D of equal length")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for lang in train_languages:
        in_lang = languages == lang
        if not in_lang.any():
            raise SSIError(f"ssi split: training language {lang!r} has no items")
        for label in np.unique(labels[in_lang]):
            group = np.flatnonzero(in_lang & (labels == label))
            group = group[rng.permutation(len(group))]
            n_val = int(round(val_fraction * len(group)))
            if len(group) >= 2:
                n_val = min(max(n_val, 1), len(group) - 1)
            val.append(group[:n_val])
            train.append(group[n_val:])
    heldout = np.flatnonzero(~np.isin(languages, list(train_languages)))
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    return cat(train), cat(val), heldout.astype(np.int64)


# ----------------------------------------------------------------------------- training

def _check_xy(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise SSIError(f"ssi {what}: features must be (N, d) and labels (N,), got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise SSIError(f"ssi {what}: no items")
    if not np.isin(y, (0, 1)).all():
        raise SSIError(f"ssi {what}: labels must be 0 (benign) or 1 (harmful)")
    if not np.isfinite(x).all():
        raise SSIError(f"ssi {what}: features contain NaN or Inf")
    return x, y.astype(np.float32)


def _make_optimizer(cfg) -> optax.GradientTransformation:
    # inject_hyperparams keeps the learning rate in the optimiser state as an array, so the
    # plateau schedule changes it between epochs without recompiling the epoch function.
    def make(learning_rate):
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                           optax.adamw(learning_rate, weight_decay=cfg.weight_decay))

    return optax.inject_hyperparams(make)(learning_rate=cfg.learning_rate)


def _make_epoch_fn(model: Probe, tx: optax.GradientTransformation, batch_size: int):
    """One epoch of training plus the validation pass, as one function to jit."""

    def loss_fn(params, xb, yb, mb, key):
        logits = model.apply(params, xb, deterministic=False, rngs={"dropout": key})
        per_item = optax.sigmoid_binary_cross_entropy(logits, yb) * mb
        return per_item.sum() / jnp.maximum(mb.sum(), 1.0), per_item.sum()

    def epoch(params, opt_state, x, y, x_val, y_val, key):
        n = x.shape[0]
        n_batches = -(-n // batch_size)
        shuffle_key, dropout_key = jax.random.split(key)
        order = jax.random.permutation(shuffle_key, n)
        pad = n_batches * batch_size - n
        order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(n_batches, batch_size)
        mask = (jnp.arange(n_batches * batch_size) < n).astype(jnp.float32).reshape(n_batches, batch_size)

        def step(carry, batch):
            params, opt_state = carry
            idx, mb, i = batch
            grads, loss_sum = jax.grad(loss_fn, has_aux=True)(
                params, x[idx], y[idx], mb, jax.random.fold_in(dropout_key, i))
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss_sum

        (params, opt_state), loss_sums = jax.lax.scan(
            step, (params, opt_state), (order, mask, jnp.arange(n_batches)))
        val_logits = model.apply(params, x_val, deterministic=True)
        val_loss = optax.sigmoid_binary_cross_entropy(val_logits, y_val).mean()
        val_acc = ((val_logits > 0).astype(jnp.float32) == y_val).mean()
        return params, opt_state, loss_sums.sum() / n, val_loss, val_acc

    return epoch


def train_probe(x_train, y_train, x_val, y_val, cfg=None, *, seed: int | None = None):
    """Trains the probe; returns (best-validation-loss params, history).

    history: lists ``train_loss``, ``val_loss``, ``val_accuracy`` (at p > 0.5), ``lr`` (the rate
    used during that epoch), one entry per epoch run; ``best_epoch`` (0-based), ``best_val_loss``,
    ``stopped_early``, ``epochs_run``, ``selection`` ("val_loss"), ``compile_seconds`` and
    ``train_seconds`` (wall time of the epochs, compile excluded).
    """
    cfg = _as_config(cfg)
    seed = cfg.seed if seed is None else seed
    x_train, y_train = _check_xy(x_train, y_train, "train")
    x_val, y_val = _check_xy(x_val, y_val, "validation")
    if x_val.shape[1] != x_train.shape[1]:
        raise SSIError(f"ssi: validation width {x_val.shape[1]} != train width {x_train.shape[1]}")

    model = Probe(hidden=cfg.hidden, dropout=cfg.dropout)
    tx = _make_optimizer(cfg)
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    # Jitted: eagerly, init dispatches (and compiles) dozens of tiny ops one by one.
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, x_train.shape[1]), jnp.float32),
                                          deterministic=True))(init_key)
    opt_state = tx.init(params)
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_val, y_val))

    t0 = time.perf_counter()
    # Ahead-of-time compilation: compile time is measured on its own, and a shape or dtype
    # change that would silently recompile raises instead.
    epoch_fn = jax.jit(_make_epoch_fn(model, tx, cfg.batch_size)).lower(
        params, opt_state, *data, train_key).compile()
    compile_seconds = time.perf_counter() - t0

    history: dict[str, Any] = dict(train_loss=[], val_loss=[], val_accuracy=[], lr=[])
    best_params, best_loss, best_epoch = params, math.inf, -1
    lr = float(cfg.learning_rate)
    since_best = since_lr_change = 0
    stopped_early = False
    t0 = time.perf_counter()
    for epoch in range(cfg.max_epochs):
        params, opt_state, train_loss, val_loss, val_acc = epoch_fn(
            params, opt_state, *data, jax.random.fold_in(train_key, epoch))
        val_loss = float(val_loss)
        history["train_loss"].append(float(train_loss))
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(float(val_acc))
        history["lr"].append(lr)
        if val_loss < best_loss:
            best_params, best_loss, best_epoch = params, val_loss, epoch
            since_best = since_lr_change = 0
        else:
            since_best += 1
            since_lr_change += 1
        if since_best >= cfg.early_stop_patience:
            stopped_early = epoch + 1 < cfg.max_epochs
            break
        if since_lr_change >= cfg.lr_patience:
            lr *= cfg.lr_factor
            since_lr_change = 0
            hp = opt_state.hyperparams
            hp["learning_rate"] = jnp.asarray(lr, dtype=hp["learning_rate"].dtype)
    history.update(best_epoch=best_epoch, best_val_loss=best_loss, stopped_early=stopped_early,
                   epochs_run=len(history["val_loss"]), selection="val_loss",
                   compile_seconds=compile_seconds, train_seconds=time.perf_counter() - t0)
    return jax.tree_util.tree_map(np.asarray, best_params), history


# ----------------------------------------------------------------------------- threshold

def _confusion(probs: np.ndarray, labels: np.ndarray, tau: float) -> tuple[int, int, int, int]:
    pred = probs > tau
    pos = labels == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    return tp, fp, int(np.sum(~pred & pos)), int(np.sum(~pred & ~pos))


def _criterion_score(criterion: str, tp: int, fp: int, fn: int, tn: int,
                     max_fpr: float | None) -> float | None:
    # Each score is one division of exact integers, so mathematically equal scores compare equal
    # and the tie rule below is not decided by rounding.
    p, n = tp + fn, fp + tn
    if criterion == "accuracy":
        return (tp + tn) / (p + n)
    if criterion == "f1":
        denom = 2 * tp + fp + fn
        return 2 * tp / denom if denom else 0.0
    if criterion == "balanced_accuracy":
        if p == 0 or n == 0:
            raise SSIError("ssi threshold: balanced_accuracy needs both classes in the labels")
        return (tp * n + tn * p) / (2 * p * n)
    if criterion == "tpr_at_fpr":
        if p == 0 or n == 0:
            raise SSIError("ssi threshold: tpr_at_fpr needs both classes in the labels")
        # fp / n is one correctly rounded division, so an FPR equal to max_fpr (e.g. 29/100 vs
        # 0.29) compares equal; fp <= max_fpr * n would not (0.29 * 100 = 28.999...).
        return tp / p if fp / n <= max_fpr else None
    raise SSIError(f"ssi threshold: criterion {criterion!r} not in {CRITERIA}")


def sweep_threshold(probs, labels, criterion: str = "accuracy", max_fpr: float | None = None,
                    lo: float = 0.30, hi: float = 0.70, step: float = 0.01) -> tuple[float, float]:
    """Best threshold on the grid lo, lo + step, ..., hi for the criterion; returns (tau, score).

    Prediction is p > tau. Ties go to the threshold closest to 0.5, then to the higher one.
    ``tpr_at_fpr`` maximises TPR among thresholds with FPR <= max_fpr and raises SSIError when
    no grid threshold reaches that FPR.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.shape != labels.shape or probs.ndim != 1 or probs.size == 0:
        raise SSIError(f"ssi threshold: probs {probs.shape} and labels {labels.shape} must be 1-D, "
                       "equal length, non-empty")
    if criterion == "tpr_at_fpr" and max_fpr is None:
        raise SSIError("ssi threshold: criterion tpr_at_fpr needs max_fpr")
    # Integer grid: repeated float addition would drift off 0.01 multiples.
    i_lo, i_hi = int(round(lo / step)), int(round(hi / step))
    best = None  # (score, -distance to 0.5, tau)
    for i in range(i_lo, i_hi + 1):
        tau = round(i * step, 12)
        score = _criterion_score(criterion, *_confusion(probs, labels, tau), max_fpr)
        if score is None:
            continue
        key = (score, -round(abs(tau - 0.5), 12), tau)
        if best is None or key > best:
            best = key
    if best is None:
        raise SSIError(f"ssi threshold: no threshold in [{lo}, {hi}] has FPR <= {max_fpr}")
    return best[2], best[0]


# ----------------------------------------------------------------------------- metrics

def roc_auc(scores, labels) -> float | None:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties get average ranks).

    None when only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average rank for each run of equal scores: ranks are 1-based, a run from i to j gets (i+j)/2.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    run_ranks = first + (counts + 1) / 2.0
    ranks = np.empty_like(scores)
    ranks[order] = np.repeat(run_ranks, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _group_metrics(probs, labels, threshold) -> dict[str, Any]:
    tp, fp, fn, tn = _confusion(probs, labels, threshold)
    p, n = tp + fn, fp + tn
    return dict(accuracy=(tp + tn) / (p + n), tpr=tp / p if p else None, fpr=fp / n if n else None,
                roc_auc=roc_auc(probs, labels), n=int(p + n), n_harmful=int(p))


def per_language_metrics(probs, labels, languages, threshold: float,
                         train_languages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{lang: {accuracy, tpr, fpr, roc_auc, n, n_harmful, seen}} plus the pooled groups
    ``all_seen`` (training languages) and ``all_heldout`` (the rest) when they have items.

    tpr is None without harmful items, fpr None without benign items, roc_auc None with one class.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    languages = np.asarray(languages).astype(str)
    if not (probs.shape == labels.shape == languages.shape) or probs.ndim != 1:
        raise SSIError(f"ssi metrics: probs {probs.shape}, labels {labels.shape} and languages "
                       f"{languages.shape} must be 1-D of equal length")
    seen_set = set(train_languages)
    out: dict[str, dict[str, Any]] = {}
    for lang in sorted(set(languages.tolist()), key=lambda l: (l not in seen_set, l)):
        m = languages == lang
        out[lang] = dict(_group_metrics(probs[m], labels[m], threshold), seen=lang in seen_set)
    seen_mask = np.isin(languages, list(seen_set))
    for key, mask, seen in ((ALL_SEEN, seen_mask, True), (ALL_HELDOUT, ~seen_mask, False)):
        if mask.any():
            out[key] = dict(_group_metrics(probs[mask], labels[mask], threshold), seen=seen)
    return out


# ----------------------------------------------------------------------------- artifact

def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclasses.dataclass
class SSIArtifact:
    """A trained probe with its metadata (layer, threshold, widths, fingerprint, ...)."""

    meta: dict[str, Any]
    params: Any  # {"params": {"hidden": {...}, "norm": {...}, "out": {...}}}, NumPy leaves

    def __post_init__(self):
        model = Probe(hidden=int(self.meta["probe_hidden"]), dropout=float(self.meta["dropout"]))
        self._apply = jax.jit(lambda p, x: model.apply(p, x, deterministic=True))

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def logits(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        width = int(self.meta["hidden_size"])
        if x.ndim != 2 or x.shape[1] != width:
            raise SSIError(f"ssi: features must be (N, {width}), got {x.shape}")
        return np.asarray(self._apply(self.params, x))

    def probs(self, features) -> np.ndarray:
        return _sigmoid(self.logits(features).astype(np.float64))

    def verdicts(self, features) -> np.ndarray:
        return self.probs(features) > self.threshold


def save_artifact(directory: str, params, meta: Mapping[str, Any]) -> None:
    """Writes ssi.safetensors (names like "hidden.kernel", kernels (in, out)) and ssi.json.

    The JSON is written last, so a directory with ssi.json always has matching weights.
    """
    from safetensors.numpy import save_file

    missing = [k for k in _META_FIELDS if k not in meta]
    if missing:
        raise SSIError(f"ssi save: meta lacks {', '.join(missing)}")
    if meta["feature"] not in FEATURE_KINDS.values():
        raise SSIError(f"ssi save: meta feature {meta['feature']!r} not in {list(FEATURE_KINDS.values())}")
    flat = traverse_util.flatten_dict(params["params"], sep=".")
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flat.items()}
    meta_json = json.dumps(_jsonable(dict(meta)), indent=2, sort_keys=True)
    atomic_write(os.path.join(directory, WEIGHTS_FILE), lambda p: save_file(tensors, p))

    def write_json(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(meta_json + "\n")

    atomic_write(os.path.join(directory, META_FILE), write_json)


def load_artifact(directory: str, *, model_fingerprint: str | None = None,
                  hidden_size: int | None = None, num_layers: int | None = None) -> SSIArtifact:
    """Loads and checks an SSI directory against the model it will run on (checks are skipped
    for arguments left None)."""
    from safetensors.numpy import load

    meta_path = os.path.join(directory, META_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (meta_path, weights_path):
        if not fileio.exists(path):
            raise SSIError(f"{path}: missing SSI artifact file")
    try:
        meta = json.loads(fileio.read_text(meta_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SSIError(f"{meta_path}: not valid JSON ({e}); rerun the ssi stage") from None
    if not isinstance(meta, dict):
        raise SSIError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in _META_FIELDS if k not in meta]
    if missing:
        raise SSIError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise SSIError(f"{meta_path}: format_version {meta['format_version']} not supported "
                       f"(expected {FORMAT_VERSION})")
    if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
        raise SSIError(f"{meta_path}: trained for model fingerprint {meta['model_fingerprint']!r}, "
                       f"but this model is {model_fingerprint!r}")
    if hidden_size is not None and int(meta["hidden_size"]) != hidden_size:
        raise SSIError(f"{meta_path}: probe width hidden_size={meta['hidden_size']} but the model's "
                       f"hidden size is {hidden_size}")
    if num_layers is not None and not 0 <= int(meta["layer"]) <= num_layers:
        raise SSIError(f"{meta_path}: layer {meta['layer']} out of range 0..{num_layers}")
    try:
        flat = load(fileio.read_bytes(weights_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise SSIError(f"{weights_path}: not a readable safetensors file ({' '.join(str(e).split())}); "
                       "rerun the ssi stage") from None
    d, h = int(meta["hidden_size"]), int(meta["probe_hidden"])
    expected = {"hidden.kernel": (d, h), "hidden.bias": (h,), "norm.scale": (h,), "norm.bias": (h,),
                "out.kernel": (h, 1), "out.bias": (1,)}
    if set(flat) != set(expected):
        raise SSIError(f"{weights_path}: tensors {sorted(flat)} != expected {sorted(expected)}")
    for name, shape in expected.items():
        if flat[name].shape != shape:
            raise SSIError(f"{weights_path}: {name} has shape {flat[name].shape}, expected {shape} "
                           f"from hidden_size={d}, probe_hidden={h}")
    params = {"params": traverse_util.unflatten_dict(flat, sep=".")}
    return SSIArtifact(meta=meta, params=params)


# ----------------------------------------------------------------------------- pipeline

def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def train_ssi(features, labels, languages, cfg=None, meta: Mapping[str, Any] | None = None):
    """Split, train, pick tau on validation, measure per language; returns (artifact, report).

    ``meta`` supplies ``layer``, ``model_fingerprint`` and ``feature`` (default
    "last_real_token_raw_prompt"); widths, threshold, dropout and languages are filled in here.
    Per-language metrics: training languages are scored on their validation items only (the
    training items would flatter them); held-out languages on all their items.
    """
    cfg = _as_config(cfg)
    meta = dict(meta or {})
    if "layer" not in meta:
        raise SSIError("ssi: meta needs 'layer' (the bottleneck layer the features come from)")
    x = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    languages = np.asarray(languages).astype(str)
    if x.ndim != 2 or x.shape[0] != labels.shape[0] or languages.shape != labels.shape:
        raise SSIError(f"ssi: features {x.shape}, labels {labels.shape}, languages {languages.shape} "
                       "must be (N, d), (N,), (N,)")
    train_idx, val_idx, heldout_idx = split_train_val(
        labels, languages, cfg.train_languages, cfg.val_fraction, cfg.seed)
    if len(np.unique(labels[train_idx])) < 2:
        raise SSIError("ssi: training split needs both harmful (1) and benign (0) items")
    params, history = train_probe(x[train_idx], labels[train_idx], x[val_idx], labels[val_idx], cfg,
                                  seed=cfg.seed)
    d = x.shape[1]
    meta.update(threshold=0.5, hidden_size=d, probe_hidden=d if cfg.hidden == -1 else int(cfg.hidden),
                dropout=float(cfg.dropout), train_languages=list(cfg.train_languages),
                format_version=FORMAT_VERSION)
    meta.setdefault("model_fingerprint", None)
    meta.setdefault("feature", FEATURE_KINDS["raw"])
    artifact = SSIArtifact(meta=meta, params=params)
    val_probs = artifact.probs(x[val_idx])
    tau, score = sweep_threshold(val_probs, labels[val_idx], cfg.criterion,
                                 max_fpr=cfg.max_fpr if cfg.criterion == "tpr_at_fpr" else None)
    artifact.meta["threshold"] = tau
    eval_idx = np.concatenate([val_idx, heldout_idx])
    eval_probs = np.concatenate([val_probs, artifact.probs(x[heldout_idx])]) if len(heldout_idx) else val_probs
    per_language = per_language_metrics(eval_probs, labels[eval_idx], languages[eval_idx], tau,
                                        cfg.train_languages)
    heldout_langs = sorted(set(languages[heldout_idx].tolist()))
    report = _jsonable(dict(
        layer=int(meta["layer"]), threshold=tau, criterion=cfg.criterion, criterion_score=score,
        per_language=per_language, history=history, n_train=len(train_idx), n_val=len(val_idx),
        n_heldout=len(heldout_idx), seen_languages=list(cfg.train_languages),
        heldout_languages=heldout_langs,
        note="seen-language metrics are on the validation split; held-out languages on all items",
    ))
    return artifact, report


# ----------------------------------------------------------------------------- reporting

def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(report: Mapping[str, Any]) -> str:
    rows = [f"SSI layer {report['layer']}  threshold {report['threshold']:.2f} ({report['criterion']})",
            f"{'language':<12} {'split':<8} {'n':>6} {'harmful':>7} {'acc':>6} {'tpr':>6} {'fpr':>6} {'auc':>6}"]
    for lang, m in report["per_language"].items():
        if lang in (ALL_SEEN, ALL_HELDOUT):
            rows.append("-" * 62)
        rows.append(f"{lang:<12} {'seen' if m['seen'] else 'held-out':<8} {m['n']:>6} {m['n_harmful']:>7} "
                    f"{_fmt(m['accuracy']):>6} {_fmt(m['tpr']):>6} {_fmt(m['fpr']):>6} {_fmt(m['roc_auc']):>6}")
    return "\n".join(rows)
