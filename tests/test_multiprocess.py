"""Two local processes (4 simulated CPU devices each) joined by jax.distributed on loopback.

- One checkpoint sharded across both gives the single-process features (float32, 1e-5) and
  greedy generations (token for token).
- The multi-host contract's helpers: process 0's decisions reach both, its errors too, a
  mismatch of barrier names is an error rather than a hang, sharded arrays reach the host whole.
- (slow) ``python -m lasa_jax.main`` on the tiny config, all four stages, mesh data=2 x fsdp=4:
  two processes produce the single-process run's outputs (same k*, silhouettes within 1e-4,
  same SSI layer and threshold, identical generations); and one process killed during align,
  both restarted, resume from the last checkpoint and end where the uninterrupted run ended
  (float32 weights within 1e-6).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

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


def _wait_all(procs, logs, timeout, *, until=None):
    """Wait for every process (or for ``until`` alone); a process that fails stops the others at
    once (the survivors would wait at their next collective until the timeout)."""
    deadline = time.time() + timeout
    waiting = [until] if until is not None else procs
    while any(p.poll() is None for p in waiting):
        failed = any(p.poll() not in (None, 0) for p in procs if p is not until)
        if failed or time.time() > deadline:
            for q in procs:
                q.kill()
            why = "a process failed" if failed else "timed out"
            raise AssertionError(f"{why}:\n" + "\n---\n".join(_tail(x) for x in logs))
        time.sleep(0.5)
    return [p.returncode for p in procs]


def _tail(path, n=4000):
    with open(path, errors="replace") as f:
        return f"{path}:\n" + f.read()[-n:]


def _env(devices, cache=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if cache:  # the restarted processes reuse what the killed ones compiled
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def test_contract_helpers_across_two_processes(tmp_path):
    port = _free_port()
    logs = [str(tmp_path / f"log{i}.txt") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"),
                               "contract", str(port), str(i), str(tmp_path)], env=_env(4),
                              stdout=open(logs[i], "w"), stderr=subprocess.STDOUT)
             for i in range(2)]
    assert _wait_all(procs, logs, 300) == [0, 0], "\n".join(_tail(x) for x in logs)
    seen = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
    for s in seen:
        assert s["broadcast"] == {"from": 0, "text": "é" * 300}
        assert s["on_primary"] == {"ran_on": 0}
        assert s["error"][1] == "/w/bottleneck/report.json: not found"
        assert "point" in s["mismatch"] and s["mismatch"] != "passed"
        assert s["to_host"] == np.arange(24, dtype=np.float32).reshape(8, 3).tolist()
    assert seen[0]["error"][0] == "ArtifactError"  # process 0 raises its own error
    assert [s["progress"] for s in seen] == [True, False]


# ------------------------------------------------------------------------------ the whole pipeline

# The tiny config as a user runs it; only the evaluation sets are cut (3 queries per set, in all
# 10 languages) to keep the CPU time of three runs down.
PIPELINE = ["--config=configs/tiny.py", "--config.progress=False", "--config.mesh.data=2",
            "--config.mesh.fsdp=4", "--config.evaluate.max_prompts=3"]


def _main(workdir, *, processes, log_dir, extra=(), kill=None, cache=None, timeout=1500):
    """Run ``python -m lasa_jax.main`` as ``processes`` processes; returns their log files."""
    port = _free_port()
    procs, logs = [], []
    for i in range(processes):
        args = [*PIPELINE, f"--config.workdir={workdir}", *extra]
        if processes > 1:
            args += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"]
        if kill is None:
            cmd = [sys.executable, "-m", "lasa_jax.main", *args]
        else:
            cmd = [sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"), "main",
                   str(kill[0]), str(kill[1]), "--", *args]
        logs.append(os.path.join(log_dir, f"{os.path.basename(workdir)}-{len(os.listdir(log_dir))}-{i}.log"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(8 // processes, cache),
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    if kill is None:
        codes = _wait_all(procs, logs, timeout)
        assert codes == [0] * processes, "\n".join(_tail(x) for x in logs)
        return logs
    # The killed process dies first; a scheduler (srun --kill-on-bad-exit) then stops the other,
    # which waits at its next collective for the dead one.
    victim, survivor = procs[kill[1]], procs[1 - kill[1]]
    _wait_all(procs, logs, timeout, until=victim)
    time.sleep(2)
    survivor.kill()
    survivor.wait()
    assert victim.returncode == -signal.SIGKILL, "\n".join(_tail(x) for x in logs)
    return logs


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    logs = str(base / "logs")
    os.makedirs(logs)
    t0 = time.time()
    _main(str(base / "single"), processes=1, log_dir=logs)
    t1 = time.time()
    consoles = _main(str(base / "two"), processes=2, log_dir=logs)
    print(f"single process {t1 - t0:.0f}s, two processes {time.time() - t1:.0f}s")
    return base, consoles


def _json(path):
    with open(path) as f:
        return json.load(f)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_process_pipeline_equals_single_process(pipeline_runs):
    base, consoles = pipeline_runs
    one, two = base / "single", base / "two"
    a, b = _json(one / "bottleneck" / "report.json"), _json(two / "bottleneck" / "report.json")
    assert a["bottleneck_layer"] == b["bottleneck_layer"]
    assert [r["layer"] for r in a["layers"]] == [r["layer"] for r in b["layers"]]
    for ra, rb in zip(a["layers"], b["layers"]):
        for k in ("s_sem", "s_lang", "diff"):
            assert abs(ra[k] - rb[k]) <= 1e-4, (ra["layer"], k, ra[k], rb[k])
    sa, sb = _json(one / "ssi" / "report.json"), _json(two / "ssi" / "report.json")
    assert (sa["layer"], sa["threshold"]) == (sb["layer"], sb["threshold"])
    ga, gb = _jsonl(one / "evaluate" / "generations.jsonl"), _jsonl(two / "evaluate" / "generations.jsonl")
    assert len(ga) == len(gb) == 2 * 2 * 3 * 10  # aligned + base, harmful + benign, 3 queries, 10 languages
    for x, y in zip(ga, gb):
        assert {k: v for k, v in x.items() if k != "ssi_prob"} == {k: v for k, v in y.items() if k != "ssi_prob"}
        assert (x["ssi_prob"] is None) == (y["ssi_prob"] is None)
        if x["ssi_prob"] is not None:
            assert abs(x["ssi_prob"] - y["ssi_prob"]) <= 1e-5
    # Console tables on process 0 only.
    out = [open(c, errors="replace").read() for c in consoles]
    assert "| metric (%) |" in out[0] and "| metric (%) |" not in out[1]


@pytest.mark.slow
def test_killed_process_during_align_resumes_from_the_last_checkpoint(pipeline_runs):
    """Process 1 is SIGKILLed once checkpoint 3 (of 6 steps, every 3) is on disk; process 0 is
    then stopped too. Both restart with the same command: training resumes at step 3 and ends
    with the uninterrupted two-process run's metrics and weights."""
    base, _ = pipeline_runs
    ref, work = base / "two", base / "killed"
    work.mkdir()
    for sub in ("tiny_model", "cache", "bottleneck", "ssi"):  # the earlier stages' outputs
        shutil.copytree(ref / sub, work / sub)
    cache = str(base / "jax_cache")
    logs = str(base / "logs")
    _main(str(work), processes=2, log_dir=logs, extra=["--config.stages=align"], kill=(3, 1), cache=cache)
    assert not (work / "align" / "hf").exists() and not (work / "align" / "summary.json").exists()
    steps = sorted(int(d) for d in os.listdir(work / "align" / "checkpoints") if d.isdigit())
    assert steps == [3]
    _main(str(work), processes=2, log_dir=logs, extra=["--config.stages=align"], cache=cache)
    summary = _json(work / "align" / "summary.json")
    assert summary["resumed_from"] == 3 and summary["steps"] == 6
    got, want = _jsonl(work / "align" / "metrics.jsonl"), _jsonl(ref / "align" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["batch"] for r in got] == [r["batch"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], atol=1e-6, rtol=0)
    from safetensors.numpy import load_file
    a = load_file(str(work / "align" / "hf" / "model.safetensors"))
    b = load_file(str(ref / "align" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6
