"""Package layering: library modules never import a training task, and tasks never import the
loop that runs them (the loop imports the tasks; `train.task` is the contract between them)."""

from __future__ import annotations

import ast
from pathlib import Path

import recllm_jax

PACKAGE = Path(recllm_jax.__file__).parent
TASK_MODULES = {"recllm_jax.train.sft", "recllm_jax.train.grpo"}


def _imports(path: Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
    elif isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
  return found


def test_no_library_module_imports_a_training_task():
  for path in PACKAGE.rglob("*.py"):
    if path.parent.name == "train":
      continue
    assert not _imports(path) & TASK_MODULES, f"{path} imports a training task"


def test_tasks_do_not_import_the_loop():
  for name in ("sft", "grpo"):
    imported = _imports(PACKAGE / "train" / f"{name}.py")
    assert "recllm_jax.train.loop" not in imported, name
    assert "recllm_jax.train.task" in imported
    other = "grpo" if name == "sft" else "sft"
    assert f"recllm_jax.train.{other}" not in imported, f"{name} imports the {other} task"
