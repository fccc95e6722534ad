"""Modules import only downward, as ../shared/DESIGN.md draws it (read from the source)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "llm_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
  """{module: the llm_jax modules it imports}, at any depth of its code (lazy imports too).

  `from package import module` counts as importing the module alone; `from module import
  name` as importing the module."""
  trees = {_module_name(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}
  graph = {}
  for module, tree in trees.items():
    names = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        submodules = {f"{node.module}.{a.name}" for a in node.names} & trees.keys()
        names.update(submodules or {node.module})
    graph[module] = {n for n in names if n in trees and n != module}
  return graph


GRAPH = _imports()


def _reaches(start: str, prefix: str) -> list[str]:
  """The modules under `prefix` that `start` imports, directly or through others."""
  seen, todo = set(), [start]
  while todo:
    for name in GRAPH.get(todo.pop(), ()):
      if name not in seen:
        seen.add(name)
        todo.append(name)
  return sorted(n for n in seen if n == prefix or n.startswith(prefix + "."))


@pytest.mark.parametrize("module, forbidden", [
    ("llm_jax.model", "llm_jax.train"),
    ("llm_jax.model.kernels", "llm_jax.model.transformer"),
    ("llm_jax.data", "llm_jax.model"),
    ("llm_jax.data", "llm_jax.train"),
    ("llm_jax.data", "llm_jax.objectives"),
    ("llm_jax.data", "llm_jax.posttrain"),
    ("llm_jax.objectives", "llm_jax.data"),  # objectives are losses over arrays: no I/O
    ("llm_jax.objectives", "llm_jax.parallel.checkpoint"),
    ("llm_jax.objectives", "llm_jax.inference"),
    ("llm_jax.objectives", "llm_jax.posttrain"),
    ("llm_jax.posttrain", "llm_jax.train"),
    ("llm_jax.inference", "llm_jax.train"),
    ("llm_jax.inference", "llm_jax.posttrain"),
    ("llm_jax.model.flops", "llm_jax.parallel.hardware"),
    ("llm_jax.train", "llm_jax.cli"),
    ("llm_jax.train", "llm_jax.tools"),
])
def test_a_module_never_imports_what_lies_above_it(module, forbidden):
  starts = [m for m in GRAPH if m == module or m.startswith(module + ".")]
  assert starts
  for start in starts:
    assert not _reaches(start, forbidden), (start, _reaches(start, forbidden))


def test_no_module_imports_itself_through_others():
  assert not [m for m in GRAPH if m in _reaches(m, m)]


def test_the_loop_names_no_objective_and_samples_nothing():
  """The end-of-run sample belongs to whoever called the loop; objectives reach it only
  through `recipes`, the one place a name picks an objective."""
  assert "llm_jax.inference.generate" not in GRAPH["llm_jax.train.loop"]
  source = (PACKAGE / "train" / "loop.py").read_text()
  for name in ("grpo", "dpo", "rl.", "rollout", "next_token"):
    assert name not in source, name
