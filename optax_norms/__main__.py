"""``python -m optax_norms demo`` and ``python -m optax_norms bench``."""

from __future__ import annotations

import sys

_USAGE = "usage: python -m optax_norms {demo,bench} [--help]"


def main(argv: list[str] | None = None) -> int:
  """Dispatches ``demo`` and ``bench``; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(_USAGE)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command == "demo":
    from optax_norms.tools.demo import main as demo_main

    return demo_main(rest)
  if command == "bench":
    from optax_norms.tools.bench import main as bench_main

    return bench_main(rest)
  print(f"unknown command {command!r}. {_USAGE}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  raise SystemExit(main())
