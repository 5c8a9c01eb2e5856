"""Faults and bad inputs a real run meets (issue 18): bad overrides, fields, model directories and
data files, long prompts, corrupt checkpoints and artifacts, two runs on one workdir, a read-only
workdir, a full disk.

One tiny workdir (configs/tiny.py, made smaller: 2 layers, 4 align steps, checkpoints at 2 and 4)
is built once per module with all four stages; each case runs on its own copy and hashes every
file before and after. A user error must end in one line naming the field or file (exit status 2
and a single ``error:`` line on the command line; a one-line ``LasaError`` in process), before
any stage runs when the preflight can see it, with no earlier artifact changed; where a run can
go on (a corrupt newest checkpoint, a full disk) it resumes and reaches the parameters of the
uninterrupted run. dtype float32; parameters compared to 1e-6 absolute.

Kill -9 during ``align`` and while a checkpoint is being written, and a non-finite loss, are
tests/test_train.py's (resume to 1e-6; one-line ``NonFiniteLoss`` naming the last good checkpoint).
"""
import errno
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lasa_jax import preflight, runner
from lasa_jax.config import base_config
from lasa_jax.data.readers import FIXTURES_DIR
from lasa_jax.errors import LasaError, WorkdirLocked
from lasa_jax.infra import lock as lockmod
from lasa_jax.main import user_message
from lasa_jax.stages import align as align_stage
from lasa_jax.stages import evaluate as evaluate_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    "progress": False, "model.tiny.hidden_size": 32, "model.tiny.num_layers": 2,
    "model.tiny.intermediate_size": 64, "data.languages": "en,zh,ko", "bottleneck.max_queries": 4,
    "bottleneck.bootstrap_draws": 20, "ssi.max_epochs": 2, "align.max_steps": 4, "align.checkpoint_every": 2,
    "align.keep_checkpoints": 3, "align.tensorboard": False, "evaluate.max_prompts": 1,
    "evaluate.max_new_tokens": 4, "evaluate.compare_base": False,
}
TOL = 1e-6


