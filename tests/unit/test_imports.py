"""The package's import graph, read from the source: packages in one order, no circles, imports at the top.

A module may import modules of its own package and of the packages below its own in ORDER; inside a package the
imports must not form a circle. A new module needs no entry here, a new package or top-level module does
(docs/ARCHITECTURE.md shows the same order)."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edsr_dist"

# Bottom first: each entry is a package folder or a top-level module of edsr_dist, and may import only the ones before
# it. `edsr_dist` is the package's __init__ (`__version__`). Why this order, where it is not obvious: config needs
# locations (is_url); model needs parallel (the device rules of npu); data needs state (atomic writes) and config;
# inference needs data (image files, to_uint8), model and state (weights); evaluation runs the inference code;
# train needs evaluation (validation) and inference (weights for --init-from); perf measures train and inference;
# tracking (experiment trackers) needs config and state (the run folder's files), and evaluation and train log to it.
ORDER = ["edsr_dist", "errors", "locations", "config", "parallel", "state", "tracking", "model", "data", "launcher",
         "inference", "evaluation", "train", "perf", "cli", "__main__"]
# Optional dependencies are imported where they are switched on; everything else at the top of the file.
OPTIONAL = ("horovod", "torch_npu", "onnx", "onnxruntime", "safetensors", "torch.utils.tensorboard", "fsspec",
            "mlflow", "wandb")
# torch itself is optional for `sr` (ONNX Runtime serves without it): its PyTorch backend imports these when chosen.
TORCH_SIDE_OF = {"edsr_dist.inference.command": ("edsr_dist.inference.torch_runtime", "edsr_dist.model.precision",
                                                 "edsr_dist.inference.onnx_cache")}
# torch is optional for the launcher's own process (a single-server launch starts its workers without it): imported
# where a Kubernetes pod's GPUs are counted and where a multi-server job store is opened.
LAUNCHER_TORCH = {"edsr_dist.launcher.pod_env": ("torch",), "edsr_dist.launcher.job_store": ("torch.distributed",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    # `from edsr_dist import __version__` imports the package; `from edsr_dist.data import x` may name a module.
    return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]


def graph() -> dict[str, set[str]]:
    found = modules()
    edges = {}
    for name, tree in found.items():
        targets = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for t in imported(node)}
        edges[name] = {t for t in targets if t in found and t != name}
    return edges


def unit(module: str) -> str:
    """The ORDER entry a module belongs to: its package folder, or itself for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward(edges: dict[str, set[str]]) -> list[str]:
    place = {name: i for i, name in enumerate(ORDER)}
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if unit(a) != unit(b) and place[unit(b)] > place[unit(a)])


def test_every_package_has_a_place():
    missing = sorted({unit(name) for name in modules()} - set(ORDER))
    assert not missing, f"add {missing} to ORDER in {__file__} (and to docs/ARCHITECTURE.md)"


def test_imports_only_go_down():
    assert not upward(graph()), f"imports from a lower package to a higher one: {upward(graph())}"


def test_the_guard_sees_an_upward_import():
    edges = {"edsr_dist.state.remote": {"edsr_dist.errors", "edsr_dist.train.trainer"},
             "edsr_dist.train.trainer": {"edsr_dist.state.remote"}, "edsr_dist.errors": set()}
    assert upward(edges) == ["edsr_dist.state.remote -> edsr_dist.train.trainer"]


def find_circles(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path = path + [node]
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path)
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])
    return circles


def test_no_import_circles():
    # Across packages the order already rules circles out; this finds the ones inside a package.
    assert not find_circles(graph()), f"import circles: {find_circles(graph())}"


def test_imports_sit_at_the_top_of_each_file():
    # cli.py dispatches commands with importlib (so `edsr-dist` without torch prints one line): no import statement.
    nested = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
                target = imported(node)[0]
                if target in TORCH_SIDE_OF.get(name, ()) or target in LAUNCHER_TORCH.get(name, ()):
                    continue
                if not any(target == opt or target.startswith(opt + ".") for opt in OPTIONAL):
                    nested.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not nested, f"imports inside functions (move them to the top of the file): {nested}"


def test_the_guard_sees_a_circle_hidden_in_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "edsr_dist"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from edsr_dist.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from edsr_dist.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert find_circles(graph()) == ["edsr_dist.a -> edsr_dist.b -> edsr_dist.a"]
