"""`edsr-dist launch --dry-run` with a rank table: CPU_AFFINITY_CONF hands CPU binding to torch_npu."""

from helpers import launch_dry_run, v1, write_table


def test_cpu_affinity_conf_leaves_binding_to_torch_npu(tmp_path):
    table = write_table(tmp_path, v1([("127.0.0.1", [4, 5])]))
    pinned = launch_dry_run(["--rank-table", str(table), "--log-dir", str(tmp_path)])
    assert pinned.returncode == 0, pinned.stderr
    assert "taskset -c" in pinned.stdout and "left to torch_npu" not in pinned.stdout
    handed = launch_dry_run(["--rank-table", str(table), "--log-dir", str(tmp_path)],
                            {"CPU_AFFINITY_CONF": "1,npu_affine:1"})
    assert handed.returncode == 0, handed.stderr
    assert "# CPU binding: left to torch_npu (CPU_AFFINITY_CONF=1,npu_affine:1)" in handed.stdout
    assert "taskset" not in handed.stdout and "cores any" in handed.stdout
