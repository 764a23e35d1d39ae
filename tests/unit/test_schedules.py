"""Learning-rate schedules: values at chosen steps, each a function of the step alone."""

import math

import pytest

from edsr_dist.config import Config, build_config
from edsr_dist.errors import UserError
from edsr_dist.model.schedules import base_lr, learning_rate


def test_paper_schedule_halves_every_200k_steps():
    for preset in ("paper", "paper_x2"):
        cfg = build_config(preset=preset)
        assert learning_rate(cfg, 0, 300_000) == pytest.approx(1e-4)
        assert learning_rate(cfg, 199_999, 300_000) == pytest.approx(1e-4)
        assert learning_rate(cfg, 200_000, 300_000) == pytest.approx(5e-5)
    cfg = Config()  # the old TF script: x0.9 every 500 steps
    assert learning_rate(cfg, 499, 1) == pytest.approx(1e-4)
    assert learning_rate(cfg, 1000, 1) == pytest.approx(1e-4 * 0.81)


def test_multistep_multiplies_by_gamma_at_each_milestone():
    cfg = build_config(overrides={"lr_schedule": "multistep", "milestones": "300, 100", "gamma": 0.1})
    values = [learning_rate(cfg, step, 1000) for step in (0, 99, 100, 299, 300, 999)]
    assert values == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])


def test_cosine_with_linear_warm_up():
    cfg = build_config(overrides={"lr_schedule": "cosine", "warmup_steps": 10, "min_lr": 1e-6})
    horizon = 110
    # Warm-up: the k-th step (k = step + 1) gets lr * k / warmup, as BasicSR's warmup_iter.
    assert learning_rate(cfg, 0, horizon) == pytest.approx(1e-5)
    assert learning_rate(cfg, 4, horizon) == pytest.approx(5e-5)
    assert learning_rate(cfg, 9, horizon) == pytest.approx(1e-4)
    assert learning_rate(cfg, 10, horizon) == pytest.approx(1e-4)
    # Half-way through the cosine: the mean of peak and floor; at the end and beyond: the floor.
    assert learning_rate(cfg, 60, horizon) == pytest.approx((1e-4 + 1e-6) / 2)
    assert learning_rate(cfg, 35, horizon) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(cfg, 110, horizon) == pytest.approx(1e-6)
    assert learning_rate(cfg, 500, horizon) == pytest.approx(1e-6)


def test_warm_up_applies_to_the_staircase_too():
    cfg = build_config(overrides={"warmup_steps": 4, "decay_step": 100, "decay_rate": 0.5})
    assert [learning_rate(cfg, s, 1) for s in (0, 1, 3, 4, 100)] == pytest.approx([2.5e-5, 5e-5, 1e-4, 1e-4, 5e-5])


def test_linear_scaling_rule_is_opt_in():
    big = {"batch_size": 64, "lr_schedule": "cosine", "min_lr": 1e-6}
    assert base_lr(build_config(overrides=big)) == pytest.approx(1e-4)
    cfg = build_config(overrides={**big, "scale_lr": True})
    assert base_lr(cfg) == pytest.approx(4e-4)
    assert learning_rate(cfg, 1000, 1000) == pytest.approx(4e-6)  # the floor scales with it


def test_schedule_depends_on_the_step_only():
    cfg = build_config(overrides={"lr_schedule": "cosine", "warmup_steps": 5})
    first = [learning_rate(cfg, s, 50) for s in range(50)]
    again = [learning_rate(cfg, s, 50) for s in reversed(range(50))][::-1]
    assert first == again


@pytest.mark.parametrize("overrides,fragment", [
    ({"lr_schedule": "linear"}, "lr_schedule must be one of staircase, multistep, cosine"),
    ({"lr_schedule": "multistep"}, "needs --milestones"),
    ({"milestones": "200k"}, "milestones must be whole step numbers"),
    ({"gamma": 0}, "gamma must be in (0, 1]"),
    ({"min_lr": 1e-3}, "min_lr must be >= 0 and below lr"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"grad_clip_norm": -1}, "grad_clip_norm must be >= 0"),
    ({"ema_decay": 1}, "ema_decay must be in [0, 1)"),
])
def test_bad_recipe_settings_are_one_line_errors(overrides, fragment):
    with pytest.raises(UserError) as err:
        build_config(overrides=overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)
