"""``python -m optax_norms bench``: the cost of every transform, measured on this device.

Every variant runs ``K`` optimizer steps inside ONE jit-compiled ``lax.fori_loop`` that
carries the parameters and the optimizer state, so Python dispatch is excluded. The variants
of one row (our transform, the same chain without it, the optax peer, a hand-written ``jnp``
version) are timed alternately, repeat after repeat, and each ratio is the median over the
repeats of the paired ratio, so slow machine drift cancels.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from optax_norms.tools import _cli
from optax_norms.tools.bench_table import BENCH_TABLE, by_name

__all__ = ["main"]

TRANSFORMS = tuple(entry.name for entry in BENCH_TABLE)
# The targets' two classes: element-wise rules, and rules that reduce (over units, N:M blocks
# or whole leaves).
ELEMENTWISE = tuple(e.name for e in BENCH_TABLE if not (e.per_unit or e.reduces_leaf))
PER_UNIT = tuple(e.name for e in BENCH_TABLE if e.per_unit or e.reduces_leaf)
TREES = ("big", "transformer", "many", "mlp", "groups", "coupled")
OPTIMIZERS = ("sgd", "adam")
# The many-leaf tree measures per-leaf overheads (tracing, compile time, kernels per leaf);
# with adam its compile time is ~5x longer on CPU for the same information, so sgd only.
TREE_OPTIMIZERS = {"big": OPTIMIZERS, "transformer": OPTIMIZERS, "many": ("sgd",)}
MASK = "**/kernel"
# regularize's clip and freeze rows of the MLP bench: a global norm every step exceeds, half
# the layers frozen.
GLOBAL_NORM = 1e-3
FROZEN = "Dense_[0-3]/**"
_PROG = "python -m optax_norms bench"

# Hyperparameters: small enough that training stays sane, large enough that clips and
# projections are active for part of the units.
# The hyperparameters of each transform are in its ``bench_table`` entry.
ALPHA, MAX_NORM = 1e-4, 1.0
WEIGHT_DECAY = 0.1  # decoupled (AdamW-style), as optax.adamw's weight_decay
LR = {"sgd": 1e-2, "adam": 1e-3}

# size -> (big-leaf side, transformer width, transformer layers, small-leaf side,
#          small-leaf blocks (2 leaves each), MLP width, MLP batch, steps, repeats)
SIZES = {
  "tiny": dict(big=256, d=16, layers=2, small=8, blocks=10, width=32, batch=16, steps=2, repeats=2),
  "small": dict(
    big=1024, d=64, layers=20, small=16, blocks=500, width=256, batch=64, steps=10, repeats=5
  ),
  "medium": dict(
    big=4096, d=256, layers=20, small=64, blocks=500, width=512, batch=128, steps=20, repeats=7
  ),
  "large": dict(
    big=16384, d=1024, layers=20, small=256, blocks=500, width=2048, batch=512, steps=50, repeats=9
  ),
}

# Opcodes that launch no kernel of their own.
_FREE_OPS = frozenset(
  {
    "kParameter",
    "kConstant",
    "kGetTupleElement",
    "kTuple",
    "kBitcast",
    "kWhile",
    "kConditional",
    "kCall",
    "kAfterAll",
    "kOptimizationBarrier",
    "kPartitionId",
    "kReplicaId",
    "kIota",
  }
)
# Called computations run inside the kernel of the op that applies them (a reduce's adder, a
# sort's comparator), except those of control flow, whose instructions are kernels themselves.
_APPLIED = re.compile(r"\bto_apply=%?([\w.-]+)")


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = _cli.Parser(
    prog=_PROG,
    description="Time every optax_norms transform against the unpenalized chain, the optax "
    "peer and a hand-written jnp version, inside one jit-compiled loop.",
  )
  parser.add_argument(
    "--size",
    choices=tuple(SIZES),
    default="small",
    help="problem size (tiny: CI smoke; small: CPU default; large: GPU)",
  )
  parser.add_argument("--steps", type=_cli.positive_int, help="optimizer steps per timed call (K)")
  parser.add_argument("--repeats", type=_cli.positive_int, help="timed calls per variant")
  parser.add_argument("--only", help="comma-separated transforms to run (default: all)")
  parser.add_argument("--trees", help=f"comma-separated benchmarks among {','.join(TREES)}")
  parser.add_argument("--json", metavar="PATH", help="also write all results as JSON")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  args.only = _cli.names(args.only, TRANSFORMS, "--only") if args.only else TRANSFORMS
  args.trees = _cli.names(args.trees, TREES, "--trees") if args.trees else TREES
  config = SIZES[args.size]
  args.steps = args.steps or config["steps"]
  args.repeats = args.repeats or config["repeats"]
  return args


# --------------------------------------------------------------------------------------------
# Trees.


def _trees(config: dict[str, int], names: Sequence[str]) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  key = iter(jax.random.split(jax.random.PRNGKey(0), 8192))

  def normal(shape, scale=1.0):
    return scale * jax.random.normal(next(key), shape, jnp.float32)

  trees = {}
  if "big" in names:
    n = config["big"]
    trees["big"] = {"dense": {"kernel": normal((n, n), n**-0.5)}}
  if "transformer" in names:
    d = config["d"]
    layers = {}
    for i in range(config["layers"]):
      layers[f"layer_{i}"] = {
        "ln_1": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        "attn": {name: {"kernel": normal((d, d), d**-0.5)} for name in "qkvo"},
        "ln_2": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
        "mlp_in": {"kernel": normal((d, 4 * d), d**-0.5)},
        "mlp_out": {"kernel": normal((4 * d, d), (4 * d) ** -0.5)},
      }
    trees["transformer"] = layers
  if "many" in names:
    s = config["small"]
    trees["many"] = {
      f"block_{i}": {"kernel": normal((s, s), s**-0.5), "bias": normal((s,), 0.1)}
      for i in range(config["blocks"])
    }
  return trees


def _is_kernel(path) -> bool:
  import jax

  last = path[-1]
  return isinstance(last, jax.tree_util.DictKey) and last.key == "kernel"


def _bool_mask(tree: Any) -> Any:
  """The mask a user of plain optax writes: True on every ``kernel`` leaf."""
  import jax

  return jax.tree_util.tree_map_with_path(lambda path, _: _is_kernel(path), tree)


# --------------------------------------------------------------------------------------------
# Transforms: ours, the hand-written jnp version, the optax peer.


def _ours(name: str, lr: float):
  entry = by_name(name)
  return entry.factory(**entry.values(lr), **entry.options, mask=MASK)


def _scheduled(name: str):
  """Our transform with every hyperparameter given as a schedule (for state bytes)."""
  import optax

  entry = by_name(name)
  return entry.factory(
    **{k: optax.constant_schedule(v) for k, v in entry.values(0.1).items()},
    **entry.options,
    mask=MASK,
  )


def _hand_rule(name: str, lr: float) -> Callable[[Any, Any], Any]:
  """The same math written directly in jnp, the way a careful user would (f32 leaves)."""
  entry = by_name(name)
  return entry.hand_rule(entry.values(lr), lr)


def _hand(name: str, lr: float):
  import jax
  import optax

  rule = _hand_rule(name, lr)

  def update(updates, state, params=None):
    mask = _bool_mask(updates)
    new = jax.tree.map(lambda m, g, w: rule(g, w) if m else g, mask, updates, params)
    return new, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _peer(name: str, lr: float):
  """(optax transform, same math?) or None."""
  entry = by_name(name)
  return None if entry.peer is None else entry.peer(entry.values(lr), _bool_mask)


def _optimizer(name: str):
  import optax

  return optax.sgd(LR["sgd"]) if name == "sgd" else optax.adam(LR["adam"])


def _chain(extra, opt_name: str, placement: str):
  """Decays and clips go before the optimizer, prox steps and constraints after it; an
  optimizer entry (``prox_adam``) replaces it."""
  import optax

  if placement == "optimizer":
    return extra
  opt = _optimizer(opt_name)
  return optax.chain(extra, opt) if placement == "before" else optax.chain(opt, extra)


# --------------------------------------------------------------------------------------------
# Compilation, analysis, timing.


def _tree_loop(tx, steps: int):
  import jax
  import optax

  def run(params, state, target):
    def body(_, carry):
      p, s = carry
      g = jax.tree.map(lambda w, t: w - t, p, target)  # Gradient of ½‖w − t‖².
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, steps, body, (params, state))

  return run


def _copy_loop(steps: int):
  import jax

  def run(tree, a, b):  # a = 1, b = 0 at run time: XLA cannot fold the copy away.
    return jax.lax.fori_loop(0, steps, lambda _, x: jax.tree.map(lambda v: v * a + b, x), tree)

  return run


def _kernel_count(compiled) -> int | None:
  """Kernel-launching instructions of the compiled module, from XLA's HLO module objects:
  fusions, custom calls and unfused ops in the entry computation and in loop bodies (not
  inside fused computations, which XLA lists apart, nor inside a reduce's adder or a sort's
  comparator). ``None`` where this jaxlib does not expose the modules."""
  try:
    modules = compiled.runtime_executable().hlo_modules()
    computations = [c for m in modules for c in m.make_nonfusion_computations()]
    everything = [c for m in modules for c in m.computations()]
  except (AttributeError, NotImplementedError):
    return None
  # XLA's Python API gives opcodes but not called computations: only the name of a
  # computation applied by a non-control-flow op is read from that instruction's text.
  applied = {
    name
    for computation in everything
    for instruction in computation.instructions()
    if instruction.opcode.name != "kCall"
    for name in _APPLIED.findall(instruction.to_string())
  }
  return sum(
    instruction.opcode.name not in _FREE_OPS
    for computation in computations
    if computation.name not in applied
    for instruction in computation.instructions()
  )


def _temp_bytes(compiled) -> int | None:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # Not implemented on this backend.
    return None
  if analysis is None:
    return None
  value = getattr(analysis, "temp_size_in_bytes", None)
  return None if value is None else int(value)


def _nbytes(tree: Any) -> int:
  import jax

  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


class _Compiled:
  """One jit-compiled loop, its inputs and its static analysis."""

  def __init__(self, fn, args):
    import jax

    start = time.perf_counter()
    self.compiled = jax.jit(fn).lower(*args).compile()
    self.compile_s = time.perf_counter() - start
    self.args = args
    self.kernels = _kernel_count(self.compiled)
    self.temp_bytes = _temp_bytes(self.compiled)
    self.output = None

  def __call__(self):
    import jax

    out = self.compiled(*self.args)
    jax.block_until_ready(out)
    return out


def _time(variants: dict[str, _Compiled], repeats: int) -> dict[str, list[float]]:
  """Calls every variant once per repeat, in a rotating order; returns seconds per call."""
  names = list(variants)
  for name in names:  # Warm-up; keep the first output for the correctness check.
    variants[name].output = variants[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    order = names[r % len(names) :] + names[: r % len(names)]
    if r % 2:
      order.reverse()
    for name in order:
      start = time.perf_counter()
      variants[name]()
      times[name].append(time.perf_counter() - start)
  return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float | None:
  if a not in times or b not in times:
    return None
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


# The period of the budgets' periodic rows (``update_every``).
PERIOD = 100


def _ratio_over_period(
  times: dict[str, list[float]], name: str, base: str, steps: int, every1: str | None = None
) -> tuple[float | None, float | None]:
  """`name`'s paired ratio against `base`, and for a periodic budget row (`every1`: the row that
  ranks every step) the ratio over a whole period with the ratio between rankings beside it.

  A periodic row is timed from the state after the first (ranking) step, so with `steps` <
  `PERIOD` its window holds no ranking: a run of `PERIOD` steps costs ``PERIOD − 1`` of those and
  one ranking step, which costs what a step of `every1` costs. A longer window holds its
  rankings already: its plain ratio is the one over a period.
  """
  if every1 is None or steps >= PERIOD:
    return _ratio(times, name, base), None
  if not {every1, name, base} <= set(times):
    return None, None
  over_period = statistics.median(
    ((PERIOD - 1) * between + rank) / (PERIOD * b)
    for between, rank, b in zip(times[name], times[every1], times[base])
  )
  return over_period, _ratio(times, name, base)


def _after_first_step(run_one, params, state, *rest):
  """`params` and `state` after one step of `run_one` (the first step of a periodic budget
  ranks; the timed window starts after it)."""
  import jax

  return jax.jit(run_one)(params, state, *rest)


def _max_diff(x, y) -> float:
  import jax
  import numpy as np

  diffs = [
    float(np.max(np.abs(np.asarray(p) - np.asarray(q)), initial=0.0))
    for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y))
  ]
  return max(diffs, default=0.0)


class _Progress:
  def __init__(self, total: int, enabled: bool):
    self.bar = None
    if enabled:
      try:
        from tqdm import tqdm
      except ImportError:  # tqdm is in the demo extra; no bar without it.
        tqdm = None
      if tqdm is not None:
        self.bar = tqdm(total=total, file=sys.stderr, unit="row", leave=False)

  def step(self, text: str) -> None:
    if self.bar is not None:
      self.bar.set_description(text[:40])
      self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# --------------------------------------------------------------------------------------------
# Benchmarks.


def _bench_tree(tree_name, params, args, progress) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  steps = args.steps
  target = jax.tree.map(lambda w: 0.5 * jax.random.normal(jax.random.PRNGKey(1), w.shape), params)
  copy = _Compiled(_copy_loop(steps), (params, jnp.float32(1), jnp.float32(0)))
  copy_times = _time({"copy": copy}, args.repeats)["copy"]
  copy_s = statistics.median(copy_times) / steps
  copy_bw = 2 * _nbytes(params) / copy_s
  rows = []
  for opt_name in TREE_OPTIMIZERS[tree_name]:
    opt_state_bytes = _nbytes(_optimizer(opt_name).init(params))
    min_bytes = 3 * _nbytes(params) + 2 * opt_state_bytes  # w, t in; w out; state in/out.

    def compile_tx(tx):
      return _Compiled(_tree_loop(tx, steps), (params, tx.init(params), target))

    base = compile_tx(_optimizer(opt_name))
    for name in args.only:
      entry = by_name(name)
      placement = entry.placement
      if placement == "optimizer" and opt_name != "adam":
        continue  # An Adam-type optimizer: timed against adam only.
      lr = LR[opt_name]
      variants = {"base": base}
      ours_tx = _ours(name, lr)
      variants["ours"] = compile_tx(_chain(ours_tx, opt_name, placement))
      if entry.hand_rule is not None:
        variants["hand"] = compile_tx(_chain(_hand(name, lr), opt_name, placement))
      peer = _peer(name, lr)
      if peer is not None:
        variants["peer"] = compile_tx(_chain(peer[0], opt_name, placement))
      times = _time(variants, args.repeats)
      us = {k: 1e6 * statistics.median(v) / steps for k, v in times.items()}
      final = {k: v.output[0] for k, v in variants.items()}
      row = {
        "transform": name,
        "optimizer": opt_name,
        "us_per_step": us,
        "ratio_vs_base": _ratio(times, "ours", "base"),
        "ratio_vs_peer": _ratio(times, "ours", "peer"),
        "ratio_vs_hand": _ratio(times, "ours", "hand"),
        "peer_same_math": None if peer is None else peer[1],
        "bw_fraction": min_bytes / (us["ours"] * 1e-6) / copy_bw,
        "compile_s": {k: v.compile_s for k, v in variants.items()},
        "kernels": {k: v.kernels for k, v in variants.items()},
        "temp_bytes": {k: v.temp_bytes for k, v in variants.items()},
        "state_bytes": _nbytes(ours_tx.init(params)),
        "max_abs_diff_vs_hand": (
          _max_diff(final["ours"], final["hand"]) if "hand" in final else None
        ),
        "max_abs_diff_vs_peer": (
          _max_diff(final["ours"], final["peer"]) if peer is not None and peer[1] else None
        ),
      }
      for v in variants.values():
        v.output = None
      rows.append(row)
      progress.step(f"{tree_name} {opt_name} {name}")
  leaves = jax.tree.leaves(params)
  return {
    "n_leaves": len(leaves),
    "n_params": int(sum(x.size for x in leaves)),
    "copy": {"us_per_step": 1e6 * copy_s, "gb_per_s": copy_bw / 1e9},
    "rows": rows,
  }


def _group_rules(tree_name: str):
  """A 4-group rule table for `regularize` and the same groups as exclusive globs."""
  if tree_name == "transformer":
    g1, g2, g3 = "*/attn/*/kernel", "*/mlp_*/kernel", "*/ln_*/scale"
  else:  # "many": 1000 leaves.
    g1, g2, g3 = "block_[0-4]*/kernel", "block_[5-9]*/kernel", "*/bias"
  rules = [
    (g1, {"l2": ALPHA, "max_norm": MAX_NORM}),
    (g2, {"clip_unit_norm": MAX_NORM, "l2": ALPHA}),
    (g3, {"l1": 1e-5}),
  ]
  if tree_name == "transformer":  # LayerNorm biases: left alone.
    rules.append(("**", None))
  return rules, (g1, g2, g3)


def _bench_groups(config, args, progress) -> dict[str, Any]:
  """``regularize`` with 4 groups against the hand-written chain of masked transforms."""
  import optax

  import optax_norms as on

  rows = []
  for tree_name, params in _trees(config, ("transformer", "many")).items():
    import jax

    target = jax.tree.map(lambda w: 0.5 * w, params)
    rules, (g1, g2, g3) = _group_rules(tree_name)
    lr = LR["adam"]
    ours = on.regularize(optax.adam(lr), rules, learning_rate=lr)
    hand = optax.chain(
      on.clip_by_row_norm(MAX_NORM, mask=g2),
      on.add_l2_decay(ALPHA, mask=[g1, g2]),
      on.add_l1_decay(1e-5, mask=g3),
      optax.adam(lr),
      on.constrain_row_norm(MAX_NORM, mask=g1),
    )
    variants = {
      name: _Compiled(_tree_loop(tx, args.steps), (params, tx.init(params), target))
      for name, tx in (("regularize", ours), ("hand_chain", hand), ("adam", optax.adam(lr)))
    }
    times = _time(variants, args.repeats)
    rows.append(
      {
        "tree": tree_name,
        "n_leaves": len(jax.tree.leaves(params)),
        "us_per_step": {k: 1e6 * statistics.median(v) / args.steps for k, v in times.items()},
        "ratio_vs_hand_chain": _ratio(times, "regularize", "hand_chain"),
        "compile_s": {k: v.compile_s for k, v in variants.items()},
        "temp_bytes": {k: v.temp_bytes for k, v in variants.items()},
        "max_abs_diff_vs_hand_chain": _max_diff(
          variants["regularize"].output[0], variants["hand_chain"].output[0]
        ),
      }
    )
    progress.step(f"groups {tree_name}")
  return {"rows": rows}


def _print_groups(result: dict[str, Any]) -> None:
  print("\n## regularize (4 groups) vs the hand-written chain of masked transforms (adam)")
  print(
    f"{'tree':<12}{'leaves':>7}{'us/step':>10}{'x hand':>8}{'compile s ours/hand':>22}"
    f"{'max |diff|':>12}"
  )
  for r in result["rows"]:
    c = r["compile_s"]
    print(
      f"{r['tree']:<12}{r['n_leaves']:>7}{r['us_per_step']['regularize']:>10.1f}"
      f"{r['ratio_vs_hand_chain']:>8.3f}{c['regularize']:>11.2f}/{c['hand_chain']:<10.2f}"
      f"{r['max_abs_diff_vs_hand_chain']:>12.2e}"
    )


def _coupled_tree(config):
  """A stacked transformer's attention and MLP leaves: heads and neurons as coupled groups."""
  import jax
  import numpy as np

  import optax_norms as on

  layers, d = config["layers"], config["d"]
  heads, head_dim, hidden = 8, max(d // 8, 2), 4 * d
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jax.numpy.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), np.float32)

  attn = {n: {"kernel": normal(layers, d, heads, head_dim)} for n in ("query", "key", "value")}
  attn["out"] = {"kernel": normal(layers, heads, head_dim, d)}
  mlp = {
    "mlp_in": {"kernel": normal(layers, d, hidden), "bias": normal(layers, hidden) * 0},
    "mlp_out": {"kernel": normal(layers, hidden, d)},
  }
  groups = [
    on.coupled_groups(
      "**/attn",
      {"query/kernel": 2, "key/kernel": 2, "value/kernel": 2, "out/kernel": 1},
      stacked=True,
    ),
    on.coupled_groups(
      "**/mlp", {"mlp_in/kernel": 2, "mlp_in/bias": 1, "mlp_out/kernel": 1}, stacked=True
    ),
  ]
  return {"blocks": {"attn": attn, "mlp": mlp}}, groups


