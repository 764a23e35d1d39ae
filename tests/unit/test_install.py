"""The CPU install takes torch's CPU build from PyTorch's CPU index, and docs/INSTALL.md says so and what GPU/NPU
users do."""

import re

from helpers import REPO

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _requirements() -> list[str]:
    lines = (REPO / "requirements-cpu.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_requirements_pin_the_cpu_build_from_its_index():
    lines = _requirements()
    assert f"--extra-index-url {CPU_INDEX}" in lines
    pins = [m for line in lines if (m := re.fullmatch(r"torch==(\d+\.\d+\.\d+)\+cpu", line))]
    assert len(pins) == 1
    # The package's own `cpu` extra names the same release, so both install paths agree.
    assert f'cpu = ["torch=={pins[0].group(1)}"]' in (REPO / "pyproject.toml").read_text()


def test_install_page_names_the_index_and_the_gpu_npu_route():
    page = (REPO / "docs" / "INSTALL.md").read_text()
    assert "pip install -r requirements-cpu.txt" in page and CPU_INDEX in page
    assert "--retries 0" in page  # where the index is unreachable
    assert "GPU and NPU machines" in page and "pip install -e ." in page
    # The front page sends GPU/NPU users there.
    readme = (REPO / "README.md").read_text()
    assert "pip install -r requirements-cpu.txt" in readme and "(docs/INSTALL.md)" in readme
