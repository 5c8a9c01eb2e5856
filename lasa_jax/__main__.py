"""``python -m lasa_jax [--config=configs/toy.py] [--config.FIELD=VALUE ...]`` (same as lasa_jax.main)."""
from lasa_jax.main import cli

cli()
