"""`auto`: measured choice per device and shape, its disk cache, pinning, and CPU behaviour.

Timings are faked (`autotune._time`) so the choice is deterministic; the output
check against `reference` runs for real.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import autotune, quantize_weight, resolve_backend, w4a6_matmul
from pallas_kernels.autotune import Choice

GPU_TILES = dict(block_m=32, block_n=32, block_k=64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  path = tmp_path / "autotune.json"
  monkeypatch.setenv(autotune.CACHE_ENV, str(path))
  monkeypatch.delenv(autotune.PIN_ENV, raising=False)
  return path


@pytest.fixture
def fake_device(monkeypatch):
  """Pretends this is an accelerator with two candidates, timed as `seconds` says."""
  seconds, timed = {"xla_int8": 1.0, "interpret": 0.5}, []
  monkeypatch.setattr(autotune, "candidates",
                      lambda platform: [Choice("xla_int8"), Choice("interpret", GPU_TILES)])

  def fake_time(choice, problem, args):
    timed.append((choice.backend, problem.m))
    return seconds[choice.backend]
  monkeypatch.setattr(autotune, "_time", fake_time)
  return seconds, timed


def _case(m=40, k=128, n=64, dtype=jnp.bfloat16):
  rng = np.random.default_rng(m)
  return (jnp.asarray(rng.standard_normal((m, k)), dtype),
          quantize_weight(rng.standard_normal((k, n)) * 0.05, 4).unpacked())


def test_cpu_auto_is_xla_int8_without_measuring(cache, monkeypatch):
  monkeypatch.setattr(autotune, "_time", lambda *a: pytest.fail("measured on CPU"))
  x, qw = _case()
  assert resolve_backend("auto") == "xla_int8"
  out = w4a6_matmul(x, qw, backend="auto")
  np.testing.assert_array_equal(out, w4a6_matmul(x, qw, backend="xla_int8"))
  assert not cache.exists()


def test_first_call_measures_then_the_cache_answers(cache, fake_device):
  seconds, timed = fake_device
  x, qw = _case()
  ref = w4a6_matmul(x, qw, backend="reference")
  out = w4a6_matmul(x, qw, backend="auto")
  assert sorted(timed) == [("interpret", 40), ("xla_int8", 40)]
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8)
  (key, entry), = json.loads(cache.read_text()).items()
  assert f"jax {jax.__version__}" in key and "40x128x64" in key and "w4 int8" in key
  assert "a6" in key and "bfloat16->bfloat16" in key and jax.devices()[0].device_kind in key
  assert entry["backend"] == "interpret" and entry["tiles"] == GPU_TILES
  assert entry["seconds"] == {"xla_int8": 1.0, f"interpret {GPU_TILES}": 0.5}
  # Second call: read from the cache, even though the timings would now say otherwise.
  seconds["interpret"] = 9.0
  w4a6_matmul(x, qw, backend="auto")
  assert len(timed) == 2
  # Another shape is another problem.
  x2, _ = _case(m=7)
  w4a6_matmul(x2[:, :128], qw, backend="auto")
  assert len(timed) == 4 and len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("kernel_seconds,expected", [(0.5, "interpret"), (0.99, "xla_int8"),
                                                     (2.0, "xla_int8")])
def test_a_kernel_must_clearly_beat_xla_int8(cache, fake_device, kernel_seconds, expected):
  seconds, _ = fake_device
  seconds["interpret"] = kernel_seconds
  x, qw = _case()
  problem = autotune.Problem(40, 128, 64, 4, False, 6, "bfloat16", "bfloat16")
  assert autotune.choose(problem).backend == expected
  assert resolve_backend("auto", problem) == expected


def test_a_candidate_with_wrong_output_is_never_chosen(cache, fake_device, monkeypatch):
  real_run = autotune._run

  def broken_run(choice, problem, *args):
    out = real_run(choice, problem, *args)
    return out + 1 if choice.backend == "interpret" else out
  monkeypatch.setattr(autotune, "_run", broken_run)
  problem = autotune.Problem(40, 128, 64, 4, True, 6, "float32", "float32")
  assert autotune.choose(problem).backend == "xla_int8"
  entry, = json.loads(cache.read_text()).values()
  assert "differs from reference" in entry["errors"][f"interpret {GPU_TILES}"]


def test_autotune_runs_while_an_outer_jit_traces(cache, fake_device):
  x, qw = _case(m=24)
  out = jax.jit(lambda x, qw: w4a6_matmul(x, qw, backend="auto"))(x, qw)
  ref = w4a6_matmul(x, qw, backend="reference")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8)
  entry, = json.loads(cache.read_text()).values()
  assert entry["backend"] == "interpret" and not entry["errors"]  # both candidates really ran


def test_pinning(cache, fake_device, monkeypatch):
  _, timed = fake_device
  monkeypatch.setenv(autotune.PIN_ENV, "reference")
  x, qw = _case()
  assert resolve_backend("auto") == "reference"
  w4a6_matmul(x, qw, backend="auto")
  assert not timed and not cache.exists()
  monkeypatch.setenv(autotune.PIN_ENV, "cuda")
  with pytest.raises(ValueError, match="S2Q_KERNEL_BACKEND"):
    w4a6_matmul(x, qw, backend="auto")
  # An explicit back-end is a pin of its own: neither the variable nor measuring apply.
  w4a6_matmul(x, qw, backend="xla_int8")
  assert not timed


def test_unreadable_cache_is_measured_again(cache, fake_device):
  _, timed = fake_device
  cache.write_text("{not json")
  x, qw = _case()
  with pytest.warns(UserWarning, match="unreadable autotune cache"):
    w4a6_matmul(x, qw, backend="auto")
  assert len(timed) == 2 and len(json.loads(cache.read_text())) == 1


def test_real_timer_gives_positive_seconds():
  x, qw = _case(m=16)
  problem = autotune.Problem(16, 128, 64, 4, False, 6, "bfloat16", "bfloat16")
  args = (x, qw, jnp.zeros(64, jnp.float32))
  assert 0 < autotune._time(Choice("xla_int8"), problem, args) < 10
