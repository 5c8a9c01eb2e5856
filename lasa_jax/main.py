"""Command line: ``python -m lasa_jax.main [--config=configs/toy.py] [--config.FIELD=VALUE ...]``
(the default config is configs/toy.py, the toy world).

A user error (a ``lasa_jax.errors.LasaError``: an unknown config field, a malformed data file, a
checkpoint that does not match its config, a run that cannot fit, a workdir another run holds;
or an OS error for permissions or a read-only or full file system) ends the run with one line
naming the file or field and exit status 2; ``LASA_DEBUG=1`` shows the traceback instead. Any
other exception is a bug and keeps its traceback. Our own progress lines are logged at INFO;
other libraries (Orbax, absl, JAX) stay at WARNING unless ``--verbosity=1`` asks for more.
"""
import errno
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Run config file (configs/*.py).")
_started = False
# Operating-system errors a user fixes (permissions, a read-only or full file system), not bugs.
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _set_log_levels() -> None:
    verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity > 0
    logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    py_logging.getLogger("lasa_jax").setLevel(py_logging.INFO)


def main(argv):
    global _started
    _started = True
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _set_log_levels()
    from lasa_jax.errors import LasaError
    from lasa_jax.runner import run
    try:
        run(_CONFIG.value)
    except (LasaError, OSError) as e:
        message = user_message(e)
        if message is None or os.environ.get("LASA_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def user_message(e: BaseException) -> str | None:
    """The one-line message of a user-facing error, None for a bug (which keeps its traceback).
    Besides ``LasaError``: an ``OSError`` for permissions or a read-only or full file system,
    named by its path (a disk that fills during ``align`` leaves the last checkpoint to resume from)."""
    from lasa_jax.errors import LasaError
    if isinstance(e, LasaError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _USER_OS_ERRORS:
        where = e.filename if e.filename is not None else "(path not reported)"
        return " ".join(f"{where}: {e.strerror or e}".split())
    return None


def _bad_override(e: BaseException):
    bad = [a for a in sys.argv[1:] if a.startswith("--config.")]
    message = " ".join(str(e).split())
    if isinstance(e, flags.Error) and "--config" not in message:
        print(f"error: bad command-line flag ({message})", file=sys.stderr)
    else:
        print(f"error: bad --config override ({message}); overrides given: {bad}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    # absl reports a value that does not parse (--config.align.batch_size=abc) in two lines with
    # exit status 1; ours is one line and status 2, like every other user error.
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if os.environ.get("LASA_DEBUG"):
            raise
        _bad_override(e)


def cli():
    try:
        app.run(main, flags_parser=_parse_flags)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if _started or os.environ.get("LASA_DEBUG"):
            raise
        # Raised while parsing --config overrides, before main(): an unknown field or a bad value.
        _bad_override(e)


if __name__ == "__main__":
    cli()
