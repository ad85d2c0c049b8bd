"""A griffe extension (named in mkdocs.yml; not a page): reST leftovers in docstrings → Markdown.

The docstrings are Google style, with a few reStructuredText habits that mkdocstrings would
print literally or mangle:

* ``Example:`` / ``Example::`` is not a Google section for griffe (``Examples:`` is), so its
  ``>>>`` lines would render as nested block quotes: renamed to ``Examples:``, without the
  blank line ``Example::`` has after it;
* a paragraph ending in ``::`` followed by a doctest: the ``::`` becomes ``:`` and the doctest
  a fenced ``pycon`` block;
* Sphinx roles ``:func:`name```, ``:class:`name``` and ``:meth:`name```: a link to the API
  entry for public names of ``optax_norms``, plain code otherwise.

Each rule is a no-op on docstrings written in plain Google style/Markdown, so fixing a
docstring at its source never conflicts with this file.
"""

from __future__ import annotations

import ast
import pathlib
import re

import griffe

_INIT = pathlib.Path(__file__).resolve().parent.parent / "optax_norms" / "__init__.py"
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj):`~?([\w.]+)`")


def _public_names() -> frozenset[str]:
  for node in ast.parse(_INIT.read_text()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
      return frozenset(ast.literal_eval(node.value))
  return frozenset()


PUBLIC = _public_names()


def _role(match: re.Match) -> str:
  name = match.group(1).removeprefix("optax_norms.")
  return f"[`{name}`][optax_norms.{name}]" if name in PUBLIC else f"`{name}`"


def fix_docstring(text: str) -> str:
  lines = _ROLE.sub(_role, text).split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.strip() in ("Example:", "Example::"):
      out.append(line.replace(line.strip(), "Examples:"))
      i += 1
      while i < len(lines) and not lines[i].strip():  # A Google section has no blank line here.
        i += 1
      continue
    if line.rstrip().endswith("::"):
      out.append(line.rstrip()[:-1])
      i += 1
      while i < len(lines) and not lines[i].strip():
        out.append(lines[i])
        i += 1
      indent = None
      block: list[str] = []
      while i < len(lines) and lines[i].strip():
        if indent is None:
          indent = len(lines[i]) - len(lines[i].lstrip())
        block.append(lines[i])
        i += 1
      if block and block[0].lstrip().startswith(">>>"):
        pad = " " * (indent or 0)
        out += [pad + "```pycon", *block, pad + "```"]
      else:
        out += block
      continue
    out.append(line)
    i += 1
  return "\n".join(out)


class DocstringFixes(griffe.Extension):
  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = fix_docstring(obj.docstring.value)