def _hand_group_norms(params):
  """Per (layer, head) and (layer, neuron): the squared norms, written out in plain jnp."""
  import jax.numpy as jnp

  a, m = params["blocks"]["attn"], params["blocks"]["mlp"]
  heads = sum(jnp.sum(a[n]["kernel"] ** 2, axis=(1, 3)) for n in ("query", "key", "value"))
  heads = heads + jnp.sum(a["out"]["kernel"] ** 2, axis=(2, 3))
  neurons = jnp.sum(m["mlp_in"]["kernel"] ** 2, axis=1) + m["mlp_in"]["bias"] ** 2
  neurons = neurons + jnp.sum(m["mlp_out"]["kernel"] ** 2, axis=2)
  return heads, neurons


def _hand_apply(params, head_factor, neuron_factor):
  """Scales every member slice by its group's factor ((layers, G) arrays)."""
  a, m = params["blocks"]["attn"], params["blocks"]["mlp"]
  attn = {
    n: {"kernel": a[n]["kernel"] * head_factor[:, None, :, None]} for n in ("query", "key", "value")
  }
  attn["out"] = {"kernel": a["out"]["kernel"] * head_factor[:, :, None, None]}
  mlp = {
    "mlp_in": {
      "kernel": m["mlp_in"]["kernel"] * neuron_factor[:, None, :],
      "bias": m["mlp_in"]["bias"] * neuron_factor,
    },
    "mlp_out": {"kernel": m["mlp_out"]["kernel"] * neuron_factor[:, :, None]},
  }
  return {"blocks": {"attn": attn, "mlp": mlp}}


