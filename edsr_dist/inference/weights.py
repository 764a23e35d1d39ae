"""Weight import and export: our names (= the reference EDSR implementation's), BasicSR's names, safetensors.

Our parameter names: sub_mean, head.0, body.{i}.body.0 / body.{i}.body.2, body.{B}, tail.0.0 (tail.0.2 for x4),
tail.1, add_mean. BasicSR's EDSR: conv_first, body.{i}.conv1 / conv2, conv_after_body, upsample.0 (upsample.2),
conv_last, saved as {"params": ..., "params_ema": ...}. BasicSR works on [0, 1] images and multiplies by
img_range = 255 inside, ours on [0, 255] with the mean shift as fixed 1x1 convs, so the same conv weights compute
the same function (ours(255 x) = 255 basicsr(x)); BasicSR's mean is not a learned parameter, hence our mean-shift
layers keep their fixed DIV2K values when loading BasicSR weights.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import re
from pathlib import Path

import torch
from torch import nn

from edsr_dist.config import config_from_dict
from edsr_dist.errors import DiskFull, UserError
from edsr_dist.model.edsr import DIV2K_RGB_MEAN, EDSR, RGB_RANGE, bare_model, build_model
from edsr_dist.state.atomic import atomic_write_bytes, make_parent_folder
from edsr_dist.state.checkpoint import find_checkpoint, load_checkpoint
from edsr_dist.state.checkpoint_files import follow_pointer, is_checkpoint_file
from edsr_dist.state.safe_load import load_tensors

_WRAPPER_KEYS = ("params_ema", "params", "model", "state_dict")  # in order of preference
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_BASICSR_BLOCK = re.compile(r"^body\.(\d+)\.conv([12])\.(weight|bias)$")
_OUR_BLOCK = re.compile(r"^body\.(\d+)\.body\.([02])\.(weight|bias)$")
# (BasicSR's name, ours), read left to right on import and right to left on export. {i}: a residual block,
# {u}: a layer of the upsampler, {leaf}: weight or bias, {blocks}: the number of blocks (the conv after the body).
_NAME_PAIRS = (
    ("conv_first.{leaf}", "head.0.{leaf}"),
    ("body.{i}.conv1.{leaf}", "body.{i}.body.0.{leaf}"),
    ("body.{i}.conv2.{leaf}", "body.{i}.body.2.{leaf}"),
    ("conv_after_body.{leaf}", "body.{blocks}.{leaf}"),
    ("upsample.{u}.{leaf}", "tail.0.{u}.{leaf}"),
    ("conv_last.{leaf}", "tail.1.{leaf}"),
)
_PLACEHOLDERS = {"i": r"\d+", "u": r"\d+", "leaf": r"[^.]+"}


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(sd: dict) -> dict:
    if _is_tensor_dict(sd):
        return sd
    for key in _WRAPPER_KEYS:
        inner = sd.get(key) if isinstance(sd, dict) else None
        if isinstance(inner, dict) and inner:
            return _unwrap(inner)
    return sd


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _mean_shift_entries(rgb_mean) -> dict:
    mean = torch.as_tensor(rgb_mean, dtype=torch.float32).reshape(3)
    eye = torch.eye(3).view(3, 3, 1, 1)
    return {"sub_mean.weight": eye.clone(), "sub_mean.bias": -RGB_RANGE * mean,
            "add_mean.weight": eye.clone(), "add_mean.bias": RGB_RANGE * mean}


def _name_pattern(template: str, blocks: int) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{blocks\}", str(blocks))
    for name, matches in _PLACEHOLDERS.items():
        pattern = pattern.replace(rf"\{{{name}\}}", f"(?P<{name}>{matches})")
    return re.compile(pattern)


def _rename(key: str, blocks: int, to_basicsr: bool) -> str | None:
    """`key` in the other naming by _NAME_PAIRS, or None when no pair names it."""
    for basicsr, ours in _NAME_PAIRS:
        source, target = (ours, basicsr) if to_basicsr else (basicsr, ours)
        match = _name_pattern(source, blocks).fullmatch(key)
        if match:
            return target.format(blocks=blocks, **match.groupdict())
    return None


def _count_blocks(keys, pattern: re.Pattern) -> int:
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def convert_state_dict(sd: dict, num_blocks: int | None = None) -> dict:
    """Any supported layout -> our parameter names (a new dict; tensors are shared, not copied).

    Accepts our/reference names, BasicSR names, {"params": .., "params_ema": ..} wrappers (params_ema
    preferred), our checkpoint dicts ({"model": ..}) and "module."/"_orig_mod." prefixes.
    Mean-shift entries missing from the source get the fixed DIV2K values.
    """
    sd = {_strip(k): v for k, v in _unwrap(sd).items()}
    if any(k.startswith("conv_first.") for k in sd):
        blocks = _count_blocks(sd, _BASICSR_BLOCK)
        if num_blocks is not None and num_blocks != blocks:
            raise UserError(f"the BasicSR weights have {blocks} residual blocks but the model has {num_blocks}; "
                            f"pass --num-blocks {blocks}")
        converted: dict = {}
        basicsr_mean = None
        for key, value in sd.items():
            if key == "mean":  # a buffer in some BasicSR versions: the data mean in [0, 1]
                basicsr_mean = value
                continue
            # An unknown name is kept: the strict load reports it as unexpected.
            converted[_rename(key, blocks, to_basicsr=False) or key] = value
        mean = basicsr_mean if basicsr_mean is not None and basicsr_mean.numel() == 3 else DIV2K_RGB_MEAN
        sd = converted
        for key, value in _mean_shift_entries(mean).items():
            sd.setdefault(key, value)
        return sd
    sd = dict(sd)
    for key, value in _mean_shift_entries(DIV2K_RGB_MEAN).items():
        sd.setdefault(key, value)
    return sd


def to_basicsr_state_dict(sd: dict) -> dict:
    """Our names -> BasicSR's EDSR names (mean-shift layers dropped: BasicSR's mean is not a parameter)."""
    sd = convert_state_dict(sd)
    blocks = _count_blocks(sd, _OUR_BLOCK)
    out: dict = {}
    for key, value in sd.items():
        if key.startswith(("sub_mean.", "add_mean.")):
            continue
        name = _rename(key, blocks, to_basicsr=True)
        if name is None:
            raise ValueError(f"no BasicSR name for parameter {key!r}")
        out[name] = value
    return out


def infer_architecture(sd: dict) -> dict:
    """scale, num_blocks and num_filters read from the tensor shapes (res_scale is not in the weights)."""
    sd = convert_state_dict(sd)
    try:
        num_filters = int(sd["head.0.weight"].shape[0])
        num_blocks = _count_blocks(sd, _OUR_BLOCK)
        first_up = int(sd["tail.0.0.weight"].shape[0])
    except KeyError as exc:
        raise UserError(f"these weights have no {exc.args[0]} entry, so they are not EDSR weights; "
                        "pass a file saved from EDSR (reference, BasicSR or edsr-dist)") from None
    if first_up == 9 * num_filters:
        scale = 3
    else:
        ups = sum(1 for k in sd if re.fullmatch(r"tail\.0\.\d+\.weight", k))
        scale = 2 ** ups
    return {"scale": scale, "num_blocks": num_blocks, "num_filters": num_filters}


def checkpoint_weights(state: dict, raw: bool = False) -> dict:
    """The weights of a training checkpoint: the EMA of the weights when the run kept one (what validation scored),
    the raw weights with raw=True or when there is no EMA."""
    ema = state.get("ema")
    if not raw and isinstance(ema, dict) and isinstance(ema.get("weights"), dict):
        return ema["weights"]
    return state.get("model", {})


def read_weights_file(path: str | Path, raw: bool = False) -> tuple[dict, dict]:
    """(raw state dict, metadata) from .safetensors, .pt/.pth or our .ckpt (its EMA weights unless raw); pickles
    are read weights-only."""
    path = follow_pointer(Path(path))
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass an existing .pt, .pth, .safetensors or .ckpt file")
    if is_checkpoint_file(path):
        state = load_checkpoint(path)
        return checkpoint_weights(state, raw), {k: str(v) for k, v in state.get("config", {}).items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise UserError(f"reading {path} needs the safetensors package; pip install 'edsr-dist[export]'") from None
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise UserError(f"cannot read {path} as safetensors ({exc}); the file is damaged or not safetensors"
                            ) from None
    sd = load_tensors(path, path, "weights file")
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds a {type(sd).__name__}, not a state dict; save model.state_dict() instead")
    return sd, {}


def _load_converted(model: nn.Module, sd: dict, source: str) -> None:
    model = bare_model(model)
    blocks = len(model.body) - 1 if isinstance(model, EDSR) else None
    sd = convert_state_dict(sd, num_blocks=blocks)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"missing {few(missing)}"] if missing else []
        parts += [f"unexpected {few(unexpected)}"] if unexpected else []
        raise UserError(f"weights in {source} do not fit this model: {'; '.join(parts)}; "
                        "check --scale, --num-blocks and --num-filters against the file")
    for key, value in sd.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"weights in {source} do not fit this model: {key} is {tuple(value.shape)} in the file "
                            f"but {tuple(expected[key].shape)} in the model; check --scale and --num-filters")
    model.load_state_dict(sd, strict=True)


def load_matching(model: nn.Module, path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """Initialise `model` from a weights file or checkpoint (EMA weights preferred, any supported naming): every
    tensor whose name and shape match is copied, the rest keep their initial values.

    Returns (loaded, left at init, in the file but not loaded: "name (file shape vs model shape)").
    Refuses when nothing but the upsampler and output conv would load: that is not the same network.
    """
    sd, _ = read_weights_file(path)
    sd = convert_state_dict(sd)
    target = bare_model(model)
    expected = target.state_dict()
    loaded = [k for k, v in expected.items() if k in sd and tuple(sd[k].shape) == tuple(v.shape)]
    left = [k for k in expected if k not in loaded]
    skipped = [f"{k} ({'x'.join(map(str, v.shape))} vs {'x'.join(map(str, expected[k].shape))})"
               if k in expected else k for k, v in sd.items() if k not in loaded]
    fixed = ("sub_mean.", "add_mean.")  # the mean shift is not learned; every EDSR file "matches" there
    if not [k for k in loaded if not k.startswith(("tail.", *fixed))]:
        raise UserError(f"--init-from {path}: nothing but the upsampler would load (head and body differ from this "
                        f"model's); check --num-filters and --num-blocks against the file, or drop --init-from")
    target.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return loaded, left, skipped


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load .pt/.pth/.safetensors/.ckpt weights in any supported naming into `model`, strictly."""
    sd, _ = read_weights_file(path)
    _load_converted(model, sd, str(path))


