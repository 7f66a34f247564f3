"""jaxllm's imports form a DAG: no module imports, even inside a function, one that imports it back.

The graph is read from the source with ``ast`` (nothing is imported), over every ``.py`` under
``jaxllm/``; an import anywhere in a module (top level, function body, ``if TYPE_CHECKING``) is an
edge. ``import jaxllm`` and ``from jaxllm import load`` are edges to the package's ``__init__``;
``from jaxllm.core import config`` is an edge to the module ``jaxllm.core.config``. The
capabilities' subpackages (``jaxllm/core``, ``model``, ``data``, ...) form a DAG too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of ``package`` (a package is its ``__init__``)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imported(node: ast.AST, here: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules of ``modules`` that one import statement in module ``here`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's own package, one level up per extra dot
        anchor = here.split(".") if is_package else here.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    found = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:  # `from pkg import submodule`
            found.append(f"{base}.{alias.name}")
        elif base in modules:  # `from module import name`
            found.append(base)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: the package's modules it imports anywhere in its source}``."""
    files = module_names(root, package)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {dep for node in ast.walk(tree) for dep in _imported(node, name, is_package, set(files))}
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_jaxllm_imports_form_no_cycle():
    graph = import_graph(ROOT, "jaxllm")
    assert len(graph) > 30  # the walk found the package's modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def package_graph(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """The module graph folded onto the package's direct subpackages (``jaxllm.model.moe`` ->
    ``model``); the top-level package itself and its own modules are left out."""

    def sub(name: str) -> str | None:
        parts = name.split(".")
        return parts[1] if len(parts) > 2 and parts[0] == package else None

    folded: dict[str, set[str]] = {}
    for name, deps in graph.items():
        if (here := sub(name)) is not None:
            folded.setdefault(here, set()).update(d for dep in deps if (d := sub(dep)) not in (None, here))
    return folded


def test_the_subpackages_form_a_dag_rooted_in_core():
    packages = package_graph(import_graph(ROOT, "jaxllm"), "jaxllm")
    assert {"core", "model", "data", "parallel", "train", "sft", "infer", "hf", "plan", "scaling"} <= set(packages)
    cycle = find_cycle(packages)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)
    assert packages["core"] == set() and packages["model"] == {"core"}


def test_folding_modules_onto_subpackages_keeps_a_cycle_between_them():
    graph = {"p.a.x": {"p.b.y"}, "p.b.y": {"p.b.z"}, "p.b.z": {"p.a.w"}, "p.a.w": set()}
    assert package_graph(graph, "p") == {"a": {"b"}, "b": {"a"}}
    assert find_cycle(package_graph(graph, "p")) == ["a", "b", "a"]


def _write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_an_import_inside_a_function_closes_a_cycle(tmp_path):
    # the shape of the model <-> quantize cycle: the second edge hidden in a function body
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/model.py": "from pkg.quantize import dot\n",
            "pkg/quantize.py": "def axes():\n    from pkg.model import Linear\n",
        },
    )
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.model", "pkg.quantize", "pkg.model"]


def test_importing_the_package_reaches_what_its_init_imports(tmp_path):
    # the shape of the generate -> jaxllm (whose lazy __getattr__ imports api) -> generate cycle
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "def __getattr__(name):\n    from pkg import api\n    return getattr(api, name)\n",
            "pkg/api.py": "from pkg import generate\n",
            "pkg/generate.py": "def main():\n    import pkg\n    pkg.load()\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/leaf.py": "from .. import api\nfrom . import other\n",
            "pkg/sub/other.py": "",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub.leaf"] == {"pkg.api", "pkg.sub.other"}  # relative imports resolve
    assert find_cycle(graph) == ["pkg", "pkg.api", "pkg.generate", "pkg"]


def test_a_dag_has_no_cycle(tmp_path):
    _write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b, c\n",
            "pkg/b.py": "from pkg.c import x\n",
            "pkg/c.py": "import os\n",
        },
    )
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_train_py_refuses_a_bad_config_before_importing_jax():
    # min_lr > lr is a relation between keys, found by config.validate, not by parsing
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import train; "
        "status = train.main(['optim.lr=0.1', 'optim.min_lr=1']); print(status, 'jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.split() == ["2", "False"], out.stderr
    assert "optim.min_lr" in out.stderr
