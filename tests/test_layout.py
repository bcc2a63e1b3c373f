"""The package's layout and dependency rule (docs/design.md, "Layout"), checked on the source itself:

* `entropy_search.problem` is plain PyTorch: importing it loads no Ray, Gymnasium or MLflow, and none of its
  files imports them, nor the layers built on it (envs, rl, search, sweep, tracking...);
* the layers only import downwards (problem < envs < rl < search < sweep), heavy libraries only where they
  belong, and the module-level imports have no cycle;
* an import deferred into a function says why, on its line.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "entropy_search"
HEAVY = ("ray", "gymnasium", "mlflow")


# ---------------------------------------------------------------- reading the source


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


class Import:
    """One import statement: the modules it names (absolute), where it is, and whether it is inside a function."""

    def __init__(self, module: str, node: ast.stmt, targets: list[str], in_function: bool, line: str) -> None:
        self.module, self.node, self.targets, self.in_function, self.line = module, node, targets, in_function, line

    def __repr__(self) -> str:
        return f"{MODULES[self.module].relative_to(REPO)}:{self.node.lineno}: {self.line.strip()}"


def imports_of(name: str) -> list[Import]:
    """Every import of module `name`, relative ones resolved; `from X import y` names X and, where y is a
    module of the package, X.y too."""
    source = MODULES[name].read_text()
    lines = source.splitlines()
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.append(Import(name, child, [a.name for a in child.names], in_function, lines[child.lineno - 1]))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package(name) else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                subs = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in MODULES]
                # `from .. import tracking` imports the module tracking, not (only) the package
                targets = subs if subs and len(subs) == len(child.names) else [target, *subs]
                out.append(Import(name, child, targets, in_function, lines[child.lineno - 1]))
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def under(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def offending(modules, forbidden) -> list[Import]:
    """Imports in `modules` of anything under one of the `forbidden` prefixes."""
    return [imp for m in modules for imp in imports_of(m) if any(under(t, f) for t in imp.targets for f in forbidden)]


def in_package(prefix: str) -> list[str]:
    return [m for m in MODULES if under(m, prefix)]


# ---------------------------------------------------------------- (a) the problem package is plain PyTorch


def loaded_by_import(module: str) -> list[str]:
    """The modules of Ray, Gymnasium and MLflow that `import module` loads in a fresh interpreter (this
    checkout's package, whatever else is installed)."""
    code = (
        f"import sys, {module} as m\n"
        "print(m.__file__)\n"
        f"print(','.join(sorted(n for n in sys.modules if n in {HEAVY!r} or n.startswith('ray.'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, heavy = (proc.stdout.splitlines() + ["", ""])[:2]
    assert Path(where).resolve().is_relative_to(PACKAGE.resolve()), f"{module} imported from {where}, not {PACKAGE}"
    return [n for n in heavy.split(",") if n]


def test_importing_the_problem_package_loads_no_ray_gymnasium_or_mlflow():
    assert loaded_by_import("entropy_search.problem") == []


@pytest.mark.parametrize("module, absent", [
    ("entropy_search", HEAVY),
    ("entropy_search.envs", ("ray", "mlflow")),
    ("entropy_search.store", HEAVY),
    ("entropy_search.summary", HEAVY),
    ("entropy_search.cli", HEAVY),  # the commands import the search and the sweep when they run
])
def test_light_modules_stay_light(module, absent):
    loaded = [n for n in loaded_by_import(module) if n.split(".")[0] in absent]
    assert loaded == [], f"importing {module} loaded {loaded}"


# ---------------------------------------------------------------- (b) nor does its source import them


def test_problem_files_import_no_heavy_library_and_no_layer_above():
    files = sorted((PACKAGE / "problem").glob("*.py"))
    names = {p.stem for p in files}
    assert {"__init__", "space", "macs", "budget", "evaluate", "setup", "finalize", "baselines"} <= names, names
    forbidden = [*HEAVY] + [f"entropy_search.{m}" for m in ("envs", "rl", "sweep", "search", "tracking", "ray_runtime",
                                                            "commands", "cli", "store", "summary", "plots")]
    bad = offending(in_package("entropy_search.problem"), forbidden)
    assert not bad, "entropy_search.problem imports what it must not:\n" + "\n".join(map(repr, bad))


def test_problem_imports_only_pytorch_numpy_scipy_and_the_pure_modules():
    """docs/design.md's dependency rule: PyTorch, NumPy, SciPy, Torch-Pruning (Triton lazily for CUDA maps), the
    standard library, and the pure top-level modules."""
    allowed_third_party = ("torch", "numpy", "scipy", "torch_pruning", "triton")
    pure = [f"entropy_search.{m}" for m in ("config", "data", "models", "train", "utils", "errors", "jsonio", "latency", "problem")]
    bad = []
    for name in in_package("entropy_search.problem"):
        for imp in imports_of(name):
            for target in imp.targets:
                top = target.split(".")[0]
                if top in sys.stdlib_module_names or top in allowed_third_party or any(under(target, p) for p in pure):
                    continue
                bad.append(imp)
    assert not bad, "\n".join(map(repr, bad))


# ---------------------------------------------------------------- (c) layers import downwards, without cycles


LAYERS = ["entropy_search.problem", "entropy_search.envs", "entropy_search.rl", "entropy_search.search",
          "entropy_search.sweep"]


@pytest.mark.parametrize("index", range(len(LAYERS) - 1), ids=[p.rsplit(".", 1)[1] for p in LAYERS[:-1]])
def test_layers_never_import_the_layers_built_on_them(index):
    layer, above = LAYERS[index], LAYERS[index + 1:] + ["entropy_search.tracking", "entropy_search.commands",
                                                        "entropy_search.cli"]
    assert in_package(layer), f"no package {layer}"
    bad = offending(in_package(layer), above)
    assert not bad, f"{layer} imports a layer built on it:\n" + "\n".join(map(repr, bad))


@pytest.mark.parametrize("library, allowed", [
    ("mlflow", ["entropy_search.tracking"]),
    ("gymnasium", ["entropy_search.envs", "entropy_search.rl.algorithm"]),
    ("ray.rllib", ["entropy_search.rl"]),
    ("ray", ["entropy_search.ray_runtime", "entropy_search.search", "entropy_search.finalists", "entropy_search.sweep",
             "entropy_search.tracking", "entropy_search.rl"]),
])
def test_heavy_libraries_are_imported_only_where_they_belong(library, allowed):
    others = [m for m in MODULES if not any(under(m, a) for a in allowed)]
    bad = offending(others, [library])
    assert not bad, f"{library} imported outside {allowed}:\n" + "\n".join(map(repr, bad))


def test_commands_import_the_search_and_the_sweep_only_when_they_run():
    bad = [imp for imp in offending(in_package("entropy_search.commands") + ["entropy_search.cli"],
                                    ["entropy_search.search", "entropy_search.sweep", "entropy_search.tracking"])
           if not imp.in_function]
    assert not bad, "\n".join(map(repr, bad))


def module_graph() -> dict[str, set[str]]:
    """Module-level imports between the package's modules (a package stands for its __init__)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name in MODULES:
        for imp in imports_of(name):
            if not imp.in_function:
                graph[name] |= {t for t in imp.targets if t in MODULES and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_module_level_imports_have_no_cycle():
    found = cycles(module_graph())
    assert not found, f"import cycles: {found}"


# ---------------------------------------------------------------- (d) deferred imports say why


def test_every_deferred_first_party_import_says_why_on_its_line():
    """An import inside a function hides a dependency (or breaks a cycle, or avoids a slow import): when it is
    one of the package's own modules, its line carries a comment saying why."""
    silent = []
    for name in MODULES:
        for imp in imports_of(name):
            first_party = any(under(t, "entropy_search") for t in imp.targets)
            if imp.in_function and first_party and "#" not in imp.line:
                silent.append(imp)
    assert not silent, "function-level imports of the package without a comment:\n" + "\n".join(map(repr, silent))


def test_the_import_reader_sees_deferred_and_relative_imports(tmp_path, monkeypatch):
    """The checks above rest on `imports_of`; it must resolve relative imports and tell deferred ones apart."""
    pkg = tmp_path / "entropy_search"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text(
        "import os\nfrom .. import other\nfrom ..other import y\n\n\ndef f():\n    from . import leaf  # why\n"
        "    import ray\n")
    (pkg / "other.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    got = [(i.targets, i.in_function) for i in imports_of("entropy_search.sub.leaf")]
    assert got == [(["os"], False), (["entropy_search.other"], False), (["entropy_search.other"], False),
                   (["entropy_search.sub.leaf"], True), (["ray"], True)]
    assert [i.targets for i in imports_of("entropy_search.sub")] == [["entropy_search.sub.leaf"]]


def test_no_file_of_the_project_unpickles_code():
    """Every PyTorch file the project reads opens with `weights_only=True` (a checkpoint is data)."""
    unsafe = "weights_only=" + "False"
    offenders = [str(path.relative_to(REPO)) for folder in ("entropy_search", "tests", "bench")
                 for path in (REPO / folder).rglob("*.py") if unsafe in path.read_text()]
    assert offenders == []
