"""Command-line scaffolding shared by ``demo`` and ``bench``.

Both commands report a bad flag in one line on stderr with exit status 2 (no usage block, no
traceback), show every flag's default in ``--help``, and take comma-separated name lists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["Parser", "UsageError", "names", "positive_int", "run"]


class UsageError(Exception):
  """A bad command-line value: reported in one line, without a traceback."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Shows each flag's default, and keeps the description's and epilog's line breaks."""


class Parser(argparse.ArgumentParser):
  """An ``ArgumentParser`` that raises `UsageError` instead of printing usage and exiting."""

  def __init__(self, **kwargs):
    kwargs.setdefault("formatter_class", _Formatter)
    super().__init__(**kwargs)

  def error(self, message: str):
    raise UsageError(message)


def positive_int(text: str) -> int:
  """An ``argparse`` type: a positive integer."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def names(text: str, allowed: Sequence[str], flag: str) -> tuple[str, ...]:
  """Parses a comma-separated list of names among ``allowed``, without repeats.

  Raises:
    UsageError: an empty entry (``a,,b``), an unknown name, or no name at all.
  """
  items = [n.strip() for n in text.split(",")]
  empty = [i + 1 for i, n in enumerate(items) if not n]
  if empty and len(items) > 1:
    raise UsageError(
      f"{flag} {text!r} has an empty entry (entry {', '.join(map(str, empty))} of "
      f"{len(items)}); separate names with single commas"
    )
  items = [n for n in items if n]
  unknown = [n for n in items if n not in allowed]
  if unknown or not items:
    raise UsageError(
      f"{flag}: unknown name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
      f"choose from {', '.join(allowed)}"
    )
  return tuple(dict.fromkeys(items))


def run(prog: str, parse: Callable[[list[str]], argparse.Namespace], main, argv) -> int:
  """Parses ``argv`` and calls ``main(args)``; returns the exit status.

  A `UsageError` from parsing (or from ``main``, for checks that need the environment, such
  as a folder that cannot be written) prints ``<prog>: error: ...`` in one line and returns 2.
  ``--help`` returns 0.
  """
  try:
    return main(parse(list(argv)))
  except UsageError as error:
    print(f"{prog}: error: {error} (see --help)", file=sys.stderr)
    return 2
  except SystemExit as exit_:  # --help.
    return int(exit_.code or 0)