def model_from_weights(path: str | Path, res_scale: float | None = None) -> tuple[EDSR, dict]:
    """Build an EDSR whose shape is read from a weights file and load it. Returns (model, architecture).

    res_scale is not stored in plain weights: it comes from the argument, the file's metadata (our exports),
    or the published convention (0.1 for 256 filters, the paper model; 1.0 otherwise, the baseline).
    """
    sd, meta = read_weights_file(path)
    arch = infer_architecture(sd)
    if res_scale is None and "res_scale" in meta:
        res_scale = float(meta["res_scale"])
    if res_scale is None:
        res_scale = 0.1 if arch["num_filters"] >= 256 else 1.0
    arch["res_scale"] = res_scale
    model = EDSR(**arch)
    _load_converted(model, sd, str(path))
    return model.eval(), arch


def checkpoint_model(path: str | Path, raw: bool = False):
    """(EDSR with the saved weights, its Config) from a checkpoint file or a run folder; model on CPU, eval mode.
    The EMA of the weights when the run kept one, the raw weights with raw=True. The Config's precision is the one
    the run trained and validated with (its metadata), not `auto`."""
    found = find_checkpoint(path)
    if found is None:
        raise UserError(f"no valid checkpoint in {path}; pass a .ckpt file or a run folder that has checkpoints/")
    state = load_checkpoint(found)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"checkpoint {found} has no model weights and config; "
                        "pass a checkpoint written by `edsr-dist train`")
    cfg = config_from_dict(state["config"])
    trained = state.get("meta", {}).get("precision")
    if trained:
        cfg = dataclasses.replace(cfg, precision=trained)
    model = build_model(cfg)
    model.load_state_dict(convert_state_dict(checkpoint_weights(state, raw), num_blocks=cfg.num_blocks), strict=True)
    return model.eval(), cfg


