"""`edsr-dist build-store`: an HDF5 patch store from one or more DIV2K-style image folders (DF2K: DIV2K +
Flickr2K), or the embedded sample store; `--verify` checks an existing one. The building itself is
edsr_dist/data/builder.py."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from edsr_dist.data.builder import (
    DEFAULT_SCALES,
    DEFAULT_TILE_SIZE,
    OFFICIAL_DEGRADATION,
    SourceFolder,
    check_output_file,
    check_tile_size,
    folder_source,
    parse_scales,
    write_store,
)
from edsr_dist.data.resize import DEGRADATIONS
from edsr_dist.data.sample_store import SAMPLE_TILE_SIZE, build_sample_store
from edsr_dist.data.store import verify_store
from edsr_dist.errors import CommandParser, UserError

NO_VALIDATION_NOTE = (
    "note: no validation images in this store; `edsr-dist train` refuses it unless --val-benchmark names a "
    "benchmark set; rebuild with --valid-count K or --valid-hr-dir DIR to hold images out"
)


def summary_lines(summary: dict[str, object], scales: Sequence[int], tile_size: int, degradation: str) -> list[str]:
    mib = int(summary["bytes"]) / (1 << 20)
    lines = [
        f"wrote {summary['out']}: {summary['train_tiles']} training tiles of {tile_size}px from "
        f"{summary['train_images']} images, {summary['valid_images']} validation images, scales "
        f"{','.join(map(str, scales))}, degradation {degradation}, {mib:.1f} MiB in {float(summary['seconds']):.1f}s"
    ]
    for record in summary["sources"]:  # type: ignore[union-attr]
        lr = f" (LR {record['lr']})" if record["lr"] else ""
        tiles = f", {record['tiles']} tiles" if record["role"] == "train" else ""
        lines.append(f"  {record['role']:5s} {record['hr']}{lr}: {record['images']} images{tiles}")
    small = list(summary["skipped_small"])  # type: ignore[call-overload]
    if small:
        shown = ", ".join(small[:10]) + (f" and {len(small) - 10} more" if len(small) > 10 else "")
        lines.append(f"note: {len(small)} image(s) smaller than one {tile_size}px tile were left out: {shown}; "
                     f"a smaller --tile-size keeps them")
    if not summary["valid_images"]:
        lines.append(NO_VALIDATION_NOTE)
    return lines


def _build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="edsr-dist build-store",
        description="Build an HDF5 patch store from one or more folders of HR images (PNG, JPEG, BMP, TIFF, WebP), "
                    "or the small embedded sample store.",
    )
    parser.add_argument("--hr-dir", action="append", default=[],
                        help="folder of HR images (e.g. DIV2K_train_HR); repeat for several folders (DF2K: "
                             "--hr-dir DIV2K_train_HR --hr-dir Flickr2K_HR)")
    parser.add_argument("--lr-dir", action="append", default=[],
                        help="official LR folder with X2/X3/X4 subfolders holding <stem>x2.png ...; one per --hr-dir, "
                             "in the same order; omitted: LR made by bicubic downscaling")
    parser.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)),
                        help="comma-separated scales (default 2,3,4)")
    parser.add_argument("--out", help="store file to write (replaced atomically)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help=f"HR tile side, divisible by every scale (default {DEFAULT_TILE_SIZE}; 144 for --sample)")
    parser.add_argument("--valid-hr-dir", action="append", default=[],
                        help="folder of HR validation images (e.g. DIV2K_valid_HR); repeatable")
    parser.add_argument("--valid-lr-dir", action="append", default=[],
                        help="official LR folder for each --valid-hr-dir (needed with --lr-dir)")
    parser.add_argument("--valid-count", type=int, default=0,
                        help="use the last K images of the last --hr-dir for validation (not for training)")
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
            f"{args.verify}: OK, {layout['checked']} checksums verified ({layout['num_train_tiles']} tiles from "
            f"{layout['num_train_images']} images, {len(layout['valid_names'])} validation images, scales "
            f"{','.join(map(str, layout['scales']))})"
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
        print("\n".join(summary_lines(summary, scales, tile_size, str(summary["degradation"]))))
        return 0

    if not args.hr_dir:
        raise UserError("--hr-dir is required (or --sample, or --verify FILE); pass the folder of HR images")
    tile_size = args.tile_size or DEFAULT_TILE_SIZE
    check_tile_size(tile_size, scales)
    check_output_file(args.out)
    folders = _folders(args, scales)
    for folder in folders:
        for note in folder.notes:
            print(note)
    degradation = OFFICIAL_DEGRADATION if args.lr_dir else args.degradation
    source = args.source or " ".join(f"{f.role}={f.hr}" + (f",lr={f.lr}" if f.lr else "") for f in folders)
    summary = write_store(args.out, folders, scales, tile_size, degradation, source, args.degradation, progress)
    print("\n".join(summary_lines(summary, scales, tile_size, degradation)))
    return 0


def _folders(args: argparse.Namespace, scales: Sequence[int]) -> list[SourceFolder]:
    """The folders in the order they are stored, each with its role; checks the flags fit together."""
    if args.valid_count < 0:
        raise UserError(f"--valid-count {args.valid_count} must be >= 0")
    if args.valid_count and args.valid_hr_dir:
        raise UserError("--valid-count and --valid-hr-dir both choose validation images; pass only one")
    for hr_flag, hr_dirs, lr_flag, lr_dirs in (("--hr-dir", args.hr_dir, "--lr-dir", args.lr_dir),
                                               ("--valid-hr-dir", args.valid_hr_dir, "--valid-lr-dir",
                                                args.valid_lr_dir)):
        if lr_dirs and len(lr_dirs) != len(hr_dirs):
            raise UserError(f"{len(hr_dirs)} {hr_flag} but {len(lr_dirs)} {lr_flag}: give one {lr_flag} per "
                            f"{hr_flag}, in the same order, or none to generate bicubic LR")
    if args.valid_lr_dir and not args.valid_hr_dir:
        raise UserError("--valid-lr-dir needs --valid-hr-dir; pass the validation HR folder too")
    if args.valid_hr_dir and bool(args.lr_dir) != bool(args.valid_lr_dir):
        # One degradation per store: official LR for training but bicubic for validation would mislead the metrics.
        raise UserError("--lr-dir and --valid-lr-dir go together (one degradation per store); pass both or neither")
    seen: dict[str, str] = {}
    for flag, folder in [("--hr-dir", d) for d in args.hr_dir] + [("--valid-hr-dir", d) for d in args.valid_hr_dir]:
        key = os.path.realpath(folder)
        if key in seen:
            hint = "; use --valid-count K to hold out images of one folder" if flag != seen[key] else ""
            raise UserError(f"{flag} {folder} is already given as {seen[key]}: a folder is used once{hint}")
        seen[key] = flag

    lr_dirs = args.lr_dir or [None] * len(args.hr_dir)
    folders = [folder_source("train", hr, lr, scales) for hr, lr in zip(args.hr_dir, lr_dirs)]
    if args.valid_count:
        last = folders[-1]
        if args.valid_count > len(last.images):
            raise UserError(f"--valid-count {args.valid_count} exceeds the {len(last.images)} images in --hr-dir "
                            f"{args.hr_dir[-1]}")
        held_out = last.images[-args.valid_count:]
        last.images = last.images[:-args.valid_count]
        folders.append(SourceFolder("valid", last.hr, held_out, last.lr))
    valid_lr = args.valid_lr_dir or [None] * len(args.valid_hr_dir)
    folders += [folder_source("valid", hr, lr, scales, "--valid-hr-dir", "--valid-lr-dir")
                for hr, lr in zip(args.valid_hr_dir, valid_lr)]
    return folders
