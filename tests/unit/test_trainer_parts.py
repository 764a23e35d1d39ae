"""The Trainer's parts, each alone in a world of one (the base Engine: its collectives are the identity):
the step agreement, the checkpointer, the validator, the training data, the micro-steps and the progress log."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY

from edsr_dist.config import parse_train_args
from edsr_dist.data.store import PatchStore
from edsr_dist.errors import UserError
from edsr_dist.model.edsr import build_model
from edsr_dist.model.ema import WeightEMA
from edsr_dist.model.precision import LossScaler
from edsr_dist.parallel.engine import Engine
from edsr_dist.parallel.world import World
from edsr_dist.state.checkpoint import load_checkpoint
from edsr_dist.state.checkpoint_files import list_checkpoints
from edsr_dist.train.agreement import StepAgreement, TrainingDiverged
from edsr_dist.train.checkpointer import CHECKPOINT_FORMAT, Checkpointer
from edsr_dist.train.data import TrainingData
from edsr_dist.train.micro_steps import MicroSteps
from edsr_dist.train.progress import Progress
from edsr_dist.train.reporting import LossMeter
from edsr_dist.train.step_timer import StepTimer
from edsr_dist.train.validator import Validator, open_validation

CPU = torch.device("cpu")


def config(sample_store, out, *extra):
    return parse_train_args([*TINY, "--data", str(sample_store), "--out", str(out), *extra])


def post(agreement: StepAgreement, step: int, bad=0.0, stop=0.0, timed_save=0.0, host_decides=True) -> bool:
    """The all-reduced flags of one step, as a world of one all-reduces them (unchanged)."""
    return agreement.post(step, torch.tensor([bad, stop, timed_save]), host_decides=host_decides)


# ---- StepAgreement ----------------------------------------------------------------------------------------------

def test_agreement_flags_carry_the_local_overflow_the_stop_request_and_the_timed_save():
    agreement = StepAgreement(max_bad_steps=5)
    assert agreement.flags(torch.tensor(1.0), timed_save=False).tolist() == [1.0, 0.0, 0.0]
    agreement.request_stop(signal.SIGTERM, None)
    assert agreement.flags(torch.tensor(0.0), timed_save=True).tolist() == [0.0, 1.0, 1.0]
    assert agreement.stop_signal == signal.SIGTERM and not agreement.stop_agreed  # asked, not yet agreed


def test_agreement_counts_consecutive_bad_steps_and_declares_divergence_at_the_limit():
    agreement = StepAgreement(max_bad_steps=3)
    for step, bad in enumerate([1, 1, 0, 1, 1], start=1):  # a finite step resets the count
        post(agreement, step, bad=bad)
        agreement.read(through_step=step)
    assert agreement.bad_steps == 2
    post(agreement, 6, bad=1)
    with pytest.raises(TrainingDiverged) as raised:
        agreement.read(through_step=6)
    assert raised.value.args == (6,)


def test_agreement_reads_a_step_only_when_asked_through_it():
    agreement = StepAgreement(max_bad_steps=5)
    post(agreement, 1, bad=1)
    post(agreement, 2, stop=1, timed_save=1)
    agreement.read(through_step=1)  # during step 2: step 1's flags only
    assert (agreement.bad_steps, agreement.stop_agreed, agreement.timed_save_agreed) == (1, False, False)
    agreement.read(through_step=2)
    assert (agreement.bad_steps, agreement.stop_agreed, agreement.timed_save_agreed) == (0, True, True)
    assert agreement.pending == []


def test_agreement_host_decides_the_skip_or_leaves_it_to_the_device():
    agreement = StepAgreement(max_bad_steps=5)
    assert post(agreement, 1, bad=1, host_decides=True) is True
    assert post(agreement, 2, bad=0, host_decides=True) is False
    assert post(agreement, 3, bad=1, host_decides=False) is False  # the device skips; the host learns later
    agreement.read(through_step=3)
    assert agreement.bad_steps == 1


def test_agreement_signals_only_ask_for_a_stop_and_handlers_come_back():
    agreement = StepAgreement(max_bad_steps=5)
    before = signal.getsignal(signal.SIGTERM)
    with agreement.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert agreement.stop_requested and agreement.stop_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# ---- Checkpointer -----------------------------------------------------------------------------------------------

def make_checkpointer(cfg) -> Checkpointer:
    return Checkpointer(cfg, Path(cfg.out), True, Engine(World(), CPU), CPU,
                        meta={"world_size": 1, "engine": "local", "precision": "fp32"})


def state_at(step: int):
    return lambda: {"step": step, "epoch": 0, "step_in_epoch": step, "weights": torch.full((2,), float(step))}


def saved_steps(out) -> list[int]:
    return sorted(int(path.name[5:13]) for path in list_checkpoints(out))


def test_checkpointer_saves_on_its_step_cadence_and_keeps_the_newest(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run", "--save-every-steps", "3", "--keep-last", "2")
    checkpointer, agreement = make_checkpointer(cfg), StepAgreement(max_bad_steps=5)
    try:
        for step in range(1, 13):
            post(agreement, step)
            checkpointer.save_at_step(step, agreement, state_at(step))
        assert saved_steps(cfg.out) == [9, 12]  # 3, 6, 9, 12 saved; --keep-last 2
        saved = load_checkpoint(checkpointer.out / "checkpoints" / "step_00000012.ckpt")
        assert saved["step"] == 12 and saved["config"] == cfg.to_dict()
        assert saved["meta"]["format_version"] == CHECKPOINT_FORMAT and saved["meta"]["engine"] == "local"
    finally:
        checkpointer.close()


def test_checkpointer_holds_a_step_save_back_until_a_finite_step(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run", "--save-every-steps", "3")
    checkpointer, agreement = make_checkpointer(cfg), StepAgreement(max_bad_steps=5)
    try:
        for step, bad in [(1, 0), (2, 0), (3, 1), (4, 1), (5, 0), (6, 0)]:
            post(agreement, step, bad=bad)
            agreement.read(through_step=step - 1)  # as train_step does: the previous step's flags
            checkpointer.save_at_step(step, agreement, state_at(step))
        assert saved_steps(cfg.out) == [5, 6]  # 3's save waited through the bad steps 3 and 4
    finally:
        checkpointer.close()


def test_checkpointer_timed_save_restarts_rank_0s_clock_and_saves_once_agreed(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run", "--save-every-minutes", "0.01")  # 0.6 s
    checkpointer, agreement = make_checkpointer(cfg), StepAgreement(max_bad_steps=5)
    try:
        checkpointer._last_save -= 1.0  # a second ago
        assert checkpointer.timed_save_due() and not checkpointer.timed_save_due()  # the clock restarted
        post(agreement, 1, timed_save=1)
        checkpointer.save_at_step(1, agreement, state_at(1))  # step 1's flags are not read yet: no save
        post(agreement, 2)
        agreement.read(through_step=1)  # during step 2, as train_step does
        assert agreement.timed_save_agreed and saved_steps(cfg.out) == []
        checkpointer.save_at_step(2, agreement, state_at(2))
        assert saved_steps(cfg.out) == [2] and not agreement.timed_save_agreed
    finally:
        checkpointer.close()


def test_checkpointer_epoch_cadence_and_the_last_epoch(sample_store, tmp_path):
    checkpointer = make_checkpointer(config(sample_store, tmp_path / "run", "--save-every", "2"))
    try:
        assert [checkpointer.should_save_epoch(n, last=False) for n in (1, 2, 3, 4)] == [False, True, False, True]
        assert checkpointer.should_save_epoch(5, last=True)
    finally:
        checkpointer.close()


def test_checkpointer_claims_the_run_folder_and_resumes_from_its_save(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run", "--resume", "auto")
    first = make_checkpointer(cfg)
    try:
        with pytest.raises(UserError):  # one writer per run folder
            make_checkpointer(cfg)
        first.save(7, state_at(7), psnr=30.0)
        first.save(8, state_at(8), psnr=29.0)
        assert first.best_psnr == 30.0
    finally:
        first.close()
    second, loaded = make_checkpointer(cfg), []
    try:
        second.start(loaded.append, build_model(cfg), None)
        assert [state["step"] for state in loaded] == [8]
        assert torch.equal(loaded[0]["weights"], torch.full((2,), 8.0))
        assert second.resumed_from.endswith("step_00000008.ckpt") and second.initialized_from is None
        assert second.describe_start(8) == f"resumed from {second.resumed_from} at step 8"
    finally:
        second.close()


def test_checkpointer_init_from_loads_matching_weights_into_a_fresh_run(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run")
    source = build_model(cfg)
    for parameter in source.parameters():
        parameter.data.fill_(0.25)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    cfg = config(sample_store, tmp_path / "run", "--init-from", str(tmp_path / "weights.pt"), "--ema-decay", "0.9")
    checkpointer, model = make_checkpointer(cfg), build_model(cfg)
    ema = WeightEMA(model, cfg.ema_decay)
    try:
        checkpointer.start(lambda state: pytest.fail("nothing to resume"), model, ema)
        assert all(torch.all(p == 0.25) for p in model.parameters())
        assert all(torch.all(p == 0.25) for p in ema.model.parameters())  # the EMA starts from the loaded weights
        assert checkpointer.describe_start(0) == f"fresh start from the weights of {cfg.init_from}"
    finally:
        checkpointer.close()


# ---- Validator, TrainingData, Progress --------------------------------------------------------------------------

def test_validator_scores_the_ema_when_there_is_one_and_leaves_the_model_training(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run", "--validate-every", "2")
    store = PatchStore(str(sample_store), cfg.scale)
    try:
        source, engine = open_validation(cfg, store), Engine(World(), CPU)
        torch.manual_seed(0)
        model, other = build_model(cfg), build_model(cfg)
        ema = WeightEMA(other, 0.5)
        with_ema = Validator(cfg, source, model, ema, CPU, "fp32", World(), engine, tmp_path)
        of_the_ema = Validator(cfg, source, ema.model, None, CPU, "fp32", World(), engine, tmp_path)
        of_the_model = Validator(cfg, source, model, None, CPU, "fp32", World(), engine, tmp_path)
        report = with_ema.validate()
        assert report == of_the_ema.validate() != of_the_model.validate()
        assert report["images"] == 2 and model.training
        assert [with_ema.should_validate(n, last=False) for n in (1, 2, 3)] == [False, True, False]
        assert with_ema.should_validate(3, last=True)
    finally:
        store.close()


def test_training_data_batches_an_epoch_from_any_step_and_moves_them_to_the_device(sample_store, tmp_path):
    cfg = config(sample_store, tmp_path / "run", "--steps-per-epoch", "5")
    data = TrainingData(PatchStore(str(sample_store), cfg.scale), cfg, World(), CPU, torch.channels_last)
    try:
        batches = data.batches(epoch=1, first_step=3, timer=StepTimer())
        try:
            got = list(batches)
        finally:
            batches.close()
        assert [step for step, _ in got] == [3, 4]
        lr, hr = got[0][1]
        assert np.array_equal(lr, data.sampler.batch(1, 3)[0])  # the same batch whichever step it starts from
        x = data.to_device(hr)
        assert x.shape == (cfg.batch_size, 3, hr.shape[1], hr.shape[2]) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(hr).float())
    finally:
        data.close()


# ---- MicroSteps ------------------------------------------------------------------------------------------------

def test_micro_steps_of_a_share_add_up_to_the_gradient_and_loss_of_the_whole_share(sample_store, tmp_path):
    grads, losses = {}, {}
    for accumulate in (1, 2, 4):
        cfg = config(sample_store, tmp_path / "run", "--batch-size", "4", "--accumulate", str(accumulate))
        data = TrainingData(PatchStore(str(sample_store), cfg.scale), cfg, World(), CPU, torch.contiguous_format)
        try:
            torch.manual_seed(0)
            model = build_model(cfg)
            steps = MicroSteps(Engine(World(), CPU), LossScaler(enabled=False), data, StepTimer(), CPU, "fp32",
                               cfg.batch_size)
            micro_batches = data.sampler.micro_batches(*data.sampler.batch(0, 0))
            assert len(micro_batches) == accumulate
            losses[accumulate] = steps.run(model, micro_batches)
            grads[accumulate] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        finally:
            data.close()
    for accumulate in (2, 4):
        assert torch.allclose(losses[accumulate], losses[1], rtol=1e-5)
        assert torch.allclose(grads[accumulate], grads[1], rtol=1e-4, atol=1e-6)
    assert not torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_progress_logs_on_its_cadence_and_records_each_line(tmp_path, capsys):
    cfg = parse_train_args([*TINY, "--out", str(tmp_path), "--log-every", "2"])
    progress = Progress(cfg, tmp_path, is_main=True, total_steps=4)
    window = LossMeter(CPU)
    assert not progress.should_log(2, window)  # nothing counted yet
    window.add(torch.tensor(1.0), torch.tensor(0.0))
    window.add(torch.tensor(3.0), torch.tensor(0.0))
    assert not progress.should_log(3, window) and progress.should_log(2, window)
    with progress.running(step=0):
        progress.log_window(window, step=2, epoch=0, lr=1e-4, loss_scale=1.0)
    progress.close()
    assert capsys.readouterr().out.startswith("Step nr: [2/4] - Loss: 2.00000 - Lr: 1.000e-04 - elapsed ")
    entry = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert (entry["type"], entry["step"], entry["epoch"], entry["loss"]) == ("step", 2, 1, 2.0)
