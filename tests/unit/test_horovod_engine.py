"""The Horovod engine's pieces that run without horovodrun."""

import sys

import pytest
import torch

from edsr_dist.errors import UserError
from edsr_dist.parallel.horovod_engine import HorovodEngine, dense_view
from edsr_dist.parallel.world import World


def test_dense_view_makes_channels_last_contiguous_in_place():
    weight = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    view, inverse = dense_view(weight)
    assert view.is_contiguous() and view.data_ptr() == weight.data_ptr()
    view.mul_(2)  # what an in-place collective does
    restored = view.permute(inverse)
    assert restored.shape == weight.shape and restored.stride() == weight.stride()
    assert torch.equal(restored, weight)
    plain = torch.randn(4, 5)
    assert dense_view(plain) == (plain, None)
    one_by_one = torch.randn(3, 3, 1, 1).contiguous(memory_format=torch.channels_last)  # tied strides
    assert dense_view(one_by_one)[0].is_contiguous()


def test_missing_horovod_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # makes `import horovod.torch` fail
    with pytest.raises(UserError, match="bash scripts/install_horovod.sh"):
        HorovodEngine(World(), torch.device("cpu"))
