"""`edsr-dist export`: a trained model's weights (.safetensors or .pt/.pth, reference or BasicSR names) or the
network as ONNX (verified with ONNX Runtime before it is written; onnx_export.py)."""

from __future__ import annotations

from pathlib import Path

from edsr_dist.errors import CommandParser, UserError, add_raw_weights_flag, add_res_scale_flag
from edsr_dist.inference.onnx_export import export_command
from edsr_dist.inference.weights import export_safetensors, export_torch


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="edsr-dist export",
        description="Export a trained model: its weights (.safetensors, the default, or .pt/.pth) with our/reference "
                    "EDSR names or BasicSR names, or the network as ONNX (.onnx, verified with ONNX Runtime).")
    parser.add_argument("--checkpoint", required=True,
                        help="a .ckpt file or a run folder (newest valid checkpoint); for ONNX also a weights file "
                             "(.pt/.pth/.safetensors)")
    parser.add_argument("--out", required=True, help="output file: FILE.safetensors, FILE.pt, FILE.pth or FILE.onnx")
    parser.add_argument("--format", choices=("safetensors", "pt", "onnx"), default=None,
                        help="output format (default: from the --out suffix)")
    parser.add_argument("--names", choices=("reference", "basicsr"), default="reference",
                        help="parameter names: reference (= edsr-dist, the reference EDSR code) or basicsr")
    add_raw_weights_flag(parser)
    onnx = parser.add_argument_group("ONNX")
    onnx.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                      help="weights and activations inside the graph (the lr/sr interface is float32 either way)")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default 13: Ascend ATC and TensorRT)")
    onnx.add_argument("--verify-image", metavar="PNG", default=None,
                      help="the photo the export is checked on (default: scikit-image's chelsea)")
    onnx.add_argument("--verify-sizes", metavar="HxW,..", default=None,
                      help="LR crop sizes of the check (default 32x48,27x41,45x30)")
    add_res_scale_flag(onnx)
    args = parser.parse_args(argv)
    out = Path(args.out)
    suffix_format = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".onnx": "onnx"}.get(out.suffix)
    fmt = args.format or suffix_format
    if fmt is None:
        raise UserError(f"--out {out}: unknown weights format {out.suffix or '(no suffix)'}; "
                        "use a .safetensors, .pt, .pth or .onnx file name, or pass --format")
    if suffix_format is not None and suffix_format != fmt:
        raise UserError(f"--format {fmt} but --out {out} names a {suffix_format} file; make them agree")
    onnx_only = [flag for flag, value in (("--precision", args.precision), ("--opset", args.opset),
                                          ("--verify-image", args.verify_image), ("--verify-sizes", args.verify_sizes),
                                          ("--res-scale", args.res_scale)) if value is not None]
    if fmt != "onnx" and onnx_only:
        raise UserError(f"only ONNX exports take {', '.join(onnx_only)}; drop them or write a .onnx file")
    if fmt == "onnx" and args.names != "reference":
        raise UserError("--names applies to weight files; an ONNX file has no parameter names to choose")
    if fmt == "onnx":
        path = export_command(args)
    elif fmt == "safetensors":
        path = export_safetensors(args.checkpoint, out, names=args.names, raw=args.raw_weights)
    else:
        path = export_torch(args.checkpoint, out, names=args.names, raw=args.raw_weights)
    print(f"wrote {path}")
    return 0
