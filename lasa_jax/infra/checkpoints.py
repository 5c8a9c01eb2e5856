"""Train-state checkpoints with Orbax: a CheckpointManager per stage folder, save and restore
of a ``{"state": pytree, "meta": json}`` pair per step."""
from __future__ import annotations

import orbax.checkpoint as ocp


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
