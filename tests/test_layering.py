"""The import layering, read from the source: snn <- data, engine <- analysis, export <- cli, no cycle.

Every ``import`` of a msgcli module counts, at the top of a file or inside a function; a name of the
top-level package's lazy public API (``from msgcli import register_dataset``) counts as the module
that defines it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import msgcli

PACKAGE = Path(msgcli.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every msgcli module and the msgcli modules it imports (``from msgcli.x import y``: ``msgcli.x.y`` if that
    is a module, else ``msgcli.x``)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        targets.add(f"{base}.{alias.name}")
                    else:  # the lazy public API resolves to the module that defines the name
                        targets.add(msgcli._API.get(alias.name, base) if base == "msgcli" else base)
        found[name] = {t for t in targets if t == "msgcli" or t.startswith("msgcli.")} - {name}
    return found


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of every package outside msgcli and the standard library that ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"msgcli", "__future__"}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_layer_imports_only_the_layers_below_it():
    allowed = {  # layer -> the layers it may import (besides itself)
        "errors": set(), "config": {"errors", "snn"}, "snn": {"errors"}, "data": {"errors", "config", "snn"},
        "engine": {"errors", "config", "snn", "data"}, "analysis": {"errors", "config", "snn", "data", "engine"},
        "export": {"errors", "config", "snn", "engine"},
        "cli": {"errors", "config", "snn", "data", "engine", "analysis", "export"}, "__main__": {"cli"}, "": set(),
    }
    allowed["plugins"] = {"errors"}  # below the config, which imports a run's plugins before it validates
    for above in ("config", "data", "engine", "analysis", "export", "cli"):
        allowed[above].add("plugins")
    graph = imports()
    assert {layer(module) for module in graph} <= set(allowed), "a new layer: give it its place here"
    wrong = [f"{module} imports {target}" for module, targets in graph.items() for target in targets
             if layer(target) not in allowed[layer(module)] | {layer(module), ""}]
    assert not wrong, wrong
    # the top-level package's lazy API reaches into data: nothing below the CLI goes through it
    through_top = [module for module, targets in graph.items() if "msgcli" in targets and layer(module) != "cli"]
    assert not through_top, through_top


def test_the_core_is_pure_torch():
    """msgcli/snn/ (and errors, plugins beneath the config) use torch, numpy and Triton only: no YAML, CLI,
    data or plotting package."""
    for path in PACKAGE.rglob("*.py"):
        if layer(module_name(path)) in ("snn", "errors", "plugins"):
            assert third_party_imports(path) <= {"torch", "numpy", "triton"}, path


def test_the_lazy_public_api_names_real_modules_of_its_layers():
    assert set(msgcli._API.values()) <= set(imports()) and {layer(m) for m in msgcli._API.values()} <= {"snn", "data"}
    for name, module in msgcli._API.items():
        assert hasattr(importlib.import_module(module), name), (name, module)


def test_config_and_cli_read_only_the_torch_free_options_of_snn():
    for module, targets in imports().items():
        if layer(module) in ("config", "cli"):
            assert {t for t in targets if layer(t) == "snn"} <= {"msgcli.snn.options", "msgcli.snn.surrogate"}, module


def test_no_import_cycle():
    graph = imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            assert state.get(target) != "open", " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
