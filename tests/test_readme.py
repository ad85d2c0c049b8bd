"""The README as a user runs it: every ```python block executes, and its numeric claims hold.

Each block is self-contained (its own imports) and runs as written in a fresh interpreter
(a subprocess with a timeout, so blocks share nothing), with rank promotion as an error and
strict dtype promotion, as in tests/conftest.py. optax 0.2.8's own ``adam``/``adamw``
(``decay**count`` in the bias correction) and ``cosine_decay_schedule`` are not strict-clean:
a block whose only strict failure is a ``TypePromotionError`` raised inside optax is run again
under JAX's default ("standard") promotion, and must pass there. Any other failure fails.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT_S = 240

# Runs a script (argv[1]) under `jax_numpy_dtype_promotion` = argv[2]; exit code 3 when the
# script fails only by a TypePromotionError raised inside optax's own code.
RUNNER = textwrap.dedent("""
    import os, sys, traceback
    import jax
    jax.config.update("jax_numpy_dtype_promotion", sys.argv[2])
    jax.config.update("jax_numpy_rank_promotion", "raise")

    def innermost_outside_jax(error):
      frames = [f.filename for f in traceback.extract_tb(error.__traceback__)]
      frames = [f for f in frames if os.sep + "jax" + os.sep not in f
                and os.sep + "jaxlib" + os.sep not in f]
      return frames[-1] if frames else ""

    def chain(error):
      while error is not None:
        yield error
        error = error.__cause__ or error.__context__

    path = sys.argv[1]
    try:
      exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__"})
    except Exception as error:
      traceback.print_exc()
      promotion = [e for e in chain(error) if type(e).__name__ == "TypePromotionError"]
      if promotion and os.sep + "optax" + os.sep in innermost_outside_jax(promotion[-1]):
        sys.exit(3)
      sys.exit(1)
""")


def _python_blocks() -> list[tuple[int, str]]:
  """``(first line number, source)`` of every ```python block of README.md."""
  text = README.read_text()
  blocks = []
  for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.DOTALL | re.MULTILINE):
    line = text.count("\n", 0, match.start()) + 2
    blocks.append((line, match.group(1)))
  return blocks


BLOCKS = _python_blocks()


def _run(
  source: str,
  tmp_path: pathlib.Path,
  name: str,
  promotion: str = "strict",
  env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
  script = tmp_path / f"{name}.py"
  script.write_text(source)
  runner = tmp_path / "_runner.py"
  runner.write_text(RUNNER)
  environ = dict(os.environ, **(env or {}))
  environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + ([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else [])
  )
  environ.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run(
    [sys.executable, str(runner), str(script), promotion],
    cwd=tmp_path,
    env=environ,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def test_readme_has_the_recipes():
  sources = "\n".join(source for _, source in BLOCKS)
  assert len(BLOCKS) >= 4, len(BLOCKS)
  for needle in ("flax.linen", "from flax import nnx", "equinox", "optax.chain"):
    assert needle in sources, needle


@pytest.mark.slow
@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, source, tmp_path):
  name = f"readme_line{line}"
  result = _run(source, tmp_path, name)
  if result.returncode == 3:  # Strict-clean but for optax itself: as a user runs it.
    result = _run(source, tmp_path, name, promotion="standard")
  assert result.returncode == 0, (
    f"README.md block at line {line} failed:\n{source}\n--- stderr ---\n{result.stderr[-4000:]}"
  )


# The README's "factor 2" claim, in the dtypes it names (float64 needs x64: a subprocess).
CLAIM = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    import optax_norms as on

    def updates(tx, g, w):
      return np.asarray(tx.update({"w": g}, tx.init({"w": w}), {"w": w})[0]["w"], np.float64)

    rng = np.random.default_rng(0)
    w64, g64 = rng.normal(size=4096), rng.normal(size=4096)
    for alpha in (1e-4, 0.05, 0.3):
      ours, theirs = on.add_l2_decay(alpha), optax.add_decayed_weights(2 * alpha)
      for dtype in (jnp.float32, jnp.float64):
        w, g = jnp.asarray(w64, dtype), jnp.asarray(g64, dtype)
        assert w.dtype == dtype
        np.testing.assert_array_equal(updates(ours, g, w), updates(theirs, g, w))
      for dtype in (jnp.bfloat16, jnp.float16):
        w = jnp.asarray(w64, dtype)
        for g in (jnp.asarray(g64, dtype), jnp.zeros_like(w)):
          exact = np.asarray(g, np.float64) + 2 * alpha * np.asarray(w, np.float64)
          a, b = updates(ours, g, w), updates(theirs, g, w)
          assert np.all(np.abs(a - exact) <= np.abs(b - exact)), (alpha, dtype)
        # The decay term alone: where they differ, by one ulp.
        a, b = updates(ours, jnp.zeros_like(w), w), updates(theirs, jnp.zeros_like(w), w)
        differ = a != b
        assert 0.1 < differ.mean() < 0.6, (alpha, dtype, differ.mean())
        small = jnp.asarray(np.minimum(np.abs(a), np.abs(b)), dtype)
        ulp = np.asarray(jnp.nextafter(small, jnp.full_like(small, jnp.inf)) - small, np.float64)
        np.testing.assert_array_equal(np.abs(a - b)[differ], ulp[differ])
    print("ok")
""")


@pytest.mark.slow
def test_readme_claim_add_l2_decay_vs_add_decayed_weights(tmp_path):
  result = _run(CLAIM, tmp_path, "claim", env={"JAX_ENABLE_X64": "1"})
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-4000:]