def _hand_coupled(kind: str, lr: float, alpha: float, fraction: float, sizes):
  """The group prox and the group budget after Adam, hand-written in jnp (no masks, no
  checks, the tree's layout known): the baselines of the coupled bench."""
  import jax
  import jax.numpy as jnp
  import optax

  def prune(updates, params):
    v = jax.tree.map(lambda w, u: w + u, params, updates)
    heads, neurons = _hand_group_norms(v)
    if kind == "prox":
      factors = [
        jnp.maximum(0, 1 - lr * alpha * jnp.sqrt(p) / jnp.where(n > 0, jnp.sqrt(n), 1)) * (n > 0)
        for n, p in zip((heads, neurons), sizes)
      ]
    else:
      factors = []
      for n in (heads, neurons):
        k = int(fraction * n.shape[-1])
        order = jnp.argsort(n, axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1, stable=True)
        factors.append((rank >= k).astype(n.dtype))
    kept = _hand_apply(v, *factors)
    return jax.tree.map(lambda q, w: q - w, kept, params)

  adam = optax.adam(lr)

  def update(updates, state, params=None):
    updates, state = adam.update(updates, state, params)
    return prune(updates, params), state

  return optax.GradientTransformation(adam.init, update)


def _bench_coupled(config, args, progress) -> dict[str, Any]:
  """Coupled groups (heads, neurons) after Adam against hand-written jnp versions, and the
  group budget's ranking at update_every 1 and 100."""
  import jax
  import optax

  import optax_norms as on

  params, groups = _coupled_tree(config)
  instances = [i for g in groups for i in g.resolve(params)]
  sizes = [i.size for i in instances]
  lr, alpha, fraction = LR["adam"], 1e-2, 0.5
  target = jax.tree.map(lambda w: 0.5 * w, params)
  txs = {
    "adam": optax.adam(lr),
    "prox_ours": optax.chain(optax.adam(lr), on.prox_group_l2(alpha, lr, groups=groups)),
    "prox_hand": _hand_coupled("prox", lr, alpha, fraction, sizes),
    "budget_ours": optax.chain(
      optax.adam(lr), on.constrain_group_sparsity(fraction, groups=groups)
    ),
    "budget_hand": _hand_coupled("budget", lr, alpha, fraction, sizes),
    "budget_every100": optax.chain(
      optax.adam(lr), on.constrain_group_sparsity(fraction, groups=groups, update_every=PERIOD)
    ),
    "prox_adam": on.prox_adam(lr, group=alpha, groups=groups),
  }

  every1 = {"budget_every100": "budget_ours"}  # The periodic row and its every-step twin.

  def start(name, tx):
    state = (params, tx.init(params))
    if name in every1:
      state = _after_first_step(_tree_loop(tx, 1), *state, target)
    return (*state, target)

  variants = {
    name: _Compiled(_tree_loop(tx, args.steps), start(name, tx)) for name, tx in txs.items()
  }
  times = _time(variants, args.repeats)
  rows = []
  for name, variant in variants.items():
    hand = {"prox_ours": "prox_hand", "budget_ours": "budget_hand"}.get(name)
    ratio, between = _ratio_over_period(times, name, "adam", args.steps, every1.get(name))
    rows.append(
      {
        "variant": name,
        "us_per_step": 1e6 * statistics.median(times[name]) / args.steps,
        "ratio_vs_adam": ratio,
        "ratio_between_rankings": between,
        "ratio_vs_hand": _ratio(times, name, hand) if hand else None,
        "compile_s": variant.compile_s,
        "compile_vs_hand": (variant.compile_s / variants[hand].compile_s) if hand else None,
        "temp_bytes": variant.temp_bytes,
      }
    )
  diffs = {
    kind: _max_diff(variants[f"{kind}_ours"].output[0], variants[f"{kind}_hand"].output[0])
    for kind in ("prox", "budget")
  }
  progress.step("coupled")
  return {
    "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
    "layers": config["layers"],
    "groups": [f"{i.anchor}: {i.layers}×{i.groups} of {i.size}" for i in instances],
    "rows": rows,
    "max_abs_diff_vs_hand": diffs,
  }


