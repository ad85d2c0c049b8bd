"""``python -m optax_norms demo`` and ``python -m optax_norms bench``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  usage = "usage: python -m optax_norms {demo,bench} [--help]"
  if not argv or argv[0] in ("-h", "--help"):
    print(usage)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "demo":
    print("optax_norms demo: coming soon (see CHANGELOG).")
    return 0
  if command == "bench":
    print("optax_norms bench: coming soon (see CHANGELOG).")
    return 0
  print(f"unknown command {command!r}. {usage}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  raise SystemExit(main())
