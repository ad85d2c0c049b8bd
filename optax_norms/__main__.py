"""``python -m optax_norms demo`` and ``python -m optax_norms bench``."""

from __future__ import annotations

import importlib
import sys

# Each command is the ``main(argv) -> int`` of a module in the tools subpackage, imported
# only when it runs (the core never imports the tools).
_COMMANDS = {"demo": "optax_norms.tools.demo", "bench": "optax_norms.tools.bench"}
_USAGE = f"usage: python -m optax_norms {{{','.join(_COMMANDS)}}} [--help]"


def main(argv: list[str] | None = None) -> int:
  """Dispatches ``demo`` and ``bench``; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(_USAGE)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command not in _COMMANDS:
    print(f"unknown command {command!r}. {_USAGE}", file=sys.stderr)
    return 2
  return importlib.import_module(_COMMANDS[command]).main(rest)


if __name__ == "__main__":
  raise SystemExit(main())
