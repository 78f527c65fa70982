import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq.io import diffusers_dit
from diffq.models import dit, layers
from diffq.seam import spec as spec_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def n_params(cfg):
  shapes = jax.eval_shape(lambda: dit.init_params(cfg, jax.random.key(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,millions", [("DiT-XL/2", 675), ("DiT-L/2", 458), ("DiT-B/2", 130), ("DiT-S/2", 33),
                                           ("DiT-XL/8", 676)])
def test_preset_parameter_counts_match_paper(name, millions):
  # DiT Table 4 (params exclude the fixed positional embedding, as here). XL/8 has a larger patch/out layer.
  assert round(n_params(dit.preset(name)) / 1e6) == millions


def test_adaln_zero_init_outputs_zero():
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  params = dit.init_params(cfg, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
  out = dit.DiT(config=cfg).apply({"params": params}, x, jnp.array([3, 900]), jnp.array([1, 10]))
  assert out.shape == (2, 32, 32, 2)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_patchify_unpatchify_round_trip_and_order():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  tokens = dit.patchify(x, 4)
  assert tokens.shape == (2, 4, 48)
  # token 1 is the top-right 4x4 patch; its features are (row, col, channel)-ordered
  np.testing.assert_array_equal(tokens[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])
  np.testing.assert_array_equal(dit.unpatchify(tokens, 4, 3), x)


def test_sincos_positions_match_formula():
  d, g = 16, 3
  pe = dit.sincos_pos_embed_2d(d, g)
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  for h in range(g):
    for w in range(g):
      expect = np.concatenate([np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)])
      np.testing.assert_allclose(pe[h * g + w], expect, rtol=1e-6, atol=1e-6)


def test_wrong_image_size_is_a_clear_error():
  cfg = dit.preset("FM", hidden_size=32, depth=1, num_heads=2)
  params = dit.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"expects inputs of shape \(N, 32, 32, 1\)"):
    dit.DiT(config=cfg).apply({"params": params}, jnp.zeros((1, 28, 28, 1)), jnp.zeros(1, int), jnp.zeros(1, int))


def test_bad_architecture_and_preset_errors():
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    dit.DiTConfig(input_size=30, patch_size=4)
  with pytest.raises(ValueError, match="Unknown DiT preset"):
    dit.preset("DiT-M/2")


def test_every_matmul_goes_through_the_seam():
  """All dot_generals of the forward pass are seam Linears, except the two attention einsums per block."""
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  params = dit.init_params(cfg, jax.random.key(0))
  model, calls = dit.DiT(config=cfg), []

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.Linear) and context.method_name == "__call__":
      calls.append("/".join(context.module.scope.path))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, int),
                                                 jnp.zeros(1, int)))(params)
  n_dots = sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns)
  assert len(calls) == 1 + 2 + 5 * cfg.depth + 2
  assert n_dots == len(calls) + 2 * cfg.depth
  spec_lib.check_table([("blocks_*/attn/qkv", spec_lib.FLOAT)], calls)
  with pytest.raises(ValueError, match="matches no layer"):
    spec_lib.check_table([("blocks_*/atn/qkv", spec_lib.FLOAT)], calls)


def test_diffusers_parity():
  """Converted diffusers weights reproduce diffusers' own output (fixture made by make_diffusers_dit_fixture.py)."""
  cfg, params = diffusers_dit.load_diffusers_dit(os.path.join(FIXTURES, "diffusers_dit_tiny"))
  io = np.load(os.path.join(FIXTURES, "diffusers_dit_tiny_io.npz"), allow_pickle=False)
  out = dit.DiT(config=cfg).apply({"params": params}, jnp.asarray(io["x"].transpose(0, 2, 3, 1)), io["t"], io["y"])
  out = np.asarray(out).transpose(0, 3, 1, 2)
  # torch and XLA both compute in float32; the outputs reach |4.6|, so compare relative to their scale.
  err = np.abs(out - io["out"]).max() / np.abs(io["out"]).max()
  assert err < 1e-5, err
  # The original-DiT timestep convention (freq_shift=0) must NOT match: the test is sensitive to it.
  wrong = dit.DiT(config=dit.DiTConfig(**{**cfg.__dict__, "freq_shift": 0})).apply(
      {"params": params}, jnp.asarray(io["x"].transpose(0, 2, 3, 1)), io["t"], io["y"])
  assert np.abs(np.asarray(wrong).transpose(0, 3, 1, 2) - io["out"]).max() > 1e-2


def test_diffusers_converter_rejects_other_models(tmp_path):
  (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
  (tmp_path / diffusers_dit.WEIGHTS_NAME).write_bytes(b"")
  with pytest.raises(ValueError, match="Expected a DiTTransformer2DModel"):
    diffusers_dit.load_diffusers_dit(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json"):
    diffusers_dit.load_diffusers_dit(str(tmp_path / "nope"))