def tiny_config(workdir, **fields):
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir = str(workdir)
    for name, value in {**OVERRIDES, **fields}.items():
        *parents, leaf = name.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def cli(workdir, timeout=600, **fields):
    args = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **fields}.items()]
    return subprocess.run([sys.executable, "-m", "lasa_jax.main", "--config=configs/tiny.py",
                           f"--config.workdir={workdir}", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=timeout)


def snapshot(workdir) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_cli_error(proc, *needles):
    """Exit status 2, no traceback, exactly one ``error:`` line, the last one, naming ``needles``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def run_error(config, *needles) -> str:
    """runner.run(config) must raise a one-line user error naming ``needles``."""
    with pytest.raises(LasaError) as info:
        runner.run(config)
    message = str(info.value)
    assert "\n" not in message and user_message(info.value) == message
    for needle in needles:
        assert needle in message, message
    return message


def hf_tensors(workdir, stage="align"):
    from safetensors.numpy import load_file
    return load_file(os.path.join(str(workdir), stage, "hf", "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def metrics(workdir):
    with open(os.path.join(str(workdir), "align", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The reference workdir: bottleneck, ssi, align (steps 2 and 4 checkpointed), evaluate."""
    workdir = tmp_path_factory.mktemp("built") / "run"
    runner.run(tiny_config(workdir))
    return workdir


@pytest.fixture
def work(built, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(built, workdir, symlinks=True)
    return workdir


@pytest.fixture
def no_stage_runs(monkeypatch):
    """For errors the preflight must find: any stage running fails the test."""
    def refuse(ctx):
        raise AssertionError("a stage ran before the preflight reported the problem")
    for name in list(runner.STAGES):
        monkeypatch.setitem(runner.STAGES, name, refuse)


def test_reference_workdir(built):
    assert sorted(os.listdir(built)) == ["align", "bottleneck", "cache", "evaluate", "ssi", "tiny_model"]
    assert [r["step"] for r in metrics(built)] == [1, 2, 3, 4]
    assert sorted(os.listdir(built / "align" / "checkpoints")) == ["2", "4"]
    report = json.loads((built / "evaluate" / "report.json").read_text())
    assert list(report["models"]) == ["aligned"]
    assert report["prompt_lengths"]["generation"] == {"limit": 2048 - 4, "truncated": 0, "examples": []}


# ----------------------------------------------------------------------------- fields

def test_every_config_field_has_a_rule():
    assert set(preflight.leaves(base_config())) == set(preflight.FIELD_RULES)


@pytest.mark.parametrize("field,value,needle", [
    ("ssi.layer", 99, "config.ssi.layer=99: out of range; this model has layers 0..2"),
    ("ssi.layer", -5, "config.ssi.layer=-5: expected an integer >= 0 (or -1)"),
    ("data.languages", "en,xx", "config.data.languages: unknown language 'xx'"),
    ("evaluate.judge", "foo", "config.evaluate.judge='foo': expected one of"),
    ("evaluate.top_p", 1.5, "config.evaluate.top_p=1.5"),
    ("evaluate.temperature", -1.0, "config.evaluate.temperature=-1.0"),
    ("evaluate.max_new_tokens", 4096, "config.evaluate.max_new_tokens=4096 leaves no room"),
    ("bottleneck.ci", 1.0, "config.bottleneck.ci=1.0"),
    ("bottleneck.bootstrap_draws", -1, "config.bottleneck.bootstrap_draws=-1"),
    ("mesh.data", 3, "config.mesh: 8 devices are not divisible by 3"),
    ("align.max_length", 100_000, "config.align.max_length=100000 exceeds the model's max_position_embeddings=2048"),
    ("align.grad_accum", 3, "config.align.batch_size=8 is not divisible by config.align.grad_accum=3"),
    ("align.source_probs", "safety=2", "config.align.source_probs"),
    ("align.z_mode", "sometimes", "config.align.z_mode='sometimes'"),
    ("ssi.train_languages", ("en", "xx"), "config.ssi.train_languages: unknown language 'xx'"),
    ("ssi.criterion", "auc", "config.ssi.criterion='auc'"),
    ("data.feature_text", "html", "config.data.feature_text='html'"),
    ("data.max_prompt_tokens", -1, "config.data.max_prompt_tokens=-1"),
    ("model.remat", "some", "config.model.remat='some'"),
    ("seed", -3, "config.seed=-3"),
    ("model.tiny.hidden_size", 16, "config.model.tiny.hidden_size=16 but it was built with 32"),
    ("data.eval_harmful", "/nonexistent/harmful.csv", "/nonexistent/harmful.csv:-: config.data.eval_harmful"),
    ("data.kto_pairs", "fixtures:nope.json", "nope.json:-: config.data.kto_pairs: data file not found"),
])
def test_bad_field_is_one_line_before_any_stage(work, no_stage_runs, field, value, needle):
    before = snapshot(work)
    run_error(tiny_config(work, **{field: value}), needle)
    assert snapshot(work) == before


def test_cli_field_errors_exit_2_with_one_line(work):
    before = snapshot(work)
    assert_cli_error(cli(work, **{"ssi.layer": 99}), "config.ssi.layer=99: out of range")
    assert_cli_error(cli(work, stages="bottleneck,foo"), "config.stages: unknown stage(s) ['foo']")
    assert_cli_error(cli(work, **{"align.batch_size": "abc"}), "bad --config override",
                     "--config.align.batch_size=abc: invalid literal for int()")
    assert snapshot(work) == before


# ----------------------------------------------------------------------------- model directories

def _model_copy(work, tmp_path, edit):
    model = tmp_path / "model"
    shutil.copytree(work / "tiny_model", model)
    edit(model)
    return str(model)


def _set_config_json(model, **fields):
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(fields)
    (model / "config.json").write_text(json.dumps(cfg))


def _pickle_only(model):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.mark.parametrize("edit,needles", [
    (lambda m: _set_config_json(m, model_type="gpt2"), ["config.json", "'model_type'='gpt2' does not match"]),
    (_pickle_only, ["pickle checkpoints are not loaded"]),
    (lambda m: _truncate(m / "model.safetensors"), ["model.safetensors: not a readable safetensors file"]),
    (lambda m: (m / "tokenizer.json").unlink(), ["cannot load a tokenizer"]),
    (lambda m: _set_config_json(m, hidden_size=48), ["checkpoint does not match config.json"]),
    (lambda m: (m / "config.json").write_text("{\"archi"), ["config.json: malformed JSON"]),
])
def test_bad_model_directory(work, tmp_path, no_stage_runs, edit, needles):
    path = _model_copy(work, tmp_path, edit)
    before = snapshot(work)
    run_error(tiny_config(work, **{"model.path": path}), path, *needles)
    assert snapshot(work) == before


def test_model_expect_and_missing_directory(work, no_stage_runs, tmp_path):
    run_error(tiny_config(work, **{"model.path": str(work / "tiny_model"), "model.expect.num_layers": 7}),
              "config.model.expect", "num_layers: config says 7, checkpoint has 2")
    run_error(tiny_config(work, **{"model.path": str(tmp_path / "absent")}), "config.model.path=", "not a directory")


# ----------------------------------------------------------------------------- data files

def test_data_problem_reported_before_hours_of_compute(work, no_stage_runs, tmp_path):
    bad = tmp_path / "pairs.json"
    bad.write_text('[{"prompt": "hi", "chosen": "a", "rejected": "b"')
    run_error(tiny_config(work, **{"data.kto_pairs": str(bad)}), f"{bad}:1: json: malformed JSON")
    twin = tmp_path / "harmful.csv"
    twin.write_text("id,en,zh\n1,Hello,\n")
    run_error(tiny_config(work, **{"data.eval_harmful": str(twin)}), str(twin), "missing language column 'ko'")


LONG = "x " * 100_000  # 200,000 characters, 200,000 tokens of the byte-level tokenizer


def _long_parallel(tmp_path):
    records = json.loads(open(os.path.join(FIXTURES_DIR, "parallel_harmful.json"), encoding="utf-8").read())
    records[0]["original_query"] = LONG
    path = tmp_path / "parallel.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_long_parallel_prompt_is_cut_and_counted(work, tmp_path):
    path = _long_parallel(tmp_path)
    runner.run(tiny_config(work, stages="bottleneck", **{"data.parallel_prompts": str(path)}))
    report = json.loads((work / "bottleneck" / "report.json").read_text())
    assert report["prompt_lengths"] == {"limit": 2048, "truncated": 1,
                                        "examples": [f"{path}:id 1 (en) (200001 tokens)"]}  # + BOS


def test_long_ssi_prompt_is_cut_and_counted(work, tmp_path):
    records = json.loads(open(os.path.join(FIXTURES_DIR, "ssi_prompts.json"), encoding="utf-8").read())
    records[0]["prompt"] = LONG
    path = tmp_path / "ssi.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    runner.run(tiny_config(work, stages="ssi", **{"data.ssi_prompts": str(path), "data.max_prompt_tokens": 512}))
    report = json.loads((work / "ssi" / "report.json").read_text())
    assert report["prompt_lengths"]["limit"] == 512 and report["prompt_lengths"]["truncated"] == 1


def test_long_evaluation_prompt_is_cut_and_counted(work, tmp_path):
    path = _long_parallel(tmp_path)  # as the harmful evaluation set
    runner.run(tiny_config(work, stages="evaluate", **{"data.eval_harmful": str(path)}))
    report = json.loads((work / "evaluate" / "report.json").read_text())
    # Generation leaves room for the 4 new tokens; the SSI reads the raw prompt (BOS + 200,000 bytes).
    assert report["prompt_lengths"]["generation"]["limit"] == 2044
    assert report["prompt_lengths"]["generation"]["truncated"] == 1
    assert report["prompt_lengths"]["ssi"] == {"limit": 2048, "truncated": 1,
                                               "examples": [f"{path}:id 1 (en) (200001 tokens)"]}


def test_prompt_that_cannot_fit_names_file_and_record(work, tmp_path):
    """A limit of 8 tokens cannot hold the chat template's tail (end of turn + assistant header)."""
    before = snapshot(work / "evaluate")
    path = _long_parallel(tmp_path)  # as the harmful evaluation set
    message = run_error(tiny_config(work, stages="evaluate", **{"data.eval_harmful": str(path),
                                                               "data.max_prompt_tokens": 8}),
                        f"{path}:id 1 (en): prompt:", "leave no room in the limit of 8")
    assert "tokens, and the" in message
    assert snapshot(work / "evaluate") == before


# ----------------------------------------------------------------------------- checkpoints

def _newest_data_files(work):
    # Every file of the step: which of them a restore reads depends on how Orbax's concurrent
    # writes fell (small ones may hold superseded b-tree nodes, and in one CI run cutting only the
    # largest left step 4 readable), so all are cut short.
    d = work / "align" / "checkpoints" / "4" / "state" / "ocdbt.process_0" / "d"
    return sorted(d.iterdir())


# With every data file cut, Orbax abandons the step's other pending array reads when the first
# fails; their coroutines are reported at garbage collection, ~150 lines of noise per CI run.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["data_file", "metadata"])
def test_corrupt_newest_checkpoint_falls_back_and_reaches_the_same_parameters(built, work, damage):
    if damage == "data_file":
        for path in _newest_data_files(work):
            _truncate(path)
    else:
        _truncate(work / "align" / "checkpoints" / "4" / "state" / "_METADATA")
    shutil.rmtree(work / "align" / "hf")
    damaged = snapshot(work / "align" / "checkpoints" / "4")
    runner.run(tiny_config(work, stages="align"))
    summary = json.loads((work / "align" / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    # Nothing deleted: the unreadable step is kept, byte for byte, beside the checkpoints.
    assert snapshot(work / "align" / "checkpoints-unreadable" / "4") == damaged
    assert sorted(os.listdir(work / "align" / "checkpoints")) == ["2", "4"]
    rows = metrics(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in metrics(built)], atol=TOL, rtol=0)
    assert max_diff(hf_tensors(work), hf_tensors(built)) <= TOL


def test_no_restorable_step_is_one_line_and_moves_nothing(work):
    for step in ("2", "4"):
        _truncate(work / "align" / "checkpoints" / step / "state" / "_METADATA")
    before = snapshot(work)
    message = run_error(tiny_config(work, stages="align"), "align checkpoint step 4 does not restore",
                        str(work / "align" / "checkpoints" / "4" / "state" / "_METADATA"), "nor does any earlier step")
    assert "checkpoints-unreadable" not in message
    after = snapshot(work)
    # The reference log-probs are recomputed only if absent; here they exist, so nothing changed.
    assert after == before


def test_metrics_log_keeps_one_row_per_step(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 2, 3, 4)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # torn by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    align_stage._MetricsLog(str(tmp_path), 3, tensorboard=False).close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0}]


def test_os_errors_a_user_fixes_are_one_line_others_are_bugs():
    assert user_message(OSError(errno.EACCES, "Permission denied", "/w/align/x")) == "/w/align/x: Permission denied"
    assert user_message(OSError(errno.EROFS, "Read-only file system", "/w/x")) == "/w/x: Read-only file system"
    assert user_message(OSError(errno.ENOSPC, "No space left on device")) == \
        "(path not reported): No space left on device"
    assert user_message(OSError(errno.ENOENT, "No such file or directory", "/w/x")) is None  # a bug of ours
    assert user_message(RuntimeError("x")) is None


def test_full_disk_during_align_is_one_line_and_resumable(built, work, monkeypatch):
    shutil.rmtree(work / "align" / "checkpoints" / "4")
    shutil.rmtree(work / "align" / "hf")
    real = align_stage._MetricsLog.write

    def full(self, row):
        if row["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        real(self, row)

    monkeypatch.setattr(align_stage._MetricsLog, "write", full)
    with pytest.raises(OSError) as info:
        runner.run(tiny_config(work, stages="align"))
    assert user_message(info.value) == f"{work / 'align' / 'metrics.jsonl'}: No space left on device"
    assert not os.path.exists(work / "lasa.lock")
    monkeypatch.setattr(align_stage._MetricsLog, "write", real)
    runner.run(tiny_config(work, stages="align"))
    assert [r["step"] for r in metrics(work)] == [1, 2, 3, 4]
    assert max_diff(hf_tensors(work), hf_tensors(built)) <= TOL


# ----------------------------------------------------------------------------- artifacts

@pytest.mark.parametrize("damage,stages,needles", [
    (lambda w: (w / "bottleneck" / "report.json").unlink(), "ssi", ["bottleneck/report.json: not found"]),
    (lambda w: _truncate(w / "bottleneck" / "report.json"), "ssi", ["bottleneck/report.json: bottleneck report is not valid JSON"]),
    (lambda w: _truncate(w / "ssi" / "ssi.safetensors"), "evaluate", ["ssi/ssi.safetensors: not a readable safetensors file"]),
    (lambda w: _truncate(w / "ssi" / "ssi.json"), "evaluate", ["ssi/ssi.json: not valid JSON"]),
    (lambda w: shutil.rmtree(w / "ssi"), "evaluate", ["ssi: no SSI artifact"]),
    (lambda w: shutil.rmtree(w / "align"), "evaluate", ["align/hf: not found, and no align checkpoints"]),
    (lambda w: [shutil.rmtree(w / "align" / x) for x in ("hf", "checkpoints/4")], "evaluate",
     ["align/hf: not found", "holds step 2 of 4: the align stage did not finish"]),
])
def test_missing_or_corrupt_artifact_is_one_line_before_any_stage(work, no_stage_runs, damage, stages, needles):
    damage(work)
    before = snapshot(work)
    run_error(tiny_config(work, stages=stages), *needles)
    assert snapshot(work) == before


def test_ssi_from_another_model_is_refused_before_loading(work, no_stage_runs):
    meta = json.loads((work / "ssi" / "ssi.json").read_text())
    meta["model_fingerprint"] = "0" * 16
    (work / "ssi" / "ssi.json").write_text(json.dumps(meta))
    run_error(tiny_config(work, stages="evaluate"), "ssi/ssi.json: trained for model fingerprint '0000000000000000'")


def test_evaluate_exports_a_finished_align_run_instead_of_dropping_it(built, work):
    shutil.rmtree(work / "align" / "hf")
    runner.run(tiny_config(work, stages="evaluate"))
    report = json.loads((work / "evaluate" / "report.json").read_text())
    assert list(report["models"]) == ["aligned"]
    assert max_diff(hf_tensors(work), hf_tensors(built)) == 0.0
    gens = [json.loads(x) for x in (work / "evaluate" / "generations.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (built / "evaluate" / "generations.jsonl").read_text().splitlines()]
    assert [g["response"] for g in gens] == [g["response"] for g in want]


def test_failed_evaluation_leaves_the_previous_one(work, monkeypatch):
    before = snapshot(work / "evaluate")

    def broken(*args, **kw):
        raise RuntimeError("judge crashed")

    monkeypatch.setattr(evaluate_stage, "make_judge", broken)
    with pytest.raises(RuntimeError, match="judge crashed"):
        runner.run(tiny_config(work, stages="evaluate"))
    assert snapshot(work / "evaluate") == before
    monkeypatch.undo()
    runner.run(tiny_config(work, stages="evaluate"))  # the next evaluation clears the leftovers
    assert not [n for n in os.listdir(work) if n.startswith(".evaluate")]
    assert snapshot(work / "evaluate").keys() == before.keys()


def test_corrupt_feature_cache_is_recomputed(built, work):
    for name in os.listdir(work / "cache"):
        if name.endswith(".npy"):
            _truncate(work / "cache" / name)
    runner.run(tiny_config(work, stages="bottleneck"))
    got = json.loads((work / "bottleneck" / "report.json").read_text())
    want = json.loads((built / "bottleneck" / "report.json").read_text())
    assert got["bottleneck_layer"] == want["bottleneck_layer"]
    np.testing.assert_allclose([e["diff"] for e in got["layers"]], [e["diff"] for e in want["layers"]], atol=1e-6)


# ----------------------------------------------------------------------------- workdir

def test_lock_refuses_a_live_holder_and_replaces_stale_ones(tmp_path):
    first = lockmod.WorkdirLock(str(tmp_path))
    first.acquire()
    info = json.loads((tmp_path / "lasa.lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(WorkdirLocked, match=rf"in use by host {socket.gethostname()} pid {os.getpid()}"):
        lockmod.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / "lasa.lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "start": "1", "started": "", "argv": []}
    (tmp_path / "lasa.lock").write_text(json.dumps(stale))
    with lockmod.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / "lasa.lock").read_text())["pid"] == os.getpid()

    foreign = {"host": "elsewhere", "pid": 1, "started": "", "argv": ["python", "-m", "lasa_jax.main"]}
    (tmp_path / "lasa.lock").write_text(json.dumps(foreign))
    with pytest.raises(WorkdirLocked, match="in use by host elsewhere pid 1"):
        lockmod.WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - lockmod.STALE_AFTER_S - 60
    os.utime(tmp_path / "lasa.lock", (old, old))  # no heartbeat for longer than STALE_AFTER_S
    with lockmod.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / "lasa.lock").read_text())["host"] == socket.gethostname()


def _race(workdir, barrier, results):
    barrier.wait()
    try:
        lockmod.WorkdirLock(workdir).acquire()  # held until this process exits
        results.put("won")
        time.sleep(3.0)
    except WorkdirLocked:
        results.put("locked")


# The forked racers run only the lock's plain-Python code, never JAX, so fork is safe here.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.parametrize("stale", [False, True])
def test_lock_is_taken_by_exactly_one_of_racing_runs(tmp_path, stale):
    if stale:  # all racers find the same dead holder's lock
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (tmp_path / "lasa.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    mp = multiprocessing.get_context("fork")
    n = 6
    barrier, results = mp.Barrier(n), mp.Queue()
    procs = [mp.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in range(n))
    assert outcomes == ["locked"] * (n - 1) + ["won"]


def test_second_run_on_a_workdir_fails_at_once_naming_the_first(work):
    shutil.rmtree(work / "align")  # the first run trains align from scratch: long enough to be caught
    first = subprocess.Popen([sys.executable, "-m", "lasa_jax.main", "--config=configs/tiny.py",
                              f"--config.workdir={work}", "--config.stages=align",
                              *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (work / "lasa.lock").exists():
            assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        t0 = time.time()
        second = cli(work, stages="align")
        assert_cli_error(second, f"{work / 'lasa.lock'}: the workdir is in use by host {socket.gethostname()} "
                                 f"pid {first.pid}")
        assert first.poll() is None, "the second run must fail while the first still runs"
        elapsed = time.time() - t0
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not (work / "lasa.lock").exists()
    print(f"second run refused in {elapsed:.1f}s (interpreter start included)")


@pytest.fixture
def read_only(tmp_path):
    """Make a path read-only even for root (chattr +i), or by mode bits for other users."""
    made = []

    def make(path):
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                pytest.skip("running as root and chattr +i is unavailable here")
        else:
            os.chmod(path, 0o555)
        made.append(path)

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            os.chmod(path, 0o755)


def test_read_only_workdir_is_one_line_at_once(work, read_only):
    before = snapshot(work)
    read_only(work)
    assert_cli_error(cli(work), f"{work / 'lasa.lock'}: cannot create the workdir lock")
    assert snapshot(work) == before


def test_read_only_stage_folder_is_found_before_any_stage(work, read_only, no_stage_runs):
    read_only(work / "align")
    run_error(tiny_config(work, stages="align"), f"{work / 'align'}: not writable")
