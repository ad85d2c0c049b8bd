"""Parameter paths, and masks that select leaves by path.

A path is a tuple of ``str | int`` (dict keys, attribute names, sequence indices), the
same for Flax Linen dicts, ``FrozenDict``, ``nnx.State``, Equinox modules and plain
dicts/lists/NamedTuples. NNX's trailing ``value`` (the field of an ``nnx.Variable``) is
dropped, so a mask selects the same leaves at ``init`` (which ``nnx.Optimizer`` calls with
Variables) and at ``update`` (which it calls with raw arrays).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np

__all__ = [
    "Mask",
    "Path",
    "PathMask",
    "format_path",
    "normalize_path",
    "path_labels",
    "path_mask",
    "select_leaves",
    "tree_paths",
    "weights_only",
]

Path = tuple[str | int, ...]
Mask = Union[None, str, Sequence[str], "PathMask", Any, Callable[[Any], Any]]

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
  """Turns a JAX key path into a tuple of ``str | int``, dropping NNX's trailing ``value``.

  Args:
    key_path: a key path from ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The path as a tuple, e.g. ``("layers", 0, "kernel")``.
  """
  path = tuple(_key_name(key) for key in key_path)
  if (
      key_path
      and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
      and key_path[-1].name == "value"
  ):
    path = path[:-1]
  return path


def format_path(path: Path) -> str:
  """``("layers", 0, "kernel")`` -> ``"layers/0/kernel"``."""
  return "/".join(str(key) for key in path)


def _flatten(tree: Any) -> tuple[list[Path], list[Any], Any]:
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [normalize_path(key_path) for key_path, _ in with_paths]
  leaves = [leaf for _, leaf in with_paths]
  return paths, leaves, treedef


def tree_paths(tree: Any) -> list[str]:
  """The ``/``-joined path of every leaf of `tree`, in flattening order.

  Use it to see what a glob will be matched against::

    >>> import jax.numpy as jnp, optax_norms
    >>> optax_norms.tree_paths({"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}})
    ['dense/bias', 'dense/kernel']
  """
  return [format_path(path) for path in _flatten(tree)[0]]


def _segment_regex(segment: str) -> str:
  """One glob segment as a regex: ``*`` -> ``[^/]*``, ``?`` -> ``[^/]``, ``[!a]`` -> ``[^a]``."""
  out, i = [], 0
  while i < len(segment):
    char = segment[i]
    if char == "*":
      out.append("[^/]*")
    elif char == "?":
      out.append("[^/]")
    elif char == "[":
      end = segment.find("]", i + 2)
      body = segment[i + 1 : end]
      if body.startswith("!"):
        body = "^" + body[1:]
      out.append("[" + body.replace("\\", "\\\\") + "]")
      i = end
    else:
      out.append(re.escape(char))
    i += 1
  return "".join(out)


@functools.lru_cache(maxsize=1024)
def _compile_glob(pattern: str) -> re.Pattern[str]:
  """A glob over ``/``-joined paths: ``*`` and ``?`` stay inside one segment, ``**``
  spans any number of segments (zero included), ``[...]`` is a character class."""
  if not pattern or pattern.strip("/") != pattern or "//" in pattern:
    raise ValueError(
        f"Malformed glob {pattern!r}: it must be non-empty, without leading, trailing or "
        "doubled '/'. Example: '**/kernel'."
    )
  parts = []
  for segment in pattern.split("/"):
    if segment == "**":
      parts.append(None)
    elif "**" in segment:
      raise ValueError(
          f"Malformed glob {pattern!r}: '**' must be a whole path segment, as in "
          "'encoder/**/kernel'."
      )
    else:
      if segment.count("[") != segment.count("]"):
        raise ValueError(f"Malformed glob {pattern!r}: unbalanced '[' ']' in {segment!r}.")
      parts.append(_segment_regex(segment))
  regex = ""
  for i, part in enumerate(parts):
    if part is None:  # '**': zero or more whole segments.
      regex += "(?:[^/]+(?:/[^/]+)*)?" if i == len(parts) - 1 else "(?:[^/]+/)*"
    else:
      regex += part + ("/" if i < len(parts) - 1 else "")
  if regex.endswith("/(?:[^/]+(?:/[^/]+)*)?"):  # 'encoder/**' also matches 'encoder'.
    regex = regex[: -len("/(?:[^/]+(?:/[^/]+)*)?")] + "(?:/[^/]+)*"
  return re.compile(regex)


def _glob_matches(pattern: str, path: str) -> bool:
  return _compile_glob(pattern).fullmatch(path) is not None


def _nothing_matched(what: str, paths: Sequence[str]) -> ValueError:
  shown = ", ".join(repr(p) for p in paths[:_SHOWN_PATHS])
  more = f" and {len(paths) - _SHOWN_PATHS} more" if len(paths) > _SHOWN_PATHS else ""
  return ValueError(
      f"{what} matches no parameter. The parameter paths are: {shown}{more}. "
      "Globs match whole '/'-joined paths: '*' stays in one segment, '**' spans any "
      "number ('**/kernel' is every kernel). See optax_norms.tree_paths(params)."
  )


class PathMask:
  """Selects leaves by path: include/exclude globs, a regex, and a predicate.

  A leaf is selected when it passes every given criterion: it matches one of `include`
  (or `include` is empty), matches none of `exclude`, matches `regex` (``re.search`` on the
  ``/``-joined path) and satisfies ``where(path, leaf)``. Each glob and the regex must match
  at least one parameter, else ``ValueError`` lists the real paths: a silent typo is the
  usual way regularization quietly does nothing.

  Calling a ``PathMask`` on a pytree returns a bool pytree of the same structure, so it is
  also a valid ``mask=`` for optax (``optax.adamw(..., mask=path_mask("**/kernel"))``).
  """

  def __init__(
      self,
      include: Iterable[str] = (),
      exclude: Iterable[str] = (),
      regex: str | None = None,
      where: Callable[[Path, Any], bool] | None = None,
  ):
    self.include = _as_globs("include", include)
    self.exclude = _as_globs("exclude", exclude)
    if regex is not None and not isinstance(regex, str):
      raise ValueError(f"`regex` must be a string, got {type(regex).__name__}.")
    try:
      self.regex = None if regex is None else re.compile(regex)
    except re.error as error:
      raise ValueError(f"`regex` {regex!r} is not a valid regular expression: {error}.") from None
    if where is not None and not callable(where):
      raise ValueError(f"`where` must be a callable (path, leaf) -> bool, got {where!r}.")
    self.where = where
    for glob in (*self.include, *self.exclude):
      _compile_glob(glob)

  def __repr__(self) -> str:
    return (
        f"PathMask(include={list(self.include)}, exclude={list(self.exclude)}, "
        f"regex={self.regex.pattern if self.regex else None!r}, where={self.where!r})"
    )

  def select(self, paths: Sequence[Path], leaves: Sequence[Any], check: bool = True) -> list[bool]:
    """One bool per leaf; with `check`, raises if a glob or the regex matches nothing."""
    texts = [format_path(path) for path in paths]
    selected = []
    for path, text, leaf in zip(paths, texts, leaves):
      keep = not self.include or any(_glob_matches(g, text) for g in self.include)
      keep = keep and not any(_glob_matches(g, text) for g in self.exclude)
      keep = keep and (self.regex is None or self.regex.search(text) is not None)
      keep = keep and (self.where is None or bool(self.where(path, leaf)))
      selected.append(keep)
    if check:
      for glob in self.include:
        if not any(_glob_matches(glob, text) for text in texts):
          raise _nothing_matched(f"The glob {glob!r}", texts)
      for glob in self.exclude:
        if not any(_glob_matches(glob, text) for text in texts):
          raise _nothing_matched(f"The exclusion glob {'!' + glob!r}", texts)
      if self.regex is not None and not any(self.regex.search(t) for t in texts):
        raise _nothing_matched(f"The regex {self.regex.pattern!r}", texts)
    return selected

  def select_in(
      self, tree: Any, paths: Sequence[Path], leaves: Sequence[Any], check: bool = True
  ) -> list[bool]:
    """Like :meth:`select`, for masks that also look at the tree's node types."""
    del tree
    return self.select(paths, leaves, check)

  def __call__(self, params: Any) -> Any:
    paths, leaves, treedef = _flatten(params)
    return jax.tree_util.tree_unflatten(treedef, self.select_in(params, paths, leaves))


def _as_globs(name: str, globs: Any) -> tuple[str, ...]:
  if isinstance(globs, str):
    globs = (globs,)
  try:
    globs = tuple(globs)
  except TypeError:
    raise ValueError(f"`{name}` must be a glob string or a list of them, got {globs!r}.") from None
  for glob in globs:
    if not isinstance(glob, str):
      raise ValueError(f"`{name}` must contain glob strings, got {glob!r}.")
  return globs


def path_mask(
    include: str | Iterable[str] = (),
    *,
    exclude: str | Iterable[str] = (),
    regex: str | None = None,
    where: Callable[[Path, Any], bool] | None = None,
) -> PathMask:
  """Builds a mask that selects leaves by path.

  Args:
    include: glob(s) over ``/``-joined paths; a leaf must match one. Empty: every leaf.
      A glob starting with ``!`` is moved to `exclude`.
    exclude: glob(s); a leaf matching one is not selected.
    regex: a regular expression the ``/``-joined path must contain (``re.search``).
    where: a predicate ``(path, leaf) -> bool``; `path` is a tuple of ``str | int``.

  Returns:
    A :class:`PathMask`, usable as ``mask=`` here and in optax.

  Example::

    >>> import optax_norms
    >>> mask = optax_norms.path_mask("**/kernel", exclude="head/**")
    >>> decay = optax_norms.add_l2_decay(1e-4, mask=mask)
  """
  include = _as_globs("include", include)
  exclude = _as_globs("exclude", exclude) + tuple(g[1:] for g in include if g.startswith("!"))
  include = tuple(g for g in include if not g.startswith("!"))
  return PathMask(include, exclude, regex, where)


_NORM_LAYER = re.compile(r"norm|^(ln|bn|gn)(_?\d*|_.*)$", re.IGNORECASE)
_WEIGHT_NAMES = frozenset({"kernel", "embedding", "weight"})


def weights_only() -> PathMask:
  """Selects the weights of Dense/Conv/Embedding layers: no biases, no norm scales.

  A leaf is selected when its name is ``kernel`` or ``embedding`` (Flax Linen and NNX) or
  ``weight`` (Equinox, PyTorch-style trees), and no enclosing name looks like a
  normalization layer (contains ``norm`` in any case, or is ``ln``/``bn``/``gn`` with an
  optional suffix). It never looks at ``ndim``, so the 2-D LayerNorm scales of stacked or
  scanned layers stay unselected. For Equinox trees, ``weight`` leaves inside a module
  whose class name contains ``Norm`` are excluded too.
  """
  return _WeightsOnly(where=_is_weight)


class _WeightsOnly(PathMask):
  """:func:`weights_only`: also drops leaves inside modules whose class name has 'Norm'."""

  def select_in(self, tree, paths, leaves, check=True):
    norm_modules = _norm_module_paths(tree)
    return [
        keep and not any(path[: len(m)] == m for m in norm_modules)
        for keep, path in zip(self.select(paths, leaves, check), paths)
    ]

  def __repr__(self) -> str:
    return "weights_only()"


def _is_weight(path: Path, leaf: Any) -> bool:
  del leaf
  if not path or path[-1] not in _WEIGHT_NAMES:
    return False
  return not any(isinstance(k, str) and _NORM_LAYER.search(k) for k in path[:-1])


def _norm_module_paths(tree: Any) -> list[Path]:
  """Paths of Equinox-style modules whose class name contains 'Norm'."""

  def is_norm_module(node: Any) -> bool:
    return "Norm" in type(node).__name__ and hasattr(node, "__dataclass_fields__")

  with_paths, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_norm_module)
  return [normalize_path(p) for p, node in with_paths if is_norm_module(node)]


def _mask_tree_selection(mask: Any, paths: Sequence[Path]) -> list[bool]:
  """Selection from a bool pytree: each leaf takes the value of its longest mask prefix."""
  mask_paths, mask_leaves, _ = _flatten(mask)
  table: dict[Path, bool] = {}
  for mpath, value in zip(mask_paths, mask_leaves):
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
          f"The mask value at {format_path(mpath)!r} is traced: masks must be static "
          "(Python bools, or a function of the parameters' structure and shapes)."
      )
    is_array = isinstance(value, (bool, np.bool_, np.ndarray, jax.Array))
    array = np.asarray(value) if is_array else None
    if array is None or array.dtype != np.bool_ or array.ndim != 0:
      if not mpath:
        raise ValueError(
            "`mask` must be None, a glob, a list of globs, a PathMask, a bool pytree or a "
            f"callable params -> bool pytree; got {value!r}."
        )
      raise ValueError(
          f"The mask leaf at {format_path(mpath)!r} must be a bool, got {value!r}."
      )
    table[mpath] = bool(array)
  selection, used = [], set()
  for path in paths:
    for cut in range(len(path), -1, -1):
      if path[:cut] in table:
        selection.append(table[path[:cut]])
        used.add(path[:cut])
        break
    else:
      raise ValueError(
          f"The mask does not cover the parameter {format_path(path)!r}: the mask's "
          "structure must match the parameters (or be a prefix of them). First mask "
          f"paths: {[format_path(p) for p in mask_paths[:_SHOWN_PATHS]]}."
      )
  for mpath in mask_paths:
    if mpath not in used:
      raise ValueError(
          f"The mask has a leaf at {format_path(mpath)!r} that is not a parameter: "
          "the mask's structure must match the parameters. Parameter paths: "
          f"{[format_path(p) for p in paths[:_SHOWN_PATHS]]}."
      )
  return selection


