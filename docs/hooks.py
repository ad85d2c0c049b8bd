"""MkDocs hooks for the optax_norms site (named in mkdocs.yml; not a page).

* The notebooks live in ``notebooks/`` at the repository root (the tests execute them there);
  this hook adds them to the site as ``notebooks/<name>.ipynb`` so that mkdocs-jupyter renders
  them (as stored, executed, without running them) without a copy or a symlink in ``docs/``.
* A page line ``<!-- README section: <title> -->`` becomes the body of the README's
  ``## <title>`` section (up to its next heading), so the README is the one source of the
  "Which one do I want?" table and of the placement guide; public names in table cells become
  links to the API reference.
"""

from __future__ import annotations

import pathlib
import re

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parent.parent


@event_priority(100)  # Before mkdocs-jupyter's on_files, which converts every .ipynb it sees.
def on_files(files: Files, config) -> Files:
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    files.append(
      File(
        f"notebooks/{notebook.name}",
        src_dir=str(ROOT),
        dest_dir=config["site_dir"],
        use_directory_urls=config["use_directory_urls"],
      )
    )
  return files


_MARKER = re.compile(r"^<!-- README section: (.+?) -->$", re.MULTILINE)
_CODE_SPAN = re.compile(r"(?<!\[)`([A-Za-z_]\w*)((?:\([^`]*)?)`")


def readme_section(title: str, readme: str | None = None) -> str:
  """The body of the README's ``## <title>`` (or ``### <title>``) section, up to its next
  heading."""
  text = (ROOT / "README.md").read_text() if readme is None else readme
  match = re.search(rf"^###? {re.escape(title)}\n(.*?)(?=^#{{2,3}} |\Z)", text, re.M | re.S)
  if match is None:
    raise ValueError(f"README.md has no section '## {title}'")
  return match.group(1).strip("\n")


def _linked(line: str, public: set[str]) -> str:
  """Table cells: `name(...)` and `name` of public names as links to the API reference."""

  def link(match: re.Match) -> str:
    name, rest = match.group(1), match.group(2)
    if name not in public:
      return match.group(0)
    return f"[`{name}{rest}`][optax_norms.{name}]"

  return _CODE_SPAN.sub(link, line) if line.startswith("|") else line


def expand_readme_sections(markdown: str) -> str:
  """Replaces every ``<!-- README section: <title> -->`` line of a page by that section."""
  import optax_norms

  public = set(optax_norms.__all__)

  def body(match: re.Match) -> str:
    section = readme_section(match.group(1)).replace("](docs/", "](")
    return "\n".join(_linked(line, public) for line in section.splitlines())

  return _MARKER.sub(body, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
  return expand_readme_sections(markdown)
