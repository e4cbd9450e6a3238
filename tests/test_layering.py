"""Imports run one way: models → quant → calibration/distillation → methods → deploy/job.

Read from the source (function-level imports included), so nothing is imported here.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Each layer may import the ones before it, never those after.
LAYERS = (("s2q_jax.models",), ("s2q_jax.quant",), ("s2q_jax.calibration", "s2q_jax.distillation"),
          ("s2q_jax.methods",), ("s2q_jax.deploy", "s2q_jax.job", "s2q_jax.pretrained"))


def _layer(module: str) -> int | None:
  for i, packages in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in packages):
      return i
  return None


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, module: str):
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      yield base
      yield from (f"{base}.{a.name}" for a in node.names)


SOURCES = sorted((ROOT / "s2q_jax").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_imports(path):
  module = _module(path)
  own = _layer(module)
  if own is None:
    return
  upward = sorted({name for name in _imports(path, module)
                   if (layer := _layer(name)) is not None and layer > own})
  assert not upward, f"{module} imports {', '.join(upward)}, which depend on it"
