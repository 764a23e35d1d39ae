"""What the code under test chose and did, for tests to read: FAKE_NPU_RECORD=<file> appends one JSON line per
event (the optimizer built, the compile mode set), and `counters` counts the host<->device transfers that stall
the host on a real NPU."""

import json
import os

# device_reads: blocking device-to-host reads (.item(), bool(), .tolist(), .cpu(), copies into host tensors), which
# wait for the device's queue. pageable_async_copies: non_blocking host-to-device copies from unpinned memory, which
# torch_npu turns into a stream synchronisation (csrc/core/npu/CachingHostAllocator.cpp:1404-1419).
counters = {"device_reads": 0, "pageable_async_copies": 0}


def event(kind: str, **fields) -> None:
    path = os.environ.get("FAKE_NPU_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, **fields}) + "\n")
