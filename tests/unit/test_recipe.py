"""The training recipe in-process: --init-from across scales, the EMA of the weights (its update, its place in
checkpoints, which weights eval/sr/export get), the batch-divides message, the warnings, the paper presets."""

import pytest
import torch

from edsr_dist.config import batch_shares, build_config, check_batch_splits, describe_split, parse_train_args
from edsr_dist.errors import UserError
from edsr_dist.inference.weights import checkpoint_model, load_matching, to_basicsr_state_dict
from edsr_dist.model.edsr import EDSR
from edsr_dist.model.ema import WeightEMA
from edsr_dist.state.checkpoint import load_checkpoint, save_checkpoint
from edsr_dist.train.reporting import MIN_STEPS_PER_EPOCH, module_groups, recipe_warnings


def tiny(scale: int, filters: int = 8, blocks: int = 2) -> EDSR:
    return EDSR(scale=scale, num_blocks=blocks, num_filters=filters, res_scale=1.0)


def test_init_from_x2_into_x4_loads_every_tensor_whose_name_and_shape_match(tmp_path):
    torch.manual_seed(1)
    x2 = tiny(2)
    path = tmp_path / "x2.pt"
    torch.save(x2.state_dict(), path)
    torch.manual_seed(2)
    x4 = tiny(4)
    before = {k: v.clone() for k, v in x4.state_dict().items()}
    loaded, left, skipped = load_matching(x4, path)
    # x4's upsampler is two (conv F->4F, shuffle 2) stages: the first has x2's shape, the second is new.
    assert left == ["tail.0.2.weight", "tail.0.2.bias"]
    assert skipped == []
    assert module_groups(loaded) == ["sub_mean", "add_mean", "head", "body", "tail.0.0", "tail.1"]
    after = x4.state_dict()
    for name in loaded:
        assert torch.equal(after[name], x2.state_dict()[name]), name
    for name in left:
        assert torch.equal(after[name], before[name]), name


def test_init_from_x2_into_x3_skips_the_differently_shaped_upsampler_and_reads_basicsr_names(tmp_path):
    x2 = tiny(2)
    path = tmp_path / "x2_basicsr.pth"
    torch.save({"params": to_basicsr_state_dict(x2.state_dict())}, path)
    loaded, left, skipped = load_matching(tiny(3), path)
    assert left == ["tail.0.0.weight", "tail.0.0.bias"]
    assert skipped == ["tail.0.0.weight (32x8x3x3 vs 72x8x3x3)", "tail.0.0.bias (32 vs 72)"]
    assert "head.0.weight" in loaded and "body.2.weight" in loaded and "tail.1.weight" in loaded


def test_init_from_refuses_when_only_the_tail_would_load(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(tiny(2, filters=16).state_dict(), path)
    with pytest.raises(UserError, match="nothing but the upsampler would load") as err:
        load_matching(tiny(2, filters=8), path)
    assert "\n" not in str(err.value)


def test_ema_update_is_basicsrs_formula_and_skips_nothing_else():
    torch.manual_seed(0)
    model = tiny(2)
    ema = WeightEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, value in ema.model.state_dict().items():
        expected = 0.9 * start[name] + 0.1 * model.state_dict()[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert ema.updates == 1
    assert all(not p.requires_grad for p in ema.model.parameters())
    ema.reset(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.model.state_dict().values(), model.state_dict().values()))


def test_checkpoint_with_ema_loads_weights_only_and_gives_the_ema_unless_raw(tmp_path):
    cfg = build_config(overrides={"num_blocks": 2, "num_filters": 8, "res_scale": 1.0, "ema_decay": 0.5})
    model = tiny(2)
    ema = WeightEMA(model, cfg.ema_decay)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "config": cfg.to_dict(), "step": 1}
    path = save_checkpoint(tmp_path, state, step=1, keep_last=1)
    # The payload unpickles with weights_only=True: the EMA adds tensors, numbers and strings only.
    payload = load_checkpoint(path)
    assert payload["ema"]["decay"] == 0.5 and payload["ema"]["updates"] == 1
    averaged, _ = checkpoint_model(path)
    raw, _ = checkpoint_model(path, raw=True)
    for name, value in averaged.state_dict().items():
        assert torch.equal(value, ema.model.state_dict()[name]), name
        assert torch.equal(raw.state_dict()[name], model.state_dict()[name]), name
    assert not torch.equal(averaged.head[0].weight, raw.head[0].weight)


