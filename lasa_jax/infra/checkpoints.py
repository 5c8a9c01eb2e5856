"""Train-state checkpoints with Orbax: a CheckpointManager per stage folder, save and restore
of a ``{"state": pytree, "meta": json}`` pair per step, and resume that survives a corrupt step.

A step Orbax committed can still be damaged afterwards (a truncated file on a flaky file system,
a metadata file cut short by a full disk). ``restore_latest`` therefore tries the steps newest
first: a step that fails to restore is reported in one line (step, file, error) and the previous
step is used. Nothing is deleted: the unreadable newer steps are moved to
``<checkpoints>-unreadable/`` (so training can write those step numbers again), and when no step
restores nothing is moved and the run stops with one line.
"""
from __future__ import annotations

import json
import logging
import os
import re

import orbax.checkpoint as ocp

from lasa_jax.errors import ArtifactError
from lasa_jax.infra import fileio, multihost

log = logging.getLogger("lasa_jax")

# Orbax's JSON files inside a step: a truncated one fails with a JSON error that names no file.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "metadata", "_sharding")


def manager(directory: str, *, keep: int, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(keep), 1), create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=bool(async_save))
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                     meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def newest_meta(mngr: ocp.CheckpointManager) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose small JSON meta reads, None if none does; cheap, so
    a run can check that the checkpoints are its own before any expensive work."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 - a damaged step; restore_latest reports it
            continue
        if isinstance(meta, dict):
            return step, meta
    return None


def _chain(error: BaseException) -> list[BaseException]:
    out, e = [], error
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _culprit(step_dir: str, error: BaseException) -> str:
    """The file that broke a restore, as far as it can be told: a JSON file that does not parse,
    else the file and array a TensorStore error names, else the step directory."""
    for root, _, files in os.walk(step_dir):
        for name in sorted(files):
            if name in _JSON_FILES or os.path.basename(root) == "array_metadatas":
                path = os.path.join(root, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        json.load(f)
                except (ValueError, OSError):
                    return path
    for e in _chain(error):
        found = re.search(r'reading "([^"]+)" in \w+ database at local file "([^"]+)"', str(e))
        if found:
            return f"{found.group(2).rstrip('/')} (array {found.group(1)})"
    return step_dir


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The most specific message in the exception chain (Orbax wraps TensorStore's status line
    in a page of JSON spec), on one line."""
    short = [str(e) for e in _chain(error) if str(e).strip() and len(str(e)) < 1000]
    text = " ".join((short[-1] if short else str(error).splitlines()[0] if str(error) else type(error).__name__).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _move_aside(directory: str, steps: list[int]) -> str:
    """Move unreadable step folders out of Orbax's sight, keeping them for inspection."""
    aside = directory.rstrip("/") + "-unreadable"
    if multihost.is_primary():
        folder = fileio.as_path(aside)  # local, or a bucket (where a rename is a copy)
        folder.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target, n = folder / str(step), 1
            while target.exists():
                target, n = folder / f"{step}.{n}", n + 1
            (fileio.as_path(directory) / str(step)).rename(target)
    # Every process must see the folders gone before its manager relists the steps.
    ocp.multihost.sync_global_processes("lasa_jax_checkpoints_move_aside")
    return aside


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict,
                   what: str = "checkpoint") -> tuple[int, dict, dict] | None:
    """(step, state, meta) of the newest step that restores, None when there is no step.

    A step that fails is logged in one line and the previous one is tried; the unreadable steps
    newer than the one used are moved aside (``_move_aside``) and the manager reloaded. If no step
    restores, nothing is moved and an ``ArtifactError`` names the newest step's problem."""
    directory = str(mngr.directory)
    failed: list[tuple[int, str, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, meta = restore(mngr, step, abstract_state)
        except Exception as e:  # noqa: BLE001 - Orbax, TensorStore and json raise many types
            culprit, message = _culprit(os.path.join(directory, str(step)), e), _one_line(e)
            failed.append((step, culprit, message))
            log.warning("%s step %d does not restore (%s: %s); trying the previous step",
                        what, step, culprit, message)
            continue
        if failed:
            aside = _move_aside(directory, [s for s, _, _ in failed])
            mngr.reload()
            log.warning("%s: resuming from step %d; unreadable step(s) %s moved to %s", what, step,
                        [s for s, _, _ in failed], aside)
        return step, state, meta
    if not failed:
        return None
    step, culprit, message = failed[0]
    raise ArtifactError(f"{culprit}: {what} step {step} does not restore ({message}), nor does any earlier "
                        f"step in {directory}; move that folder away to start this stage over")