def _print_coupled(result: dict[str, Any]) -> None:
  print(
    f"\n## coupled groups after adam ({result['n_params']:,} params; {'; '.join(result['groups'])})"
  )
  head = (
    f"{'variant':<17}{'us/step':>10}{'xadam':>8}{'xhand':>8}{'compile s':>11}{'xhand':>7}"
    f"{'temp KiB':>10}"
  )
  print(head)
  print("-" * len(head))
  for r in result["rows"]:
    print(
      f"{r['variant']:<17}{r['us_per_step']:>10.1f}{_fmt(r['ratio_vs_adam']):>8}"
      f"{_fmt(r['ratio_vs_hand']):>8}{r['compile_s']:>11.2f}{_fmt(r['compile_vs_hand']):>7}"
      f"{_kib(r['temp_bytes']):>10}"
    )
  _print_periodic(result["rows"])
  diffs = ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff_vs_hand"].items())
  print(f"max |ours − hand| after the timed loop: {diffs}")


def _bench_mlp(config, args, progress) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import optax

  try:
    import flax.linen as nn
  except ImportError:
    progress.step("mlp (skipped)")
    return {"skipped": "flax is not installed (pip install optax-norms[demo])"}
  import optax_norms as on

  width, batch, steps, depth = config["width"], config["batch"], args.steps, 8

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(depth - 1):
        x = nn.relu(nn.Dense(width)(x))
      return nn.Dense(width)(x)

  model = MLP()
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(2), 3)
  x = jax.random.normal(kx, (batch, width))
  y = jax.random.normal(ky, (batch, width))
  params = model.init(kp, x)["params"]
  lr = LR["adam"]

  def loss(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  def loop(tx, *, after_first_step=False):
    def run(params, state, x, y, steps=steps):
      def body(_, carry):
        p, s = carry
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      return jax.lax.fori_loop(0, steps, body, (params, state))

    start = (params, tx.init(params))
    if after_first_step:
      start = _after_first_step(functools.partial(run, steps=1), *start, x, y)
    return _Compiled(run, (*start, x, y))

  adam = lambda: optax.adam(lr)
  hand = lambda name: _hand(name, lr)
  txs = {
    "base": adam(),
    "l2_ours": optax.chain(on.add_l2_decay(ALPHA, mask=MASK), adam()),
    "l2_optax": optax.chain(optax.add_decayed_weights(2 * ALPHA, mask=_bool_mask), adam()),
    "l2_hand": optax.chain(hand("add_l2_decay"), adam()),
    "maxnorm_ours": optax.chain(adam(), on.constrain_row_norm(MAX_NORM, mask=MASK)),
    "maxnorm_hand": optax.chain(adam(), hand("constrain_row_norm")),
    "clip_ours": optax.chain(on.clip_by_row_norm(MAX_NORM, mask=MASK), adam()),
    "clip_hand": optax.chain(hand("clip_by_row_norm"), adam()),
    "clip_agc": optax.chain(optax.masked(optax.adaptive_grad_clip(0.05), _bool_mask), adam()),
    "all_ours": optax.chain(
      on.clip_by_row_norm(MAX_NORM, mask=MASK),
      on.add_l2_decay(ALPHA, mask=MASK),
      adam(),
      on.constrain_row_norm(MAX_NORM, mask=MASK),
    ),
    "all_hand": optax.chain(
      hand("clip_by_row_norm"), hand("add_l2_decay"), adam(), hand("constrain_row_norm")
    ),
    # The pruning budgets, ranking every step and every PERIOD steps (the periodic rows are
    # timed between two rankings and reported over a period: `_ratio_over_period`).
    "sparsity_every1": optax.chain(adam(), on.constrain_sparsity(0.5, mask=MASK)),
    "sparsity_every100": optax.chain(
      adam(), on.constrain_sparsity(0.5, update_every=PERIOD, mask=MASK)
    ),
    "nofm_every1": optax.chain(adam(), on.constrain_n_of_m(2, 4, mask=MASK)),
    "nofm_every100": optax.chain(adam(), on.constrain_n_of_m(2, 4, update_every=PERIOD, mask=MASK)),
    # Decoupled decay and CPR: the whole step against optax.adamw's (same decay, same mask).
    "adamw": optax.adamw(lr, weight_decay=WEIGHT_DECAY, mask=_bool_mask),
    "decay_lr": optax.chain(adam(), on.add_decoupled_weight_decay(WEIGHT_DECAY, lr, mask=MASK)),
    "decay_indep": optax.chain(
      adam(),
      on.add_decoupled_weight_decay(WEIGHT_DECAY * lr, lr, convention="independent", mask=MASK),
    ),
    "decay_adamc": optax.chain(
      adam(), on.add_decoupled_weight_decay(WEIGHT_DECAY, lr, convention="adamc", mask=MASK)
    ),
    "decay_caut": optax.chain(
      adam(), on.add_decoupled_weight_decay(WEIGHT_DECAY, lr, cautious=True, mask=MASK)
    ),
    "cpr": optax.chain(
      adam(), on.cpr(kappa_init_method="warm_start", kappa_init_param=10, mask=MASK)
    ),
    # regularize's clips and freeze against the optax chains that do the same.
    "gclip_ours": on.regularize(adam(), [("**", None)], clip_global_norm=GLOBAL_NORM),
    "gclip_hand": optax.chain(optax.clip_by_global_norm(GLOBAL_NORM), adam()),
    "zclip_ours": on.regularize(adam(), [("**", {"clip_adaptive": True})]),
    "freeze_ours": on.regularize(adam(), [(FROZEN, {"freeze": True}), ("**", None)]),
    "freeze_hand": optax.multi_transform(
      {"train": adam(), "frozen": optax.set_to_zero()},
      on.path_labels({"frozen": FROZEN}, default="train"),
    ),
  }
  # The periodic rows and their every-step twins.
  every1 = {name: name.replace("every100", "every1") for name in txs if name.endswith("every100")}
  variants = {name: loop(tx, after_first_step=name in every1) for name, tx in txs.items()}
  times = _time(variants, args.repeats)
  rows = []
  for name, v in variants.items():
    ratio, between = _ratio_over_period(times, name, "base", steps, every1.get(name))
    rows.append(
      {
        "variant": name,
        "us_per_step": 1e6 * statistics.median(times[name]) / steps,
        "ratio_vs_base": ratio,
        "ratio_between_rankings": between,
        "ratio_vs_hand": (
          _ratio(times, name, name.rsplit("_", 1)[0] + "_hand") if name.endswith("_ours") else None
        ),
        "ratio_vs_adamw": (
          _ratio(times, name, "adamw") if name.startswith(("decay_", "cpr")) else None
        ),
        "compile_s": v.compile_s,
        "kernels": v.kernels,
        "temp_bytes": v.temp_bytes,
      }
    )
  diffs = {
    group: _max_diff(variants[f"{group}_ours"].output[0], variants[f"{group}_hand"].output[0])
    for group in ("l2", "maxnorm", "clip", "all", "gclip", "freeze")
  }
  diffs["l2_optax"] = _max_diff(variants["l2_ours"].output[0], variants["l2_optax"].output[0])
  diffs["decay_lr_adamw"] = _max_diff(variants["decay_lr"].output[0], variants["adamw"].output[0])
  progress.step("mlp")
  return {
    "depth": depth,
    "width": width,
    "batch": batch,
    "n_params": int(sum(p.size for p in jax.tree.leaves(params))),
    "rows": rows,
    "max_abs_diff_vs_hand": diffs,
  }


def _state_bytes(names: Sequence[str]) -> dict[str, dict[str, int]]:
  import jax.numpy as jnp

  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}
  return {
    name: {
      "constant": _nbytes(_ours(name, 0.1).init(params)),
      "scheduled": _nbytes(_scheduled(name).init(params)),
    }
    for name in names
  }