def _architecture_of(model: EDSR) -> dict:
    return {"scale": model.scale, "num_blocks": len(model.body) - 1, "num_filters": model.head[0].out_channels,
            "res_scale": model.body[0].res_scale if len(model.body) > 1 else 1.0}


def _resolve_source(model_or_checkpoint, raw: bool = False) -> tuple[dict, dict]:
    if isinstance(model_or_checkpoint, nn.Module):
        model = bare_model(model_or_checkpoint)
        meta = _architecture_of(model) if isinstance(model, EDSR) else {}
        return model.state_dict(), meta
    model, cfg = checkpoint_model(model_or_checkpoint, raw=raw)
    meta = _architecture_of(model)
    meta["res_scale"] = cfg.res_scale
    return model.state_dict(), meta


def export_safetensors(model_or_checkpoint, out_path: str | Path, names: str = "reference", raw: bool = False) -> Path:
    """Write the model weights (a model, or a checkpoint file/run folder) as safetensors; atomic.

    names="reference" (ours, loads into the reference EDSR code) or "basicsr".
    The architecture (scale, num_blocks, num_filters, res_scale) goes into the file's metadata. A checkpoint gives
    its EMA weights when it has them (raw=True: the raw weights).
    """
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("exporting to safetensors needs the safetensors package; "
                        "pip install 'edsr-dist[export]'") from None
    sd, meta = _resolve_source(model_or_checkpoint, raw)
    sd = to_basicsr_state_dict(sd) if names == "basicsr" else sd
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    metadata = {"format": "edsr-dist", "names": names, **{k: str(v) for k, v in meta.items()}}
    return _write_export(Path(out_path), save(sd, metadata=metadata))


def _write_export(out_path: Path, data: bytes) -> Path:
    """The file made in memory first, then written atomically by plain writes: a full disk is an OSError with its
    errno here, where safetensors and torch.save writing the file themselves raise their own errors (SafetensorError,
    torch's `[enforce fail at inline_container.cc]`), with the file mode of a new file (safetensors' own
    save_file leaves it 0600)."""
    make_parent_folder(out_path)
    try:
        atomic_write_bytes(out_path, data)
    except OSError as exc:
        kind = DiskFull if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else UserError
        raise kind(f"cannot write {out_path} ({exc.strerror or exc}); free space or pass another --out; "
                   "nothing was written") from None
    return out_path


def export_torch(model_or_checkpoint, out_path: str | Path, names: str = "reference", raw: bool = False) -> Path:
    """Plain torch.save of the state dict (.pt/.pth); BasicSR names are wrapped as {"params": ...}. A checkpoint
    gives its EMA weights when it has them (raw=True: the raw weights)."""
    sd, _ = _resolve_source(model_or_checkpoint, raw)
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    obj = {"params": to_basicsr_state_dict(sd)} if names == "basicsr" else sd
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return _write_export(Path(out_path), buffer.getvalue())
