"""In-process distributed plumbing: who a worker is (world), how it talks (engine, factory, horovod_engine) and the
Ascend rules (npu, ascend_env, rank_table: HCCL's rank tables). Starting workers is the launcher package's job."""
