import pytest
import torch
import torch.nn.functional as F

from edsr_dist.cli import main as cli_main
from edsr_dist.config import Config
from edsr_dist.errors import UserError
from edsr_dist.inference.weights import (
    convert_state_dict,
    export_safetensors,
    infer_architecture,
    load_pretrained,
    model_from_weights,
    read_weights_file,
    to_basicsr_state_dict,
)
from edsr_dist.model.edsr import EDSR, build_model
from edsr_dist.state.checkpoint import save_checkpoint

DIV2K_MEAN = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)


def _random_model(scale=2, blocks=2, filters=8, res_scale=0.5, seed=0):
    torch.manual_seed(seed)
    model = EDSR(scale=scale, num_blocks=blocks, num_filters=filters, res_scale=res_scale)
    with torch.no_grad():  # default init of the biases is tiny; make every parameter matter
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def _basicsr_forward(params: dict, x01: torch.Tensor, scale: int, res_scale: float) -> torch.Tensor:
    """BasicSR's EDSR forward as published: [0, 1] input, mean subtracted and times img_range (255) inside."""
    def conv(name, t):
        return F.conv2d(t, params[f"{name}.weight"], params[f"{name}.bias"], padding=1)

    x = (x01 - DIV2K_MEAN) * 255.0
    x = conv("conv_first", x)
    res = x
    i = 0
    while f"body.{i}.conv1.weight" in params:
        res = res + conv(f"body.{i}.conv2", F.relu(conv(f"body.{i}.conv1", res))) * res_scale
        i += 1
    res = conv("conv_after_body", res) + x
    if scale == 3:
        res = F.pixel_shuffle(conv("upsample.0", res), 3)
    else:
        for k in range(0, 2 * (scale // 2), 2):
            if f"upsample.{k}.weight" in params:
                res = F.pixel_shuffle(conv(f"upsample.{k}", res), 2)
    return conv("conv_last", res) / 255.0 + DIV2K_MEAN


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_basicsr_weights_compute_the_same_function(scale):
    source = _random_model(scale=scale)
    basicsr = to_basicsr_state_dict(source.state_dict())
    expected_keys = {"conv_first.weight", "conv_after_body.weight", "conv_last.weight", "body.1.conv2.bias",
                     "upsample.0.weight"} | ({"upsample.2.weight"} if scale == 4 else set())
    assert expected_keys <= set(basicsr)
    assert not any(k.startswith(("sub_mean", "add_mean", "head", "tail")) for k in basicsr)

    target = EDSR(scale=scale, num_blocks=2, num_filters=8, res_scale=0.5).eval()
    load_pretrained_dict = convert_state_dict({"params": basicsr}, num_blocks=2)
    target.load_state_dict(load_pretrained_dict, strict=True)
    x01 = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        ours = target(x01 * 255.0)
        reference = _basicsr_forward(basicsr, x01, scale, 0.5) * 255.0
        assert torch.allclose(ours, source(x01 * 255.0), atol=1e-4)
    assert torch.allclose(ours, reference, atol=1e-3), (ours - reference).abs().max()


def test_key_mapping_round_trips():
    sd = _random_model(scale=4, blocks=3).state_dict()
    back = convert_state_dict(to_basicsr_state_dict(sd), num_blocks=3)
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_reference_names_load_strictly_and_wrappers(tmp_path):
    source = _random_model(scale=2, blocks=2)
    sd = source.state_dict()
    reference_names = {"head.0.weight", "body.0.body.0.weight", "body.1.body.2.bias", "body.2.weight",
                       "tail.0.0.weight", "tail.1.weight", "sub_mean.weight", "add_mean.bias"}
    assert reference_names <= set(sd)
    EDSR(scale=2, num_blocks=2, num_filters=8).load_state_dict(convert_state_dict(sd), strict=True)

    # "module." prefixes (DDP) and {"params", "params_ema"} wrappers: params_ema wins
    ema = _random_model(seed=1).state_dict()
    wrapped = {"params": to_basicsr_state_dict(sd),
               "params_ema": {f"module.{k}": v for k, v in to_basicsr_state_dict(ema).items()}}
    path = tmp_path / "basicsr.pth"
    torch.save(wrapped, path)
    target = EDSR(scale=2, num_blocks=2, num_filters=8, res_scale=0.5)
    load_pretrained(target, path)
    assert torch.equal(target.head[0].weight, ema["head.0.weight"])
    assert torch.equal(target.sub_mean.bias, sd["sub_mean.bias"])  # fixed mean shift kept


def test_mismatch_names_missing_and_unexpected_keys(tmp_path):
    sd = _random_model(blocks=2).state_dict()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"missing body\.2\.body\.0\.weight.*\(\+2 more\); unexpected body\.2\.weight"):
        load_pretrained(EDSR(scale=2, num_blocks=3, num_filters=8), path)
    with pytest.raises(UserError, match=r"tail\.0\.0\.weight is \(32, 8, 3, 3\) in the file"):
        load_pretrained(EDSR(scale=3, num_blocks=2, num_filters=8), path)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(EDSR(scale=2, num_blocks=2, num_filters=8), tmp_path / "nope.pt")
    torch.save({"x": [1, 2]}, path)
    with pytest.raises(UserError):
        load_pretrained(EDSR(scale=2, num_blocks=2, num_filters=8), path)


def test_infer_architecture():
    for scale in (2, 3, 4):
        sd = _random_model(scale=scale, blocks=3, filters=8).state_dict()
        assert infer_architecture(sd) == {"scale": scale, "num_blocks": 3, "num_filters": 8}
        assert infer_architecture(to_basicsr_state_dict(sd))["scale"] == scale


def test_safetensors_export_and_export_command(tmp_path, capsys):
    pytest.importorskip("safetensors")
    model = _random_model(scale=2, res_scale=0.5)
    out = export_safetensors(model, tmp_path / "m.safetensors")
    sd, meta = read_weights_file(out)
    assert meta["res_scale"] == "0.5" and meta["scale"] == "2"
    loaded, arch = model_from_weights(out)
    assert arch == {"scale": 2, "num_blocks": 2, "num_filters": 8, "res_scale": 0.5}
    x = torch.rand(1, 3, 6, 5) * 255
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    cfg = Config(scale=2, num_blocks=2, num_filters=8, res_scale=0.5)
    save_checkpoint(tmp_path / "run", {"model": model.state_dict(), "config": cfg.to_dict()}, step=3, keep_last=1)
    target = tmp_path / "exp" / "basicsr.safetensors"
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(target), "--names", "basicsr"]) == 0
    fresh = build_model(cfg)
    load_pretrained(fresh, target)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    pth = tmp_path / "ref.pth"
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(pth)]) == 0
    assert set(torch.load(pth, weights_only=True)) == set(model.state_dict())
    assert cli_main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(target)]) == 2
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x.bin")]) == 2
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "unknown weights format" in err