def _as_path_mask(mask: Any) -> PathMask | None:
  if isinstance(mask, PathMask):
    return mask
  if isinstance(mask, str):
    return path_mask(mask)
  if isinstance(mask, (list, tuple)) and mask and all(isinstance(g, str) for g in mask):
    return path_mask(mask)
  return None


def select_leaves(
    mask: Mask, params: Any, paths: Sequence[Path], leaves: Sequence[Any], check: bool
) -> list[bool]:
  """One bool per leaf of `params` (flattened as `paths`, `leaves`) for `mask`.

  `mask` may be ``None`` (every leaf), a glob string or list of globs, a
  :class:`PathMask`, a bool pytree, or a callable ``params -> bool pytree``. A pytree that is
  itself callable (an Equinox module) is a bool pytree, not a function (optax #913).
  """
  if mask is None:
    return [True] * len(leaves)
  path_based = _as_path_mask(mask)
  if path_based is not None:
    return path_based.select_in(params, paths, leaves, check)
  if isinstance(mask, (list, tuple)) and not mask:
    raise ValueError("`mask` is an empty list: give at least one glob, or mask=None for all.")
  if isinstance(mask, list) and any(isinstance(g, str) for g in mask):
    bad = next(g for g in mask if not isinstance(g, str))
    raise ValueError(f"`mask` is a list of globs, but it contains {bad!r}, not a string.")
  if callable(mask) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(mask)):
    mask = mask(params)
    if isinstance(mask, PathMask):
      return select_leaves(mask, params, paths, leaves, check)
  if isinstance(mask, (bool, np.bool_)):
    return [bool(mask)] * len(leaves)
  return _mask_tree_selection(mask, paths)


