"""Weights fingerprints cover every byte of the weight files and are cached; reports carry library versions."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import save_file

import unigendet.evaluation.provenance as provenance
import unigendet.utils.fingerprint as fingerprint
from unigendet.evaluation.provenance import run_provenance
from unigendet.utils.fingerprint import weights_fingerprint

MIB = 2**20


def _big_file(path, tail: bytes):
    """A little over 64 MiB whose bytes differ between calls only after the first 64 MiB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\0" * (64 * MIB))
        fh.write(tail)
    return path


@pytest.fixture
def counted(monkeypatch):
    """Counts the files read by the hashing function."""
    calls = []
    real = fingerprint.hash_file

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fingerprint, "hash_file", counting)
    monkeypatch.setattr(fingerprint, "_MEMORY", {})
    return calls


def test_models_differing_after_64_mib_get_different_fingerprints(tmp_path, counted):
    a = _big_file(tmp_path / "a" / "model.safetensors", b"tail-a")
    b = _big_file(tmp_path / "b" / "model.safetensors", b"tail-b")
    assert weights_fingerprint(a.parent) != weights_fingerprint(b.parent)
    assert len(weights_fingerprint(a)) == 64 and len(counted) == 2


def test_cache_hit_does_not_reread_and_a_rewrite_is_rehashed(tmp_path, counted):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 1000)
    first = weights_fingerprint(tmp_path)
    assert weights_fingerprint(tmp_path) == first and len(counted) == 1
    fingerprint._MEMORY.clear()  # a new process: the on-disk cache answers
    assert weights_fingerprint(tmp_path) == first and len(counted) == 1
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(1, 1))  # same size, new mtime
    assert weights_fingerprint(tmp_path) != first and len(counted) == 2


def test_sharded_directory_hashes_every_shard_and_the_vae(tmp_path, counted):
    import torch

    for i, value in enumerate((1.0, 2.0)):
        save_file({f"w{i}": torch.full((4,), value)}, str(tmp_path / f"model-0000{i + 1}-of-00002.safetensors"))
    index = {"metadata": {"total_size": 32}, "weight_map": {"w0": "model-00001-of-00002.safetensors",
                                                            "w1": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "vae.safetensors").write_bytes(b"vae")
    before = weights_fingerprint(tmp_path)
    assert {p.name for p in counted} == {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                         "model-00002-of-00002.safetensors", "vae.safetensors"}
    save_file({"w1": torch.full((4,), 3.0)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert weights_fingerprint(tmp_path) != before


def test_report_provenance_names_versions_and_commit(tmp_path):
    record = run_provenance({"name": "x"}, model_path=None)
    versions = record["versions"]
    for name in ("torch", "transformers", "diffusers", "deepspeed", "peft", "safetensors", "python", "git_commit"):
        assert name in versions
    assert versions["transformers"] and versions["safetensors"] and versions["git_commit"]
    assert record["weights_sha256"] is None and weights_fingerprint(tmp_path) is None


def test_git_commit_is_unknown_without_git(monkeypatch):
    import subprocess

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    provenance.git_commit.cache_clear()
    monkeypatch.setattr(subprocess, "run", no_git)
    try:
        assert provenance.git_commit() == "unknown"
    finally:
        provenance.git_commit.cache_clear()
