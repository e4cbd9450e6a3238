"""Activation quantization fused into the norm + modulation: optimised HLO, sharing, numerics."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import reference
from s2q_jax import deploy, fused_quant, quant
from s2q_jax.job_config import base_config
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D
from s2q_jax.pretrained import load_pretrained
from s2q_jax.models.cogvideox import CogVideoXBlock

CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=32, in_channels=3, out_channels=3,
                      time_embed_dim=32, text_embed_dim=24, num_layers=1, sample_width=16,
                      sample_height=16, sample_frames=5, patch_size=4, max_text_seq_length=6,
                      use_rotary_positional_embeddings=True)
VIDEO, TEXT, DIM = 200, 6, 64  # tokens of each part, hidden size


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  model = CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))
  quant.quantize_model(model, quant.rules_from_config(base_config(4, 6, "rtn").quant,
                                                       model.quant_defaults()))
  quant.freeze_all(model)
  deploy.round_fp_params(model)
  path = str(tmp_path_factory.mktemp("w4a6"))
  deploy.export_quantized(model, path)
  return model, path


def _model(path, fuse=True, dtype=jnp.bfloat16):
  return load_pretrained(path, dtype=dtype, backend="xla_int8", fuse_act_quant=fuse)


def _block(path, fuse=True, dtype=jnp.bfloat16):
  return _model(path, fuse, dtype).transformer_blocks[0]


@functools.cache
def _compiled(path, fuse, dtype):
  """(jitted forward, state) of a block no test modifies; loaded and compiled once."""
  return _forward(_block(path, fuse, dtype))


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((1, VIDEO, DIM)), dtype),
          jnp.asarray(rng.standard_normal((1, TEXT, DIM)), dtype),
          jnp.asarray(rng.standard_normal((1, 32)), dtype))


def _forward(block):
  graphdef, state = nnx.split(block)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)), state


def _entry(hlo: str) -> dict[str, tuple[str, int, str, list[str]]]:
  """ENTRY instructions of optimised HLO: name → (dtype, elements, opcode, operand names)."""
  out = {}
  for line in hlo[hlo.index("\nENTRY"):].splitlines()[1:]:
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w+)\((.*)", line)
    if m:
      name, dtype, dims, op, rest = m.groups()
      size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
      out[name] = (dtype, size, op, re.findall(r"%([\w.\-]+)", rest.split("), ")[0]))
  return out


def _attention_codes(hlo: str) -> tuple[dict, list[str]]:
  """(entry, names of the instructions writing the int8 codes that q, k and v multiply)."""
  entry = _entry(hlo)
  weights = [n for n, (_, _, op, _) in entry.items() if op == "parameter" and
             re.search(r"attn1_+to_[qkv]_+data", n)]
  assert len(weights) == 3, weights
  codes = {x for _, _, _, operands in entry.values() if set(weights) & set(operands)
           for x in operands if entry[x][0] == "s8" and entry[x][1] == (VIDEO + TEXT) * DIM}
  return entry, sorted(codes)


def _stored_between(entry: dict, codes: str) -> list[str]:
  """Full-size float buffers the codes are computed from, other than the block's inputs."""
  return [x for x in entry[codes][3] if entry[x][0] in ("bf16", "f32")
          and entry[x][1] >= VIDEO * DIM and entry[x][2] != "parameter"]


def test_codes_are_written_by_the_norm_and_modulation_fusion(checkpoint):
  """Optimised CPU HLO of a bf16 block: the fusion that writes q/k/v's int8 codes reads
  the block's inputs and per-token statistics, no stored modulated activations. The
  plain block (norm + modulation, concatenation, then quantization) fails the check."""
  _, path = checkpoint
  args = _inputs(jnp.bfloat16)
  for fused in (True, False):
    fn, state = _compiled(path, fused, jnp.bfloat16)
    entry, codes = _attention_codes(fn.lower(state, *args).compile().as_text())
    assert len(codes) == 1, codes  # q, k and v quantize alike: one set of codes
    stored = _stored_between(entry, codes[0])
    if fused:
      assert not stored, [(s, entry[s][:2]) for s in stored]
    else:  # the concatenated, modulated bf16 activations
      assert stored, "the unfused block should store the modulated activations"


