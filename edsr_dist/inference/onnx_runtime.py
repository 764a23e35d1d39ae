"""Super-resolution with an exported .onnx model in ONNX Runtime, without torch.

The same tiling and self-ensemble as the PyTorch path (`tiling`), on numpy arrays. The model's scale, width and
receptive field come from the metadata `edsr-dist export` writes into the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edsr_dist.data.images import to_uint8
from edsr_dist.errors import UserError
from edsr_dist.inference import tiling
from edsr_dist.inference.tiling import ArrayOps, check_rgb_uint8

# --device -> ONNX Runtime execution providers, in order of preference (CPU always last, as the fallback)
PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider",), "npu": ("CANNExecutionProvider",)}


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--backend onnxruntime needs the onnxruntime package; pip install 'edsr-dist[onnx]'") from None
    return onnxruntime


NUMPY_OPS = ArrayOps(
    new_output=lambda shape, like: np.empty(shape, dtype=np.float32),
    rot90=lambda x, k: np.rot90(x, k, axes=(-2, -1)),
    flip=lambda x: np.flip(x, -1),
    float32=lambda x: np.asarray(x, dtype=np.float32),
    to_network=lambda window: window.transpose(2, 0, 1)[None].astype(np.float32),
    to_uint8=lambda y: to_uint8(y[0].transpose(1, 2, 0)),
)

# An accelerator's free memory is not something ONNX Runtime reports: what a window may take there.
ACCELERATOR_FREE_BYTES = 8 * tiling.GIB


class OnnxModel:
    """An exported EDSR in an ONNX Runtime session: call it on (N, 3, h, w) float32 arrays in [0, 255]."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0):
        ort = onnxruntime_module()
        path = Path(path)
        if not path.is_file():
            raise UserError(f"model {path} does not exist; export one with `edsr-dist export --checkpoint C "
                            "--out model.onnx`")
        available = ort.get_available_providers()
        if device == "auto":
            wanted = next((PROVIDERS[d] for d in ("cuda", "npu") if PROVIDERS[d][0] in available), PROVIDERS["cpu"])
        else:
            wanted = PROVIDERS[device]
            if wanted[0] not in available:
                raise UserError(f"--device {device} needs ONNX Runtime's {wanted[0]}, but this onnxruntime has only "
                                f"{', '.join(available)}; install the onnxruntime build for it or pass --device cpu")
        self.device_type = "cpu" if wanted == PROVIDERS["cpu"] else "accelerator"
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=list(dict.fromkeys(wanted + PROVIDERS["cpu"])))
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
            reason = (str(exc).splitlines() or [""])[0]
            raise UserError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {reason}); pass a model "
                            "written by `edsr-dist export --out model.onnx`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.scale = int(meta["scale"])
            self.num_filters = int(meta["num_filters"])
            self.receptive_field_radius = int(meta["receptive_field_radius"])
        except (KeyError, ValueError):
            raise UserError(f"{path} lacks the edsr-dist metadata (scale, num_filters, receptive_field_radius); "
                            "export the model with `edsr-dist export --out model.onnx`") from None
        self.precision = meta.get("precision", "fp32")

    def __call__(self, lr: np.ndarray) -> np.ndarray:
        return self.session.run(["sr"], {"lr": np.ascontiguousarray(lr, dtype=np.float32)})[0]


def super_resolve_onnx(model: OnnxModel, lr_uint8_hwc: np.ndarray, tile: int | None = None, pad: int | None = None,
                       ensemble: bool = False) -> np.ndarray:
    """One RGB uint8 (H, W, 3) image -> (sH, sW, 3) uint8; tile and pad as in `torch_runtime.super_resolve`."""
    img = check_rgb_uint8(lr_uint8_hwc)
    if pad is None:
        pad = model.receptive_field_radius
    on_host = model.device_type == "cpu"
    return tiling.upscale(model, img, scale=model.scale, num_filters=model.num_filters, pad=pad, tile=tile,
                          ensemble=ensemble, ops=NUMPY_OPS,
                          free_bytes=tiling.host_free_bytes if on_host else lambda: ACCELERATOR_FREE_BYTES,
                          on_host=on_host)
