"""The layers of raydiff: a Ray-free core and data layer, and one package that runs on Ray.

``raydiff.distributed`` may import the core; nothing outside it may import it, or Ray (the
command line imports a command's module only to run it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import raydiff

PACKAGE = Path(raydiff.__file__).parent
RAY_LAYER = "raydiff.distributed"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _outside_ray_layer() -> list[str]:
    return sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                  if not _module_name(p).startswith(RAY_LAYER))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_and_data_never_import_the_ray_layer_or_ray():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module.startswith(RAY_LAYER) or module == "raydiff.cli":
            continue
        for name in _imports(path):
            if name == "ray" or name.startswith(("ray.", RAY_LAYER)):
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


def test_core_and_data_import_with_ray_unimportable():
    """Every module outside the Ray layer imports (and the CLI builds its parser) in a Python
    where ``import ray`` fails."""
    modules = _outside_ray_layer()
    assert {"raydiff.engine", "raydiff.data.parquet", "raydiff.data.samples", "raydiff.cli"} \
        <= set(modules)
    code = f"""
import importlib, sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not importable here")

sys.meta_path.insert(0, NoRay())
for name in {modules!r}:
    importlib.import_module(name)
from raydiff import cli
cli.build_parser()
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_ray_free_check_fails_when_ray_is_imported():
    """The blocker above really blocks: importing the Ray layer fails under it."""
    code = """
import sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not importable here")

sys.meta_path.insert(0, NoRay())
import raydiff.distributed.runtime
import ray
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "ray is not importable here" in done.stderr
