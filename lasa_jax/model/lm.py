"""A loaded language model: config, params on a mesh, tokenizer, and its jitted entry points.

This is the notebook face of lasa_jax (``lasa_jax.load_model``) and what every stage uses. The
one function that computes a prompt's feature lives here (``LanguageModel.features``): hidden
state at the last real token of every requested layer, correct under left and right padding.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lasa_jax.errors import CheckpointError, ConfigError
from lasa_jax.infra import fileio
from lasa_jax.infra import mesh as shd
from lasa_jax.model import checkpoint as ckpt
from lasa_jax.model.config import ModelConfig, check_expected, from_hf_config
from lasa_jax.model.lengths import PromptBound, template_tail
from lasa_jax.model.packing import PackedBatch
from lasa_jax.model.transformer import Transformer, param_specs, unstack_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str | Any) -> Any:
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (choose from {sorted(DTYPES)})")
    return DTYPES[name]


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer, from its files only (never the hub, never remote code); a
    checkpoint at a URL has its tokenizer files copied to a local temporary folder first."""
    import transformers
    try:
        if not fileio.is_url(path):
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                              trust_remote_code=False)
        with tempfile.TemporaryDirectory() as local:
            fileio.local_copy(path, ("config.json", *ckpt.AUX_FILES), local)
            return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True,
                                                              trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer from this directory ({e})".splitlines()[0]) from None


def chat_text(tokenizer, messages, *, add_generation_prompt: bool = True, **template_kwargs) -> str:
    """The chat template applied to ``messages`` (``(role, content)`` pairs or ``{role, content}``
    dicts), as text. ``template_kwargs`` reach the template (``enable_thinking`` for Qwen3; other
    templates ignore names they do not use). Encode the result with ``add_special_tokens=False``:
    the template writes the special tokens itself (Llama's BOS), and this is exactly what
    ``apply_chat_template(..., tokenize=True)`` encodes."""
    msgs = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **template_kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def model_fingerprint(cfg: ModelConfig, tokenizer=None) -> str:
    """Identity of a model's *architecture and vocabulary*, not of its weights: an SSI trained on
    the base model's features is meant to run on the aligned model (same architecture, same
    tokenizer, different weights), so a weight hash here would reject the intended use. Use
    ``checkpoint.weights_digest`` where the exact weights matter (feature caches)."""
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 4096)]).encode())
        h.update(str(len(vocab)).encode())
    return h.hexdigest()[:16]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def param_shardings(cfg: ModelConfig, mesh) -> dict:
    """Flat parameter path -> NamedSharding on ``mesh``, from the logical axes the model declares."""
    specs = param_specs(cfg)
    return shd.named_shardings({p: axes for p, (_, axes) in specs.items()},
                               {p: shape for p, (shape, _) in specs.items()}, mesh)


def unstacked_shardings(cfg: ModelConfig, mesh) -> dict:
    """The shardings of ``unstack_layers(params)`` on ``mesh`` (as a tree): each layer's arrays
    as the stacked ones without their leading "layers" dimension."""
    stacked = ckpt.unflatten(param_shardings(cfg, mesh))
    layer = jax.tree.map(lambda sh: jax.NamedSharding(mesh, jax.P(*sh.spec[1:])), stacked["layers"])
    return {**{k: v for k, v in stacked.items() if k != "layers"},
            **{f"layers_{i}": layer for i in range(cfg.num_layers)}}


