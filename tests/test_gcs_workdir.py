"""A checkpoint read from gs://, an export to gs://, and the whole pipeline with a gs:// workdir,
against tests/fake_gcs.py (an fsspec file system for gs:// over a temporary folder; no network).

What is checked: the URL is never turned into a local path (the test runs in an empty current
folder and nothing appears there), parameters read by byte range from the bucket equal the
local load exactly (float32, bytes copied), every stage's outputs land in the bucket, and Orbax
is handed the checkpoint URL unchanged. Orbax's array data goes through TensorStore's own GCS
driver, which a fake file system cannot serve, so there the URL is recorded and the data written
to the fake bucket's folder.
"""
import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from lasa_jax.errors import ConfigError
from lasa_jax.infra import fileio
from lasa_jax.infra.mesh import make_mesh
from lasa_jax.infra.multihost import to_host
from lasa_jax.model.checkpoint import flatten, weights_digest
from lasa_jax.model.lm import load_model
from lasa_jax.model.tokenizers import build_byte_tokenizer
from lasa_jax.runner import run
from tests import fake_gcs
from tests.hf_models import make_hf_model, save_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "objects"
    root.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with fake_gcs.installed(str(root)) as fs:
        yield root, fs
    assert os.listdir(cwd) == [], "a gs:// path was written as a local path"


def _host_params(lm):
    return {k: to_host(v) for k, v in flatten(lm.params).items()}


def test_checkpoint_in_a_bucket_loads_like_the_local_one_and_exports_back(bucket, tmp_path):
    root, fs = bucket
    local = save_hf_model(make_hf_model("qwen3", num_attention_heads=8, num_key_value_heads=4),
                          str(tmp_path / "ckpt"), max_shard_size="200KB")
    build_byte_tokenizer("qwen").save_pretrained(local)
    shutil.copytree(local, root / "b" / "ckpt")
    assert len([f for f in os.listdir(local) if f.endswith(".safetensors")]) > 1  # an index with shards
    mesh = make_mesh(1, 4, 2)  # every process-local slice is a strict part of most tensors
    want = load_model(local, mesh=mesh)
    got = load_model("gs://b/ckpt", mesh=mesh)
    a, b = _host_params(want), _host_params(got)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert got.tokenizer("Wie backe ich Brot?")["input_ids"] == want.tokenizer("Wie backe ich Brot?")["input_ids"]
    assert weights_digest("gs://b/ckpt") == weights_digest(local)
    assert any(m == "rb" and p.endswith(".safetensors") for m, p in fs.opened)

    out = got.save("gs://b/run/align/hf", max_shard_bytes=100_000)
    assert out == "gs://b/run/align/hf"
    exported = sorted(os.listdir(root / "b" / "run" / "align" / "hf"))
    assert "model.safetensors.index.json" in exported and "tokenizer.json" in exported
    assert [p for m, p in fs.opened if "w" in m][-1] == "gs://b/run/align/hf/config.json"
    again = _host_params(load_model("gs://b/run/align/hf", mesh=mesh))
    for k in a:
        np.testing.assert_array_equal(a[k], again[k], err_msg=k)


def _tiny_config(workdir):
    from configs.tiny import get_config
    c = get_config()
    c.unlock()
    c.workdir, c.progress = workdir, False
    c.data.languages = "en,zh,ko,sw"
    c.bottleneck.bootstrap_draws, c.bottleneck.max_queries = 10, 6
    c.ssi.max_epochs = 2
    c.align.max_steps, c.align.checkpoint_every, c.align.tensorboard = 2, 1, False
    c.evaluate.max_prompts, c.evaluate.max_new_tokens, c.evaluate.compare_base = 1, 4, False
    return c


def test_pipeline_with_a_gs_workdir(bucket, monkeypatch):
    """All four stages with --config.workdir=gs://b/run: the tiny model is built into the bucket
    and read back from it, the cache, reports, figures, SSI, reference, metrics, export and
    generations land there, and Orbax receives 'gs://b/run/align/checkpoints' as is."""
    root, fs = bucket
    handed = []
    real_manager = ocp.CheckpointManager

    def recording_manager(directory, *args, **kw):
        handed.append(directory)
        return real_manager(fake_gcs.FakeGCS._strip_protocol(directory), *args, **kw)

    monkeypatch.setattr(ocp, "CheckpointManager", recording_manager)
    ctx = run(_tiny_config("gs://b/run"))
    assert os.fspath(ctx.workdir) == "gs://b/run"
    assert handed == ["gs://b/run/align/checkpoints"]
    run_dir = root / "b" / "run"
    for rel in ("tiny_model/config.json", "tiny_model/model.safetensors", "bottleneck/report.json",
                "bottleneck/silhouette.png", "bottleneck/projection.png", "ssi/ssi.json",
                "ssi/ssi.safetensors", "ssi/report.json", "ssi/per_language.png", "align/metrics.jsonl",
                "align/summary.json", "align/hf/config.json", "align/hf/model.safetensors",
                "evaluate/generations.jsonl", "evaluate/report.json", "evaluate/asr.png"):
        assert (run_dir / rel).is_file(), rel
    assert any(f.startswith("features-") for f in os.listdir(run_dir / "cache"))
    assert any(f.startswith("reference-") for f in os.listdir(run_dir / "align"))
    assert sorted(int(d) for d in os.listdir(run_dir / "align" / "checkpoints") if d.isdigit()) == [1, 2]
    summary = json.loads((run_dir / "align" / "summary.json").read_text())
    assert summary["hf"] == "gs://b/run/align/hf" and summary["metrics"] == "gs://b/run/align/metrics.jsonl"
    rows = [json.loads(x) for x in (run_dir / "align" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    gens = fileio.read_jsonl("gs://b/run/evaluate/generations.jsonl")
    assert {g["model"] for g in gens} == {"aligned"} and len(gens) == 2 * 4  # harmful + benign, 4 languages
    # The models were read from the bucket (tiny base model and the aligned export).
    read = {p for m, p in fs.opened if m == "rb"}
    assert "gs://b/run/tiny_model/model.safetensors" in read and "gs://b/run/align/hf/model.safetensors" in read


def test_tensorboard_in_a_bucket_without_its_uploader_stops_before_any_stage(bucket):
    import importlib.util
    try:
        have = importlib.util.find_spec("google.cloud.storage") is not None
    except ModuleNotFoundError:
        have = False
    if have:
        pytest.skip("google-cloud-storage is installed here")
    c = _tiny_config("gs://b/run")
    c.align.tensorboard = True
    with pytest.raises(ConfigError, match=r"config.align.tensorboard: .*pip install google-cloud-storage"):
        run(c)
    assert not (bucket[0] / "b").exists()  # nothing ran
