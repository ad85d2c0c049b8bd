"""``python -m optax_norms demo``: one Flax MLP on scikit-learn digits, once per regularizer.

Trains a Linen MLP (64 → 256 → 256 → 10) on a small, standardized training split of
``load_digits`` (300 samples, so the unregularized model overfits) and the rest as test set,
once per setting, with the same initialization, data and base optimizer
(``optax.sgd(lr, momentum)``, full batch; the ``prox_adam`` setting is Adam itself, with
its proximal L1 step). Prints a table (accuracies, generalization gap,
sparsity, dead units, largest unit norm, total weight norm from
`optax_norms.norm_report`, and the largest step any setting took) and writes three PNG
figures, printing the path of each file it writes. Flax, scikit-learn, matplotlib and tqdm
(the ``[demo]`` extra) are imported only when the demo runs.

There is no timing column: per-setting step times of one short run differ by less than the
run-to-run noise of a shared CPU (penalized runs came out "faster" than none).
``python -m optax_norms bench`` measures what each transform costs, paired and repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from optax_norms.tools import _cli

__all__ = ["SETTINGS", "main"]

_INSTALL_HINT = "install with pip install -e '.[demo]'"
_PROG = "python -m optax_norms demo"
_KERNELS = "**/kernel"

# Base optimizer and data split, shared by every setting.
_LR = 0.05
_MOMENTUM = 0.9
_TRAIN_SIZE = 300
_HIDDEN = (256, 256)
_DEFAULT_STEPS = 600
_EVAL_POINTS = 30


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the demo: a name, the chain it trains with (as text) and its builder."""

  name: str
  chain: str
  build: Callable[[Any, Any], Any]  # (optax, optax_norms) -> GradientTransformation


def _sgd(optax):
  return optax.sgd(_LR, momentum=_MOMENTUM)


# Hyperparameters chosen so that each effect is visible at the default 600 steps.
_MAX_NORM = 0.5
SETTINGS: tuple[Setting, ...] = (
  Setting("none", "sgd", lambda ox, on: _sgd(ox)),
  Setting(
    "l2",
    "add_l2_decay(3e-3) → sgd",
    lambda ox, on: ox.chain(on.add_l2_decay(3e-3, mask=_KERNELS), _sgd(ox)),
  ),
  Setting(
    "l1",
    "add_l1_decay(3e-4) → sgd",
    lambda ox, on: ox.chain(on.add_l1_decay(3e-4, mask=_KERNELS), _sgd(ox)),
  ),
  Setting(
    "prox_l1",
    "sgd → prox_l1(3e-3, lr)",
    lambda ox, on: ox.chain(_sgd(ox), on.prox_l1(3e-3, _LR, mask=_KERNELS)),
  ),
  Setting(
    "elastic",
    "sgd → prox_elastic(3e-3, 3e-3, lr)",
    lambda ox, on: ox.chain(_sgd(ox), on.prox_elastic(3e-3, 3e-3, _LR, mask=_KERNELS)),
  ),
  Setting(
    "group",
    "sgd → prox_group_l2(5e-2, lr)",
    lambda ox, on: ox.chain(_sgd(ox), on.prox_group_l2(5e-2, _LR, mask=_KERNELS)),
  ),
  Setting(
    "prox_adam",
    "prox_adam(1e-3, l1=3e-4)",
    lambda ox, on: on.prox_adam(1e-3, l1=3e-4, mask=_KERNELS),
  ),
  Setting(
    "2:4",
    "sgd → constrain_n_of_m(2, 4)",
    lambda ox, on: ox.chain(_sgd(ox), on.constrain_n_of_m(2, 4, mask=_KERNELS)),
  ),
  Setting(
    "maxnorm",
    f"sgd → constrain_row_norm({_MAX_NORM})",
    lambda ox, on: ox.chain(_sgd(ox), on.constrain_row_norm(_MAX_NORM, mask=_KERNELS)),
  ),
  Setting(
    "clip_row",
    "clip_by_row_norm(0.05) → sgd",
    lambda ox, on: ox.chain(on.clip_by_row_norm(0.05, mask=_KERNELS), _sgd(ox)),
  ),
  Setting(
    "clip_abs",
    "clip_by_max_abs(0.005) → sgd",
    lambda ox, on: ox.chain(on.clip_by_max_abs(0.005, mask=_KERNELS), _sgd(ox)),
  ),
)
_BY_NAME = {s.name: s for s in SETTINGS}

