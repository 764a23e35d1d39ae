
import dataclasses

import pytest

from edsr_dist.config import PROTOCOL_NAMES, Config, build_config, parse_override_args, parse_train_args
from edsr_dist.errors import UserError
from edsr_dist.evaluation.protocols import PROTOCOLS


def test_defaults_are_the_old_tensorflow_scripts():
    cfg = Config()
    assert (cfg.scale, cfg.num_blocks, cfg.num_filters, cfg.res_scale) == (2, 32, 256, 0.1)
    assert (cfg.batch_size, cfg.patch_size, cfg.lr, cfg.beta1) == (16, 48, 1e-4, 0.9)
    assert (cfg.decay_rate, cfg.decay_step, cfg.epochs, cfg.save_every) == (0.9, 500, 100, 5)


def test_presets_and_overrides_in_order(tmp_path):
    cfg = build_config(preset="baseline")
    assert (cfg.num_blocks, cfg.num_filters, cfg.res_scale) == (16, 64, 1.0)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: baseline\nepochs: 7\nlr: 2.0e-4\n")
    cfg = parse_train_args(["--config", str(yaml_file), "--epochs", "3", "--patch-size=24", "--channels-last", "false"])
    assert (cfg.num_blocks, cfg.epochs, cfg.lr, cfg.patch_size, cfg.channels_last) == (16, 3, 2e-4, 24, False)


@pytest.mark.parametrize("args,fragment", [
    (["--no-such-thing", "1"], "unknown option --no-such-thing"),
    (["--epochs", "many"], "epochs expects int"),
    (["--lr", "-1"], "lr must be positive"),
    (["--precision", "fp8"], "precision must be one of"),
    (["--preset", "huge"], "unknown preset"),
    (["--epochs"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_settings_are_one_line_user_errors(args, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_train_args(args)


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rate'"):
        parse_train_args(["--config", str(bad)])
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_train_args(["--config", str(bad)])


def test_bare_boolean_flag_switches_on():
    assert parse_override_args(["--progress", "--epochs", "2"]) == {"progress": "true", "epochs": "2"}




def test_config_names_exactly_the_defined_protocols():
    assert tuple(PROTOCOLS) == PROTOCOL_NAMES


def test_every_setting_has_a_description_in_train_help(capsys):
    """The description is the field's own metadata, so a new field without one fails here, and --help cannot drift."""
    missing = [f.name for f in dataclasses.fields(Config) if len(f.metadata.get("help", "").split()) < 2]
    assert missing == []
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        line = next(line for line in text.splitlines() if line.split()[:1] == [f"--{f.name.replace('_', '-')}"])
        assert line.rstrip().endswith(f.metadata["help"])
