"""What `edsr-dist eval` scores: the checkpoints of a run folder, one checkpoint, or a plain weights file, and
how each becomes a model (with its training step and Config when it has them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edsr_dist.errors import UserError
from edsr_dist.inference.torch_runtime import load_inference_model
from edsr_dist.inference.weights import checkpoint_model
from edsr_dist.state.checkpoint import load_checkpoint
from edsr_dist.state.checkpoint_files import _step_of, follow_pointer, is_checkpoint_file, list_checkpoints


@dataclass
class Candidate:
    """Something to evaluate: a training checkpoint (step known) or a plain weights file."""

    path: Path
    is_checkpoint: bool


# ---- what to evaluate ---------------------------------------------------------------------------------------

def collect_candidates(path_text: str) -> list[Candidate]:
    """A folder: its step_*.ckpt files (run folder or its checkpoints/), oldest step first. A file: itself."""
    path = Path(path_text)
    if not path.exists():
        raise UserError(f"--checkpoints {path} does not exist; pass a run folder, its checkpoints/ folder, "
                        "a .ckpt file or a weights file")
    if path.is_file():
        path = follow_pointer(path)
        return [Candidate(path, is_checkpoint_file(path))]
    files = list_checkpoints(path)
    if not files:
        raise UserError(f"--checkpoints {path} holds no step_*.ckpt files; pass a run folder (with checkpoints/) "
                        "or one checkpoint file")
    return [Candidate(p, True) for p in files]


def load_candidate(candidate: Candidate, res_scale: float | None = None, raw: bool = False,
                   scale: int | None = None):
    """(model on CPU in eval mode, step or None, checkpoint Config or None); res_scale is for plain weights, raw
    picks a checkpoint's raw weights over its EMA; plain weights of a scale other than `scale` are refused."""
    if not candidate.is_checkpoint:
        return load_inference_model(str(candidate.path), res_scale=res_scale, scale=scale), None, None
    model, cfg = checkpoint_model(candidate.path, raw=raw)
    step = _step_of(candidate.path)
    if step < 0:  # renamed file: the step is inside
        step = int(load_checkpoint(candidate.path).get("step", -1))
    return model, (step if step >= 0 else None), cfg
