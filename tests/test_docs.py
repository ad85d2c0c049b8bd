"""The documentation site: every public name documented, and a strict build passes."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import optax_norms

ROOT = pathlib.Path(__file__).resolve().parent.parent
API_PAGE = ROOT / "docs" / "api.md"


def _documented() -> set[str]:
  """Names with a ``::: optax_norms.<name>`` (mkdocstrings) entry in the API reference."""
  return set(re.findall(r"^:::\s+optax_norms\.(\w+)\s*$", API_PAGE.read_text(), re.MULTILINE))


def test_every_public_name_is_in_the_api_reference():
  missing = sorted(set(optax_norms.__all__) - _documented())
  assert not missing, f"add '::: optax_norms.<name>' entries to docs/api.md for {missing}"


def test_api_reference_documents_only_public_names():
  stale = sorted(_documented() - set(optax_norms.__all__))
  assert not stale, f"docs/api.md documents names that are not in optax_norms.__all__: {stale}"


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
  for module in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter"):
    pytest.importorskip(module)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "mkdocs",
      "build",
      "--strict",
      "--config-file",
      str(ROOT / "mkdocs.yml"),
      "--site-dir",
      str(tmp_path / "site"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
  )
  assert result.returncode == 0, result.stderr[-4000:]
  site = tmp_path / "site"
  api = (site / "api" / "index.html").read_text()
  for name in optax_norms.__all__:
    assert f'id="optax_norms.{name}"' in api, name
  for page in (
    "notebooks/01_tour",
    "notebooks/05_rnn_gradient_clipping",
    "reliability",
    "bad-inputs",
    "benchmarks",
  ):
    assert (site / page / "index.html").is_file(), page
  # The reST-isms in docstrings are rendered, not printed (docs/griffe_docstrings.py).
  assert ":func:" not in api and "<blockquote>" not in api


def _hooks():
  import importlib.util

  spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_which_one_page_is_the_readme_table_and_placement_guide():
  hooks = _hooks()
  page = (ROOT / "docs" / "which-one.md").read_text()
  for title in ("Which one do I want?", "Where each transform goes in a chain"):
    assert f"<!-- README section: {title} -->" in page, title
  expanded = hooks.expand_readme_sections(page)
  for title in ("Which one do I want?", "Where each transform goes in a chain"):
    for line in hooks.readme_section(title).splitlines():
      if line.startswith("| ") and not line.startswith("| I want"):
        wanted = line.split("|")[1].strip()
        assert f"| {wanted} |" in expanded, wanted
  assert "add_decoupled_weight_decay(λ, lr, cautious=True)`][optax_norms." in expanded


def test_every_regularize_setting_is_in_its_docstring_and_the_readme():
  from optax_norms._groups import SETTINGS

  doc = optax_norms.regularize.__doc__
  readme = _hooks().readme_section("Regularizing a transformer")
  for key in (*SETTINGS, "axis", "groups"):
    assert f"``{key}``" in doc, f"regularize's docstring table lacks {key!r}"
    assert f"`{key}" in readme, f"the README's 'Regularizing a transformer' lacks {key!r}"