# --------------------------------------------------------------------------------------------
# Report.


def _fmt(x: float | None, spec: str = ".3f") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _kib(x: int | None) -> str:
  return "-" if x is None else f"{x / 1024:.0f}"


def _print_tree(name: str, result: dict[str, Any]) -> None:
  print(
    f"\n## {name}: {result['n_leaves']} leaves, {result['n_params']:,} params; "
    f"copy {result['copy']['us_per_step']:.1f} us/step = "
    f"{result['copy']['gb_per_s']:.1f} GB/s"
  )
  width = max([19] + [len(r["transform"]) + 1 for r in result["rows"]])
  head = (
    f"{'transform':<{width}}{'opt':<5}{'us/step':>9}{'xbase':>7}{'xpeer':>7}{'xhand':>7}"
    f"{'BW%':>5} {'compile s':>11} {'kernels':>11} {'temp KiB':>11}"
  )
  print(head)
  print("-" * len(head))
  for r in result["rows"]:
    c, k, t = r["compile_s"], r["kernels"], r["temp_bytes"]
    c, k, t = ({"hand": None, **x} for x in (c, k, t))
    peer = _fmt(r["ratio_vs_peer"])
    if r["peer_same_math"] is False:
      peer += "*"
    print(
      f"{r['transform']:<{width}}{r['optimizer']:<5}{r['us_per_step']['ours']:>9.1f}"
      f"{_fmt(r['ratio_vs_base']):>7}{peer:>7}{_fmt(r['ratio_vs_hand']):>7}"
      f"{100 * r['bw_fraction']:>5.0f} {c['ours']:>5.2f}/{_fmt(c['hand'], '.2f'):<5}"
      f" {_fmt(k['ours'], 'd'):>3}/{_fmt(k['hand'], 'd'):>3}/{_fmt(k['base'], 'd'):<3}"
      f" {_kib(t['ours']):>5}/{_kib(t['hand']):<5}"
    )


