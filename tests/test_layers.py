"""Tier 1: the import rule of docs/ARCHITECTURE.md, read from the source with ast (nothing imported).

Packages import downwards only: ernie_cli -> processing -> model. Inside model/, every module
belongs to one layer of LAYERS (the longest matching prefix) and imports only from its own layer
or the layers below; no import circle, at module level or inside a function, anywhere in model/.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ernie_cli", "processing", "model")  # top to bottom

# model/'s layers, top to bottom: a module may import its own layer and the ones below it.
LAYERS = [
    ("model",),  # the package's facade (ErnieVL, load_pretrained)
    ("model.ernie_vl",),  # the whole model: builds itself from a checkpoint, generates
    ("model.generation", "model.checkpoint"),  # the decode loop; reading checkpoints
    ("model.text", "model.vision", "model.resampler", "model.attention", "model.moe", "model.rope",
     "model.positions", "model.quantize"),  # the architecture's parts; the quantization transform
    ("model.backends",),  # picking a backend for a device
    ("model.backends.cpu", "model.backends.cuda"),  # one folder per device kind
    ("model.backends.base", "model.backends.qformat"),  # the interface and its plain torch implementation
    ("model.config", "model.errors", "model.env"),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".") if is_package else name.split(".")[:-1]
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module inside a package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer_of(name: str) -> int | None:
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            below = "." in prefix and name.startswith(prefix + ".")  # "model" is the facade alone
            if (name == prefix or below) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the rule, as 'a -> b (why)'."""
    bad = []
    for a, targets in sorted(graph.items()):
        top_a = a.split(".")[0]
        for b in sorted(targets):
            top_b = b.split(".")[0]
            if top_a != top_b:
                if PACKAGES.index(top_b) < PACKAGES.index(top_a):
                    bad.append(f"{a} -> {b} (an upward import between packages)")
                continue
            if top_a != "model":
                continue
            la, lb = layer_of(a), layer_of(b)
            if la is None or lb is None:
                bad.append(f"{a} -> {b} ({a if la is None else b} belongs to no layer of LAYERS)")
            elif lb < la:
                bad.append(f"{a} -> {b} (an upward import: layer {la} imports layer {lb})")
            elif _sibling_backends(a, b):
                bad.append(f"{a} -> {b} (one backend imports another)")
    return bad


def _sibling_backends(a: str, b: str) -> bool:
    folders = ("model.backends.cpu", "model.backends.cuda")
    fa = next((f for f in folders if a == f or a.startswith(f + ".")), None)
    fb = next((f for f in folders if b == f or b.startswith(f + ".")), None)
    return fa is not None and fb is not None and fa != fb


def test_every_model_module_has_a_layer():
    graph = import_graph()
    assert [name for name in graph if name.startswith("model") and layer_of(name) is None] == []


def test_no_import_circles_in_the_project():
    assert cycles(import_graph()) == []


def test_imports_flow_down_the_layers():
    assert violations(import_graph()) == []


ARCHITECTURE = ("model.ernie_vl", "model.text", "model.vision", "model.resampler", "model.attention", "model.moe",
                "model.rope", "model.positions")
# what testing a CPU feature or a device kind looks like: x.is_cpu, torch.ops.mkldnn, x.device.type,
# torch.cpu._is_avx512_bf16_supported(), torch.cuda.is_available() (x.cpu() moves to the host: fine)
DEVICE_TESTS = {"is_cpu", "is_cuda", "is_mps", "mkldnn"}
TORCH_DEVICE_MODULES = {"cpu", "cuda", "mps", "backends"}


