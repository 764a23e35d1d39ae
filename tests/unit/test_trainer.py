"""The Trainer in this process (a world of one): its measuring seam and its one state description."""

import contextlib

import pytest
import torch

from edsr_dist.checkpoint import find_checkpoint, load_checkpoint
from edsr_dist.config import parse_train_args
from edsr_dist.dist.world import World
from edsr_dist.step_timer import StepTimer
from edsr_dist.train import Trainer
from helpers import TINY

STEPS = 4


@pytest.fixture
def make_trainer(sample_store, tmp_path):
    threads = torch.get_num_threads()  # the trainer sets the process's thread count
    made = []

    def make(name: str, timer=None) -> Trainer:
        cfg = parse_train_args([*TINY, "--data", str(sample_store), "--out", str(tmp_path / name),
                                "--steps-per-epoch", str(STEPS), "--max-val-images", "1"])
        made.append(Trainer(cfg, World(), timer=timer))
        return made[-1]

    yield make
    for trainer in made:
        trainer.close()
    torch.set_num_threads(threads)


class Recorder(StepTimer):
    def __init__(self):
        self.events = []

    def begin_step(self):
        self.events.append("begin")

    def end_step(self, skipped):
        self.events.append("skipped" if skipped else "end")

    @contextlib.contextmanager
    def phase(self, name):
        self.events.append(name)
        yield


def test_the_timer_sees_every_step_and_its_phases_in_order(make_trainer):
    timer = Recorder()
    make_trainer("run", timer).fit()
    one_step = ["data_wait", "begin", "to_device", "finish_gradients", "overflow_check", "optimizer", "end"]
    assert timer.events == one_step * STEPS


def test_save_and_resume_share_one_state_description(make_trainer):
    first = make_trainer("first")
    first.fit()
    state = first.state_dict()
    assert state["step"] == STEPS and state["epoch"] == 1 and state["step_in_epoch"] == 0
    saved = load_checkpoint(find_checkpoint(first.out))
    assert set(state) <= set(saved) and saved["step"] == STEPS  # save wrote exactly this description

    second = make_trainer("second")
    assert second.step == 0
    second.load_state_dict(saved)
    assert (second.step, second.epoch, second.step_in_epoch) == (STEPS, 1, 0)
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name
    moments = second.optimizer.state_dict()["state"]
    assert {float(s["step"]) for s in moments.values()} == {float(STEPS)}
    assert second.state_dict().keys() == state.keys()
