"""The package boundary, by AST: no module of optax_norms imports another module's private
(underscore) name (a name shared between modules is a plain name in its private module, listed
in its ``__all__``), and the modules form three layers, each importing only its own layer and
those below; the bottom one (pure math, values, messages) imports nothing of the package.
Tests may reach into private names; the package may not."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "optax_norms"


def _is_module(dotted: str) -> bool:
  path = PACKAGE.parent.joinpath(*dotted.split("."))
  return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def private_imports(source: str, name: str = "<source>") -> list[str]:
  """``file:line: module.name`` for every private name of another optax_norms module that
  `source` imports (``from optax_norms.x import _y``) or reads off an imported module
  (``import optax_norms._x as m`` then ``m._y``)."""
  found, aliases = [], {}
  tree = ast.parse(source)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optax_norms"):
      for alias in node.names:
        dotted = f"{node.module}.{alias.name}"
        if alias.name.startswith("_") and not _is_module(dotted):
          found.append(f"{name}:{node.lineno}: {dotted}")
        elif _is_module(dotted):
          aliases[alias.asname or alias.name] = dotted
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("optax_norms.") and alias.asname:
          aliases[alias.asname] = alias.name
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
      and not _is_module(f"{aliases[node.value.id]}.{node.attr}")
    ):
      found.append(f"{name}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
  return found


def _package_imports(source: str) -> set[str]:
  modules = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optax_norms"):
      modules.add(node.module)
    elif isinstance(node, ast.Import):
      modules |= {a.name for a in node.names if a.name.startswith("optax_norms")}
  return modules


def test_no_module_imports_a_private_name_of_another():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    found += private_imports(path.read_text(), str(path.relative_to(PACKAGE.parent)))
  assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_checker_sees_both_forms_and_allows_modules():
  bad = (
    "from optax_norms._numerics import _norm_scales, compute_dtype\n"
    "from optax_norms import _numerics as n\n"
    "x = n._norm_scales\n"
    "from optax_norms.tools import _cli\n"
  )
  assert private_imports(bad) == [
    "<source>:1: optax_norms._numerics._norm_scales",
    "<source>:3: optax_norms._numerics._norm_scales",
  ]


# The three layers: pure math, values and messages at the bottom; paths, globs, layouts and
# units in the middle; the factory, the transforms and `regularize` on top (every other module).
BOTTOM = {"_numerics", "_messages", "_hyperparams", "_sharding"}
MIDDLE = {"_paths", "_masks", "_layout", "_units"}


def _layer(module: str) -> int:
  name = module.rpartition(".")[2]
  return 0 if name in BOTTOM else 1 if name in MIDDLE else 2


def layering_violations(modules: dict[str, set[str]]) -> list[str]:
  """``"a -> b"`` for each import of `modules` (module name -> the package modules it
  imports) that reaches a higher layer, or any import of the package from the bottom layer."""
  found = []
  for name, imports in sorted(modules.items()):
    for target in sorted(imports):
      if _layer(name) == 0 or _layer(target) > _layer(name):
        found.append(f"{name} -> {target}")
  return found


def test_each_layer_imports_only_the_layers_below():
  for name in BOTTOM | MIDDLE:
    assert (PACKAGE / f"{name}.py").exists(), f"{name} is named in a layer but does not exist"
  modules = {path.stem: _package_imports(path.read_text()) for path in PACKAGE.glob("_*.py")}
  assert not layering_violations(modules), "\n".join(layering_violations(modules))


def test_the_layering_check_can_fail():
  assert layering_violations(
    {
      "_numerics": {"optax_norms._paths"},
      "_units": {"optax_norms._transform"},
      "_prox": {"optax_norms._units"},
    }
  ) == ["_numerics -> optax_norms._paths", "_units -> optax_norms._transform"]
