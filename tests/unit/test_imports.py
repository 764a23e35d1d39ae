"""The package's import graph, read from the source: one-way layers, no circles, imports at the top.

A module may import only modules of a lower layer. A new module needs a line in LAYERS (docs/ARCHITECTURE.md
describes the layers)."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "edsr_dist"

# Lowest first. Modules in one layer do not import each other.
LAYERS = [
    ["edsr_dist", "edsr_dist.parallel", "edsr_dist.errors", "edsr_dist.model", "edsr_dist.state", "edsr_dist.train",
     "edsr_dist.launcher", "edsr_dist.evaluation", "edsr_dist.inference", "edsr_dist.perf", "edsr_dist.state.locations"],
    ["edsr_dist.config", "edsr_dist.state.atomic", "edsr_dist.launcher.rank_table", "edsr_dist.train.step_timer", "edsr_dist.state.safe_load", "edsr_dist.parallel.npu",
     "edsr_dist.parallel.ascend_env", "edsr_dist.evaluation.reference_numbers", "edsr_dist.inference.tiling"],
    ["edsr_dist.model.edsr", "edsr_dist.model.precision", "edsr_dist.model.optim", "edsr_dist.evaluation.metrics", "edsr_dist.data", "edsr_dist.data.resize",
     "edsr_dist.data.store", "edsr_dist.data.images", "edsr_dist.parallel.world", "edsr_dist.launcher.hostfile",
     "edsr_dist.state.checkpoint", "edsr_dist.model.schedules", "edsr_dist.state.owner", "edsr_dist.launcher.pod_env", "edsr_dist.state.remote"],
    ["edsr_dist.data.builder", "edsr_dist.data.sampler", "edsr_dist.data.prefetch", "edsr_dist.parallel.engine", "edsr_dist.state.weights",
     "edsr_dist.state.run_folder", "edsr_dist.state.bucket_lock", "edsr_dist.evaluation.protocols", "edsr_dist.data.skimage_benchmarks", "edsr_dist.inference.onnx_runtime",
     "edsr_dist.model.ema", "edsr_dist.train.reporting", "edsr_dist.launcher.plan", "edsr_dist.perf.machine", "edsr_dist.launcher.world_command",
     "edsr_dist.launcher.table_command", "edsr_dist.state.inputs"],
    ["edsr_dist.launcher.job_store", "edsr_dist.state.runs_command", "edsr_dist.evaluation.benchmark_sets", "edsr_dist.data.sample_store", "edsr_dist.parallel.horovod_engine", "edsr_dist.inference.torch_runtime",
     "edsr_dist.state.mirror"],
    ["edsr_dist.data.build_store", "edsr_dist.parallel.factory", "edsr_dist.evaluation.candidates", "edsr_dist.inference.onnx_export",
     "edsr_dist.launcher.workers", "edsr_dist.train.start"],
    ["edsr_dist.evaluation.benchmark_suite", "edsr_dist.train.trainer", "edsr_dist.inference.onnx_cache",
     "edsr_dist.launcher.supervise"],
    ["edsr_dist.perf.measure", "edsr_dist.inference.command"],
    ["edsr_dist.train.command"],
    ["edsr_dist.evaluation.command", "edsr_dist.inference.export", "edsr_dist.perf.sr_speed", "edsr_dist.launcher.command"],
    ["edsr_dist.perf.train_speed"],
    ["edsr_dist.cli"],
    ["edsr_dist.__main__"],
]
# Optional dependencies are imported where they are switched on; everything else at the top of the file.
OPTIONAL = ("horovod", "torch_npu", "onnx", "onnxruntime", "safetensors", "torch.utils.tensorboard", "fsspec")
# torch itself is optional for `sr` (ONNX Runtime serves without it): its PyTorch backend imports these when chosen.
TORCH_SIDE_OF = {"edsr_dist.inference.command": ("edsr_dist.inference.torch_runtime", "edsr_dist.model.precision",
                                                 "edsr_dist.inference.onnx_cache")}


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


def test_every_module_has_a_layer():
    placed = {name for layer in LAYERS for name in layer}
    missing = sorted(set(modules()) - placed)
    assert not missing, f"add {missing} to LAYERS in {__file__}"


def test_imports_only_go_down():
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if a in layer_of and b in layer_of and layer_of[b] >= layer_of[a] and b != "edsr_dist"]
    assert not upward, f"imports that do not go to a lower layer: {upward}"


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
    assert not find_circles(graph()), f"import circles: {find_circles(graph())}"


def test_imports_sit_at_the_top_of_each_file():
    # cli.py dispatches commands with importlib (so `edsr-dist` without torch prints one line): no import statement.
    nested = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
                target = imported(node)[0]
                if target in TORCH_SIDE_OF.get(name, ()):
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
