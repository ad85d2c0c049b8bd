"""Masks: which leaves a transform touches, chosen by path, compiled once.

A mask is ``None`` (every leaf), a glob or a list of globs over ``/``-joined paths, a
``PathMask``, a bool pytree (possibly a prefix of the parameters) or a callable
``params -> bool pytree`` (optax's contract). ``compile_mask`` turns any of them into a
``Selector`` when a transform is built, so a malformed glob fails at construction and
``init``/``update`` do no parsing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np

from optax_norms._messages import static_args_hint
from optax_norms._paths import (
  Path,
  check_unambiguous,
  flatten,
  format_path,
  normalize_path,
  shown_paths,
)

__all__ = [
  "Mask",
  "PathMask",
  "Selector",
  "as_globs",
  "compile_mask",
  "path_labels",
  "path_mask",
  "selector_mask",
  "weights_only",
]

Mask = Union[None, str, Sequence[str], "PathMask", Any, Callable[[Any], Any]]

_STATIC_ARGS_HINT = static_args_hint("mask")


# --- globs ---------------------------------------------------------------------------------


def _class_regex(glob: str, body: str) -> str:
  """The inside of a ``[...]`` class as a regex class body; ranges must be ordered."""
  out, i = [], 0
  while i < len(body):
    if i + 2 < len(body) and body[i + 1] == "-":
      low, high = body[i], body[i + 2]
      if low > high:
        raise ValueError(f"Malformed glob {glob!r}: the range '{low}-{high}' is empty.")
      out.append(f"{re.escape(low)}-{re.escape(high)}")
      i += 3
    else:
      out.append(re.escape(body[i]))
      i += 1
  return "".join(out)


def _segment_regex(glob: str, segment: str) -> str:
  """One segment: ``*`` -> ``[^/]*``, ``?`` -> ``[^/]``, ``[...]``/``[!...]`` a class (a
  ``]`` right after ``[`` or ``[!`` is literal, as in fnmatch), ``\\x`` a literal ``x``."""
  out, i, n = [], 0, len(segment)
  while i < n:
    char = segment[i]
    i += 1
    if char == "\\" and i < n:
      out.append(re.escape(segment[i]))
      i += 1
    elif char == "*":
      out.append("[^/]*")
    elif char == "?":
      out.append("[^/]")
    elif char == "[":
      start = i + 1 if i < n and segment[i] == "!" else i
      end = segment.find("]", start + 1 if start < n and segment[start] == "]" else start)
      if end < 0:
        raise ValueError(
          f"Malformed glob {glob!r}: '[' at position {i - 1} of {segment!r} is never closed. "
          "Write '\\[' for a literal bracket."
        )
      negate = "^" if start > i else ""
      out.append(f"[{negate}{_class_regex(glob, segment[start:end])}]")
      i = end + 1
    else:
      out.append(re.escape(char))
  return "".join(out)


def compile_glob(glob: str) -> re.Pattern[str]:
  """A glob over ``/``-joined paths as a compiled regex (matched with ``fullmatch``).

  ``*`` and ``?`` stay inside one segment, ``**`` spans any number of segments (zero
  included; empty keys too), ``[...]`` is a character class, ``\\`` escapes the next
  character (``\\!x`` selects a key that starts with ``!``).
  """
  if not isinstance(glob, str) or not glob or glob.strip("/") != glob or "//" in glob:
    raise (ValueError if isinstance(glob, str) else TypeError)(
      f"Malformed glob {glob!r}: it must be a non-empty string, without leading, trailing "
      "or doubled '/'. Example: '**/kernel'."
    )
  segments = glob.split("/")
  regex = ""
  for i, segment in enumerate(segments):
    last = i == len(segments) - 1
    if segment == "**":
      if not last:
        regex += "(?:[^/]*/)*"
      elif i == 0:
        regex += ".*"
      else:  # 'encoder/**' also matches 'encoder' itself.
        regex = regex[:-1] + "(?:/.*)?"
    elif "**" in segment:
      raise ValueError(
        f"Malformed glob {glob!r}: '**' must be a whole path segment, as in 'encoder/**/kernel'."
      )
    else:
      regex += _segment_regex(glob, segment) + ("" if last else "/")
  return re.compile(regex, re.DOTALL)


def as_globs(name: str, globs: Any) -> tuple[str, ...]:
  if isinstance(globs, str):
    globs = (globs,)
  try:
    globs = tuple(globs)
  except TypeError:
    raise ValueError(f"`{name}` must be a glob string or a list of them, got {globs!r}.") from None
  for glob in globs:
    if not isinstance(glob, str):
      raise TypeError(f"`{name}` must contain glob strings, got {glob!r}.")
  return globs


def _nothing_matched(what: str, texts: Sequence[str]) -> ValueError:
  return ValueError(
    f"{what} matches no parameter. The parameter paths are: {shown_paths(texts)}. "
    "Globs match whole '/'-joined paths: '*' stays in one segment, '**' spans any "
    "number ('**/kernel' is every kernel). See optax_norms.tree_paths(params)."
  )


# --- PathMask --------------------------------------------------------------------------------


class PathMask:
  """Selects leaves by path: include/exclude globs, a regex, and a predicate.

  A leaf is selected when it passes every given criterion: it matches one of ``include``
  (or ``include`` is empty), matches none of ``exclude``, matches ``regex`` (``re.search`` on
  the ``/``-joined path) and satisfies ``where(path, leaf)``. Each glob and the regex must
  match at least one parameter, else ``ValueError`` lists the real paths: a silent typo is the
  usual way regularization quietly does nothing. Build one with ``path_mask``.

  Calling a ``PathMask`` on a pytree returns a bool pytree of the same structure, so it is
  also a valid ``mask=`` for optax (``optax.adamw(..., mask=path_mask("**/kernel"))``).

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> mask = optax_norms.PathMask(include=["**/kernel"], where=lambda path, w: w.ndim == 2)
    >>> mask({"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones(2)}})
    {'a': {'kernel': True}, 'b': {'kernel': False}}
  """

  def __init__(
    self,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    regex: str | None = None,
    where: Callable[[Path, Any], bool] | None = None,
  ):
    self.include = as_globs("include", include)
    self.exclude = as_globs("exclude", exclude)
    self._include = [compile_glob(g) for g in self.include]
    self._exclude = [compile_glob(g) for g in self.exclude]
    if regex is not None and not isinstance(regex, str):
      raise TypeError(f"`regex` must be a string, got {type(regex).__name__}.")
    try:
      self.regex = None if regex is None else re.compile(regex)
    except re.error as error:
      raise ValueError(f"`regex` {regex!r} is not a valid regular expression: {error}.") from None
    if where is not None and not callable(where):
      raise TypeError(f"`where` must be a callable (path, leaf) -> bool, got {where!r}.")
    self.where = where

  def __repr__(self) -> str:
    return (
      f"PathMask(include={list(self.include)}, exclude={list(self.exclude)}, "
      f"regex={self.regex.pattern if self.regex else None!r}, where={self.where!r})"
    )

  def select(
    self, tree: Any, paths: Sequence[Path], leaves: Sequence[Any], check: bool = True
  ) -> list[bool]:
    """One bool per leaf of `tree` (flattened as `paths`, `leaves`); with `check`, raises
    if a glob or the regex matches no (non-``None``) leaf."""
    del tree
    by_text = self._include or self._exclude or self.regex is not None
    texts = check_unambiguous(paths) if by_text else [format_path(p) for p in paths]
    selected = []
    for path, text, leaf in zip(paths, texts, leaves):
      keep = not self._include or any(g.fullmatch(text) for g in self._include)
      keep = keep and not any(g.fullmatch(text) for g in self._exclude)
      keep = keep and (self.regex is None or self.regex.search(text) is not None)
      keep = keep and (self.where is None or bool(self.where(path, leaf)))
      selected.append(keep)
    real = [t for t, leaf in zip(texts, leaves) if leaf is not None]
    # A tree without any parameter (optax.tree_map_params initializes with placeholder
    # trees that have no leaves) cannot tell a typo from a match: nothing to check.
    if check and real:
      for glob, regex in zip(self.include, self._include):
        if not any(regex.fullmatch(t) for t in real):
          raise _nothing_matched(f"The glob {glob!r}", real)
      for glob, regex in zip(self.exclude, self._exclude):
        if not any(regex.fullmatch(t) for t in real):
          raise _nothing_matched(f"The exclusion glob {'!' + glob!r}", real)
      if self.regex is not None and not any(self.regex.search(t) for t in real):
        raise _nothing_matched(f"The regex {self.regex.pattern!r}", real)
    return selected

  def __call__(self, params: Any) -> Any:
    if isinstance(params, (jax.Array, np.ndarray, np.generic)) and np.ndim(params) == 0:
      raise ValueError(
        f"A PathMask was called with a step count, not parameters. {_STATIC_ARGS_HINT}"
      )
    paths, leaves, treedef = flatten(params)
    return jax.tree_util.tree_unflatten(treedef, self.select(params, paths, leaves))


def path_mask(
  include: str | Iterable[str] = (),
  *,
  exclude: str | Iterable[str] = (),
  regex: str | None = None,
  where: Callable[[Path, Any], bool] | None = None,
) -> PathMask:
  r"""Builds a mask that selects leaves by path.

  A leaf is selected when its ``/``-joined path matches one of ``include`` (every leaf when
  ``include`` is empty), matches none of ``exclude``, contains ``regex`` and satisfies
  ``where``. Globs: ``*`` and ``?`` stay inside one segment, ``**`` spans any number of
  segments, ``[...]`` is a character class.

  Args:
    include: glob(s) over ``/``-joined paths; a leaf must match one. Empty: every leaf.
      A glob starting with ``!`` is moved to ``exclude`` (``\!`` is a literal ``!``).
    exclude: glob(s); a leaf matching one is not selected.
    regex: a regular expression the ``/``-joined path must contain (``re.search``).
    where: a predicate ``(path, leaf) -> bool``; ``path`` is a tuple of ``str | int``.

  Returns:
    A ``PathMask``, usable as ``mask=`` here and in optax.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> mask = optax_norms.path_mask("**/kernel", exclude="head/**")
    >>> mask({"body": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}})
    {'body': {'kernel': True}, 'head': {'kernel': False}}
  """
  include = as_globs("include", include)
  exclude = as_globs("exclude", exclude) + tuple(g[1:] for g in include if g.startswith("!"))
  include = tuple(g for g in include if not g.startswith("!"))
  return PathMask(include, exclude, regex, where)


# --- rule selectors ----------------------------------------------------------------------

REGEX_PREFIX = "re:"


class _PatternMask(PathMask):
  """Selects the leaves whose ``/``-joined path fully matches one of its patterns: globs, and
  ``"re:<regex>"`` Python regular expressions (``re.fullmatch``, as big_vision's rules)."""

  def __init__(self, patterns: tuple[str, ...]):
    super().__init__()
    self.patterns = patterns
    self._compiled = []
    for pattern in patterns:
      if not pattern.startswith(REGEX_PREFIX):
        self._compiled.append(compile_glob(pattern))
        continue
      try:
        self._compiled.append(re.compile(pattern[len(REGEX_PREFIX) :], re.DOTALL))
      except re.error as error:
        raise ValueError(
          f"The selector {pattern!r} is not a valid regular expression: {error}."
        ) from None

  def select(self, tree, paths, leaves, check=True):
    del tree
    texts = check_unambiguous(paths)
    selected = [any(p.fullmatch(t) for p in self._compiled) for t in texts]
    real = [t for t, leaf in zip(texts, leaves) if leaf is not None]
    if check and real:
      for pattern, compiled in zip(self.patterns, self._compiled):
        if not any(compiled.fullmatch(t) for t in real):
          what = "The regex" if pattern.startswith(REGEX_PREFIX) else "The glob"
          raise _nothing_matched(f"{what} {pattern!r}", real)
    return selected

  def __repr__(self) -> str:
    return f"selector_mask({list(self.patterns)!r})"


def selector_mask(selector: str | Sequence[str]) -> PathMask:
  """The mask of a rule's selector: a glob, ``"re:<regex>"`` (the regex must match the whole
  ``/``-joined path) or a list of them (a leaf is selected when one matches). Each glob and
  regex must match a parameter (checked when the mask is applied).

  Examples:
    >>> from optax_norms._masks import selector_mask
    >>> mask = selector_mask(["re:.*/(query|key)/kernel", "head/*"])
    >>> mask({"attn": {"query": {"kernel": 1.0}, "out": {"kernel": 1.0}}, "head": {"w": 1.0}})
    {'attn': {'out': {'kernel': False}, 'query': {'kernel': True}}, 'head': {'w': True}}
  """
  patterns = as_globs("selector", selector)
  if not any(p.startswith(REGEX_PREFIX) for p in patterns):
    return path_mask(patterns)
  if any(p.startswith("!") for p in patterns):
    raise ValueError(
      f"The selector {list(patterns)!r} mixes a '!' exclusion with 're:' regexes: write the "
      "exclusion into the regex (e.g. 're:(?!head/).*kernel'), or use globs only."
    )
  return _PatternMask(patterns)


# --- weights_only ----------------------------------------------------------------------------

_NORM_LAYER = re.compile(r"norm|^(ln|bn|gn)(_?\d*|_.*)$", re.IGNORECASE)
_WEIGHT_NAMES = frozenset({"kernel", "embedding", "weight"})


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


class _WeightsOnly(PathMask):
  """``weights_only``: also drops leaves inside modules whose class name has 'Norm'."""

  def select(self, tree, paths, leaves, check=True):
    norm_modules = _norm_module_paths(tree)
    return [
      keep and not any(path[: len(m)] == m for m in norm_modules)
      for keep, path in zip(super().select(tree, paths, leaves, check), paths)
    ]

  def __repr__(self) -> str:
    return "weights_only()"


def weights_only() -> PathMask:
  """Selects the weights of Dense/Conv/Embedding layers: no biases, no norm scales.

  A leaf is selected when its name is ``kernel`` or ``embedding`` (Flax Linen and NNX) or
  ``weight`` (Equinox, PyTorch-style trees), and no enclosing name looks like a
  normalization layer (contains ``norm`` in any case, or is ``ln``/``bn``/``gn`` with an
  optional suffix). It never looks at ``ndim``, so the 2-D LayerNorm scales of stacked or
  scanned layers stay unselected. For Equinox trees, ``weight`` leaves inside a module
  whose class name contains ``Norm`` are excluded too.

  Embedding tables are selected on purpose: they are weight matrices, and the common
  ``ndim > 1`` mask for ``optax.adamw`` selects them too. levanter's default (decay by module
  class) leaves them out; on a Flax tree ``path_mask("**/kernel")`` does the same.

  Returns:
    A ``PathMask``, usable as ``mask=`` here and in optax.

  Examples:
    >>> import jax.numpy as jnp, optax_norms
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
    ...           "layer_norm": {"scale": jnp.ones((3, 2))}}
    >>> optax_norms.weights_only()(params)
    {'dense': {'bias': False, 'kernel': True}, 'layer_norm': {'scale': False}}
  """
  return _WeightsOnly(where=_is_weight)


# --- selectors -------------------------------------------------------------------------------


def _bool_tree_selection(mask: Any, paths: Sequence[Path], leaves: Sequence[Any]) -> list[bool]:
  """Selection from a bool pytree: each leaf takes the value of its longest mask prefix.

  ``None`` leaves need no mask entry (``jax.tree.map`` over the parameters skips them),
  and a mask entry where the parameters hold ``None`` is fine (optax accepts both).
  """
  with_paths, _ = jax.tree_util.tree_flatten_with_path(mask)
  table: dict[Path, bool] = {}
  for key_path, value in with_paths:
    mpath = normalize_path(key_path)
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
        f"The mask value at {format_path(mpath)!r} is traced: masks must be static "
        f"(Python bools, or a function of the parameters' structure and shapes). {_STATIC_ARGS_HINT}"
      )
    is_array = isinstance(value, (bool, np.bool_, np.ndarray, jax.Array))
    array = np.asarray(value) if is_array else None
    if array is None or array.dtype != np.bool_ or array.ndim != 0:
      if not mpath:
        raise ValueError(
          "`mask` must be None, a glob, a list of globs, a PathMask, a bool pytree or a "
          f"callable params -> bool pytree; got {value!r}."
        )
      raise ValueError(f"The mask leaf at {format_path(mpath)!r} must be a bool, got {value!r}.")
    table[mpath] = bool(array)
  selection, used = [], set()
  for path, leaf in zip(paths, leaves):
    for cut in range(len(path), -1, -1):
      if path[:cut] in table:
        selection.append(table[path[:cut]])
        used.add(path[:cut])
        break
    else:
      if leaf is None:
        selection.append(False)
        continue
      raise ValueError(
        f"The mask does not cover the parameter {format_path(path)!r}: the mask's "
        "structure must match the parameters (or be a prefix of them). First mask "
        f"paths: {shown_paths(list(table))}."
      )
  unused = [m for m in table if m not in used]
  if unused:
    raise ValueError(
      f"The mask has a leaf at {format_path(unused[0])!r} that is not a parameter: "
      f"the mask's structure must match the parameters. Parameter paths: {shown_paths(paths)}."
    )
  return selection


class Selector:
  """A mask compiled once: ``select(tree, paths, leaves, check)`` gives one bool per leaf."""

  def __init__(self, mask: Mask):
    self.mask = mask
    self._path_mask = _as_path_mask(mask)

  def select(
    self, tree: Any, paths: Sequence[Path], leaves: Sequence[Any], check: bool
  ) -> list[bool]:
    mask = self.mask
    if mask is None:
      return [True] * len(leaves)
    if self._path_mask is not None:
      return self._path_mask.select(tree, paths, leaves, check)
    if callable(mask) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(mask)):
      mask = mask(tree)
      if isinstance(mask, PathMask):
        return mask.select(tree, paths, leaves, check)
    if isinstance(mask, (bool, np.bool_)):
      return [bool(mask)] * len(leaves)
    return _bool_tree_selection(mask, paths, leaves)


def _as_path_mask(mask: Any) -> PathMask | None:
  if isinstance(mask, PathMask):
    return mask
  if isinstance(mask, str):
    return path_mask(mask)
  if isinstance(mask, (list, tuple)) and mask and all(isinstance(g, str) for g in mask):
    return path_mask(mask)
  return None


def compile_mask(mask: Mask) -> Selector:
  """Checks and compiles a ``mask=`` argument (globs are compiled here, once)."""
  if mask is path_mask or mask is weights_only:
    raise ValueError(
      f"`mask` is the function `{mask.__name__}` itself: call it, e.g. "
      f"mask=optax_norms.{mask.__name__}({'' if mask is weights_only else repr('**/kernel')})."
    )
  if isinstance(mask, jax.core.Tracer) or (
    isinstance(mask, (jax.Array, np.ndarray)) and np.ndim(mask) == 0
  ):
    raise ValueError(f"`mask` is an array, not a mask. {_STATIC_ARGS_HINT}")
  if isinstance(mask, (list, tuple)) and not mask:
    raise ValueError("`mask` is an empty list: give at least one glob, or mask=None for all.")
  if (
    isinstance(mask, list)
    and not all(isinstance(g, str) for g in mask)
    and any(isinstance(g, str) for g in mask)
  ):
    bad = next(g for g in mask if not isinstance(g, str))
    raise TypeError(f"`mask` is a list of globs, but it contains {bad!r}, not a string.")
  return Selector(mask)


def path_labels(rules: Mapping[str, Mask], default: str | None = None) -> Callable[[Any], Any]:
  """Labels every leaf for ``optax.partition`` (or ``optax.multi_transform``).

  Each leaf takes the label of the first rule whose mask selects it, else ``default``.

  Args:
    rules: ``label -> mask`` (a glob, a list of globs, or a ``PathMask``), tried in
      order; a leaf takes the label of the first mask that selects it.
    default: the label of leaves no rule selects; ``None`` makes such a leaf an error.

  Returns:
    A function ``params -> label pytree``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_norms
    >>> labels = optax_norms.path_labels({"decay": "**/kernel"}, default="no_decay")
    >>> labels({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}})
    {'dense': {'bias': 'no_decay', 'kernel': 'decay'}}
    >>> tx = optax.partition(
    ...     {"decay": optax.adamw(1e-3, weight_decay=1e-2), "no_decay": optax.adam(1e-3)},
    ...     labels)
  """
  if not isinstance(rules, Mapping) or not rules:
    raise (ValueError if isinstance(rules, Mapping) else TypeError)(
      "`rules` must be a non-empty dict label -> glob(s) or PathMask."
    )
  masks: dict[str, PathMask] = {}
  for label, rule in rules.items():
    compiled = _as_path_mask(rule)
    if compiled is None:
      raise ValueError(f"The rule for label {label!r} must be a glob, globs or a PathMask.")
    masks[label] = compiled

  def label_fn(params: Any) -> Any:
    paths, leaves, treedef = flatten(params)
    labels: list[str | None] = [None] * len(leaves)
    for label, mask in masks.items():
      for i, keep in enumerate(mask.select(params, paths, leaves, check=True)):
        if keep and labels[i] is None:
          labels[i] = label
    for path, leaf, found in zip(paths, leaves, labels):
      if found is None and default is None and leaf is not None:
        raise ValueError(
          f"No rule labels the parameter {format_path(path)!r}; add a rule or a `default`."
        )
    return jax.tree_util.tree_unflatten(
      treedef,
      [
        None if leaf is None else default if found is None else found
        for leaf, found in zip(leaves, labels)
      ],
    )

  return label_fn
