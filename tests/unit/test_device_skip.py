"""The overflow skip decided on the device (the fused optimizer takes the flag as a tensor, as on CUDA) trains
exactly like the host's decision: same skipped step, same weights, same EMA, same optimizer step count."""

import contextlib

import pytest
import torch
from helpers import TINY

from edsr_dist.config import parse_train_args
from edsr_dist.parallel.world import World
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.trainer import Trainer

INJECT_AT_STEP = 3


class InjectInf(StepTimer):
    """An inf in one gradient at INJECT_AT_STEP, after the gradients are final; records the skipped steps."""

    def __init__(self):
        self.trainer, self.skipped = None, []

    @contextlib.contextmanager
    def phase(self, name):
        yield
        if name == "finish_gradients" and self.trainer.step + 1 == INJECT_AT_STEP:
            grad = next(p.grad for p in self.trainer.model.parameters() if p.grad is not None)
            grad[(0,) * grad.dim()] = float("inf")

    def end_step(self, skipped):
        if skipped:
            self.skipped.append(self.trainer.step + 1)


@pytest.fixture
def run(sample_store, tmp_path):
    threads = torch.get_num_threads()
    made = []

    def train(name: str, on_device: bool) -> tuple[Trainer, InjectInf]:
        cfg = parse_train_args([*TINY, "--data", str(sample_store), "--out", str(tmp_path / name), "--steps-per-epoch",
                                "6", "--max-val-images", "1", "--grad-clip-norm", "1e6", "--ema-decay", "0.5"])
        timer = InjectInf()
        trainer = Trainer(cfg, World(), timer=timer)
        timer.trainer = trainer
        made.append(trainer)
        trainer.skip_on_device = on_device
        trainer.fit()
        return trainer, timer

    yield train
    for trainer in made:
        trainer.close()
    torch.set_num_threads(threads)


def test_device_side_skip_matches_the_host_side_skip(run):
    host, host_timer = run("host", on_device=False)
    device, device_timer = run("device", on_device=True)
    assert host_timer.skipped == device_timer.skipped == [INJECT_AT_STEP]
    for name, value in host.model.state_dict().items():
        assert torch.equal(value, device.model.state_dict()[name]), name
    assert host.ema.updates == device.ema.updates == 5
    for name, value in host.ema.model.state_dict().items():
        assert torch.equal(value, device.ema.model.state_dict()[name]), name
    steps = {float(s["step"]) for s in device.optimizer.state_dict()["state"].values()}
    assert steps == {float(s["step"]) for s in host.optimizer.state_dict()["state"].values()} == {5.0}
