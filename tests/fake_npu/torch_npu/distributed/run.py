"""torch_npu_run of the fake (`python -m torch_npu.distributed.run`): torch's elastic agent with torch_npu's
"parallel" rendezvous forced (torch_npu/distributed/run.py:24-30). As in torch_npu/distributed/rendezvous.py:
the node_rank-0 agent hosts the store on master_addr:master_port (L132-147), workers inherit
TORCH_NPU_ELASTIC_USE_AGENT_STORE / TORCH_NPU_USE_PARALLEL_TCPSTORE=True (L198-200), and no node ever waits
(num_nodes_waiting 0, L155-156). The handler keeps torch's default use_agent_store (False), so workers get
TORCHELASTIC_USE_AGENT_STORE=False although the agent listens on MASTER_PORT."""

import os
import sys

from torch.distributed import run as torch_run
from torch.distributed.elastic.rendezvous import registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous


class _ParallelRendezvous(StaticTCPRendezvous):
    def get_backend(self) -> str:
        return "parallel"

    @property
    def use_agent_store(self) -> bool:
        return False


def _create_parallel_handler(params):
    host, port = params.endpoint.rsplit(":", 1)
    os.environ.setdefault("TORCH_NPU_ELASTIC_USE_AGENT_STORE", "True")
    os.environ.setdefault("TORCH_NPU_USE_PARALLEL_TCPSTORE", "True")
    return _ParallelRendezvous(host, int(port), params.get_as_int("rank"), params.max_nodes, params.run_id, 600)


def _main(argv=None) -> None:
    args = torch_run.parse_args(sys.argv[1:] if argv is None else argv)
    args.rdzv_backend = "parallel"
    args.rdzv_endpoint = f"{args.master_addr}:{args.master_port}"
    args.rdzv_conf = ",".join(filter(None, [args.rdzv_conf, f"rank={args.node_rank}"]))
    registry.handler_registry.register("parallel", _create_parallel_handler)
    torch_run.run(args)


if __name__ == "__main__":
    _main()
