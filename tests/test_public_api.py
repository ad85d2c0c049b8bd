"""The public API: explicit, sorted, unique __all__; no heavy imports."""

import subprocess
import sys

import optax

import optax_norms


def test_all_is_sorted_unique_and_importable():
  names = optax_norms.__all__
  assert names == sorted(names) and len(set(names)) == len(names)
  for name in names:
    assert hasattr(optax_norms, name), name


def test_every_factory_returns_a_gradient_transformation():
  for name in optax_norms.__all__:
    obj = getattr(optax_norms, name)
    if name.startswith(("add_", "clip_", "constrain_", "prox_")) or name == "elastic":
      args = {"prox_l1": (0.1, 0.1), "prox_elastic": (0.1, 0.1, 0.1),
              "prox_group_l2": (0.1, 0.1), "add_max_norm_decay": (1.0, 0.1),
              "constrain_n_of_m": (2, 4),
              "elastic": (0.1, 0.1)}.get(name, (0.1,))
      assert isinstance(obj(*args), optax.GradientTransformation), name
      assert obj.__doc__ and "Example" in obj.__doc__, name


def test_import_pulls_only_jax_and_optax():
  code = ("import sys, optax_norms; bad = [m for m in ('flax', 'equinox', 'sklearn', "
          "'matplotlib', 'tqdm', 'orbax') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0
