import json

import pytest
import torch

from edsr_dist.config import Config
from edsr_dist.errors import UserError
from edsr_dist.inference.weights import checkpoint_model
from edsr_dist.model.edsr import build_model
from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from edsr_dist.state.checkpoint_files import list_checkpoints, newest_checkpoint_quick


def _state(step, size=16):
    return {"model": {"w": torch.arange(size, dtype=torch.float32) + step}, "step": step,
            "rng": {"torch": torch.get_rng_state()}, "config": {"scale": 2}}


def test_round_trip_and_pointers(tmp_path):
    path = save_checkpoint(tmp_path, _state(7), step=7, keep_last=2, psnr=30.5)
    assert path == tmp_path / "checkpoints" / "step_00000007.ckpt"
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(16.0) + 7)
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    folder = tmp_path / "checkpoints"
    assert (folder / "latest").read_text().strip() == path.name
    assert (folder / "best").read_text().strip() == path.name
    index = json.loads((folder / "index.json").read_text())
    assert index["checkpoints"] == [{"file": path.name, "step": 7, "psnr": 30.5}]
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
    assert find_checkpoint(tmp_path) == path
    assert find_checkpoint(folder) == path
    assert find_checkpoint(path) == path
    assert find_checkpoint(tmp_path / "missing") is None


def test_flipped_byte_and_truncation_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, _state(1, size=4096), step=1, keep_last=3)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(path)
    other = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not an edsr-dist checkpoint"):
        load_checkpoint(other)


def test_find_falls_back_to_previous_valid(tmp_path, capsys):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, _state(step), step=step, keep_last=5)
    folder = tmp_path / "checkpoints"
    newest = folder / "step_00000030.ckpt"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    middle = folder / "step_00000020.ckpt"
    data = bytearray(middle.read_bytes())
    data[-1] ^= 0xFF  # corrupt
    middle.write_bytes(bytes(data))
    found = find_checkpoint(tmp_path)
    assert found == folder / "step_00000010.ckpt"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2
    assert "step_00000030.ckpt" in warnings[0] and "truncated" in warnings[0]
    assert "step_00000020.ckpt" in warnings[1] and "corrupt" in warnings[1]
    # nothing valid at all -> None
    (folder / "step_00000010.ckpt").write_bytes(b"EDSRCKPT1\n")
    assert find_checkpoint(tmp_path) is None


def test_latest_pointer_is_preferred_over_higher_steps(tmp_path):
    # A new run in an old folder: the file written last wins, not the highest step.
    save_checkpoint(tmp_path, _state(500), step=500, keep_last=5)
    save_checkpoint(tmp_path, _state(100), step=100, keep_last=5)
    assert find_checkpoint(tmp_path).name == "step_00000100.ckpt"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000100.ckpt", "step_00000500.ckpt"]


def test_retention_keeps_last_k_and_best(tmp_path):
    psnrs = {1: 30.0, 2: 33.0, 3: 31.0, 4: float("nan"), 5: 32.0, 6: None}
    for step, value in psnrs.items():
        save_checkpoint(tmp_path, _state(step), step=step, keep_last=2, psnr=value)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000002.ckpt", "step_00000005.ckpt", "step_00000006.ckpt"]
    folder = tmp_path / "checkpoints"
    assert (folder / "best").read_text().strip() == "step_00000002.ckpt"
    assert (folder / "latest").read_text().strip() == "step_00000006.ckpt"
    # The pointer files can be passed wherever a checkpoint is expected.
    assert find_checkpoint(folder / "best") == folder / "step_00000002.ckpt"
    assert find_checkpoint(folder / "latest") == folder / "step_00000006.ckpt"
    index = json.loads((folder / "index.json").read_text())
    assert index["best"] == "step_00000002.ckpt"
    assert {e["file"] for e in index["checkpoints"]} == set(names)
    # a better one replaces the best, and the old best is pruned once it is outside the last K
    save_checkpoint(tmp_path, _state(7), step=7, keep_last=2, psnr=34.0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006.ckpt", "step_00000007.ckpt"]
    assert (folder / "best").read_text().strip() == "step_00000007.ckpt"


def test_unwritable_out_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write a checkpoint"):
        save_checkpoint(blocker, _state(1), step=1, keep_last=1)


def test_checkpoint_model_rebuilds_the_network(tmp_path):
    cfg = Config(scale=3, num_blocks=2, num_filters=8, res_scale=0.5)
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "step": 5}
    save_checkpoint(tmp_path, state, step=5, keep_last=1)
    rebuilt, rebuilt_cfg = checkpoint_model(tmp_path)
    assert rebuilt_cfg == cfg
    x = torch.rand(1, 3, 9, 11) * 255
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    with pytest.raises(UserError, match="no valid checkpoint"):
        checkpoint_model(tmp_path / "nothing")


def test_newest_checkpoint_quick_skips_a_cut_file_without_reading_payloads(tmp_path):
    assert newest_checkpoint_quick(tmp_path) is None
    for step in (4, 8):
        save_checkpoint(tmp_path, _state(step), step=step, keep_last=3)
    folder = tmp_path / "checkpoints"
    assert newest_checkpoint_quick(tmp_path) == (folder / "step_00000008.ckpt", 8)
    newest = folder / "step_00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[:-1])  # cut short, as a copy killed halfway leaves it
    assert newest_checkpoint_quick(tmp_path) == (folder / "step_00000004.ckpt", 4)
    assert find_checkpoint(tmp_path) == folder / "step_00000004.ckpt"  # the worker's choice agrees
