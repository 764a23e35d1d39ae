"""`edsr-dist build-store`: an HDF5 patch store from DIV2K-style PNG folders, or the embedded sample store;
`--verify` checks an existing one. The building itself is edsr_dist/data/builder.py."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from edsr_dist.data.builder import (DEFAULT_SCALES, DEFAULT_TILE_SIZE, OFFICIAL_DEGRADATION, check_output_file,
                                    check_tile_size, images_from_folder, parse_scales, write_store)
from edsr_dist.data.resize import DEGRADATIONS
from edsr_dist.data.sample import SAMPLE_TILE_SIZE, build_sample_store
from edsr_dist.data.store import verify_store
from edsr_dist.errors import CommandParser, UserError


def _summary_line(summary: dict[str, object], scales: Sequence[int], tile_size: int, degradation: str) -> str:
    mib = int(summary["bytes"]) / (1 << 20)
    line = (
        f"wrote {summary['out']}: {summary['train_tiles']} training tiles of {tile_size}px from "
        f"{summary['train_images']} images, {summary['valid_images']} validation images, scales "
        f"{','.join(map(str, scales))}, degradation {degradation}, {mib:.1f} MiB in {float(summary['seconds']):.1f}s"
    )
    if summary["skipped_small"]:
        line += f" ({summary['skipped_small']} images smaller than one tile gave no tiles)"
    return line


def _build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="edsr-dist build-store",
        description="Build an HDF5 patch store from DIV2K-style PNG folders, or the small embedded sample store.",
    )
    parser.add_argument("--hr-dir", help="folder of HR PNG images (e.g. DIV2K_train_HR)")
    parser.add_argument("--lr-dir", help="official LR folder with X2/X3/X4 subfolders holding <stem>x2.png ...; "
                        "omitted: LR made by bicubic downscaling")
    parser.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)),
                        help="comma-separated scales (default 2,3,4)")
    parser.add_argument("--out", help="store file to write (replaced atomically)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help=f"HR tile side, divisible by every scale (default {DEFAULT_TILE_SIZE}; 144 for --sample)")
    parser.add_argument("--valid-hr-dir", help="folder of HR PNG validation images (e.g. DIV2K_valid_HR)")
    parser.add_argument("--valid-lr-dir", help="official LR folder for the validation images (needed with --lr-dir)")
    parser.add_argument("--valid-count", type=int, default=0,
                        help="use the last K images of --hr-dir for validation (not for training)")
    parser.add_argument("--degradation", choices=DEGRADATIONS, default="bicubic-pil",
                        help="how to make LR without --lr-dir (default bicubic-pil; see docs/STORE.md)")
    parser.add_argument("--source", default="", help="free text recorded in the store (default: the folders used)")
    parser.add_argument("--sample", action="store_true",
                        help="build the embedded sample store from scikit-image's photos")
    parser.add_argument("--verify", metavar="FILE", help="check every checksum of an existing store and exit")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (also off when stderr is not a tty)")
    return parser


def main(argv: list[str]) -> int:
    args = _build_parser().parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()

    if args.verify:
        if args.out or args.hr_dir or args.sample:
            raise UserError("--verify checks an existing store; do not combine it with --out, --hr-dir or --sample")
        layout = verify_store(args.verify, progress=progress)
        print(
            f"{args.verify}: OK, {layout['checked']} checksums verified ({layout['num_train_tiles']} tiles, "
            f"{len(layout['valid_names'])} validation images, scales {','.join(map(str, layout['scales']))})"
        )
        return 0

    if not args.out:
        raise UserError("--out is required; pass the store file to write, e.g. --out div2k_x234.h5")
    scales = parse_scales(args.scales)

    if args.sample:
        if args.hr_dir or args.lr_dir or args.valid_hr_dir or args.valid_lr_dir or args.valid_count:
            raise UserError(
                "--sample builds from the embedded photos; drop --hr-dir/--lr-dir/--valid-* or drop --sample"
            )
        tile_size = args.tile_size or SAMPLE_TILE_SIZE
        check_tile_size(tile_size, scales)
        summary = build_sample_store(args.out, scales=scales, tile_size=tile_size, progress=progress)
        print(_summary_line(summary, scales, tile_size, str(summary["degradation"])))
        return 0

    if not args.hr_dir:
        raise UserError("--hr-dir is required (or --sample, or --verify FILE); pass the folder of HR PNG images")
    tile_size = args.tile_size or DEFAULT_TILE_SIZE
    check_tile_size(tile_size, scales)
    check_output_file(args.out)
    if args.valid_count < 0:
        raise UserError(f"--valid-count {args.valid_count} must be >= 0")
    if args.valid_count and args.valid_hr_dir:
        raise UserError("--valid-count and --valid-hr-dir both choose validation images; pass only one")
    if args.valid_lr_dir and not args.valid_hr_dir:
        raise UserError("--valid-lr-dir needs --valid-hr-dir; pass the validation HR folder too")
    if args.valid_hr_dir and bool(args.lr_dir) != bool(args.valid_lr_dir):
        # One degradation per store: official LR for training but bicubic for validation would mislead the metrics.
        raise UserError("--lr-dir and --valid-lr-dir go together (one degradation per store); pass both or neither")

    images = images_from_folder(args.hr_dir, args.lr_dir, scales)
    if args.valid_count:
        if args.valid_count > len(images):
            raise UserError(
                f"--valid-count {args.valid_count} exceeds the {len(images)} images in --hr-dir {args.hr_dir}"
            )
        train, valid = images[: -args.valid_count], images[-args.valid_count :]
    elif args.valid_hr_dir:
        train = images
        valid = images_from_folder(args.valid_hr_dir, args.valid_lr_dir, scales, "--valid-hr-dir", "--valid-lr-dir")
    else:
        train, valid = images, []
    degradation = OFFICIAL_DEGRADATION if args.lr_dir else args.degradation
    source = args.source or _describe_source(args)
    summary = write_store(args.out, train, valid, scales, tile_size, degradation, source, args.degradation, progress)
    print(_summary_line(summary, scales, tile_size, degradation))
    return 0


def _describe_source(args: argparse.Namespace) -> str:
    parts = [f"hr={os.path.abspath(args.hr_dir)}"]
    if args.lr_dir:
        parts.append(f"lr={os.path.abspath(args.lr_dir)}")
    if args.valid_hr_dir:
        parts.append(f"valid_hr={os.path.abspath(args.valid_hr_dir)}")
    if args.valid_lr_dir:
        parts.append(f"valid_lr={os.path.abspath(args.valid_lr_dir)}")
    if args.valid_count:
        parts.append(f"valid=last {args.valid_count}")
    return " ".join(parts)