def _print_periodic(rows: list[dict[str, Any]]) -> None:
  for r in rows:
    if r.get("ratio_between_rankings") is not None:
      print(
        f"{r['variant']}: us/step between two rankings ({_fmt(r['ratio_between_rankings'])}x); "
        f"the ratio is over {PERIOD} steps, one of them a ranking step (as in the every-step row)"
      )


def _print_mlp(result: dict[str, Any]) -> None:
  if "skipped" in result:
    print(f"\n## mlp: skipped ({result['skipped']})")
    return
  print(
    f"\n## mlp: Flax Linen {result['depth']}x{result['width']} Dense, batch "
    f"{result['batch']}, adam; {result['n_params']:,} params"
  )
  head = (
    f"{'variant':<18}{'us/step':>10}{'xbase':>8}{'xhand':>8}{'xadamw':>8}{'compile s':>11}"
    f"{'kernels':>9}{'temp KiB':>10}"
  )
  print(head)
  print("-" * len(head))
  for r in result["rows"]:
    print(
      f"{r['variant']:<18}{r['us_per_step']:>10.1f}{_fmt(r['ratio_vs_base']):>8}"
      f"{_fmt(r['ratio_vs_hand']):>8}{_fmt(r.get('ratio_vs_adamw')):>8}"
      f"{r['compile_s']:>11.2f}{r['kernels']:>9}"
      f"{_kib(r['temp_bytes']):>10}"
    )
  _print_periodic(result["rows"])


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The performance targets, evaluated (reported, never asserted)."""
  tol = 1.02
  out = []

  def add(name, values, ok, threshold):
    values = [v for v in values if v is not None]
    if values:
      worst = max(values)
      out.append({"target": name, "worst": worst, "threshold": threshold, "met": ok(worst)})

  rows = [r for t in results["trees"].values() for r in t["rows"]]
  elem = [r for r in rows if r["transform"] in ELEMENTWISE]
  unit = [r for r in rows if r["transform"] in PER_UNIT]
  add(
    "element-wise: ours / unpenalized chain",
    [r["ratio_vs_base"] for r in elem],
    lambda w: w <= tol,
    tol,
  )
  add(
    "element-wise: ours / optax peer", [r["ratio_vs_peer"] for r in elem], lambda w: w <= tol, tol
  )
  unit_tol, constraint_tol = 1.20, 1.5
  add(
    "per-unit: ours / hand-written",
    [r["ratio_vs_hand"] for r in unit],
    lambda w: w <= unit_tol,
    unit_tol,
  )
  add(
    "element-wise constraints: ours / hand-written",
    [r["ratio_vs_hand"] for r in elem if r["transform"].startswith("constrain_")],
    lambda w: w <= constraint_tol,
    constraint_tol,
  )
  mlp = results.get("mlp", {})
  mlp_rows = {r["variant"]: r for r in mlp.get("rows", [])}
  add(
    "whole MLP step, L2 + max-norm + clip: ours / bare adam",
    [mlp_rows["all_ours"]["ratio_vs_base"]] if "all_ours" in mlp_rows else [],
    lambda w: w <= 1.05,
    1.05,
  )
  add(
    "pruning budgets at update_every=100, whole MLP step: ours / bare adam",
    [r["ratio_vs_base"] for k, r in mlp_rows.items() if k.endswith("_every100")],
    lambda w: w <= 1.15,
    1.15,
  )
  add(
    "weight decay, whole MLP step: ours / optax.adamw",
    [r.get("ratio_vs_adamw") for r in mlp.get("rows", [])],
    lambda w: w <= 1.05,
    1.05,
  )
  many = results["trees"].get("many")
  if many:
    add(
      f"compile time of per-unit transforms and constraints on the {many['n_leaves']}-leaf "
      "tree: ours / hand-written",
      [
        r["compile_s"]["ours"] / r["compile_s"]["hand"]
        for r in many["rows"]
        if "hand" in r["compile_s"]
        and (r["transform"] in PER_UNIT or "constrain_" in r["transform"])
      ],
      lambda w: w <= 1.30,
      1.30,
    )
  temp = [
    r["temp_bytes"]["ours"] - r["temp_bytes"]["hand"]
    for r in rows
    if r["temp_bytes"]["ours"] is not None and r["temp_bytes"].get("hand") is not None
  ]
  add("temp bytes: ours - hand-written", temp, lambda w: w <= 0, 0)
  # Transforms that keep state of their own (power-iteration vectors, Adam's moments) are
  # measured but not held to these two targets.
  sb = {
    k: v
    for k, v in results["state_bytes"].items()
    if not by_name(k).stateful and by_name(k).placement != "optimizer"
  }
  add(
    "state bytes, constant hyperparameters",
    [v["constant"] for v in sb.values()],
    lambda w: w == 0,
    0,
  )
  add(
    "state bytes, one schedule (an int32 count)",
    [v["scheduled"] for v in sb.values()],
    lambda w: w <= 4,
    4,
  )
  return out


def _print_targets(targets: list[dict[str, Any]]) -> None:
  print("\n## targets (reported, not asserted)")
  for t in targets:
    worst = t["worst"]
    shown = f"{worst:.3f}" if isinstance(worst, float) else f"{worst}"
    print(
      f"{'MET ' if t['met'] else 'MISS'}  {t['target']}: worst {shown} (target <= {t['threshold']})"
    )


def _run(args: argparse.Namespace) -> dict[str, Any]:
  import jax
  import optax

  import optax_norms

  config = SIZES[args.size]
  device = jax.devices()[0]
  meta = {
    "device": str(device),
    "device_kind": device.device_kind,
    "platform": device.platform,
    "n_devices": jax.device_count(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "optax_norms": optax_norms.__version__,
    "python": platform.python_version(),
    "size": args.size,
    "config": config,
    "steps": args.steps,
    "repeats": args.repeats,
    "transforms": list(args.only),
  }
  print(
    f"optax_norms bench: device {meta['device_kind']} ({meta['platform']}), "
    f"jax {meta['jax']}, optax {meta['optax']}, optax_norms {meta['optax_norms']}"
  )
  print(
    f"size {args.size}, {args.steps} steps per jit-compiled loop, {args.repeats} repeats, "
    f"mask {MASK!r}; ratios are medians of paired, alternated runs"
  )
  tree_names = [t for t in args.trees if t not in ("mlp", "groups", "coupled")]
  total = sum(
    by_name(n).placement != "optimizer" or o == "adam"
    for t in tree_names
    for o in TREE_OPTIMIZERS[t]
    for n in args.only
  )
  total += ("mlp" in args.trees) + 2 * ("groups" in args.trees) + ("coupled" in args.trees)
  progress = _Progress(total, not args.no_progress)
  results: dict[str, Any] = {"meta": meta, "trees": {}}
  try:
    for name, params in _trees(config, tree_names).items():
      results["trees"][name] = _bench_tree(name, params, args, progress)
    if "mlp" in args.trees:
      results["mlp"] = _bench_mlp(config, args, progress)
    if "groups" in args.trees:
      results["groups"] = _bench_groups(config, args, progress)
    if "coupled" in args.trees:
      results["coupled"] = _bench_coupled(config, args, progress)
  finally:
    progress.close()
  results["state_bytes"] = _state_bytes(args.only)
  results["targets"] = _targets(results)
  for name, result in results["trees"].items():
    _print_tree(name, result)
  if "mlp" in results:
    _print_mlp(results["mlp"])
  if "groups" in results:
    _print_groups(results["groups"])
  if "coupled" in results:
    _print_coupled(results["coupled"])
  print("\n## optimizer-state bytes of our transform alone (constant / with one schedule)")
  print(
    "  ".join(f"{k} {v['constant']}/{v['scheduled']}" for k, v in results["state_bytes"].items())
  )
  _print_targets(results["targets"])
  print(
    "\ncolumns: us/step = ours, median; xbase/xpeer/xhand = ours / (no penalty | optax peer "
    "| hand-written jnp); * = the nearest peer, not the same math (adaptive_grad_clip is "
    "relative; for prox_adam, the heuristic adam → prox_l1); "
    "BW% = minimal bytes moved / time, as % of the measured copy; compile = lower+compile "
    "s, ours/hand; kernels = ours/hand/base; temp = XLA temp KiB, ours/hand"
  )
  return results


def _main(args: argparse.Namespace) -> int:
  if args.json:
    try:
      open(args.json, "a").close()
    except OSError as error:
      raise _cli.UsageError(f"cannot write --json {args.json}: {error}") from None
  results = _run(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")
  return 0


def main(argv: list[str]) -> int:
  """Runs the benchmark; returns the exit status.

  Args:
    argv: the arguments after ``bench`` (e.g. ``["--size", "tiny"]``).
  """
  return _cli.run(_PROG, _parse, _main, argv)
