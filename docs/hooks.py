"""MkDocs hooks for the optax_norms site (named in mkdocs.yml; not a page).

* The notebooks live in ``notebooks/`` at the repository root (the tests execute them there);
  this hook adds them to the site as ``notebooks/<name>.ipynb`` so that mkdocs-jupyter renders
  them (as stored, executed, without running them) without a copy or a symlink in ``docs/``.
"""

from __future__ import annotations

import pathlib

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
