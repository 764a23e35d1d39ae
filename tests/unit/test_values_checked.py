"""Settings that used to reach torch unchecked (an Adam traceback, an inf learning rate trained into non-finite
weights, a negative step count that trained nothing) are refused by Config.check in one line naming the setting."""

from __future__ import annotations

import pytest

from edsr_dist.config import parse_train_args
from edsr_dist.errors import CommandParser, UserError, add_res_scale_flag


@pytest.mark.parametrize("args, message", [
    (["--beta1", "1"], "beta1 must be in [0, 1), got 1.0; the paper uses --beta1 0.9"),
    (["--beta1", "-0.1"], "beta1 must be in [0, 1), got -0.1; the paper uses --beta1 0.9"),
    (["--beta2", "1.5"], "beta2 must be in [0, 1), got 1.5; the paper uses --beta2 0.999"),
    (["--epsilon", "-1"], "epsilon must be >= 0, got -1.0; the paper uses --epsilon 1e-8"),
    (["--lr", "inf"], "lr must be a finite number, got inf; pass --lr with a number"),
    (["--lr", "nan"], "lr must be a finite number, got nan; pass --lr with a number"),
    (["--res-scale", "nan"], "res_scale must be a finite number, got nan; pass --res-scale with a number"),
    (["--grad-clip-norm", "inf"], "grad_clip_norm must be a finite number, got inf; pass --grad-clip-norm with a "
                                  "number"),
    (["--max-steps", "-5"], "max_steps must be >= 0 (0 = no limit), got -5"),
    (["--log-every", "0"], "log_every must be >= 1 step, got 0"),
    (["--num-threads", "-2"], "num_threads must be >= 0 (0 = OMP_NUM_THREADS or all cores), got -2"),
    (["--save-every-steps", "-1"], "save_every_steps must be >= 0 (0 = off), got -1"),
    (["--max-val-images", "-1"], "max_val_images must be >= 0 (0 = all), got -1"),
    (["--val-tile", "-8"], "val_tile must be >= 0 (0 = whole image), got -8"),
])
def test_a_value_torch_would_refuse_or_misuse_is_one_line(args, message):
    with pytest.raises(UserError) as caught:
        parse_train_args(["--preset", "sample", *args])
    assert str(caught.value) == message


def test_inf_in_yaml_is_refused_too(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: .inf\n")
    with pytest.raises(UserError, match=r"^lr must be a finite number, got inf"):
        parse_train_args(["--config", str(config)])


def test_the_edges_that_torch_accepts_still_pass():
    cfg = parse_train_args(["--preset", "sample", "--beta1", "0", "--beta2", "0.999999", "--epsilon", "0",
                            "--max-steps", "0"])
    assert (cfg.beta1, cfg.beta2, cfg.epsilon, cfg.max_steps) == (0.0, 0.999999, 0.0, 0)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_res_scale_of_eval_sr_and_export_is_finite(value):
    parser = CommandParser(prog="edsr-dist export")
    add_res_scale_flag(parser)
    with pytest.raises(UserError, match=rf"^argument --res-scale: '{value}' is not a finite number; see "):
        parser.parse_args(["--res-scale", value])
    assert parser.parse_args(["--res-scale", "0.1"]).res_scale == 0.1
