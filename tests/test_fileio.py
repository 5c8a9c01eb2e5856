"""Crash-safe files and folders (lasa_jax.infra.fileio) on a local disk and in a bucket, and
safetensors read by byte range from a URL (lasa_jax.model.remote_safetensors).

The bucket is tests/fake_gcs.py: an fsspec file system registered for gs:// that keeps objects
under a temporary folder, so no network is needed. References: the safetensors library's own
reader (``safe_open``) for slices, exact equality (no tolerance: bytes are copied, not computed).
"""
import json
import os
import stat

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lasa_jax.errors import CheckpointError, ConfigError
from lasa_jax.infra import fileio
from lasa_jax.model.remote_safetensors import RemoteSafetensors
from tests import fake_gcs


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs:// served from tmp_path/objects; the test runs in an empty current folder, so a URL
    wrongly treated as a local path would show up there as ./gs:"""
    root = tmp_path / "objects"
    root.mkdir(exist_ok=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs.installed(str(root)) as fs:
        yield root, fs
    assert os.listdir(cwd) == [], "a gs:// path was written as a local path"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------ paths

def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(fileio.as_path("gs://b/runs/x")) == "gs://b/runs/x"
    assert os.fspath(fileio.as_path("gs://b/runs/x") / "align" / "hf") == "gs://b/runs/x/align/hf"
    assert os.fspath(fileio.as_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert fileio.is_url("gs://b/x") and not fileio.is_url("/b/x") and not fileio.is_url("gs:/b/x")


def test_a_scheme_nothing_can_open_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"config.workdir='nosuch://b/x': cannot open nosuch:// paths"):
        fileio.check_url("nosuch://b/x", "config.workdir")
    fileio.check_url("/local/x", "config.workdir")  # local paths need nothing


# ------------------------------------------------------------------------------ local files

def test_local_outputs_follow_the_umask(tmp_path, umask_027):
    """mkstemp makes 0600 files, mkdtemp 0700 folders, safetensors 0600 files: every crash-safe
    output gets what a plain open/mkdir gives under umask 027 instead (0640 / 0750)."""
    fileio.write_json(tmp_path / "r.json", {"a": 1})
    fileio.atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"x": np.zeros(2, np.float32)}, p))
    fileio.save_npz(tmp_path / "ref.npz", items=np.arange(3))
    assert _mode(tmp_path / "r.json") == 0o640
    assert _mode(tmp_path / "w.safetensors") == 0o640
    assert _mode(tmp_path / "ref.npz") == 0o640
    with fileio.staged_dir(tmp_path / "hf", "config.json") as stage:
        save_file({"x": np.zeros(2, np.float32)}, os.path.join(stage.path, "model.safetensors"))
        os.makedirs(os.path.join(stage.path, "data"))
        (open(os.path.join(stage.path, "data", "d.txt"), "w")).close()
        with open(os.path.join(stage.path, "config.json"), "w") as f:
            f.write("{}")
    assert _mode(tmp_path / "hf") == 0o750 and _mode(tmp_path / "hf" / "data") == 0o750
    for name in ("model.safetensors", "config.json", "data/d.txt"):
        assert _mode(tmp_path / "hf" / name) == 0o640, name
    assert sorted(os.listdir(tmp_path)) == ["hf", "r.json", "ref.npz", "w.safetensors"]  # no temporaries


def test_staged_dir_replaces_the_old_folder_only_when_complete(tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.staged_dir(target, "config.json") as stage:
            with open(os.path.join(stage.path, "config.json"), "w") as f:
                f.write("new")
            raise RuntimeError("killed mid-export")
    assert (target / "config.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with fileio.staged_dir(target, "config.json") as stage:
        with open(os.path.join(stage.path, "config.json"), "w") as f:
            f.write("new")
    assert (target / "config.json").read_text() == "new"


# ------------------------------------------------------------------------------ bucket

def test_records_and_arrays_round_trip_through_a_bucket(bucket):
    root, fs = bucket
    fileio.write_json("gs://b/run/r.json", {"k": "数据"})
    fileio.write_jsonl("gs://b/run/g.jsonl", [{"a": 1}, {"b": 2}])
    fileio.save_npz("gs://b/run/ref.npz", items=np.arange(4.0), kl=np.ones((2, 3)))
    assert fileio.read_json("gs://b/run/r.json") == {"k": "数据"}
    assert fileio.read_jsonl("gs://b/run/g.jsonl") == [{"a": 1}, {"b": 2}]
    z = fileio.load_arrays("gs://b/run/ref.npz")
    np.testing.assert_array_equal(z["kl"], np.ones((2, 3)))
    assert json.loads((root / "b" / "run" / "r.json").read_text(encoding="utf-8")) == {"k": "数据"}
    assert fileio.file_hash("gs://b/run/r.json") == fileio.file_hash(root / "b" / "run" / "r.json")
    with pytest.raises(Exception, match="not found"):
        fileio.read_json("gs://b/run/missing.json", "report")
    # Each object was written in one upload, never appended to.
    assert [m for m, _ in fs.opened if "w" in m] == ["wb", "wb", "wb"]


def test_feature_cache_in_a_bucket(bucket):
    root, _ = bucket
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    key = {"model": "m", "layers": [1, 2]}
    first = fileio.cached_array("gs://b/run/cache", key, compute)
    again = fileio.cached_array("gs://b/run/cache", key, compute)
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    assert sorted(os.listdir(root / "b" / "run" / "cache"))[0].startswith("features-")


def test_staged_dir_in_a_bucket_uploads_the_commit_file_last(bucket):
    root, fs = bucket
    target = "gs://b/run/align/hf"
    old = root / "b" / "run" / "align" / "hf"
    old.mkdir(parents=True)
    (old / "stale.safetensors").write_text("old shard")
    (old / "config.json").write_text("old")
    with fileio.staged_dir(target, "config.json") as stage:
        for name in ("model-1.safetensors", "model-2.safetensors"):
            with open(os.path.join(stage.path, name), "wb") as f:
                f.write(b"shard")
            stage.flush(name)  # uploaded at once and freed locally
            assert not os.path.exists(os.path.join(stage.path, name))
        with open(os.path.join(stage.path, "config.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(stage.path, "tokenizer.json"), "w") as f:
            f.write("{}")
        # Mid-export the old folder is gone with its commit file: no reader trusts a mix.
        assert not (old / "config.json").exists() and not (old / "stale.safetensors").exists()
    writes = [p for m, p in fs.opened if "w" in m]
    assert writes[-1] == target + "/config.json"
    assert sorted(os.listdir(old)) == ["config.json", "model-1.safetensors", "model-2.safetensors",
                                      "tokenizer.json"]
    assert not os.path.exists(stage.path)


# ------------------------------------------------------------------------------ safetensors by range

@pytest.fixture
def st_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((7, 5)).astype(np.float32),
        "b16": rng.standard_normal((6, 4, 3)).astype(ml_dtypes.bfloat16),
        "v": rng.integers(-9, 9, (11,)).astype(np.int32),
        "s": np.asarray(3.5, np.float32),
    }
    path = tmp_path / "objects" / "b" / "ckpt" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(path)


@pytest.mark.parametrize("name,idx", [
    ("w", (slice(2, 5), slice(1, 4))), ("w", (slice(None), slice(3, 5))), ("w", (slice(6, 7),)),
    ("w", (3,)), ("w", (slice(4, 4),)), ("b16", (slice(1, 5), slice(0, 2), slice(1, 3))),
    ("b16", (slice(None),)), ("v", (slice(3, 9),)), ("s", ()),
])
def test_range_reads_equal_safe_open(bucket, st_file, name, idx):
    with safe_open(st_file, framework="numpy") as ref, RemoteSafetensors("gs://b/ckpt/model.safetensors") as got:
        assert sorted(got.keys()) == sorted(ref.keys())
        want = ref.get_slice(name)[idx] if idx else ref.get_tensor(name)
        have = got.get_slice(name)[idx]
        assert got.get_slice(name).get_shape() == list(ref.get_slice(name).get_shape())
        assert got.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype()
        assert have.dtype == want.dtype and have.shape == want.shape
        np.testing.assert_array_equal(have, want)


def test_a_malformed_remote_header_is_a_checkpoint_error(bucket, st_file):
    root, _ = bucket
    raw = open(st_file, "rb").read()
    bad = {
        "huge.safetensors": (10**9).to_bytes(8, "little") + raw[8:],
        "notjson.safetensors": raw[:8] + b"x" * int.from_bytes(raw[:8], "little") + raw[8 + int.from_bytes(raw[:8], "little"):],
        "short.safetensors": raw[:-4],
    }
    for name, data in bad.items():
        (root / "b" / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="header length"):
        RemoteSafetensors("gs://b/huge.safetensors")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        RemoteSafetensors("gs://b/notjson.safetensors")
    with pytest.raises(CheckpointError, match="malformed header entry"):
        RemoteSafetensors("gs://b/short.safetensors")
