import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edsr_dist.cli import main as cli_main
from edsr_dist.config import Config
from edsr_dist.data.images import to_uint8
from edsr_dist.inference.command import write_rgb_png
from edsr_dist.inference.torch_runtime import (
    forward_tiled,
    frozen_cpu_network,
    receptive_field_radius,
    self_ensemble,
    super_resolve,
)
from edsr_dist.model.edsr import EDSR, build_model
from edsr_dist.state.checkpoint import save_checkpoint


def _model(scale=2, blocks=2, filters=8, seed=0):
    torch.manual_seed(seed)
    return EDSR(scale=scale, num_blocks=blocks, num_filters=filters, res_scale=1.0).eval()


class NearestUp(nn.Module):
    """Exactly equivariant under flips and 90-degree rotations."""
    scale = 2

    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=2, mode="nearest")


class Skewed(nn.Module):
    """Not equivariant: weights depend on the direction, and the output on the position."""
    scale = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, -1)
        return nn.functional.pixel_shuffle(self.conv(x + ramp), 2)


def test_receptive_field_radius_of_edsr():
    for scale in (2, 3, 4):
        for blocks in (1, 2, 5):
            # head + 2 per block + body conv + upsampler conv(s) at LR + one LR pixel of reach from the HR convs
            assert receptive_field_radius(_model(scale, blocks)) == 2 * blocks + 4


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiled_equals_untiled(scale):
    model = _model(scale)
    lr = torch.rand(1, 3, 23, 30) * 255
    radius = receptive_field_radius(model)
    with torch.no_grad():
        whole = model(lr)
        for tile in (7, 10, 16):  # none divides both sides; 7 < radius
            tiled = forward_tiled(model, lr, tile=tile, pad=radius, scale=scale)
            assert tiled.shape == (1, 3, 23 * scale, 30 * scale) and tiled.dtype == torch.float32
            assert (tiled - whole).abs().max().item() < 1e-3
        # too little context shows at the seams: the radius is not overestimated
        short = forward_tiled(model, lr, tile=10, pad=radius - 1, scale=scale)
        assert (short - whole).abs().max().item() > 1e-3
        assert torch.equal(forward_tiled(model, lr, tile=0, pad=0, scale=scale), whole)


def test_every_tile_window_has_one_shape():
    """A JIT-compiling device (Ascend before 910B1) compiles each new input shape: fixed tiles give one."""
    model = _model(2)
    shapes = []

    def network(x):
        shapes.append(tuple(x.shape))
        return model(x)

    lr = torch.rand(1, 3, 23, 30) * 255
    radius = receptive_field_radius(model)
    with torch.no_grad():
        tiled = forward_tiled(network, lr, tile=7, pad=radius, scale=2)
        assert (tiled - model(lr)).abs().max().item() < 1e-3
    side = 7 + 2 * radius
    assert set(shapes) == {(1, 3, min(side, 23), min(side, 30))} and len(shapes) == 4 * 5


def _manual_ensemble(model, lr):
    outs = []
    x = lr.numpy()
    for flip in (False, True):
        for k in range(4):
            t = np.rot90(x[..., ::-1] if flip else x, k, axes=(2, 3)).copy()
            y = model(torch.from_numpy(t)).detach().numpy()
            y = np.rot90(y, -k, axes=(2, 3))
            outs.append(y[..., ::-1] if flip else y)
    return torch.from_numpy(np.mean(outs, axis=0))


def test_auto_tile_bounds_host_windows_by_the_peak_target_and_device_windows_by_the_device():
    """A DIV2K validation image (LR 678x1020) through the baseline x2 model (64 filters, pad 36): on the host, with
    plenty free, it is tiled to keep the peak within the output + 1 GB; on a device with the memory for it, whole."""
    from edsr_dist.inference.tiling import GIB, auto_tile, window_bytes

    shape = (678, 1020, 3)
    whole = window_bytes(678, 1020, 2, 64)
    assert whole < 4 * GIB
    assert auto_tile(shape, 2, 64, 36, free_bytes=24 * GIB, on_host=True) > 0
    assert auto_tile(shape, 2, 64, 36, free_bytes=80 * GIB, on_host=False) == 0
    on_small_device = auto_tile(shape, 2, 64, 36, free_bytes=whole, on_host=False)  # half of it for the window
    assert 0 < on_small_device < 1020
    assert window_bytes(on_small_device + 72, on_small_device + 72, 2, 64) <= whole // 2


