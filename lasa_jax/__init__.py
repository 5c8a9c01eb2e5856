"""lasa_jax: LASA in JAX/Flax."""
