"""lasa_jax: LASA (Language-Agnostic Semantic Alignment) in JAX/Flax.

The notebook surface: load a local HF checkpoint (optionally onto a mesh), run it, get per-layer
last-token features, save it back; ``run(config)`` (what the command line calls) and the stage
modules ``lasa_jax.stages.{bottleneck,ssi,align,baseline,evaluate}``, each ``run(ctx)`` on a
``Context(config)``.
"""
from lasa_jax.errors import LasaError
from lasa_jax.infra.mesh import make_mesh
from lasa_jax.model.config import ModelConfig, from_hf_config
from lasa_jax.model.features import extract_features
from lasa_jax.model.lm import LanguageModel, load_model

__all__ = ["Context", "LanguageModel", "LasaError", "ModelConfig", "extract_features", "from_hf_config",
           "load_model", "make_mesh", "run"]


def __getattr__(name):
    # The runner pulls in every stage (Orbax, optax, matplotlib); load it only when asked for.
    if name == "run":
        from lasa_jax.runner import run
        return run
    if name == "Context":
        from lasa_jax.context import Context
        return Context
    raise AttributeError(f"module 'lasa_jax' has no attribute {name!r}")
