import pytest
import torch

from edsr_dist.errors import UserError
from edsr_dist.model.precision import LossScaler, autocast, resolve_precision, select_device


def test_auto_precision_per_device():
    assert resolve_precision("auto", "npu") == "fp16"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_missing_devices_are_one_line_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            select_device("cuda", 0)
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="torch_npu cannot be imported"):
            select_device("npu", 0)
    assert select_device("cpu", 3) == torch.device("cpu")


def test_loss_scaler_unscales_detects_overflow_and_backs_off():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(3))
    scaler.scale_loss((p * 2).sum()).backward()
    assert scaler.unscale_([p]).item() == 0.0
    assert torch.allclose(p.grad, torch.full((3,), 2.0))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert scaler.unscale_([p]).item() == 1.0
    scaler.update(True)
    assert scaler.scale == 4.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 8.0  # grows after growth_interval good steps
    restored = LossScaler(enabled=True)
    restored.load_state_dict(scaler.state_dict())
    assert restored.scale == 8.0


def test_disabled_scaler_still_flags_nonfinite_gradients():
    scaler = LossScaler(enabled=False)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, float("nan")])
    assert scaler.unscale_([p]).item() == 1.0
    assert scaler.scale_loss(torch.tensor(3.0)).item() == 3.0


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_autocast_dtype(precision, dtype):
    layer = torch.nn.Conv2d(3, 4, 3)
    with autocast(torch.device("cpu"), precision):
        assert layer(torch.rand(1, 3, 8, 8)).dtype == dtype