class LanguageModel:
    """A decoder, its parameters (placed on ``mesh``) and its tokenizer."""

    def __init__(self, cfg: ModelConfig, params: dict, *, tokenizer=None, path: str | None = None,
                 mesh=None, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", attention_impl: str | None = None,
                 chat_template_kwargs: dict | None = None, scan_layers: bool = True):
        self.cfg, self.params, self.tokenizer, self.path, self.mesh = cfg, params, tokenizer, path, mesh
        self.decode_layout = False  # True on the copy for_decoding returns
        self._decoding = None
        # Passed to the chat template wherever this model's prompts are templated (features,
        # gating, KTO items, generation): config.model.enable_thinking.
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.dtype, self.param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        act = shd.activation_sharding(mesh) if mesh is not None else None
        self.module = Transformer(cfg, dtype=self.dtype, param_dtype=self.param_dtype, remat=remat,
                                  attention_impl=attention_impl, activation_sharding=act,
                                  scan_layers=scan_layers)

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, path: str, *, dtype: str | Any = "float32", param_dtype: str | Any | None = None,
             mesh=None, expect: dict | None = None, tokenizer: bool = True, **kw) -> "LanguageModel":
        cfg = from_hf_config(path)
        if expect:
            check_expected(cfg, expect, os.path.join(path, "config.json"))
        param_dtype = as_dtype(param_dtype if param_dtype is not None else dtype)
        shardings = None
        if mesh is not None:
            named = param_shardings(cfg, mesh)
            shardings = lambda path, shape: named[path]
        params = ckpt.load_params(path, cfg, dtype=param_dtype, shardings=shardings)
        tok = load_tokenizer(path) if tokenizer else None
        return cls(cfg, params, tokenizer=tok, path=path, mesh=mesh, dtype=dtype,
                   param_dtype=param_dtype, **kw)

    @property
    def param_shardings(self) -> dict:
        """The params' shardings as a tree like ``params`` (requires a mesh)."""
        return ckpt.unflatten(param_shardings(self.cfg, self.mesh))

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.cfg, self.tokenizer)

    def with_params(self, params: dict) -> "LanguageModel":
        other = object.__new__(LanguageModel)
        other.__dict__.update(self.__dict__)
        other.params = params
        other._decoding = None  # the decode copy holds the old weights
        return other

    def for_decoding(self, tensor: int | None = None) -> "LanguageModel":
        """This model's copy for token-by-token generation, made once and kept on this model
        (``generate`` calls this): one parameter tree per layer (``unstack_layers``), so a decode
        step reads each layer's weights in place rather than a slice copied out of the stacked
        arrays; on a mesh, resharded onto the same devices as a (data, 1, tensor) mesh
        (``mesh.decode_mesh``), so a step gathers no FSDP-sharded weights. ``tensor`` None picks
        the width by ``mesh.decode_tensor_size`` (replicated when the weights fit in half a
        device). The copy holds the weights a second time: drop this model when only decoding
        follows."""
        if self.decode_layout:
            return self
        if tensor is None and self._decoding is not None:
            return self._decoding
        mesh, shardings = None, None
        if self.mesh is not None:
            if tensor is None:
                nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
                tensor = shd.decode_tensor_size(nbytes, self.mesh.size, self.mesh.shape["tensor"],
                                                shd.device_memory_bytes())
            mesh = shd.decode_mesh(self.mesh, tensor)
            shardings = unstacked_shardings(self.cfg, mesh)
        params = jax.jit(functools.partial(unstack_layers, num_layers=self.cfg.num_layers),
                         out_shardings=shardings)(self.params)
        other = LanguageModel(self.cfg, params, tokenizer=self.tokenizer, path=self.path, mesh=mesh,
                              dtype=self.dtype, param_dtype=self.param_dtype, remat="none",
                              attention_impl=self.module.attention_impl,
                              chat_template_kwargs=self.chat_template_kwargs, scan_layers=False)
        other.decode_layout = True
        self._decoding = other
        return other

    def save(self, out_dir: str, *, dtype: str | Any | None = None, max_shard_bytes: int = 2 << 30) -> str:
        """Export as an HF checkpoint directory (tokenizer and generation files copied over)."""
        if self.decode_layout:
            raise ValueError("save the model for_decoding was called on, not its decode copy")
        return ckpt.save_params(self.params, self.cfg, out_dir, source_dir=self.path,
                                dtype=as_dtype(dtype) if dtype else None, max_shard_bytes=max_shard_bytes)

    # ---------------------------------------------------------------- tokenising
    def encode(self, texts: Sequence[str], *, padding_side: str = "right", chat_template: bool = False,
               pad_to_multiple: int | None = None, batch_multiple: int | None = None,
               max_length: int | None = None, bound: PromptBound | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise raw prompts (the tokenizer's own special tokens kept, e.g. LLaMA's BOS) or
        chat-templated prompts. Lengths are padded to a power-of-two bucket (or a multiple of
        ``pad_to_multiple``) so that jit compiles only a handful of shapes."""
        ids = self.token_ids(texts, chat_template=chat_template, max_length=max_length, bound=bound)
        return pad_batch(ids, self.pad_id, padding_side=padding_side, pad_to_multiple=pad_to_multiple,
                         batch_multiple=batch_multiple or (shd.batch_multiple(self.mesh) if self.mesh else 1))

    def token_ids(self, texts: Sequence[str], *, chat_template: bool = False,
                  add_special_tokens: bool = True, max_length: int | None = None,
                  bound: PromptBound | None = None) -> list[list[int]]:
        """Token ids of raw prompts (with the tokenizer's own special tokens unless
        ``add_special_tokens=False``, e.g. for text a chat template already wrote) or of
        chat-templated prompts; ``max_length`` or ``bound`` (which also counts what it cuts and
        protects the template's tail) keep each prompt's end, because the last token is what a
        feature reads."""
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer")
        raw = list(texts)
        if chat_template:
            # The template writes the special tokens itself (e.g. LLaMA's BOS).
            texts = [chat_text(self.tokenizer, [("user", t)], **self.chat_template_kwargs) for t in raw]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            ids = [self.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in raw]
        if bound is not None:
            tail = (lambda i: template_tail(self.tokenizer, texts[i], raw[i])) if chat_template else None
            ids = bound.apply(raw, ids, tail)
        return ids if max_length is None else [x[-max_length:] for x in ids]

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok is not None and tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        return 0

    # ---------------------------------------------------------------- compute
    def _check_padding(self, mask: np.ndarray) -> None:
        # cuDNN masks are per-row lengths, which only describe right padding.
        if self.module.attention_impl == "cudnn":
            right = np.arange(mask.shape[1])[None, :] < mask.sum(-1, keepdims=True)
            if not np.array_equal(mask, right):
                raise ValueError("attention_impl='cudnn' needs right-padded batches (padding_side='right')")

    def _place(self, *arrays):
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(shd.put_array(a, self.mesh) for a in arrays)

    # The jitted functions close over the module, not ``self``: a closure over ``self`` stored in
    # ``self`` is a reference cycle, which keeps a dropped model's weights on the device until the
    # garbage collector happens to run.
    @functools.cached_property
    def _logits_fn(self):
        module = self.module

        def fn(params, tokens, mask):
            return module.apply({"params": params}, tokens, mask).logits
        return jax.jit(fn)

    @functools.cached_property
    def _features_fn(self):
        module = self.module

        def fn(params, tokens, mask, layers):
            _, state = module.apply({"params": params}, tokens, mask, capture="last",
                                    return_logits=False, mutable=["intermediates"])
            hidden = state["intermediates"]["hidden_states"][0]  # (L+1, B, d)
            return hidden[jnp.asarray(layers)].astype(jnp.float32)
        return jax.jit(fn, static_argnums=3)

    @functools.cached_property
    def _packed_features_fn(self):
        module = self.module

        def fn(params, tokens, segments, last, layers):
            _, state = module.apply({"params": params}, tokens, capture="last", return_logits=False,
                                    segment_ids=segments, capture_index=last, mutable=["intermediates"])
            hidden = state["intermediates"]["hidden_states"][0]  # (L+1, rows, K, d)
            return hidden[jnp.asarray(layers)].astype(jnp.float32)
        return jax.jit(fn, static_argnums=4)

    def packed_features(self, batch: PackedBatch, layers: Sequence[int] | None = None) -> jax.Array:
        """(len(layers), rows, K, d) float32: ``features`` of every prompt packed in ``batch``
        (``lasa_jax.model.packing``), at [:, row, k] for its (row, k) in ``batch.items``."""
        layers = self.check_layers(layers)
        arrays = self._place(batch.tokens, batch.segment_ids, batch.last)
        return self._packed_features_fn(self.params, *arrays, layers)

    def logits(self, tokens, mask) -> jax.Array:
        """(B, T, vocab) float32 logits for a padded batch."""
        self._check_padding(np.asarray(mask, bool))
        tokens, mask = self._place(np.asarray(tokens, np.int32), np.asarray(mask, bool))
        return self._logits_fn(self.params, tokens, mask)

    def check_layers(self, layers: Sequence[int] | None, field: str | None = None) -> tuple[int, ...]:
        """The layer indices as a tuple (None = all, 0..L); out-of-range ones are an error that
        names ``field`` (the config field they came from) when given."""
        L = self.cfg.num_layers
        layers = tuple(range(L + 1)) if layers is None else tuple(int(k) for k in layers)
        bad = [k for k in layers if not 0 <= k <= L]
        if bad:
            where = f"{field}: " if field else ""
            raise ConfigError(f"{where}layer(s) {bad} out of range: this model has layers 0..{L} "
                              "(0 = embeddings, k = after block k)")
        return layers

    def features(self, tokens, mask, layers: Sequence[int] | None = None) -> jax.Array:
        """(len(layers), B, d) float32: hidden state at each row's last real token, per layer
        (0 = embedding output, k = after block k; the same indices as HF ``hidden_states``).
        The LM head is not computed."""
        layers = self.check_layers(layers)
        self._check_padding(np.asarray(mask, bool))
        tokens, mask = self._place(np.asarray(tokens, np.int32), np.asarray(mask, bool))
        return self._features_fn(self.params, tokens, mask, layers)


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (at least ``minimum``)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, *, padding_side: str = "right",
              pad_to_multiple: int | None = None, batch_multiple: int = 1,
              length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pad token lists into (tokens, mask) arrays; extra all-pad rows round the batch up to
    ``batch_multiple`` (the data-parallel size) and are simply ignored by callers."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    n = len(ids)
    longest = max(1, max((len(x) for x in ids), default=1))
    T = length or (bucket_length(longest) if pad_to_multiple is None else round_up(longest, pad_to_multiple))
    B = round_up(max(n, 1), batch_multiple)
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), bool)
    for i, x in enumerate(ids):
        if len(x) > T:
            raise ValueError(f"sequence {i} has {len(x)} tokens > padded length {T}")
        if padding_side == "right":
            tokens[i, :len(x)], mask[i, :len(x)] = x, True
        else:
            tokens[i, T - len(x):], mask[i, T - len(x):] = x, True
    mask[n:, 0] = True  # filler rows get one real token so every row has a last token
    return tokens, mask


def load_model(path: str, *, dtype: str = "float32", mesh=None, **kw) -> LanguageModel:
    """Load a Hugging Face LLaMA / Qwen2 / Qwen3 checkpoint (safetensors) from a local or mounted
    folder or a ``gs://`` URL."""
    return LanguageModel.load(path, dtype=dtype, mesh=mesh, **kw)
