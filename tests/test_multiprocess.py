"""Two local processes (4 simulated CPU devices each) joined by jax.distributed on loopback load
one checkpoint sharded across both and produce the single-process features (float32, 1e-5) and
the single-process greedy generations (token for token)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

from lasa_jax.data.readers import FIXTURES_DIR, read_prompts
from lasa_jax.model.tokenizers import build_byte_tokenizer
from lasa_jax.model.features import extract_features
from lasa_jax.model.lm import load_model
from tests.hf_models import make_hf_model, save_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    ckpt = save_hf_model(make_hf_model("qwen3", num_attention_heads=8, num_key_value_heads=4),
                         str(tmp_path / "ckpt"), max_shard_size="200KB")
    build_byte_tokenizer("qwen").save_pretrained(ckpt)  # 264 ids < the model's 512
    texts = [p.text for p in read_prompts(os.path.join(FIXTURES_DIR, "ssi_prompts.json"))[::37]]
    (tmp_path / "texts.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    out = str(tmp_path / "feats.npy")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                               ckpt, str(port), str(i), out], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(x[-3000:] for x in logs)

    lm = load_model(ckpt)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.cfg.vocab_size, (8, 48)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[::2, :9] = False
    np.testing.assert_allclose(np.load(out), np.asarray(lm.features(tokens, mask)), atol=1e-5, rtol=0)
    texts = (tmp_path / "texts.txt").read_text().split("\n")
    single = extract_features(lm, texts, [0, 2, 3], batch_size=8, progress=False)
    np.testing.assert_allclose(np.load(out.replace(".npy", "_staged.npy")), single, atol=1e-5, rtol=0)
    from lasa_jax.model.generate import generate
    want = generate(lm, lm.token_ids(texts[:8], chat_template=True), max_new_tokens=12, batch_size=8,
                    progress=False)
    got = json.loads((tmp_path / "feats_generated.json").read_text())
    assert got == [list(map(int, row)) for row in want]
    assert any(len(row) > 0 for row in got)
