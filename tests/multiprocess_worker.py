"""One process of the 2-process test: joins jax.distributed on loopback, loads a checkpoint
sharded over all 8 global devices (4 local), writes the gathered features and greedy
generations (process 0 only)."""
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


if __name__ == "__main__":
    main(*sys.argv[1:])
