"""One run per --out folder: a fresh run never mixes with an earlier one; --overwrite moves it aside, never deletes."""

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import TINY, run_cli

from edsr_dist.errors import UserError
from edsr_dist.state.run_folder import claim_run_folder


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def run(tmp_path, trained_run) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def test_the_rule(tmp_path, run):
    assert claim_run_folder(tmp_path / "new", "", False) is None
    (tmp_path / "only_logs" / "logs").mkdir(parents=True)  # what the launcher writes first: not a run
    assert claim_run_folder(tmp_path / "only_logs", "", False) is None
    message = (f"--out {run} already holds a run (1 checkpoint up to step_00000010.ckpt, metrics.jsonl); continue it "
               f"with --resume auto, or start a new run with another --out (--overwrite moves the old run to "
               f"{run}.old-1)")
    with pytest.raises(UserError, match=re.escape(message)):
        claim_run_folder(run, "", False)
    elsewhere = tmp_path / "other.ckpt"
    with pytest.raises(UserError, match="already holds a run"):
        claim_run_folder(run, str(elsewhere), False)  # a checkpoint of another run would mix too
    assert claim_run_folder(run, "auto", False) is None
    assert claim_run_folder(run, str(run / "checkpoints" / "step_00000010.ckpt"), False) is None
    with pytest.raises(UserError, match="pass only one of them"):
        claim_run_folder(run, "auto", True)


def test_overwrite_moves_the_old_run_aside(run, capsys):
    before = _snapshot(run)
    assert claim_run_folder(run, "", True) == run.with_name("run.old-1")
    assert not run.exists() and _snapshot(run.with_name("run.old-1")) == before
    assert f"moved the previous run in {run} to {run}.old-1 (--overwrite); nothing was deleted" in capsys.readouterr().err
    shutil.copytree(run.with_name("run.old-1"), run)
    assert claim_run_folder(run, "", True) == run.with_name("run.old-2")


def _train(run: Path, store: Path, *extra: str):
    return run_cli(["train", *TINY, "--data", str(store), "--out", str(run), "--steps-per-epoch", "10", *extra],
                   cwd=run.parent)


def test_a_fresh_train_into_a_run_folder_is_refused(run, sample_store):
    before = _snapshot(run)
    result = _train(run, sample_store)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edsr-dist train: error: --out {run} already holds a run")
    assert "--resume auto" in lines[0] and "another --out" in lines[0]
    assert _snapshot(run) == before


def test_the_launcher_refuses_before_it_writes_logs(run, sample_store):
    before = _snapshot(run)
    result = run_cli(["launch", "--nproc", "1", "--", *TINY, "--data", str(sample_store), "--out", str(run)],
                     cwd=run.parent)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if "already holds a run" in line]
    assert _snapshot(run) == before and not (run / "logs").exists()


def test_overwrite_trains_afresh_and_keeps_the_old_run(run, sample_store):
    before = _snapshot(run)
    result = _train(run, sample_store, "--overwrite", "--steps-per-epoch", "5")
    assert result.returncode == 0, result.stderr
    assert "fresh start" in result.stdout and f"moved the previous run in {run} to {run}.old-1" in result.stderr
    assert _snapshot(run.with_name("run.old-1")) == before
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000005.ckpt"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5


def test_resume_auto_on_a_finished_run_repeats_its_result(run, sample_store):
    metrics = (run / "metrics.jsonl").read_text()
    result_line = "Result: EDSR {psnr_y:.2f} dB, bicubic {bicubic_psnr_y:.2f} dB (Y-PSNR, {images} held-out images)"
    recorded = json.loads(metrics.splitlines()[-1])
    assert recorded["type"] == "result"
    done = _train(run, sample_store, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "The run is already complete (step 10 of 10); nothing to train."
    assert lines[-1] == result_line.format(**recorded)
    assert (run / "metrics.jsonl").read_text() == metrics
    # Stopped after the last checkpoint but before the result record: validated again, the same figures.
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics.splitlines()[:-1]))
    again = _train(run, sample_store, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == result_line.format(**recorded)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["psnr_y"] == pytest.approx(
        recorded["psnr_y"], abs=1e-9)


def test_resume_auto_refuses_when_no_checkpoint_is_usable(run, sample_store):
    ckpt = run / "checkpoints" / "step_00000010.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    before = _snapshot(run)
    result = _train(run, sample_store, "--resume", "auto")
    assert result.returncode == 2
    warning, error = result.stderr.strip().splitlines()
    assert "skipping" in warning and "truncated" in warning
    assert error.startswith("edsr-dist train: error: --resume auto: no checkpoint in") and "--overwrite" in error
    assert _snapshot(run) == before
