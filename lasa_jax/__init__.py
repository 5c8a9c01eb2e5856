"""lasa_jax: LASA (Language-Agnostic Semantic Alignment) in JAX/Flax.

The notebook surface: load a local HF checkpoint (optionally onto a mesh), run it, get per-layer
last-token features, save it back; and the stage functions the command line calls.
"""
from lasa_jax.features import extract_features
from lasa_jax.lm import LanguageModel, load_model
from lasa_jax.models.config import ModelConfig, from_hf_config
from lasa_jax.sharding import make_mesh

__all__ = ["LanguageModel", "ModelConfig", "extract_features", "from_hf_config", "load_model",
           "make_mesh", "run_bottleneck", "run_ssi", "run_align", "run_evaluate", "run"]


def __getattr__(name):
    # Stage functions import their heavier dependencies lazily.
    if name in ("run_bottleneck", "run_ssi", "run"):
        from lasa_jax import pipeline
        return getattr(pipeline, name)
    if name == "run_align":
        from lasa_jax.train import run_align
        return run_align
    if name == "run_evaluate":
        from lasa_jax.evaluate import run_evaluate
        return run_evaluate
    raise AttributeError(f"module 'lasa_jax' has no attribute {name!r}")