def test_identical_quantizers_share_codes_learned_ones_do_not(checkpoint):
  _, path = checkpoint
  block = _block(path)
  assert isinstance(block, fused_quant.FusedCogVideoXBlock)
  shared = _rounds(block)
  # The two modulation linears (W8A8 by the job's rules), one set of codes for q, k and v
  # and one for FF1 on each part (text, video), to_out and FF2.
  assert shared == 2 + 2 + 2 + 1 + 1
  block.attn1.to_q.act_clip = deploy.Deployed(jnp.full((1,), 0.8, jnp.float32))
  assert _rounds(block) == shared + 2  # to_q's learned clip: its own codes, for each part


def _rounds(block) -> int:
  """Activation quantizations (`round`s) in a forward of `block`, nested jits included."""
  graphdef, state = nnx.split(block)
  jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *_inputs(jnp.bfloat16))
  def count(j):
    n = 0
    for e in j.eqns:
      n += e.primitive.name == "round"
      for p in e.params.values():  # nested jits (pjit's "jaxpr" parameter)
        if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
          n += count(p.jaxpr)
    return n
  return count(jaxpr.jaxpr)


def test_codes_equal_quantizing_the_joined_tokens():
  rng = np.random.default_rng(1)
  parts = [jnp.asarray(rng.standard_normal((2, s, 48)) * rng.uniform(0.1, 9, (2, s, 1)),
                       jnp.float32) for s in (5, 11)]
  joined = jnp.concatenate(parts, axis=1)
  tokens = fused_quant.ModulatedTokens(parts, jnp.float32, lambda: joined)
  quantize = lambda x: reference.quantize_activations(x, 6, 0.9)
  codes, scales = tokens.quantized(("k",), quantize)
  ref_codes, ref_scales = quantize(joined)
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_array_equal(scales, ref_scales)
  assert tokens.quantized(("k",), None)[0] is codes  # cached per key
  assert tokens.shape == joined.shape


def test_fused_block_equals_the_plain_deployed_block(checkpoint):
  """float32: the same modulation and integer math, so the same outputs up to float
  rounding; bf16: the fused codes quantize the float32 modulation (not its bf16
  rounding), so the block is no farther from the float32 fake-quant block."""
  model, path = checkpoint
  args = _inputs(jnp.float32)
  want = model.transformer_blocks[0](*args)[0]
  outputs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    for fuse in (True, False):
      fn, state = _compiled(path, fuse, dtype)
      outputs[dtype, fuse] = fn(state, *(a.astype(dtype) for a in args))[0].astype(jnp.float32)
  fused, plain = outputs[jnp.float32, True], outputs[jnp.float32, False]
  np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-4 * float(jnp.abs(plain).max()))
  np.testing.assert_allclose(plain, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  err = lambda fuse: float(jnp.linalg.norm(outputs[jnp.bfloat16, fuse] - want))
  assert err(True) <= 1.05 * err(False), (err(True), err(False))


def test_blocks_with_an_unquantized_consumer_are_left_alone(checkpoint):
  _, path = checkpoint
  assert isinstance(load_pretrained(path).transformer_blocks[0], fused_quant.FusedCogVideoXBlock)
  model = _model(path, fuse=False)
  assert type(model.transformer_blocks[0]) is CogVideoXBlock
  model.transformer_blocks[0].ff.proj_in.a_bits = None  # weight-only: takes float inputs
  assert fused_quant.fuse_activation_quantization(model) == 0
  model.transformer_blocks[0].ff.proj_in.a_bits = 6
  assert fused_quant.fuse_activation_quantization(model) == 1
  assert isinstance(model.transformer_blocks[0], fused_quant.FusedCogVideoXBlock)
