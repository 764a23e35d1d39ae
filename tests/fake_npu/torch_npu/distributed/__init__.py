"""torch_npu.distributed of the fake: the worker side of torch_npu_run's store (torch_npu/distributed/
distributed_c10d.py:484-498 and rendezvous.py:36-94). Under torch_npu_run (TORCH_NPU_USE_PARALLEL_TCPSTORE=True)
init_method "env://" becomes "parallel://MASTER_ADDR:MASTER_PORT", whose handler connects every rank as a client of
the agent's store (TORCH_NPU_ELASTIC_USE_AGENT_STORE=True), keyed by "/worker/attempt_<TORCHELASTIC_RESTART_COUNT>".
Any other url (tcp://, an explicit store) is left alone, as in torch_npu."""

import datetime
import os
import urllib.parse

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _parallel_handler(url, timeout=datetime.timedelta(seconds=600), **kwargs):
    parsed = urllib.parse.urlparse(url)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    rank, world_size = int(query["rank"]), int(query["world_size"])
    agent_store = os.environ.get("TORCH_NPU_ELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(parsed.hostname, parsed.port, world_size, is_master=rank == 0 and not agent_store,
                          timeout=timeout, multi_tenant=True)
    if agent_store:
        store = dist.PrefixStore(f"/worker/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    yield store, rank, world_size


def _install() -> None:
    dist.register_rendezvous_handler("parallel", _parallel_handler)
    original = c10d.rendezvous

    def rendezvous(url, rank=-1, world_size=-1, **kwargs):
        if os.environ.get("TORCH_NPU_USE_PARALLEL_TCPSTORE") == "True" and url == "env://":
            url = (f"parallel://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:"
                   f"{os.environ.get('MASTER_PORT', '29500')}")
        return original(url, rank, world_size, **kwargs)

    c10d.rendezvous = rendezvous
