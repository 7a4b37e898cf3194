"""Checkpoint bookkeeping: only complete checkpoints count; keep-last-k; resume resolution through the
manifest check (fallback, named files, partial directories); the JSON codec of per-rank state."""

import json
import random

import numpy as np
import pytest
import torch

from unigendet.checkpoint.manager import (
    COMPLETE,
    CheckpointConfig,
    CheckpointIntegrityError,
    CheckpointManager,
    complete_checkpoints,
    partial_directories,
    step_tag,
)
from unigendet.checkpoint.manifest import MANIFEST, file_entry, list_files, write_manifest
from unigendet.checkpoint.state_json import read_state, write_state


def _fake_checkpoint(root, step, complete=True):
    """A checkpoint directory as ``save`` leaves it: two data files, the manifest, COMPLETE."""
    path = root / step_tag(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 4)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    write_manifest(path, step, [file_entry(path, rel) for rel in list_files(path)])
    if complete:
        (path / COMPLETE).write_text(str(step))
    return path


def _manager(tmp_path, **kwargs):
    return CheckpointManager(CheckpointConfig(dir=str(tmp_path), keep_last_k=2, **kwargs))


def test_only_complete_checkpoints_are_listed_in_step_order(tmp_path):
    for step in (30, 10, 20):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 40, complete=False)  # a crash mid-save
    (tmp_path / "final").mkdir()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20, 30]


def test_prune_keeps_the_newest_k_and_ignores_incomplete(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    partial = _fake_checkpoint(tmp_path, 40, complete=False)
    _manager(tmp_path)._prune()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]
    assert partial.is_dir()


def test_partial_directories_are_the_unfinished_saves_and_the_next_save_removes_them(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    unfinished = [_fake_checkpoint(tmp_path, 20, complete=False), tmp_path / "step_0000030.tmp",
                  tmp_path / "step_0000010.replaced"]
    for path in unfinished[1:]:
        path.mkdir()
    (tmp_path / "final").mkdir()
    assert partial_directories(tmp_path) == sorted(unfinished)
    _manager(tmp_path)._remove_partial()
    assert partial_directories(tmp_path) == [] and (tmp_path / "final").is_dir()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10]


def _resume(tmp_path, resume: str):
    return _manager(tmp_path, resume=resume).resolve_resume()


def test_resolve_resume(tmp_path):
    assert _resume(tmp_path, "auto") is None
    _fake_checkpoint(tmp_path, 10)
    newest = _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 30, complete=False)
    (tmp_path / "step_0000040.tmp").mkdir()
    assert _resume(tmp_path, "auto") == newest
    assert _resume(tmp_path, "none") is None
    assert _resume(tmp_path, str(newest)) == newest
    with pytest.raises(CheckpointIntegrityError, match="no COMPLETE marker"):
        _resume(tmp_path, str(tmp_path / step_tag(30)))


def _damage(path, how: str) -> str:
    target = path / "mp_rank_00_model_states.pt"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[:100])
        return "mp_rank_00_model_states.pt has 100 bytes, the manifest says 1024"
    if how == "corrupted":
        data = bytearray(target.read_bytes())
        data[7] ^= 0xFF
        target.write_bytes(bytes(data))
        return "mp_rank_00_model_states.pt does not match its SHA-256"
    if how == "missing":
        target.unlink()
        return "mp_rank_00_model_states.pt is missing"
    if how == "unexpected":
        (path / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"x")
        return "zero_pp_rank_9_mp_rank_00_optim_states.pt is not in manifest.json"
    (path / MANIFEST).unlink()
    return "manifest.json is missing"


@pytest.mark.parametrize("how", ["truncated", "corrupted", "missing", "unexpected", "no manifest"])
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies_and_names_the_file(tmp_path, how, caplog):
    previous = _fake_checkpoint(tmp_path, 10)
    newest = _fake_checkpoint(tmp_path, 20)
    problem = _damage(newest, how)
    assert problem in _manager(tmp_path).verify(newest)
    with caplog.at_level("WARNING"):
        assert _resume(tmp_path, "auto") == previous
    assert f"checkpoint {newest} fails its check: {problem}" in caplog.text
    with pytest.raises(CheckpointIntegrityError, match=problem.split(" (")[0].replace(".", "[.]")):
        _resume(tmp_path, str(newest))  # a checkpoint named explicitly is never replaced by another


def test_sizes_only_verification_misses_a_same_size_corruption(tmp_path):
    newest = _fake_checkpoint(tmp_path, 20)
    _damage(newest, "corrupted")
    assert _manager(tmp_path, verify_checksums=False).verify(newest) is None
    assert _manager(tmp_path).verify(newest) is not None


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path):
    _damage(_fake_checkpoint(tmp_path, 10), "truncated")
    with pytest.raises(CheckpointIntegrityError, match="no checkpoint in .* passes its manifest check"):
        _resume(tmp_path, "auto")


def test_a_manifest_path_leaving_the_directory_is_refused(tmp_path):
    path = _fake_checkpoint(tmp_path, 10)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"].append({"path": "../secret.pt", "size": 1, "sha256": None})
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert "leaves the checkpoint directory" in _manager(tmp_path).verify(path)


def test_checkpoint_is_due_every_interval_and_at_the_last_step(tmp_path):
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path), interval=3))
    assert [step for step in range(1, 9) if manager.due(step, total_steps=8)] == [3, 6, 8]


def test_rank_state_round_trips_through_json_without_pickle(tmp_path):
    rng = random.Random(3)
    state = {
        "python": rng.getstate(),
        "numpy": np.random.RandomState(5).get_state(),
        "torch": torch.Generator().manual_seed(7).get_state(),
        "roles": {0: {"buffer": [("t2i", 4), ("fakeclue", 9)], "carry": None}, 1: {"__tuple__": 1.5}},
        "nan": float("nan"),
    }
    write_state(tmp_path / "state.json", state)
    back = read_state(tmp_path / "state.json")
    assert back["python"] == state["python"]
    random.Random().setstate(back["python"])  # the restored tuple is accepted as a state
    np.testing.assert_array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][0] == "MT19937" and back["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(back["torch"], state["torch"]) and back["torch"].dtype == torch.uint8
    assert back["roles"] == state["roles"] and back["nan"] != back["nan"]
    with pytest.raises(TypeError, match="cannot store"):
        write_state(tmp_path / "bad.json", {"x": object()})
