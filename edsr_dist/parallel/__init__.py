"""In-process distributed plumbing: who a worker is (world), how it talks (engine, factory, horovod_engine) and the
Ascend rules (npu, ascend_env). Starting workers is the launcher package's job."""
