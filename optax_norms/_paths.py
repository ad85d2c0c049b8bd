"""Parameter paths: one normalized path per leaf, for every pytree flavour.

A path is a tuple of ``str | int`` (dict keys, attribute names, sequence indices), the
same for Flax Linen dicts, ``FrozenDict``, ``nnx.State``, Equinox modules and plain
dicts/lists/NamedTuples. NNX's trailing ``value`` (the field of an ``nnx.Variable``) is
dropped, so a mask selects the same leaves at ``init`` (which ``nnx.Optimizer`` calls with
Variables) and at ``update`` (which it calls with raw arrays). ``None`` is kept as a leaf
(a frozen parameter's update, a filtered-out Equinox field): it is passed through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
  "Path",
  "check_unambiguous",
  "flatten",
  "format_path",
  "normalize_path",
  "shown_paths",
  "tree_paths",
]

Path = tuple[str | int, ...]

_SHOWN_PATHS = 8


def _key_name(key: Any) -> str | int:
  if isinstance(key, jax.tree_util.DictKey):
    k = key.key
  elif isinstance(key, jax.tree_util.SequenceKey):
    k = key.idx
  elif isinstance(key, jax.tree_util.GetAttrKey):
    k = key.name
  elif isinstance(key, jax.tree_util.FlattenedIndexKey):
    k = key.key
  else:  # A custom key type: its string form.
    k = str(key)
  if isinstance(k, (bool, np.bool_)):
    return str(k)
  if isinstance(k, (int, np.integer)):
    return int(k)
  return k if isinstance(k, str) else str(k)


def normalize_path(key_path: Sequence[Any]) -> Path:
  """Turns a JAX key path into a tuple of ``str | int``, dropping NNX's trailing ``value``."""
  path = tuple(_key_name(key) for key in key_path)
  if (
    key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value"
  ):
    path = path[:-1]
  return path


def format_path(path: Path) -> str:
  """``("layers", 0, "kernel")`` -> ``"layers/0/kernel"``."""
  return "/".join(str(key) for key in path)


def shown_paths(paths: Sequence[Path | str]) -> str:
  """The first few paths, quoted, for an error message."""
  texts = [p if isinstance(p, str) else format_path(p) for p in paths]
  shown = ", ".join(repr(t) for t in texts[:_SHOWN_PATHS])
  more = f" and {len(texts) - _SHOWN_PATHS} more" if len(texts) > _SHOWN_PATHS else ""
  return shown + more


def _is_none(x: Any) -> bool:
  return x is None


def flatten(tree: Any) -> tuple[list[Path], list[Any], Any]:
  """Paths, leaves and treedef of `tree`; ``None`` counts as a leaf (optax does the same)."""
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
  paths = [normalize_path(key_path) for key_path, _ in with_paths]
  leaves = [leaf for _, leaf in with_paths]
  return paths, leaves, treedef


def check_unambiguous(paths: Sequence[Path]) -> list[str]:
  """The ``/``-joined paths; raises if two leaves join to the same text.

  ``{"a/b": x, "a": {"b": y}}`` gives ``a/b`` twice: a glob could not tell them apart.
  """
  texts = [format_path(path) for path in paths]
  if len(set(texts)) != len(texts):
    seen: dict[str, Path] = {}
    for path, text in zip(paths, texts):
      if text in seen:
        raise ValueError(
          f"The path {text!r} names two parameters ({seen[text]!r} and {path!r}): a key "
          "contains '/'. Globs cannot tell them apart; rename the key, or select with "
          "a bool pytree mask or path_mask(where=lambda path, leaf: ...) on the tuple path."
        )
      seen[text] = path
  return texts


def tree_paths(tree: Any) -> list[str]:
  """The ``/``-joined path of every leaf of ``tree``, in flattening order.

  Use it to see what a glob will be matched against: dict keys, attribute names and
  sequence indices joined by ``/``, with NNX's trailing ``value`` dropped.

  Args:
    tree: any pytree (Linen params, ``nnx.State``, an Equinox module, dicts and lists).

  Returns:
    One string per leaf (``None`` leaves excluded), e.g. ``'layers/0/kernel'``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> optax_norms.tree_paths({"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}})
    ['dense/bias', 'dense/kernel']
  """
  paths, leaves, _ = flatten(tree)
  return [format_path(path) for path, leaf in zip(paths, leaves) if leaf is not None]
