"""Config dataclasses, YAML loading and --key value overrides; errors name the key."""

import pytest

from pocketdit.config import ConfigError, config_to_dict, load_config, parse_overrides


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["--optim.lr", "1e-4", "--train.steps=7", "--model.hidden_size", "128",
                             "--text.encoders", "[minilm, /tmp/enc]", "--train.compile", "true"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.overrides == {"hidden_size": 128}
    assert cfg.text.encoders == ["minilm", "/tmp/enc"]
    assert cfg.train.compile is True


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: nano\n  depth_mid: 4\ndata:\n  name: shapes\n  length: 100\n"
                    "method:\n  name: pretrain\n  text_cache_size: 5\ntrain:\n  steps: 3\n")
    cfg = load_config(path, ["--train.steps", "5", "--data.length", "200"])
    assert cfg.model.overrides == {"depth_mid": 4}
    assert cfg.data.options == {"length": 200}
    assert cfg.method.options == {"text_cache_size": 5}
    assert cfg.train.steps == 5
    # the plain-dict form puts open keys back in their sections
    d = config_to_dict(cfg)
    assert d["model"]["depth_mid"] == 4 and d["data"]["length"] == 200


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--optim.lrr", "1"], "optim.lrr"),
        (["--optim.lr", "fast"], "optim.lr"),
        (["--train.steps", "1.5"], "train.steps"),
        (["--train.steps", "0"], "train.steps"),
        (["--train.distributed", "mpi"], "train.distributed"),
        (["--model.hidden", "3"], "model.hidden"),
        (["--bogus.key", "3"], "bogus.key"),
        (["--train.ema_decay", "1.5"], "train.ema_decay"),
        (["--text.dropout", "[0.1, 0.2]"], "text.dropout"),
        (["--optim.betas", "[0.9]"], "optim.betas"),
        (["--train.compile", "maybe"], "train.compile"),
    ],
)
def test_bad_keys_and_values_name_the_key(argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, argv)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section"):
        parse_overrides(["lr", "1"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(ConfigError, match="section.name"):
        parse_overrides(["--optim", "1"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(unknown)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no configs/*.yaml shipped"
    for f in files:
        load_config(f)


@pytest.mark.parametrize("key,new", [("method.shift", "schedule.shift"), ("train.sample_shift", "schedule.shift"),
                                     ("method.logit_std", "schedule.logit_std")])
def test_schedule_keys_that_moved_name_their_new_place(key, new):
    with pytest.raises(ConfigError, match=f"moved to {new}"):
        load_config(None, [f"--{key}", "2.0"])


def test_schedule_shift_must_be_positive():
    assert load_config(None, ["--schedule.shift", "2.5"]).schedule.shift == 2.5
    with pytest.raises(ConfigError, match="schedule.shift"):
        load_config(None, ["--schedule.shift", "0"])


def test_method_shorthand_is_method_name():
    from pocketdit.config import parse_overrides

    assert parse_overrides(["--method", "kd", "--method.teacher", "runs/t"]) == {"method": {"name": "kd", "teacher": "runs/t"}}


def test_bare_no_is_the_no_choice_not_false():
    # YAML reads `--train.mixed_precision no` as false; the setting's own word is meant
    assert load_config(None, ["--train.mixed_precision", "no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.output_dir: expected a string"):
        load_config(None, ["--train.output_dir", "no"])
    with pytest.raises(ConfigError, match="train.attention_backend: must be one of"):
        load_config(None, ["--train.attention_backend", "fast"])
