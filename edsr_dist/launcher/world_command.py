"""`edsr-dist world [--json]`: what a worker started in this environment would be, without training.

It calls the trainer's own `discover_world`, so what it prints is what `edsr-dist train` would use; a partial or
contradictory environment is the same one-line error (exit 2). Needs no torch: usable in a launch script's
first line or a pod's init container.
"""

from __future__ import annotations

import json

from edsr_dist.errors import CommandParser
from edsr_dist.parallel.world import discover_world


def describe(world) -> str:
    card = f"device {world.device_index}"
    if world.physical_device is not None:
        card += f" (physical card {world.physical_device})"
    return (f"rank {world.rank} of {world.size}, local rank {world.local_rank} of {world.local_size}, "
            f"launcher {world.launcher}, {card}, master {world.master_addr}:{world.master_port}")


def main(argv: list[str]) -> int:
    parser = CommandParser(prog="edsr-dist world",
                           description="Print what a worker started in this environment would be (rank, size, "
                                       "local rank, launcher, device = the logical index given to set_device, "
                                       "physical card), as `edsr-dist train` reads it.")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a sentence")
    args = parser.parse_args(argv)
    world = discover_world()
    print(json.dumps(world.as_dict(), sort_keys=True) if args.json else describe(world))
    return 0
