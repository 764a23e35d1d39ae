"""The Trainer in this process (a world of one): its measuring seam and its one state description."""

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image

from edsr_dist.config import parse_train_args
from edsr_dist.evaluation.metrics import psnr_y
from edsr_dist.parallel.world import World
from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint
from edsr_dist.train.reporting import SAMPLE_GAP, SAMPLE_LABEL_HEIGHT, sample_labels
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.trainer import Trainer

STEPS = 4


@pytest.fixture
def make_trainer(sample_store, tmp_path):
    threads = torch.get_num_threads()  # the trainer sets the process's thread count
    made = []

    def make(name: str, timer=None, extra=()) -> Trainer:
        cfg = parse_train_args([*TINY, "--data", str(sample_store), "--out", str(tmp_path / name),
                                "--steps-per-epoch", str(STEPS), "--max-val-images", "1", *extra])
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


def test_step_lines_carry_elapsed_time_and_eta_without_a_progress_bar(make_trainer, capsys):
    make_trainer("run", extra=["--log-every", "2"]).fit()  # --progress false, as under the launcher
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Step nr:")]
    assert [line.split("]")[0] for line in lines] == ["Step nr: [2/4", "Step nr: [4/4"]
    for line in lines:
        assert re.search(r" - Lr: \S+ - elapsed \d+:\d\d:\d\d - ETA \d+:\d\d:\d\d$", line), line
    assert lines[-1].endswith(" - ETA 0:00:00")  # nothing left after the last step


def test_sample_png_has_a_label_strip_over_the_three_crops(make_trainer):
    trainer = make_trainer("run")
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-6, 7, hr.shape), 0, 255).astype(np.uint8)
    bicubic = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    trainer.validator.write_sample("img", bicubic, sr, hr)
    image = np.asarray(Image.open(trainer.out / "samples" / "img_bicubic_edsr_gt.png"))
    side = 40
    assert image.shape == (SAMPLE_LABEL_HEIGHT + side, 3 * side + 2 * SAMPLE_GAP, 3)
    left = (50 - side) // 2
    panels = image[SAMPLE_LABEL_HEIGHT:]
    for index, source in enumerate((bicubic, sr, hr)):  # the crops themselves are untouched
        x = index * (side + SAMPLE_GAP)
        assert np.array_equal(panels[:, x:x + side], source[:, left:left + side])
        label = image[:SAMPLE_LABEL_HEIGHT, x:x + side]
        assert (label < 128).any() and (label == 255).any()  # dark text on the white strip
    assert sample_labels(bicubic, sr, hr, 2) == [f"bicubic {psnr_y(bicubic, hr, 2):.2f} dB",
                                                 f"EDSR {psnr_y(sr, hr, 2):.2f} dB", "ground truth"]


def test_a_checkpoint_written_by_an_old_trainer_still_resumes(make_trainer):
    old = Path(__file__).resolve().parents[1] / "data" / "step_00000003_v0a0567e.ckpt"  # see tests/e2e/test_security.py
    saved = load_checkpoint(old)
    trainer = make_trainer("resumed", extra=["--resume", str(old), "--num-blocks", "1", "--num-filters", "4",
                                             "--batch-size", "2", "--patch-size", "8", "--epochs", "2",
                                             "--steps-per-epoch", "3", "--max-steps", "4"])
    assert trainer.checkpointer.resumed_from == str(old)
    assert (trainer.step, trainer.epoch, trainer.step_in_epoch) == (3, 1, 0)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    trainer.fit()
    assert trainer.step == 4 and trainer.state_dict().keys() >= {"model", "optimizer", "scaler", "rng"}
