"""Reading torch-pickled files (checkpoints, .pt/.pth weights) without ever running code from them.

A pickle can name any importable function (`os.system`) and have it called while it loads; a checksum proves
only that the file arrived intact, not who made it. `weights_only=True` restricts unpickling to tensors,
containers, numbers and strings, and refuses anything else before creating it (torch/_weights_only_unpickler.py,
`Unpickler.load`: an unknown GLOBAL raises UnpicklingError). Everything edsr-dist writes is made of those types,
so no allow-list is needed and there is no unsafe fallback.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import torch

from edsr_dist.errors import UserError


def _blocked_name(exc: Exception) -> str:
    """`posix.system` from torch's "Trying to load unsupported GLOBAL posix.system ...", else torch's own reason:
    the line after "WeightsUnpickler error:" (torch/serialization.py builds the message: a paragraph on its default,
    that label, then the unpickler's reason, such as "Unsupported operand 149" for a pickle protocol it lacks)."""
    text = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"a reference to {match.group(1)}"
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)


def load_tensors(source: bytes | str | Path, path: str | Path, kind: str, map_location="cpu"):
    """torch.load(source) with weights_only=True; `path` and `kind` ("checkpoint", "weights file") name it in errors.

    map_location="meta" checks a file without reading its tensor data (a few milliseconds for any size).
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            # torch warns of a pickle protocol other than its own before the unpickler refuses the file; the
            # refusal below is the one line that says so.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {path}: it contains objects a {kind} never holds ({_blocked_name(exc)}); "
                        f"nothing in it was run; use a {kind} written by edsr-dist or another source you trust"
                        ) from None
    except Exception as exc:  # a damaged zip or another format: torch raises RuntimeError, EOFError, ...
        reason = (str(exc).splitlines() or [""])[0]
        raise UserError(f"cannot read {path} as a {kind} ({type(exc).__name__}: {reason}); it is damaged or "
                        f"not a torch file; pass a {kind} saved with torch.save or a .safetensors file") from None