def test_any_number_of_workers_splits_the_batch_and_too_small_a_batch_names_the_smallest():
    assert batch_shares(16, 3) == [6, 5, 5] and batch_shares(20, 8) == [3, 3, 3, 3, 2, 2, 2, 2]
    assert describe_split(16, 4) == "4 each" and describe_split(16, 7) == "3/3/2/2/2/2/2"
    check_batch_splits(20, 8)
    check_batch_splits(16, 7, accumulate=2)
    with pytest.raises(UserError, match=r"batch_size 4 \(global\) is smaller than the 8 workers of --nproc 8: every "
                                        r"worker needs at least 1 sample\(s\) per step; pass --batch-size 8 or more$"):
        check_batch_splits(4, 8, flag="--nproc")
    with pytest.raises(UserError, match="pass --batch-size 16 or more or a smaller --accumulate"):
        check_batch_splits(12, 4, accumulate=4)
    with pytest.raises(UserError, match="accumulate"):
        build_config(overrides={"batch_size": 2, "accumulate": 4})


class FakeStore:
    def __init__(self, tiles: int, tile_size: int, scale: int):
        self.num_train_tiles, self.tile_size, self.scale = tiles, tile_size, scale


def test_warnings_name_the_flag_that_fixes_them():
    cfg = build_config(overrides={"batch_size": 16, "patch_size": 48, "scale": 4})
    # patch x scale = the tile size is no warning: crops fall anywhere in the image (format 2), not in one tile.
    [short] = recipe_warnings(cfg, 3, FakeStore(48, 192, 4))
    assert "only 3 step(s)" in short and "--steps-per-epoch" in short
    # An explicit --steps-per-epoch is a choice; 192 px tiles at x2 leave room for crops.
    chosen = build_config(overrides={"steps_per_epoch": 5})
    assert recipe_warnings(chosen, 5, FakeStore(48, 192, 2)) == []
    assert recipe_warnings(build_config(), MIN_STEPS_PER_EPOCH, FakeStore(10_000, 192, 2)) == []
    scaled = build_config(overrides={"batch_size": 64, "scale_lr": True})
    assert any("--warmup-steps" in w for w in recipe_warnings(scaled, 100, FakeStore(10_000, 192, 2)))


def test_paper_presets_follow_the_paper_and_x3_x4_need_a_x2_model(tmp_path):
    x2 = build_config(preset="paper_x2")
    assert (x2.scale, x2.num_blocks, x2.num_filters, x2.res_scale) == (2, 32, 256, 0.1)
    assert (x2.batch_size, x2.patch_size, x2.lr, x2.decay_rate, x2.decay_step) == (16, 48, 1e-4, 0.5, 200_000)
    assert x2.epochs * x2.steps_per_epoch == 300_000
    for preset, scale in (("paper_x3", 3), ("paper_x4", 4)):
        with pytest.raises(UserError, match=f"preset {preset} fine-tunes a trained x2 model.*--init-from"):
            parse_train_args(["--preset", preset])
        yaml_file = tmp_path / f"{preset}.yaml"
        yaml_file.write_text(f"preset: {preset}\n")
        with pytest.raises(UserError, match=f"preset {preset} fine-tunes"):
            parse_train_args(["--config", str(yaml_file)])
        weights = tmp_path / "x2.pt"
        weights.write_bytes(b"")
        cfg = parse_train_args(["--config", str(yaml_file), "--init-from", str(weights)])
        assert cfg.scale == scale and cfg.init_from == str(weights)
        assert build_config(preset=preset).scale == scale  # bench measures the preset without a model to start from


def test_init_from_with_an_explicit_resume_is_one_line(tmp_path):
    weights = tmp_path / "x2.pt"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="pass only one of them"):
        build_config(overrides={"init_from": str(weights), "resume": "runs/x/checkpoints/latest"})
    assert build_config(overrides={"init_from": str(weights), "resume": "auto"}).resume == "auto"
    with pytest.raises(UserError, match="is not a file"):
        build_config(overrides={"init_from": str(tmp_path / "missing.pt")})
