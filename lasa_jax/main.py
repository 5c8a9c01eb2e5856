"""Command line: ``python -m lasa_jax.main [--config=configs/toy.py] [--config.FIELD=VALUE ...]``
(the default config is configs/toy.py, the toy world).

Bad input (an unknown config field, a malformed data file, a checkpoint that does not match its
config, a request that cannot fit) ends the run with one line naming the file or field; set
LASA_DEBUG=1 to see the traceback instead.
"""
import os
import sys

from absl import app, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Run config file (configs/*.py).")
_started = False


def _user_errors():
    from lasa_jax.data.readers import DataError
    from lasa_jax.fitcheck import FitError
    from lasa_jax.models.checkpoint import CheckpointError
    from lasa_jax.models.config import ConfigError
    from lasa_jax.sharding import MeshError
    from lasa_jax.ssi import SSIError
    return (DataError, FitError, CheckpointError, ConfigError, MeshError, SSIError,
            FileNotFoundError, ValueError)


def main(argv):
    global _started
    _started = True
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from lasa_jax.pipeline import run
    try:
        run(_CONFIG.value)
    except _user_errors() as e:
        if os.environ.get("LASA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli():
    try:
        app.run(main)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if _started or os.environ.get("LASA_DEBUG"):
            raise
        # Raised while parsing --config overrides, before main(): an unknown field or a bad value.
        bad = [a for a in sys.argv[1:] if a.startswith("--config.")]
        print(f"error: bad --config override ({e}); overrides given: {bad}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