def test_self_ensemble():
    lr = torch.rand(1, 3, 5, 8) * 255  # not square: rotations change the shape
    up = NearestUp()
    with torch.no_grad():
        assert torch.allclose(self_ensemble(up, lr), up(lr), atol=1e-4)
        skewed = Skewed()
        ens = self_ensemble(skewed, lr)
        assert ens.shape == (1, 3, 10, 16)
        assert torch.allclose(ens, _manual_ensemble(skewed, lr).float(), atol=1e-4)
        assert not torch.allclose(ens, skewed(lr), atol=1e-2)
        edsr = _model()
        assert torch.allclose(self_ensemble(edsr, lr), _manual_ensemble(edsr, lr).float(), atol=1e-3)


def test_super_resolve():
    model = _model()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    out = super_resolve(model, img, "cpu")
    assert out.dtype == np.uint8 and out.shape == (26, 34, 3)
    with torch.no_grad():
        expected = to_uint8(model(torch.from_numpy(img).permute(2, 0, 1)[None].float())[0])
    np.testing.assert_array_equal(out, expected)
    tiled = super_resolve(model, img, "cpu", tile=6)
    assert np.abs(tiled.astype(int) - out).max() <= 1  # only float rounding at .5 boundaries
    ens = super_resolve(model, img, "cpu", tile=6, ensemble=True)
    assert ens.shape == out.shape
    bf16 = super_resolve(model, img, torch.device("cpu"), precision="bf16")
    assert bf16.shape == out.shape and np.abs(bf16.astype(int) - out).mean() < 4
    with pytest.raises(ValueError):
        super_resolve(model, img[..., 0], "cpu")


def test_sr_command_end_to_end(tmp_path, capsys):
    cfg = Config(scale=2, num_blocks=2, num_filters=8, res_scale=1.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "run", {"model": model.state_dict(), "config": cfg.to_dict(), "step": 1},
                    step=1, keep_last=1)
    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    a = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    Image.fromarray(a).save(inputs / "a.png")
    Image.fromarray(rng.integers(0, 256, (9, 10, 3), dtype=np.uint8)).save(inputs / "b.jpg")
    Image.fromarray(a[..., 0]).save(tmp_path / "grey.png")
    (inputs / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    argv = ["sr", "--checkpoint", str(tmp_path / "run"), str(inputs), str(tmp_path / "grey.png"), "--out", str(out),
            "--tile", "5", "--device", "cpu"]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.png", "b_x2.png", "grey_x2.png"]
    sr_a = np.asarray(Image.open(out / "a_x2.png"))
    assert sr_a.shape == (24, 30, 3)
    assert np.abs(sr_a.astype(int) - super_resolve(model, a, "cpu")).max() <= 1
    assert np.asarray(Image.open(out / "b_x2.png")).shape == (18, 20, 3)

    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert cli_main(["sr", "--checkpoint", str(ckpt), str(inputs / "a.png"), "--out", str(out),
                     "--self-ensemble"]) == 0

    # user errors: exit 2, one line, no traceback
    assert cli_main(["sr", "--checkpoint", str(ckpt), str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert cli_main(["sr", "--checkpoint", str(tmp_path / "nothing"), str(inputs), "--out", str(out)]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["sr", "--checkpoint", str(ckpt), str(empty), "--out", str(out)]) == 2
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert cli_main(["sr", "--checkpoint", str(ckpt), str(tmp_path / "broken.png"), "--out", str(out)]) == 2
    Image.fromarray(a).save(tmp_path / "a.jpg")
    assert cli_main(["sr", "--checkpoint", str(ckpt), str(inputs / "a.png"), str(tmp_path / "a.jpg"),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in ("missing.png does not exist", "nothing does not exist", "has no images (.png, .bmp, .tif",
                 "cannot read image", "would both be written"):
        assert text in err, text


def test_frozen_cpu_network_matches_the_eager_model_at_any_size():
    model = _model(2)
    frozen = frozen_cpu_network(_model(2), "fp32")
    img = (np.random.default_rng(0).random((19, 27, 3)) * 255).astype(np.uint8)
    eager = super_resolve(model, img, "cpu", tile=0)
    fast = super_resolve(_model(2), img, "cpu", tile=0, compiled=frozen)
    assert np.abs(eager.astype(int) - fast.astype(int)).max() <= 1  # float rounding in uint8
    assert frozen_cpu_network(_model(2), "bf16") is None  # autocast runs the eager model


def test_rgb_png_written_band_by_band_decodes_to_the_same_pixels(tmp_path):
    rng = np.random.default_rng(5)
    for shape in ((1, 1, 3), (3, 2, 3), (600, 37, 3)):  # 600 rows: more than one band
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        write_rgb_png(img, tmp_path / "a.png")
        with Image.open(tmp_path / "a.png") as decoded:
            assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
            np.testing.assert_array_equal(np.asarray(decoded), img)
