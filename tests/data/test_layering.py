"""recllm_jax.data's import graph: no cycles, and a cheap `import recllm_jax.data`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import recllm_jax.data

PACKAGE_DIR = Path(recllm_jax.data.__file__).parent
PREFIX = "recllm_jax.data."


def _imports(path: Path) -> set[str]:
  """Sibling modules ``path`` imports anywhere (top level, lazily or under TYPE_CHECKING)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    found |= {name[len(PREFIX):].split(".")[0] for name in names if name.startswith(PREFIX)}
  return found - {path.stem}


def test_no_import_cycles_between_data_modules():
  graph = {p.stem: _imports(p) for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__"}
  assert "sources" not in graph  # split into schema / jsonl / amazon18 / loading
  assert graph["catalog"] == set() and graph["errors"] == set()
  assert graph["schema"] == {"catalog"}

  def reachable(start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
      module = todo.pop()
      if module not in seen:
        seen.add(module)
        todo.extend(graph.get(module, ()))
    return seen

  cycles = sorted(m for m in graph if m in reachable(m))
  assert cycles == []


def test_import_is_cheap():
  """Heavy optional libraries are imported only by the functions that need them."""
  code = ("import sys, recllm_jax.data; "
          "print(sorted(m for m in ('datasets', 'transformers', 'pyarrow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
