"""Distributed plumbing: who a worker is (world), how it talks (engine), and how workers are started
(launcher, from an Ascend rank table, a local process count or a Horovod hostfile)."""
