"""Checkpoint bookkeeping: only complete checkpoints count; keep-last-k; resume resolution."""

import pytest

from unigendet.checkpoint.manager import (
    COMPLETE,
    CheckpointManager,
    complete_checkpoints,
    step_tag,
)


def _fake_checkpoint(root, step, complete=True):
    path = root / step_tag(step)
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text(str(step))
    return path


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
    CheckpointManager(tmp_path, keep_last_k=2, run_config=None)._prune()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]
    assert partial.is_dir()


def test_resolve_resume(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last_k=2, run_config=None)
    assert manager.resolve_resume("auto") is None
    _fake_checkpoint(tmp_path, 10)
    newest = _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 30, complete=False)
    assert manager.resolve_resume("auto") == newest
    assert manager.resolve_resume("none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.resolve_resume(str(tmp_path / step_tag(30)))
