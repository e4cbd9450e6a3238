"""CPU attention in query tiles (long sequences) equals the one-piece attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.models import attention
from s2q_jax.models.attention import dot_product_attention, tiled_attention


def _inputs(dtype, s_q=40, s_k=None, b=2, h=3, d=16, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(b, h, s_q, d), (b, h, s_k or s_q, d), (b, h, s_k or s_q, d)]
  return [jnp.asarray(3 * rng.standard_normal(s), dtype) for s in shapes]


def _reference(q, k, v):
  return jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
                                      implementation="xla").swapaxes(1, 2)


def _grads(f, q, k, v):
  loss = lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))  # noqa: E731
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=tol, atol=tol)


def _before(q, k, v):
  """The CPU attention as it was before tiling, verbatim: the small case must stay this."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("s_q, s_k, tile", [(40, 40, 7), (40, 40, 16), (40, 40, 40),
                                            (40, 40, 1), (37, 23, 8), (5, 64, 64)])
def test_tiled_attention_matches_jax_and_its_gradient(dtype, tol, s_q, s_k, tile):
  q, k, v = _inputs(dtype, s_q, s_k)
  tiled = jax.jit(lambda q, k, v: tiled_attention(q, k, v, tile=tile))
  out = tiled(q, k, v)
  assert out.shape == q.shape and out.dtype == dtype
  _close(out, _reference(q, k, v), tol)
  (value, got), (want_value, want) = _grads(tiled, q, k, v), _grads(_reference, q, k, v)
  _close(value, want_value, 10 * tol * s_q)
  for g, w in zip(got, want):
    _close(g, w, 10 * tol)
  # And the one-piece CPU path (the same arithmetic per query, another summation order).
  (_, got), (_, want) = _grads(tiled, q, k, v), _grads(attention._attention, q, k, v)
  _close(out, attention._attention(q, k, v), tol)
  for g, w in zip(got, want):
    _close(g, w, 10 * tol)


def test_large_maps_go_through_tiles(monkeypatch):
  q, k, v = _inputs(jnp.float32, 40)
  tiles = []
  real = attention.tiled_attention
  monkeypatch.setattr(attention, "tiled_attention",
                      lambda *a, tile: tiles.append(tile) or real(*a, tile=tile))
  # Budget for 6 queries: 2 × 3 heads × 40 keys × 4 bytes per query.
  monkeypatch.setattr(attention, "MAX_MAP_BYTES", 6 * 2 * 3 * 40 * 4)
  _close(dot_product_attention(q, k, v), _reference(q, k, v), 1e-5)
  assert tiles == [6]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_small_maps_are_bit_identical_to_before(monkeypatch, dtype):
  # The embedded model's shape (4 heads × 32, 520 tokens) at a batch of 8: one piece, the
  # same arithmetic as before tiling, so none of its measured results move.
  monkeypatch.setattr(attention, "tiled_attention", None)  # would fail if called
  q, k, v = _inputs(dtype, 520, b=8, h=4, d=32)
  for jit in (lambda f: f, jax.jit):
    np.testing.assert_array_equal(np.asarray(jit(dot_product_attention)(q, k, v), np.float32),
                                  np.asarray(jit(_before)(q, k, v), np.float32))
    (value, got), (want_value, want) = (_grads(jit(dot_product_attention), q, k, v),
                                        _grads(jit(_before), q, k, v))
    assert float(value) == float(want_value)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_tiled_backward_memory_is_far_below_one_piece():
  q, k, v = _inputs(jnp.float32, 2048, b=1, h=4, d=32)

  def temp_bytes(f):
    step = jax.jit(lambda q, k, v: _grads(f, q, k, v))
    stats = step.lower(q, k, v).compile().memory_analysis()
    return None if stats is None else getattr(stats, "temp_size_in_bytes", None)

  plain = temp_bytes(attention._attention)
  tiled = temp_bytes(lambda q, k, v: tiled_attention(q, k, v, tile=64))
  if plain is None or tiled is None:
    pytest.skip("no compiled memory statistics on this backend")
  one_map = 4 * 2048 * 2048 * 4  # (B, H, S, S) float32
  assert plain >= one_map  # the one-piece backward holds at least one full map
  assert tiled < one_map / 4, (plain, tiled)  # and the tiled one not even a quarter of one
