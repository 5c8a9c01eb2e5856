"""One process of the 2-process tests (4 simulated CPU devices each, joined on loopback).

    multiprocess_worker.py CKPT PORT PID OUT        load a checkpoint sharded over all 8 global
        devices, write the gathered features and greedy generations (process 0 only)
    multiprocess_worker.py contract PORT PID OUT    the multi-host contract's helpers (broadcast,
        on_primary, barrier, to_host); each process writes what it saw to OUT/<pid>.json
    multiprocess_worker.py main KILL_AT KILL_PID -- ARGS...   ``python -m lasa_jax.main ARGS``,
        except that process KILL_PID SIGKILLs itself once align's checkpoint KILL_AT is on disk
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main(checkpoint, port, process_id, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
    import numpy as np
    from jax.experimental import multihost_utils

    from lasa_jax.infra import mesh as shd
    from lasa_jax.model.features import extract_features
    from lasa_jax.model.lm import load_model
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = shd.make_mesh(1, 4, 2)
    lm = load_model(checkpoint, mesh=mesh)
    q = lm.params["layers"]["self_attn"]["q_proj_kernel"]
    assert not q.is_fully_addressable  # each process holds only its devices' slices
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.cfg.vocab_size, (8, 48)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[::2, :9] = False
    feats = multihost_utils.process_allgather(lm.features(tokens, mask), tiled=True)
    # The stage path: tokenise, length-sort, batch, gather across hosts.
    texts = [line.strip() for line in open(os.path.join(os.path.dirname(checkpoint), "texts.txt"))]
    staged = extract_features(lm, texts, [0, 2, 3], batch_size=8, progress=False)
    # The evaluate stage's decoding: prefill + while_loop over the sharded KV cache, chat template.
    from lasa_jax.model.generate import generate
    ids = generate(lm, lm.token_ids(texts[:8], chat_template=True), max_new_tokens=12, batch_size=8,
                   progress=False)
    if jax.process_index() == 0:
        np.save(out, np.asarray(feats))
        np.save(out.replace(".npy", "_staged.npy"), staged)
        with open(out.replace(".npy", "_generated.json"), "w") as f:
            json.dump([list(map(int, row)) for row in ids], f)
    jax.distributed.shutdown()


def contract(port, process_id, out):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(process_id))
    import numpy as np

    from lasa_jax.errors import ArtifactError, LasaError
    from lasa_jax.infra import mesh as shd
    from lasa_jax.infra import multihost
    pid = jax.process_index()
    seen = {"broadcast": multihost.broadcast({"from": pid, "text": "é" * (300 + 500 * pid)}),
            "on_primary": multihost.on_primary(lambda: {"ran_on": pid})}

    def fail():
        raise ArtifactError("/w/bottleneck/report.json: not found")
    try:
        multihost.on_primary(fail)
    except LasaError as e:
        seen["error"] = [type(e).__name__, str(e)]
    try:
        multihost.barrier(f"point {pid}")  # the processes disagree on where they are
        seen["mismatch"] = "passed"
    except AssertionError as e:
        seen["mismatch"] = str(e)
    multihost.barrier("after mismatch")  # and they can still meet afterwards
    mesh = shd.make_mesh(2, 4, 1)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    seen["to_host"] = multihost.to_host(shd.put_array(x, mesh)).tolist()
    seen["progress"] = multihost.show_progress(True)
    with open(os.path.join(out, f"{pid}.json"), "w") as f:
        json.dump(seen, f)
    jax.distributed.shutdown()


def main_with_kill(kill_at, kill_pid, *args):
    import signal
    import time

    from lasa_jax import main as cli
    from lasa_jax.stages import align

    def kill(step, mngr):
        if step == int(kill_at) and jax.process_index() == int(kill_pid):
            mngr.wait_until_finished()
            final = os.path.join(os.fspath(mngr.directory), str(step))
            while not os.path.isdir(final):  # finalised (renamed into place) by process 0
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    align._after_checkpoint = kill
    sys.argv = ["lasa_jax.main", *args]
    cli.cli()


if __name__ == "__main__":
    if sys.argv[1] == "contract":
        contract(*sys.argv[2:])
    elif sys.argv[1] == "main":
        rest = sys.argv[2:]
        main_with_kill(rest[0], rest[1], *rest[3:])  # rest[2] is "--"
    else:
        main(*sys.argv[1:])
