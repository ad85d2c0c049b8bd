"""The notebooks: each one runs from scratch without a cell error.

The notebooks assert their own claims against independent references (closed-form ridge,
scikit-learn's ``Lasso``/``lasso_path``/``enet_path``/``MultiTaskLasso``, the max-norm bound),
so a wrong transform fails here as a cell error.
"""

from __future__ import annotations

import pathlib
import shutil

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec as ipykernel_spec
from jupyter_client import kernelspec, manager

pytestmark = pytest.mark.slow

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
  "01_tour.ipynb",
  "02_sparsity.ipynb",
  "03_maxnorm_and_clipping.ipynb",
  "04_transformer_groups.ipynb",
  "05_rnn_gradient_clipping.ipynb",
  "06_structured_pruning.ipynb",
  "07_weight_decay.ipynb",
]


class _ThisInterpreter(kernelspec.KernelSpecManager):
  """Resolves every kernel name to ipykernel in the interpreter running the tests.

  A ``python3`` kernelspec installed elsewhere (a user-level one pointing at another Python)
  would otherwise run the notebooks without this environment's packages.
  """

  def get_kernel_spec(self, kernel_name):
    del kernel_name
    return kernelspec.KernelSpec(resource_dir="", **ipykernel_spec.get_kernel_dict())


def _images(nb) -> int:
  return sum(
    "image/png" in output.get("data", {})
    for cell in nb.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
  )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
  source = NOTEBOOKS / name
  copy = tmp_path / name
  shutil.copy(source, copy)
  stored = nbformat.read(source, as_version=4)
  nb = nbformat.read(copy, as_version=4)
  km = manager.KernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())
  client = nbclient.NotebookClient(
    nb,
    km=km,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # Raises CellExecutionError on the first failing cell.
  errors = [
    output
    for cell in nb.cells
    if cell.cell_type == "code"
    for output in cell.get("outputs", [])
    if output.output_type == "error"
  ]
  assert not errors
  # Every plot is drawn, and the committed copy was stored executed, with the same plots.
  assert _images(nb) >= 3
  assert _images(stored) == _images(nb), "re-execute the notebook and commit its outputs"
  assert all(cell.get("execution_count") for cell in stored.cells if cell.cell_type == "code"), (
    "the committed notebook has cells that were never executed"
  )
