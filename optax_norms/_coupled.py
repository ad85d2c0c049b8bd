"""Coupled groups: units made of slices of several leaves under one module path.

A head of an attention layer lives in four leaves (its slice of the query, key and value
kernels and its rows of the output kernel), a neuron of an MLP in two or three (its column
of the input kernel, its bias entry, its row of the output kernel). ``coupled_groups``
names such groups once; ``prox_group_l2(groups=...)``, ``constrain_group_sparsity`` and
``group_report`` read them. ``CoupledGroups.resolve(params)`` finds every instance of the
anchor module in a parameter tree, with its member leaves, their group axes, the number of
groups ``G`` and the size ``p_g`` of each group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_norms._masks import compile_glob
from optax_norms._numerics import compute_dtype, is_int
from optax_norms._paths import Path, check_unambiguous, flatten, format_path, shown_paths
from optax_norms._transform import selected_leaves

__all__ = [
  "CoupledGroups",
  "GroupInstance",
  "GroupMember",
  "as_group_list",
  "coupled_groups",
  "group_report",
  "group_sq_norms",
  "member_selection",
  "member_view",
  "resolve_all",
]


class GroupMember(NamedTuple):
  """One member leaf of an anchor instance.

  Attributes:
    position: the leaf's position in the flattened parameters.
    path: the leaf's path.
    axis: the leaf's group axis, non-negative, indexing its full shape.
  """

  position: int
  path: Path
  axis: int


class GroupInstance(NamedTuple):
  """One instance of an anchor module.

  Attributes:
    anchor: the ``/``-joined path of the module (e.g. ``"blocks/0/attn"``).
    members: its member leaves, in the order of ``members`` of ``coupled_groups``.
    groups: ``G``, the number of groups (the common length of the group axes).
    size: ``p_g``, the number of entries of one group (per layer when stacked): the sum over
      the members of the leaf's size divided by its group-axis length (and layer count).
    layers: the number of layers (the common length of axis 0) when stacked, else ``None``.
  """

  anchor: str
  members: tuple[GroupMember, ...]
  groups: int
  size: int
  layers: int | None


class CoupledGroups(NamedTuple):
  """Groups made of slices of several leaves under one module path (``coupled_groups``).

  Hashable and static: pass it to ``jax.jit`` as a static argument, or close over it.

  Attributes:
    anchor: the glob over module paths.
    members: ``((relative path, axis), ...)``, in the order given.
    stacked: whether axis 0 of every member is a layer axis (groups per layer).

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> mlp = on.coupled_groups("mlp", {"w_in": -1, "w_out": 0})
    >>> params = {"mlp": {"w_in": jnp.ones((4, 3)), "w_out": jnp.ones((3, 2))}}
    >>> [(i.anchor, i.groups, i.size) for i in mlp.resolve(params)]
    [('mlp', 3, 6)]
  """

  anchor: str
  members: tuple[tuple[str, int], ...]
  stacked: bool = False

  def resolve(self, params: Any) -> tuple[GroupInstance, ...]:
    """Every instance of the anchor in `params`: its member leaves and axes, ``G``, ``p_g``.

    Raises:
      ValueError: the anchor matches no module, an instance misses a member, a member's
        axis is out of range (or is the layer axis of a stacked member), or the members of an
        instance differ in their group-axis lengths (or layer counts); the message names the
        anchor, the leaves and the lengths.
    """
    paths, leaves, _ = flatten(params)
    return _resolve(self, paths, leaves)


def coupled_groups(
  anchor: str, members: Mapping[str, int], *, stacked: bool = False
) -> CoupledGroups:
  """Groups made of slices of several leaves under one module path.

  Every module whose path matches the glob ``anchor`` is an *instance*. ``members`` maps a
  path relative to the instance to the axis of that leaf which indexes the groups; group
  ``g`` of an instance is the union of the slices ``member[..., g, ...]`` over its members,
  and ``p_g`` is its number of entries. Every instance must have every member, all with the
  same length ``G`` along their group axes. A member's axis indexes the leaf's full shape
  (negative counts from the end). With ``stacked=True`` axis 0 of every member is the layer
  axis of a scanned or vmapped stack: the groups are per ``(layer, g)``, ``p_g`` counts the
  entries of one layer, and the group axis must not be 0.

  For Flax attention kernels ``(in, heads, dim)`` and ``(heads, dim, out)``, the heads are
  ``coupled_groups("**/attn", {"query/kernel": 1, "key/kernel": 1, "value/kernel": 1,
  "out/kernel": 0})``; for an MLP ``(d, F)``, ``(F,)``, ``(F, d)`` the neurons are
  ``coupled_groups("**/mlp", {"mlp_in/kernel": -1, "mlp_in/bias": 0, "mlp_out/kernel":
  0})``. Leaves may be members of one instance only.

  Args:
    anchor: a glob over module paths (``*`` in one segment, ``**`` over any number), e.g.
      ``"**/attn"`` or ``"blocks/*"``; it is matched against every proper prefix of every
      leaf path (see ``optax_norms.tree_paths``).
    members: ``relative path -> group axis``; relative paths are ``/``-joined literal keys.
    stacked: whether axis 0 of every member is the layer axis.

  Returns:
    A ``CoupledGroups`` (hashable); ``groups.resolve(params)`` lists the instances. Errors
    about a tree (an anchor matching nothing, a missing member, lengths that differ) come
    when a transform reading the groups is initialized or updated.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> heads = on.coupled_groups("**/attn", {"query/kernel": 1, "out/kernel": 0})
    >>> params = {"layer": {"attn": {"query": {"kernel": jnp.ones((8, 2, 4))},
    ...                              "out": {"kernel": jnp.ones((2, 4, 8))}}}}
    >>> [(i.anchor, i.groups, i.size) for i in heads.resolve(params)]
    [('layer/attn', 2, 64)]
  """
  glob = compile_glob(anchor) if isinstance(anchor, str) else None
  del glob  # Compiled here so a malformed glob fails at construction.
  if not isinstance(members, Mapping) or not members:
    raise (ValueError if isinstance(members, Mapping) else TypeError)(
      f"coupled_groups({anchor!r}): `members` must be a non-empty dict relative path -> "
      f"group axis, got {members!r}."
    )
  checked = []
  for rel, axis in members.items():
    if not isinstance(rel, str) or not rel or rel.strip("/") != rel or "//" in rel:
      raise (ValueError if isinstance(rel, str) else TypeError)(
        f"coupled_groups({anchor!r}): the member {rel!r} must be a non-empty '/'-joined "
        "relative path such as 'query/kernel'."
      )
    if not is_int(axis):
      raise ValueError(
        f"coupled_groups({anchor!r}): the axis of the member {rel!r} must be an int, got {axis!r}."
      )
    checked.append((rel, int(axis)))
  if not isinstance(stacked, bool):
    raise TypeError(f"coupled_groups({anchor!r}): `stacked` must be a bool, got {stacked!r}.")
  return CoupledGroups(anchor, tuple(checked), stacked)


def as_group_list(groups: Any, name: str) -> tuple[CoupledGroups, ...]:
  """`groups` (one ``CoupledGroups`` or a sequence of them) as a non-empty tuple."""
  items = (groups,) if isinstance(groups, CoupledGroups) else groups
  if not isinstance(items, Sequence) or isinstance(items, str) or not items:
    wrong_type = not isinstance(items, Sequence) or isinstance(items, str)
    raise (TypeError if wrong_type else ValueError)(
      f"`{name}`: `groups` must be a CoupledGroups (from optax_norms.coupled_groups) or a "
      f"non-empty list of them, got {groups!r}."
    )
  for item in items:
    if not isinstance(item, CoupledGroups):
      raise TypeError(
        f"`{name}`: `groups` must hold CoupledGroups (from optax_norms.coupled_groups), got "
        f"{item!r}."
      )
  return tuple(items)


def _anchors(groups: CoupledGroups, texts: Sequence[str]) -> list[str]:
  """The module paths (proper prefixes of leaf paths) matching the anchor, in leaf order."""
  glob = compile_glob(groups.anchor)
  found: dict[str, None] = {}
  for text in texts:
    parts = text.split("/")
    for cut in range(1, len(parts)):
      prefix = "/".join(parts[:cut])
      if prefix not in found and glob.fullmatch(prefix):
        found[prefix] = None
  return list(found)


def _resolve(
  groups: CoupledGroups, paths: Sequence[Path], leaves: Sequence[Any]
) -> tuple[GroupInstance, ...]:
  texts = check_unambiguous(paths)
  real = [t for t, leaf in zip(texts, leaves) if leaf is not None]
  by_text = {t: i for i, (t, leaf) in enumerate(zip(texts, leaves)) if leaf is not None}
  anchors = _anchors(groups, real)
  label = f"coupled_groups({groups.anchor!r})"
  if not anchors:
    raise ValueError(
      f"{label}: the anchor {groups.anchor!r} matches no module path (a proper prefix of a "
      f"parameter path). The parameter paths are: {shown_paths(real)}."
    )
  instances = []
  for anchor in anchors:
    found = [(rel, by_text.get(f"{anchor}/{rel}"), axis) for rel, axis in groups.members]
    missing = [rel for rel, i, _ in found if i is None]
    if missing:
      under = sorted(t for t in real if t.startswith(anchor + "/"))
      raise ValueError(
        f"{label}: the instance {anchor!r} has no member {missing[0]!r} (no parameter "
        f"{anchor + '/' + missing[0]!r}). Its parameters are: {shown_paths(under)}."
      )
    members, lengths, layer_counts, size = [], [], [], 0
    for rel, i, axis in found:
      assert i is not None
      leaf = leaves[i]
      shape = tuple(leaf.shape)
      where = f"{label}: the member {anchor + '/' + rel!r} of shape {shape}"
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"{where} has dtype {leaf.dtype}; members must be floating-point.")
      if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{where} has no axis {axis} (rank {len(shape)}).")
      axis %= len(shape)
      if groups.stacked and axis == 0:
        raise ValueError(
          f"{where} is stacked (axis 0 is the layer axis), so its group axis cannot be 0."
        )
      members.append(GroupMember(i, paths[i], axis))
      lengths.append((anchor + "/" + rel, shape[axis]))
      if groups.stacked:
        layer_counts.append((anchor + "/" + rel, shape[0]))
      per_group = math.prod(shape) // max(shape[axis], 1)
      size += per_group // max(shape[0], 1) if groups.stacked else per_group
    if len({n for _, n in lengths}) > 1:
      shown = ", ".join(f"{p!r}: {n}" for p, n in lengths)
      raise ValueError(
        f"{label}: the members of {anchor!r} differ in their group-axis lengths ({shown}); "
        "every member must have the same number of groups."
      )
    if len({n for _, n in layer_counts}) > 1:
      shown = ", ".join(f"{p!r}: {n}" for p, n in layer_counts)
      raise ValueError(
        f"{label}: the stacked members of {anchor!r} differ in their layer counts (axis 0: "
        f"{shown})."
      )
    layers = layer_counts[0][1] if groups.stacked else None
    instances.append(GroupInstance(anchor, tuple(members), lengths[0][1], size, layers))
  return tuple(instances)


def resolve_all(
  group_list: Sequence[CoupledGroups], paths: Sequence[Path], leaves: Sequence[Any]
) -> tuple[GroupInstance, ...]:
  """The instances of every ``CoupledGroups``; raises if a leaf is in two instances."""
  instances = [inst for groups in group_list for inst in _resolve(groups, paths, leaves)]
  owner: dict[int, str] = {}
  for inst in instances:
    for member in inst.members:
      if member.position in owner:
        raise ValueError(
          f"The parameter {format_path(member.path)!r} is a member of two group instances "
          f"({owner[member.position]!r} and {inst.anchor!r}): a leaf belongs to one group "
          "instance at most."
        )
      owner[member.position] = inst.anchor
  return tuple(instances)


def member_selection(name: str, selector: Any, params: Any, instances: Any) -> list[bool]:
  """Which leaves the transform touches: the members of `instances`, all of which `mask`
  (when given) must select."""
  paths, leaves, _, active = selected_leaves(selector, params, check=selector.mask is not None)
  chosen = [False] * len(leaves)
  for inst in instances:
    for member in inst.members:
      if selector.mask is not None and not active[member.position]:
        raise ValueError(
          f"`{name}`: the member {format_path(member.path)!r} of the group instance "
          f"{inst.anchor!r} is not selected by `mask`; a mask must select every member leaf."
        )
      chosen[member.position] = True
  return chosen


def member_view(axis: int, ndim: int, stacked: bool) -> tuple[int, ...]:
  """The axes of a member leaf that one group reduces (all but the group and layer axes)."""
  return tuple(a for a in range(ndim) if a != axis and not (stacked and a == 0))


def group_sq_norms(inst: GroupInstance, values: Sequence[jax.Array], stacked: bool) -> jax.Array:
  """``‖v_g‖²`` of every group of `inst` (shape ``(G,)``, ``(L, G)`` when stacked), summed
  over the slices of all its members, in the compute dtype (>= float32) of `values`."""
  total = None
  for member, v in zip(inst.members, values):
    wide = lax.convert_element_type(v, compute_dtype(v.dtype))
    sq = jnp.sum(wide * wide, axis=member_view(member.axis, v.ndim, stacked))
    total = sq if total is None else total + sq.astype(total.dtype)
  assert total is not None
  return total


def group_report(params: Any, groups: CoupledGroups | Sequence[CoupledGroups]) -> dict:
  """Per instance (and layer) the norms of the coupled groups and the number of zero groups.

  For every instance of every ``CoupledGroups``: ``norms[g] = ‖w_g‖₂`` over the union of the
  member slices of group ``g`` (``[layer, g]`` when stacked), ``zero_groups`` the number of
  groups whose entries are all exactly zero (per layer when stacked), and ``size`` the
  number of entries ``p_g`` of one group. What a pruning run logs. Jittable (close over
  `groups`, or pass it as a static argument).

  Choosing ``α`` of ``prox_group_l2(α, lr, groups=...)``: each step shrinks ``‖w_g‖`` by
  ``lr·α·√p_g``, so a group of norm ``n`` that gets no gradient dies after about
  ``n / (lr·α·√p_g)`` steps; ``norms / √size`` at initialization is the scale of ``α·lr·T``
  that prunes a typical group within ``T`` steps.

  Args:
    params: the parameters.
    groups: a ``CoupledGroups`` or a list of them.

  Returns:
    ``{anchor path: {"norms": float32 (G,) or (L, G), "zero_groups": int32 () or (L,),
    "size": int32 ()}}``.

  Examples:
    >>> import jax.numpy as jnp, optax_norms as on
    >>> mlp = on.coupled_groups("mlp", {"w_in": 1, "w_out": 0})
    >>> params = {"mlp": {"w_in": jnp.array([[3.0, 0.0]]), "w_out": jnp.array([[4.0], [0.0]])}}
    >>> report = on.group_report(params, mlp)["mlp"]
    >>> report["norms"].tolist(), int(report["zero_groups"]), int(report["size"])
    ([5.0, 0.0], 1, 2)
  """
  group_list = as_group_list(groups, "group_report")
  paths, leaves, _ = flatten(params)
  report: dict[str, dict[str, jax.Array]] = {}
  for groups_item in group_list:
    for inst in resolve_all((groups_item,), paths, leaves):
      values = [leaves[m.position] for m in inst.members]
      sq = group_sq_norms(inst, values, groups_item.stacked)
      nonzero = None
      for member, v in zip(inst.members, values):
        axes = member_view(member.axis, v.ndim, groups_item.stacked)
        any_nonzero = jnp.any(v != 0, axis=axes)
        nonzero = any_nonzero if nonzero is None else nonzero | any_nonzero
      assert nonzero is not None
      report[inst.anchor] = {
        "norms": jnp.sqrt(sq).astype(jnp.float32),
        "zero_groups": jnp.sum((~nonzero).astype(jnp.int32), axis=-1),
        "size": jnp.asarray(inst.size, jnp.int32),
      }
  return report