_COLUMNS = (
  ("setting", "{:<9}"),
  ("train acc", "{:>9.3f}"),
  ("test acc", "{:>8.3f}"),
  ("gap", "{:>6.3f}"),
  ("zero frac", "{:>9.3f}"),
  ("dead units", "{:>10d}"),
  ("max unit norm", "{:>13.3f}"),
  ("total L2", "{:>8.2f}"),
  ("max |Δw|", "{:>8.4f}"),
  ("max unit Δw", "{:>11.4f}"),
)
# Over the whole run and all kernels: "max |Δw|" is the largest change of one weight in one
# step, "max unit Δw" the largest change of one unit (a kernel column) in one step, in norm.
# clip_abs bounds the first, clip_row the second (with momentum β: by lr·c/(1−β)).


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = _cli.Parser(
    prog=_PROG,
    description=(
      "Train one Flax MLP on scikit-learn digits once per regularizer; print a table "
      "and write figures."
    ),
    epilog="settings:\n" + "\n".join(f"  {s.name:<9} {s.chain}" for s in SETTINGS),
  )
  parser.add_argument("--out", default="optax_norms_demo", help="folder for the PNG figures")
  parser.add_argument(
    "--steps",
    type=_cli.positive_int,
    default=_DEFAULT_STEPS,
    help="full-batch training steps per setting",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the split and the init")
  parser.add_argument(
    "--settings",
    default="all",
    help="comma-separated names of the settings listed below, or 'all'",
  )
  args = parser.parse_args(argv)
  if args.seed < 0:
    raise _cli.UsageError(f"--seed must be non-negative, got {args.seed}")
  everything = args.settings.strip() == "all"
  args.settings = (
    list(_BY_NAME) if everything else _cli.names(args.settings, _BY_NAME, "--settings")
  )
  return args


def _import_extras() -> dict[str, Any]:
  """Imports the [demo] extras; raises ImportError naming the first one missing."""
  import matplotlib

  matplotlib.use("Agg")
  import flax.linen as nn
  import matplotlib.pyplot as plt
  import sklearn.datasets
  import tqdm

  return {"nn": nn, "plt": plt, "datasets": sklearn.datasets, "tqdm": tqdm}


def _load_data(datasets, seed: int):
  import numpy as np

  digits = datasets.load_digits()
  x, y = digits.data.astype(np.float64), digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  train, test = order[:_TRAIN_SIZE], order[_TRAIN_SIZE:]
  mean, std = x[train].mean(0), x[train].std(0)
  std = np.where(std > 0, std, 1.0)
  x = ((x - mean) / std).astype(np.float32)
  return x[train], y[train], x[test], y[test]


def _make_model(nn):
  class MLP(nn.Module):
    """64 → 256 → 256 → 10, ReLU."""

    @nn.compact
    def __call__(self, x):
      for width in _HIDDEN:
        x = nn.relu(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  return MLP()


def _train_one(setting, model, params0, data, steps, progress) -> dict[str, Any]:
  """Trains one setting; returns final params, curves and seconds per step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import optax_norms

  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
  tx = setting.build(optax, optax_norms)

  def loss_fn(params):
    logits = model.apply({"params": params}, x_tr)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y_tr).mean()

  def metrics(params):
    train_logits = model.apply({"params": params}, x_tr)
    test_logits = model.apply({"params": params}, x_te)
    return {
      "train_loss": optax.softmax_cross_entropy_with_integer_labels(train_logits, y_tr).mean(),
      "train_acc": jnp.mean(jnp.argmax(train_logits, -1) == y_tr),
      "test_acc": jnp.mean(jnp.argmax(test_logits, -1) == y_te),
    }

  def run(params, opt_state, n):
    """`n` full-batch steps (a traced count: one compilation serves every chunk)."""

    def body(_, carry):
      params, opt_state, max_step = carry
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      new = optax.apply_updates(params, updates)
      deltas = [a - b for a, b in zip(_leaves(new), _leaves(params), strict=True)]
      step = jnp.stack(
        [
          jnp.max(jnp.stack([jnp.max(jnp.abs(d)) for d in deltas])),
          jnp.max(jnp.stack([jnp.max(jnp.sqrt(jnp.sum(jnp.square(d), axis=0))) for d in deltas])),
        ]
      )
      return new, opt_state, jnp.maximum(max_step, step)

    return jax.lax.fori_loop(0, n, body, (params, opt_state, jnp.zeros(2, jnp.float32)))

  def _leaves(params):  # The kernels: what the mask of every setting selects.
    return [leaf for _, leaf in _kernels(params)]

  params, opt_state = params0, tx.init(params0)
  steps_fn = jax.jit(run).lower(params, opt_state, jnp.int32(1)).compile()
  metrics_fn = jax.jit(metrics).lower(params).compile()
  curve = {"step": [0], **{k: [float(v)] for k, v in metrics_fn(params).items()}}
  chunk = max(1, -(-steps // _EVAL_POINTS))
  done, max_step = 0, np.zeros(2)
  while done < steps:
    n = min(chunk, steps - done)
    params, opt_state, chunk_max = steps_fn(params, opt_state, jnp.int32(n))
    max_step = np.maximum(max_step, np.asarray(chunk_max))
    done += n
    curve["step"].append(done)
    for key, value in jax.device_get(metrics_fn(params)).items():
      curve[key].append(float(value))
    progress.update(n)
  return {
    "params": params,
    "curve": {k: np.asarray(v) for k, v in curve.items()},
    "max_step": max_step,
  }


def _row(name: str, result: dict[str, Any]) -> dict[str, Any]:
  import numpy as np

  import optax_norms

  report = optax_norms.norm_report(result["params"], mask=_KERNELS)
  sizes = {path: np.size(leaf) for path, leaf in _kernels(result["params"])}
  zeros = sum(float(r["zero_fraction"]) * sizes[p] for p, r in report.items())
  curve = result["curve"]
  train_acc, test_acc = float(curve["train_acc"][-1]), float(curve["test_acc"][-1])
  return {
    "setting": name,
    "train acc": train_acc,
    "test acc": test_acc,
    "gap": train_acc - test_acc,
    "zero frac": zeros / sum(sizes.values()),
    "dead units": int(sum(float(r["dead_units"]) for r in report.values())),
    "max unit norm": max(float(r["max_unit_norm"]) for r in report.values()),
    "total L2": float(np.sqrt(sum(float(r["l2"]) ** 2 for r in report.values()))),
    "max |Δw|": float(result["max_step"][0]),
    "max unit Δw": float(result["max_step"][1]),
  }


def _kernels(params) -> list[tuple[str, Any]]:
  import jax

  import optax_norms

  paths = optax_norms.tree_paths(params)
  leaves = jax.tree_util.tree_leaves(params)
  pairs = zip(paths, leaves, strict=True)
  return [(p, leaf) for p, leaf in pairs if p.split("/")[-1] == "kernel"]


def _table(rows: list[dict[str, Any]]) -> str:
  widths = [max(len(name), len(fmt.format(rows[0][name]))) for name, fmt in _COLUMNS]
  header = "  ".join(
    name.ljust(w) if i == 0 else name.rjust(w)
    for i, ((name, _), w) in enumerate(zip(_COLUMNS, widths, strict=True))
  )
  lines = [header, "-" * len(header)]
  for row in rows:
    cells = (
      fmt.format(row[name]).ljust(w) if i == 0 else fmt.format(row[name]).rjust(w)
      for i, ((name, fmt), w) in enumerate(zip(_COLUMNS, widths, strict=True))
    )
    lines.append("  ".join(cells))
  return "\n".join(lines)


def _figures(plt, results: dict[str, dict[str, Any]], rows, out: str) -> list[str]:
  import numpy as np

  names = list(results)
  # Distinct colours for up to 20 settings (tab10 repeats after ten).
  palette = plt.get_cmap("tab20")
  colors = lambda i: palette((2 * i) % 20 + (i // 10) % 2)  # noqa: E731
  files = []

  # Weight histograms, one panel per setting, log counts so the spike at 0 and the tails show.
  cols = min(3, len(names))
  nrows = -(-len(names) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
  values = {
    n: np.concatenate([np.ravel(np.asarray(k)) for _, k in _kernels(results[n]["params"])])
    for n in names
  }
  bound = max(float(np.max(np.abs(v))) for v in values.values())
  bins = np.linspace(-bound, bound, 81)
  for ax, name in zip(axes.flat, names, strict=False):
    w = values[name]
    ax.hist(w, bins=bins, color=colors(names.index(name)), log=True)
    ax.set_title(f"{name}: {np.mean(w == 0):.0%} exact zeros", fontsize=9)
    ax.set_xlabel("kernel weight value", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes[:, 0]:
    ax.set_ylabel("count (log)", fontsize=8)
  for ax in list(axes.flat)[len(names) :]:
    ax.axis("off")
  fig.suptitle("Kernel weights after training", fontsize=10)
  fig.tight_layout()
  files.append(_save(fig, plt, out, "weights_hist.png"))

  # Summary: one panel per question (test accuracy, generalization gap, exact zeros), settings
  # on a shared vertical axis so the labels read horizontally; values printed on the bars.
  fig, axes3 = plt.subplots(1, 3, figsize=(12, 0.42 * len(rows) + 1.6), sharey=True)
  pos = np.arange(len(rows))[::-1]
  panels = (
    ("test acc", "Test accuracy", "{:.3f}"),
    ("gap", "Generalization gap (train − test)", "{:.3f}"),
    ("zero frac", "Fraction of exact zeros in the kernels", "{:.2f}"),
  )
  for ax, (key, title, fmt) in zip(axes3, panels, strict=True):
    values = [r[key] for r in rows]
    bars = ax.barh(pos, values, 0.7, color=[colors(i) for i in range(len(rows))])
    ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=9, padding=3)
    ax.set_title(title, fontsize=11)
    ax.tick_params(labelsize=10)
    top = max(values) if max(values) > 0 else 1.0
    if key == "test acc":  # Zoomed on the spread of accuracies, never past 1.
      ax.set_xlim(max(0.0, min(values) - 0.05), min(1.0, top + 0.03))
    else:
      ax.set_xlim(0, top * 1.25)
  axes3[0].set_yticks(pos, [r["setting"] for r in rows], fontsize=10)
  fig.tight_layout()
  files.append(_save(fig, plt, out, "summary.png"))

  # Learning curves, one panel per setting (each against the unpenalized run in grey when
  # there is one): training loss on the left axis, test accuracy on the right one.
  reference = "none" if "none" in names else None
  cols = min(4, len(names))
  nrows = -(-len(names) // cols)
  fig, grid = plt.subplots(
    nrows, cols, figsize=(3.4 * cols, 2.6 * nrows), squeeze=False, sharex=True, sharey=True
  )
  low = max(0.0, min(r["test acc"] for r in rows) - 0.1)
  for i, (ax, name) in enumerate(zip(grid.flat, names, strict=False)):
    curve = results[name]["curve"]
    acc = ax.twinx()
    if reference is not None and name != reference:
      base = results[reference]["curve"]
      ax.plot(base["step"], base["train_loss"], color="0.7", lw=1.2)
      acc.plot(base["step"], base["test_acc"], color="0.7", lw=1.2, ls="--")
    ax.plot(curve["step"], curve["train_loss"], color=colors(i), lw=1.6)
    acc.plot(curve["step"], curve["test_acc"], color=colors(i), lw=1.6, ls="--")
    ax.set_yscale("log")
    acc.set_ylim(low, 1.0)
    acc.tick_params(labelsize=8)
    if (i + 1) % cols and i + 1 != len(names):
      acc.set_yticklabels([])
    ax.set_title(f"{name}: test acc {curve['test_acc'][-1]:.3f}", fontsize=10)
    ax.tick_params(labelsize=8)
  for ax in grid[:, 0]:
    ax.set_ylabel("train cross-entropy (log, —)", fontsize=9)
  for ax in grid[-1, :]:
    ax.set_xlabel("step", fontsize=9)
  for ax in list(grid.flat)[len(names) :]:
    ax.axis("off")
  grey = f"; grey: {reference}" if reference is not None else ""
  fig.suptitle(f"Training loss (solid) and test accuracy (dashed, right axis){grey}", fontsize=11)
  fig.tight_layout()
  files.append(_save(fig, plt, out, "curves.png"))
  return files


def _save(fig, plt, out: str, name: str) -> str:
  path = os.path.join(out, name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _run(args: argparse.Namespace, extras: dict[str, Any]) -> int:
  import jax
  import jax.numpy as jnp

  data = _load_data(extras["datasets"], args.seed)
  model = _make_model(extras["nn"])
  params0 = model.init(jax.random.key(args.seed), jnp.zeros((1, data[0].shape[1])))["params"]
  settings = [_BY_NAME[n] for n in args.settings]
  results: dict[str, dict[str, Any]] = {}
  with extras["tqdm"].tqdm(
    total=len(settings) * args.steps,
    desc="training",
    unit="step",
    file=sys.stderr,
    dynamic_ncols=True,
  ) as progress:
    for setting in settings:
      progress.set_postfix_str(setting.name)
      results[setting.name] = _train_one(setting, model, params0, data, args.steps, progress)
  rows = [_row(n, r) for n, r in results.items()]
  print(
    f"digits: {len(data[1])} train / {len(data[3])} test samples, MLP 64-"
    f"{'-'.join(map(str, _HIDDEN))}-10, {args.steps} full-batch steps of "
    f"sgd(lr={_LR}, momentum={_MOMENTUM}), seed {args.seed}. Norm columns over the kernels "
    f"(mask '{_KERNELS}'); max |Δw|: the largest change of one weight in one step, max unit Δw: "
    "of one unit (kernel column, in norm)."
  )
  print(_table(rows))
  print()
  for s in settings:
    print(f"  {s.name:<9} {s.chain}")
  names = ("weights_hist.png", "summary.png", "curves.png")
  existed = {n for n in names if os.path.exists(os.path.join(args.out, n))}
  files = _figures(extras["plt"], results, rows, args.out)
  print()
  for path in files:
    note = " (replaced the existing file)" if os.path.basename(path) in existed else ""
    print(f"wrote {path}{note}")
  return 0


def _main(args: argparse.Namespace) -> int:
  try:
    extras = _import_extras()
  except ImportError as error:
    missing = getattr(error, "name", None) or str(error)
    print(f"optax_norms demo needs {missing}: {_INSTALL_HINT}", file=sys.stderr)
    return 1
  try:  # Before training, so that a bad --out fails at once.
    os.makedirs(args.out, exist_ok=True)
    probe = os.path.join(args.out, ".optax_norms_demo_write_test")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as error:
    print(
      f"{_PROG}: error: cannot write to --out {args.out!r}: {error.strerror}",
      file=sys.stderr,
    )
    return 1
  return _run(args, extras)


def main(argv: list[str] | None = None) -> int:
  """Runs the demo; returns the process exit status.

  Args:
    argv: the arguments after ``demo`` (``--out``, ``--steps``, ``--seed``, ``--settings``).
  """
  return _cli.run(_PROG, _parse, _main, sys.argv[1:] if argv is None else argv)
