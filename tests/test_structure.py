"""The package's shape, read from the source with ``ast``: short modules and functions, imports that run one
way (no cycles), no references to documents outside the repository."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lbsgd"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80  # lines of code from the first statement after the docstring to the last


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The lbsgd modules ``name`` imports: ``import a.b``, ``from a.b import x`` (a.b, and a.b.x where that
    is a module) and relative forms. Function-local imports count too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
            found.update(submodules if len(submodules) == len(node.names) else submodules | {base})
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_and_a_self_contained_graph_has_none():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_among_lbsgd_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["lbsgd.trainer.step"] >= {"lbsgd.trainer.grads", "lbsgd.trainer.state"}  # the reader works
    assert _cycles(graph) == []


def test_layers_import_downwards():
    """optim, models, parallel and data import nothing of the trainer, the strategies or the config."""
    modules = _modules()
    upper = ("lbsgd.trainer", "lbsgd.strategies", "lbsgd.config", "lbsgd.train", "lbsgd.main", "lbsgd.bench")
    for name, path in modules.items():
        if name.startswith(("lbsgd.optim", "lbsgd.models", "lbsgd.parallel", "lbsgd.data")):
            bad = {m for m in _imports(name, path, modules) if m.startswith(upper)}
            assert not bad, (name, bad)


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:]  # the docstring
                if body and body[-1].end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append((name, node.name, body[-1].end_lineno - body[0].lineno + 1))
    assert long_modules == []
    assert long_functions == []


def test_public_functions_and_classes_have_docstrings():
    missing = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        if ast.get_docstring(tree) is None:
            missing.append(name)
        for node in tree.body:
            nodes = [node] + (node.body if isinstance(node, ast.ClassDef) else [])
            for n in nodes:
                if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_"):
                    if ast.get_docstring(n) is None:
                        missing.append(f"{name}.{n.name}")
    assert missing == []


def test_no_reference_to_documents_outside_the_repository():
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "experiments").glob("*.py")]:
        assert "GUIDE.md" not in path.read_text(), path
