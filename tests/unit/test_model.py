import pytest
import torch

from edsr_dist.config import build_config
from edsr_dist.model.edsr import EDSR, build_model, count_trainable_parameters, flops_per_image

# Published parameter counts of EDSR (Lim et al. 2017, baseline and paper models), without the fixed mean-shift layers.
PUBLISHED = {
    ("baseline", 2): 1_369_859, ("baseline", 3): 1_554_499, ("baseline", 4): 1_517_571,
    ("paper", 2): 40_729_603, ("paper", 3): 43_680_003, ("paper", 4): 43_089_923,
}


@pytest.mark.parametrize("preset,scale", sorted(PUBLISHED))
def test_parameter_counts_match_the_paper(preset, scale):
    model = build_model(build_config(preset=preset, overrides={"scale": scale}))
    assert count_trainable_parameters(model) == PUBLISHED[(preset, scale)]


def reference_names(num_blocks: int, scale: int) -> set[str]:
    names = {"sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias", "head.0.weight", "head.0.bias",
             f"body.{num_blocks}.weight", f"body.{num_blocks}.bias", "tail.1.weight", "tail.1.bias"}
    for i in range(num_blocks):
        for j in (0, 2):
            names |= {f"body.{i}.body.{j}.weight", f"body.{i}.body.{j}.bias"}
    upsample_convs = {2: [0], 3: [0], 4: [0, 2]}[scale]
    for j in upsample_convs:
        names |= {f"tail.0.{j}.weight", f"tail.0.{j}.bias"}
    return names


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_state_dict_names_are_the_reference_implementations(scale):
    model = EDSR(scale=scale, num_blocks=3, num_filters=8)
    assert set(model.state_dict()) == reference_names(3, scale)
    # A state dict with exactly those names (as the reference implementation saves) loads strictly.
    other = EDSR(scale=scale, num_blocks=3, num_filters=8)
    other.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shape_and_mean_shift(scale):
    model = EDSR(scale=scale, num_blocks=2, num_filters=8).eval()
    x = torch.rand(2, 3, 10, 12) * 255
    assert model(x).shape == (2, 3, 10 * scale, 12 * scale)
    # The mean shift layers are fixed: sub then add is the identity.
    assert torch.allclose(model.add_mean(model.sub_mean(x)), x, atol=1e-4)
    assert not any(p.requires_grad for p in model.sub_mean.parameters())


def test_channels_last_gives_the_same_output():
    model = EDSR(scale=2, num_blocks=2, num_filters=8).eval()
    x = torch.rand(1, 3, 16, 16) * 255
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-3)


def test_flops_count_matches_the_parameter_count_for_convolutions():
    # For a conv net, MACs per LR pixel equal the weights applied per pixel; check against the
    # parameter count for x2 (every conv but the tail runs on the LR grid; the tail conv on 4x the pixels).
    cfg = build_config(preset="baseline")
    model = build_model(cfg)
    weights = sum(p.numel() for name, p in model.named_parameters() if name.endswith("weight") and p.requires_grad)
    tail = model.tail[1].weight.numel()
    assert flops_per_image(cfg, 10, 10) == 2 * 100 * (weights - tail + 4 * tail)