def path_labels(
    rules: Mapping[str, Mask], default: str | None = None
) -> Callable[[Any], Any]:
  """Labels every leaf for ``optax.partition`` (or ``optax.multi_transform``).

  Args:
    rules: ``label -> mask`` (a glob, a list of globs, or a :class:`PathMask`), tried in
      order; a leaf takes the label of the first mask that selects it.
    default: the label of leaves no rule selects; ``None`` makes such a leaf an error.

  Returns:
    A function ``params -> label pytree``.

  Example::

    >>> import optax, optax_norms
    >>> labels = optax_norms.path_labels({"decay": "**/kernel"}, default="no_decay")
    >>> tx = optax.partition(
    ...     {"decay": optax.adamw(1e-3, weight_decay=1e-2), "no_decay": optax.adam(1e-3)},
    ...     labels)
  """
  if not isinstance(rules, Mapping) or not rules:
    raise ValueError("`rules` must be a non-empty dict label -> glob(s) or PathMask.")
  masks = {}
  for label, rule in rules.items():
    masks[label] = _as_path_mask(rule)
    if masks[label] is None:
      raise ValueError(f"The rule for label {label!r} must be a glob, globs or a PathMask.")

  def label_fn(params: Any) -> Any:
    paths, leaves, treedef = _flatten(params)
    labels: list[str | None] = [None] * len(leaves)
    for label, mask in masks.items():
      for i, keep in enumerate(select_leaves(mask, params, paths, leaves, check=True)):
        if keep and labels[i] is None:
          labels[i] = label
    for path, label in zip(paths, labels):
      if label is None and default is None:
        raise ValueError(
            f"No rule labels the parameter {format_path(path)!r}; add a rule or a `default`."
        )
    return jax.tree_util.tree_unflatten(
        treedef, [default if label is None else label for label in labels]
    )

  return label_fn
