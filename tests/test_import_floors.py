"""No module imports from a floor above its own (DESIGN.md: "a room imports only from its own floor
or below").

A static check over every ``import`` in ``megatron_tanuki/**.py``, including those inside functions:
a lazy import is still a dependency, and hiding an upward one in a function is how cycles creep in.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_tanuki")

# Floors from the ground up. The key is a module's first component under megatron_tanuki/ ("" is the
# package's own __init__). A new top-level module or package must be given a floor here.
FLOORS = {
    "": 0, "_quiet": 0, "runtime": 0, "data": 0,
    "models": 1,
    "convert": 2, "inference": 2,
    "train": 3, "serve": 3, "synth": 3, "bench": 3,  # bench: times a training step
    "demo": 4,
    "cli": 5,
}


def _module_name(path: str, root: str = ROOT) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _exists(module: str, root: str) -> bool:
    base = os.path.join(os.path.dirname(root), *module.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _imported(tree: ast.AST, module: str, is_package: bool, root: str):
    """(line, imported megatron_tanuki module) for every import statement in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")
                package = parts if is_package else parts[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:  # `from pkg import submodule` depends on the submodule
                yield node.lineno, f"{base}.{a.name}" if _exists(f"{base}.{a.name}", root) else base


def floor_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else ""
    if key not in FLOORS:
        raise KeyError(f"megatron_tanuki.{key} has no floor: add it to FLOORS in {__file__}")
    return FLOORS[key]


def upward_imports(root: str = ROOT) -> list[str]:
    found = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = _module_name(path, root)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            own = floor_of(module)
            for line, target in _imported(tree, module, name == "__init__.py", root):
                if target != "megatron_tanuki" and not target.startswith("megatron_tanuki."):
                    continue
                if floor_of(target) > own:
                    found.append(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: {module} "
                                 f"(floor {own}) imports {target} (floor {floor_of(target)})")
    return sorted(found)


def test_every_module_has_a_floor():
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                floor_of(_module_name(os.path.join(dirpath, name)))


def test_no_import_runs_upward():
    found = upward_imports()
    assert not found, "imports against the floors of DESIGN.md:\n" + "\n".join(found)


def test_the_check_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The checker itself: an upward import inside a function, written relatively or as
    `from package import module`, is still found; an unranked top-level name is an error."""
    pkg = tmp_path / "megatron_tanuki"
    for d in ("models", "convert"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "convert" / "engine.py").write_text("X = 1\n")
    (pkg / "models" / "a.py").write_text(
        "def f():\n    from ..convert import engine\n\n\ndef g():\n    from megatron_tanuki import convert\n")
    (pkg / "models" / "b.py").write_text("from megatron_tanuki.models import a\n")
    assert upward_imports(str(pkg)) == [
        "megatron_tanuki/models/a.py:2: megatron_tanuki.models.a (floor 1) imports "
        "megatron_tanuki.convert.engine (floor 2)",
        "megatron_tanuki/models/a.py:6: megatron_tanuki.models.a (floor 1) imports "
        "megatron_tanuki.convert (floor 2)",
    ]
    with pytest.raises(KeyError, match="megatron_tanuki.tools has no floor"):
        floor_of("megatron_tanuki.tools.x")
