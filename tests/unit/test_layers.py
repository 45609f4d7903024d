"""The import rule of docs/architecture.md: a module imports only from its own layer or below.

Layers, bottom to top:
1. data: configuration, the contracts that cross a handle, domain errors, the HTTP protocol
   models, pure helpers;
2. engines and store: the Ray-free model code, the document store, caches, metrics, the
   precompute feature's store, keys, counter and answers;
3. deployments and pipelines: the Serve wrappers around the engines, the pipeline deployments
   and the Precompute job;
4. top: the HTTP layer and the application builder, which alone sees every layer.

Every import is read from the source (those inside functions too), so a lazy import cannot
hide an edge that points up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "deployments")

# Module prefixes and their layers; the longest prefix that matches a module decides.
LAYERS = {
    "serve_app": 1,
    "serve_app.config": 1,
    "serve_app.contracts": 1,
    "serve_app.errors": 1,
    "serve_app.protocol": 1,
    "serve_app.chunking": 1,
    "serve_app.cascade": 2,
    "serve_app.cluster": 2,
    "serve_app.metrics": 2,
    "serve_app.cache": 2,
    "serve_app.store": 2,
    "serve_app.precompute": 2,
    "deployments.engines": 2,
    "deployments": 3,
    "serve_app.pipelines": 3,
    "serve_app.precompute.job": 3,
    "serve_app.http": 4,
    "serve_app.app": 4,
    "serve_app.launch": 4,
}
NAMES = {1: "data", 2: "engines and store", 3: "deployments and pipelines", 4: "top"}


def layer(module: str) -> int | None:
    """The layer of a module of this project (None: not one of its packages)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, relative ones resolved, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from serve_app import cache` imports the module serve_app.cache.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            found.append((node.lineno, module))
    return found


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in modules() if layer(module_name(p)) is None]
    assert not unplaced


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for path in modules():
        own = layer(module_name(path))
        for line, imported in imports(path):
            target = layer(imported)
            if target is not None and own is not None and target > own:
                violations.append(
                    f"{path.relative_to(ROOT)}:{line} imports {imported} "
                    f"({NAMES[target]}, above its own layer: {NAMES[own]})"
                )
    assert not violations, "\n".join(violations)


def test_engines_import_no_ray():
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted((ROOT / "deployments" / "engines").rglob("*.py"))
        for line, imported in imports(path)
        if imported == "ray" or imported.startswith("ray.")
    ]
    assert not offending, "\n".join(offending)


def test_engines_load_no_ray_through_what_they_import():
    """Not even through the data layer: every engine module imported in a fresh interpreter
    leaves Ray (and FastAPI) out of `sys.modules`."""
    script = (
        "import importlib, pkgutil, sys\n"
        "import deployments.engines as engines\n"
        "for m in pkgutil.iter_modules(engines.__path__):\n"
        "    importlib.import_module('deployments.engines.' + m.name)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi')]\n"
        "print(','.join(sorted(loaded)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("serve_app.config", 1),
        ("serve_app.protocol.openai", 1),
        ("serve_app.store.vector_store", 2),
        ("deployments.engines.sampling", 2),
        ("deployments.generator", 3),
        ("serve_app.precompute.answers", 2),
        ("serve_app.precompute.job", 3),
        ("serve_app.http.routers.openai", 4),
        ("numpy", None),
    ],
)
def test_the_longest_prefix_decides(module, expected):
    assert layer(module) == expected


def test_the_rule_reads_imports_inside_functions(tmp_path, monkeypatch):
    """A lazy import pointing up is found like one at the top of a module."""
    package = tmp_path / "serve_app" / "store"
    package.mkdir(parents=True)
    source = package / "lazy.py"
    source.write_text("def f():\n    from serve_app.http.ingress import app\n    return app\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert (2, "serve_app.http.ingress") in imports(source)
    assert layer(module_name(source)) == 2
