"""The run configuration: one ml_collections ConfigDict, every field declared here.

Per-model files in ``configs/`` start from ``base_config()`` (the paper models through
``lasa_jax.presets``) and change a few fields; the command line overrides any field
(``--config.ssi.learning_rate=3e-4``). The dict is locked, so a typo in a field name is an error,
on the command line and in code alike. Data only: this module imports no JAX.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from lasa_jax.errors import ConfigError

STAGES = ("bottleneck", "ssi", "align", "baseline", "evaluate")  # pipeline order
# "baseline" (plain KTO on the same pairs, no SSI or prefix; evaluated beside LASA) doubles the
# training cost, so a config asks for it by name.
DEFAULT_STAGES = ("bottleneck", "ssi", "align", "evaluate")
# Architecture facts a run config may state in ``model.expect`` (name -> type); they are checked
# against the checkpoint's config.json at load, so a config for one model never silently runs another.
ARCH_FACTS = {"family": str, "vocab_size": int, "hidden_size": int, "num_layers": int, "num_heads": int,
              "num_kv_heads": int, "head_dim": int, "intermediate_size": int, "tie_embeddings": bool}


def _fixture(name: str) -> str:
    return f"fixtures:{name}"  # resolved against lasa_jax/data/fixtures at run time


def default_distributed_config() -> ml_collections.ConfigDict:
    """``config.distributed`` (see ``lasa_jax.infra.multihost``)."""
    return ml_collections.ConfigDict({
        "initialize": "auto",  # auto | always | never
        "coordinator_address": "",  # "host:port" of process 0; "" = detect
        "num_processes": 0,  # 0 = detect
        "process_id": -1,  # -1 = detect
        "local_device_ids": "",  # "0,1,2,3"; "" = JAX's default for the cluster
    })


def default_ssi_config() -> ml_collections.ConfigDict:
    """``config.ssi``: the probe's training recipe (see ``lasa_jax.method.probe``)."""
    return ml_collections.ConfigDict(dict(
        hidden=-1,  # probe width; -1 = the model's hidden size
        dropout=0.1,
        learning_rate=1e-3,
        weight_decay=1e-4,
        batch_size=64,
        max_epochs=20,
        grad_clip=1.0,
        lr_patience=2,
        lr_factor=0.5,
        early_stop_patience=5,
        val_fraction=0.1,
        train_languages=("en", "zh", "ko"),
        criterion="accuracy",  # accuracy | f1 | balanced_accuracy | tpr_at_fpr
        max_fpr=0.05,
        seed=0,
    ))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/default"
    c.seed = 0
    c.stages = ",".join(DEFAULT_STAGES)  # comma-separated subset of STAGES, run in STAGES order
    c.progress = True

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local HF checkpoint directory
    c.model.require_path = False  # True for real-model configs: an empty path is an error
    c.model.paper_bottleneck = -1  # layer the LASA authors report for this model (reference only)
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "bfloat16"
    c.model.remat = "none"  # none | full | dots | dots_no_batch
    c.model.attention_impl = ""  # "" lets JAX choose; "xla" or "cudnn"
    # Passed to the chat template wherever one is applied (features, gating, KTO items, generation):
    # Qwen3's switch; False (the paper's setting) writes its empty think block into the
    # generation prompt, so the refusal prefix and the reply follow it. Other templates ignore it.
    c.model.enable_thinking = False
    # Architecture facts checked against the checkpoint's config.json (None = not checked).
    c.model.expect = ml_collections.ConfigDict(
        {name: config_dict.placeholder(kind) for name, kind in ARCH_FACTS.items()})
    # Used only when path is empty: a tiny random checkpoint is created in the workdir.
    c.model.tiny = ml_collections.ConfigDict({
        "family": "llama", "hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 128})

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.distributed = default_distributed_config()
    # Device memory for the fit check when the backend does not report it (CPU); 0 = skip.
    c.device_memory_gb = 0.0

    # Every data field is a data path (lasa_jax/data/sources.py): comma-separated local files
    # (JSON, JSONL, CSV, parquet, arrow), globs, `datasets` directories or hub ids ("hf:NAME"),
    # "{lang}" expanded over data.languages, "#field=column" column mappings.
    c.data = ml_collections.ConfigDict()
    c.data.parallel_prompts = _fixture("parallel_harmful.json")  # stage 1: same query, many languages
    c.data.ssi_prompts = _fixture("ssi_prompts.json")  # stage 2: harmful + benign, labelled
    c.data.ssi_harmful = ""  # stage 2: more prompts, all harmful (e.g. HarmBench without a label)
    c.data.ssi_benign = ""  # stage 2: more prompts, all benign (e.g. 'uf/monolingual_first1000_{lang}.json')
    c.data.kto_pairs = _fixture("kto_pairs.json")  # stage 3
    c.data.eval_harmful = _fixture("mild_harmful.csv")  # stage 4, MultiJail format
    c.data.eval_benign = _fixture("benign_twins.csv")
    c.data.languages = "en,zh,it,vi,ar,ko,th,bn,sw,jv"  # any ISO 639-1 codes
    c.data.feature_text = "raw"  # raw | chat : which text a prompt's feature is read from
    # Longest prompt in tokens any stage feeds the model (longer ones keep their end and are
    # counted in the stage's report); 0 = the model's max_position_embeddings. Generation also
    # leaves room for evaluate.max_new_tokens, align also applies align.max_prompt_length.
    c.data.max_prompt_tokens = 0

    c.bottleneck = ml_collections.ConfigDict()
    c.bottleneck.batch_size = 16
    c.bottleneck.bootstrap_draws = 1000
    c.bottleneck.ci = 0.95
    c.bottleneck.cache = True
    c.bottleneck.max_queries = 0  # 0 = all

    c.ssi = default_ssi_config()
    c.ssi.seed = -1  # -1 = config.seed
    c.ssi.layer = -1  # -1 = the bottleneck layer from bottleneck/report.json
    c.ssi.batch_size_features = 16

    c.align = ml_collections.ConfigDict()
    c.align.beta = 0.1
    c.align.desirable_weight = 1.0
    c.align.undesirable_weight = 1.0
    c.align.z_mode = "source"  # source | ssi | label
    c.align.source_probs = "safety=0.5,general=0.0"
    c.align.lambda_align = 0.0  # cross-lingual alignment term; 0 reproduces the paper
    c.align.align_layer = -1  # -1 = bottleneck layer
    c.align.align_batch_queries = 4
    c.align.reference = "precomputed"  # precomputed | per_step
    c.align.learning_rate = 1e-6
    c.align.warmup_steps = 100
    c.align.weight_decay = 0.0
    c.align.grad_clip = 1.0
    c.align.batch_size = 16  # items per optimiser step
    c.align.grad_accum = 1
    c.align.epochs = 3
    c.align.max_steps = 0  # 0 = epochs decide
    c.align.max_length = 512
    c.align.max_prompt_length = 384
    # Packed rows per step come from at most this many shapes, one compiled step each
    # (1 = the run's largest rows for every step).
    c.align.step_shapes = 8
    c.align.checkpoint_every = 100
    c.align.keep_checkpoints = 2
    c.align.export = True
    # Mixed precision: float32 master weights and AdamW moments, forward/backward in model.dtype
    # (the frozen reference stays in model.param_dtype); an update of lr 1e-6 vanishes in bf16.
    c.align.master_dtype = "float32"  # float32 | bfloat16 | float16
    c.align.export_dtype = ""  # "" = the dtype the base checkpoint stores
    c.align.async_checkpoints = True  # Orbax writes in the background; the step loop goes on
    c.align.tensorboard = True  # align/tensorboard (tensorboardX), process 0 only

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.judge = "refusal"  # refusal | qwen3guard | llamaguard
    c.evaluate.guard_path = ""
    c.evaluate.max_new_tokens = 512
    c.evaluate.batch_size = 16
    c.evaluate.temperature = 0.0
    c.evaluate.top_p = 1.0
    c.evaluate.use_ssi = True
    c.evaluate.compare_base = True
    c.evaluate.language_check = True
    c.evaluate.max_prompts = 0  # per set; 0 = all
    return c


def stages_of(config) -> list[str]:
    names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"config.stages: unknown stage(s) {unknown} (known: {list(STAGES)})")
    return [s for s in STAGES if s in names]
