"""Command line: ``python -m lasa_jax.main --config=configs/tiny.py [--config.FIELD=VALUE ...]``."""
import os

from absl import app, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Run config file (configs/*.py).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from lasa_jax.pipeline import run
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
