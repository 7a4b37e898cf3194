"""Start-up builders: the tiny tokenizer's corpus comes from the run's own files, read by the data package's
readers, so a broken corpus file is an error naming it."""

import pytest

from unigendet.config.loader import ConfigError
from unigendet.data.pipeline import SourceConfig
from unigendet.training.builders import InitConfig, build_tokenizer


def _source(tmp_path, text):
    path = tmp_path / "train.json"
    path.write_text(text)
    return {"det": SourceConfig(kind="fakeclue", json_path=str(path), image_root=str(tmp_path))}


def test_malformed_corpus_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.json"):
        build_tokenizer(InitConfig(tokenizer="tiny"), 512, _source(tmp_path, '[{"conversations": ['))

