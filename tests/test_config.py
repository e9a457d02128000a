"""The typed config: YAML + key=value overrides, mistakes named."""

from typing import get_args

import pytest

from sftforge.config.loading import ConfigError, dump_config, load_config
from sftforge.data.formats import FORMATS, DataFormat


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_combine_with_overrides_winning(tmp_path):
    path = write(tmp_path, "method: full\ndata:\n  train: d.jsonl\ntraining:\n  lr: 1.0e-5\n")
    config = load_config(path, ["training.lr=3e-5", "training.batch_size=4", "lora.r=8"])
    assert config.method == "full"
    assert config.training.lr == 3e-5
    assert config.training.batch_size == 4
    assert config.lora.r == 8
    assert config.data.train == "d.jsonl"


def test_default_learning_rate_depends_on_the_method():
    assert load_config(None, ["data.train=x", "method=full"]).learning_rate == 2e-5
    assert load_config(None, ["data.train=x", "method=lora"]).learning_rate == 2e-4


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'training.learning_rate'"):
        load_config(None, ["data.train=x", "training.learning_rate=1"])


def test_wrong_choice_names_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train=x", "training.schedule=exponential"])
    assert "training.schedule" in str(e.value)
    assert "'cosine'" in str(e.value) and "'linear'" in str(e.value)


def test_bad_number_names_the_key():
    with pytest.raises(ConfigError, match="training.batch_size"):
        load_config(None, ["data.train=x", "training.batch_size=0"])


def test_missing_data_is_an_error_that_says_what_to_give():
    with pytest.raises(ConfigError, match="config key 'data.train': required"):
        load_config(None, [])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["training.lr"])


def test_config_file_error_names_the_file(tmp_path):
    path = write(tmp_path, "data: {train: x}\nmethod: qlora-ish\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)


def test_dumped_config_loads_back_equal(tmp_path):
    config = load_config(None, ["data.train=[a.jsonl, b.jsonl]", "max_length=64"])
    dump_config(config, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == config
    assert config.data.train == ["a.jsonl", "b.jsonl"]


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_pure_bf16_is_refused_for_full_fine_tuning_with_the_reason():
    with pytest.raises(ConfigError, match="pure_bf16 is for LoRA"):
        load_config(None, ["data.train=x", "method=full", "training.precision=pure_bf16"])
    assert load_config(None, ["data.train=x", "training.precision=pure_bf16"]).method == "lora"


def test_a_resume_may_change_exactly_the_fields_marked_resumable():
    base = load_config(None, ["data.train=x"])
    shaping = base.run_shaping_settings()
    assert "output_dir" not in shaping and "save_every" not in shaping["training"]
    assert "every" not in shaping["eval"] and "lr" in shaping["training"]
    where_and_how_often = ["output_dir=elsewhere", "training.save_every=7", "eval.samples=1"]
    assert load_config(None, ["data.train=x", *where_and_how_often]).run_shaping_settings() == (
        shaping
    )
    for change in ["training.lr=1e-3", "max_length=64", "eval.max_new_tokens=3"]:
        assert load_config(None, ["data.train=x", change]).run_shaping_settings() != shaping


def test_the_data_formats_the_config_allows_are_the_format_table():
    assert get_args(DataFormat) == ("auto", *sorted(FORMATS))
    for name in FORMATS:
        assert load_config(None, ["data.train=x", f"data.format={name}"]).data.format == name