def test_only_the_backends_know_the_devices():
    """The architecture files and the checkpoint reader import no device's folder (they ask
    ``select_backend``) and test no CPU feature or device kind: they ask their backend. (The decode
    loop of model/generation/ may run a device's own loop, model/backends/cuda/decode.py.)"""
    graph = import_graph()
    device_folders = ("model.backends.cpu", "model.backends.cuda")
    bad = [f"{a} -> {b}" for a, targets in sorted(graph.items()) if a in ARCHITECTURE or a.startswith("model.checkpoint")
           for b in sorted(targets) if b.startswith(device_folders)]
    assert bad == []
    modules = project_modules(ROOT)
    for name in ARCHITECTURE:
        tree = ast.parse(modules[name].read_text(encoding="utf-8"))
        tests = [f"{name}:{node.lineno} .{node.attr}" for node in ast.walk(tree) if _tests_a_device(node)]
        assert tests == []


def _tests_a_device(node: ast.AST) -> bool:
    if not isinstance(node, ast.Attribute):
        return False
    if node.attr in DEVICE_TESTS:
        return True
    if node.attr in TORCH_DEVICE_MODULES:
        return isinstance(node.value, ast.Name) and node.value.id == "torch"
    device = node.value
    return node.attr == "type" and (isinstance(device, ast.Attribute) and device.attr == "device"
                                    or isinstance(device, ast.Name) and device.id == "device")


# --- the checker itself, on made-up trees --------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_checker_sees_a_lazy_circle_and_an_upward_import(tmp_path):
    # today's circle of ernie_vl <-> loading, one side inside a function
    root = _tree(tmp_path, {
        "model/ernie_vl.py": "from model.checkpoint.loading import load_checkpoint\n",
        "model/checkpoint/__init__.py": "",
        "model/checkpoint/loading.py": "def f():\n    from model.ernie_vl import ErnieVL\n",
    })
    graph = import_graph(root)
    assert cycles(graph) == [["model.checkpoint.loading", "model.ernie_vl"]]
    assert violations(graph) == ["model.checkpoint.loading -> model.ernie_vl (an upward import: layer 2 imports layer 1)"]


def test_checker_resolves_from_package_import_module_and_relative_imports(tmp_path):
    root = _tree(tmp_path, {
        "model/rope.py": "from model.backends.cpu import kernels\n",
        "model/backends/__init__.py": "", "model/backends/cpu/__init__.py": "",
        "model/backends/cpu/kernels.py": "from ...rope import x\n",
        "model/backends/cuda/__init__.py": "from ..cpu import kernels\n",
        "processing/events.py": "import ernie_cli.app\n", "ernie_cli/app.py": "",
    })
    graph = import_graph(root)
    assert graph["model.rope"] == {"model.backends.cpu.kernels"}
    assert graph["model.backends.cpu.kernels"] == {"model.rope"}
    assert cycles(graph) == [["model.backends.cpu.kernels", "model.rope"]]
    assert set(violations(graph)) == {
        "model.backends.cpu.kernels -> model.rope (an upward import: layer 5 imports layer 3)",
        "model.backends.cuda -> model.backends.cpu.kernels (one backend imports another)",
        "processing.events -> ernie_cli.app (an upward import between packages)",
    }


@pytest.mark.parametrize("name, layer", [("model", 0), ("model.checkpoint.hub", 2), ("model.backends", 4),
                                         ("model.backends.cpu.kernels", 5), ("model.errors", 7), ("model.x", None)])
def test_layer_is_the_longest_matching_prefix(name, layer):
    assert layer_of(name) == layer


def test_a_non_editable_install_ships_every_package_and_the_c_sources():
    """pyproject.toml finds every package folder and lists every C source and header as package data
    (a wheel without csrc/ would silently run without the CPU kernels)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    packages = {module_name(p, ROOT) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert [p for p in sorted(packages) if not any(fnmatch.fnmatchcase(p, pattern) for pattern in include)] == []
    data = setuptools["package-data"]
    sources = sorted((ROOT / "model").rglob("csrc/*"))
    assert {s.suffix for s in sources} == {".c", ".h"}
    for source in sources:
        package = module_name(source.parent.parent / "__init__.py", ROOT)
        rel = source.relative_to(source.parent.parent).as_posix()
        assert any(fnmatch.fnmatchcase(rel, pattern) for pattern in data.get(package, [])), rel
