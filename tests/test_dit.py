import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq.io import diffusers_dit, official_dit
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


def _official_sd():
  with np.load(os.path.join(FIXTURES, "official_dit_tiny_sd.npz"), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def test_official_dit_parity():
  """An official facebookresearch/DiT state dict (width 48, 3 heads: not an official size) converts to a DiT that
  reproduces models.py's forward (fixture made by make_official_dit_fixture.py with the repository's own code)."""
  sd = _official_sd()
  with pytest.raises(ValueError, match="pass num_heads"):
    official_dit.config_from_state_dict(sd)
  cfg = official_dit.config_from_state_dict(sd, num_heads=3)
  assert (cfg.input_size, cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_classes) == (8, 2, 48, 2, 10)
  assert cfg.freq_shift == 0 and cfg.learn_sigma
  params = official_dit.params_from_state_dict(sd, cfg)
  io = np.load(os.path.join(FIXTURES, "official_dit_tiny_io.npz"), allow_pickle=False)
  out = dit.DiT(config=cfg).apply({"params": params}, jnp.asarray(io["x"].transpose(0, 2, 3, 1)), io["t"], io["y"])
  err = np.abs(np.asarray(out).transpose(0, 3, 1, 2) - io["out"]).max() / np.abs(io["out"]).max()
  assert err < 1e-5, err
  with pytest.raises(ValueError, match="Unconverted facebookresearch/DiT keys"):
    official_dit.params_from_state_dict({**sd, "blocks.0.extra.weight": sd["pos_embed"]}, cfg)
  with pytest.raises(ValueError, match="pos_embed differs"):
    official_dit.params_from_state_dict({**sd, "pos_embed": sd["pos_embed"] + 1}, cfg)


def test_official_dit_pt_reads_with_weights_only(monkeypatch):
  """The .pt itself (torch's zip-pickle) converts identically to its numpy copy; without torch, a clear error."""
  import builtins
  real_import = builtins.__import__
  monkeypatch.setattr(builtins, "__import__",
                      lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "torch"
                      else real_import(name, *a, **k))
  path = os.path.join(FIXTURES, "official_dit_tiny.pt")
  with pytest.raises(ImportError, match="needs torch"):
    official_dit.load_official_dit(path, num_heads=3)
  monkeypatch.undo()
  pytest.importorskip("torch", reason="reading .pt needs torch, which is not a diffq requirement")
  cfg, params = official_dit.load_official_dit(path, num_heads=3)
  ref = official_dit.params_from_state_dict(_official_sd(), cfg)
  jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_diffusers_converter_rejects_other_models(tmp_path):
  (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
  (tmp_path / diffusers_dit.WEIGHTS_NAME).write_bytes(b"")
  with pytest.raises(ValueError, match="Expected a DiTTransformer2DModel"):
    diffusers_dit.load_diffusers_dit(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json"):
    diffusers_dit.load_diffusers_dit(str(tmp_path / "nope"))


def test_bfloat16_compute_stays_near_float32():
  """The embedded model in compute_dtype bfloat16: float32 output, within 1.5% relative RMS of the float32
  forward at every t (measured 0.6%), and the sampler's uint8 images within a mean 2 levels (DDIM-10, CFG 3)."""
  from configs import sample as sample_config
  from diffq import parallel, plan as plan_lib
  from diffq.jobs import sample
  cfg, params = sample.load_dit(os.path.join(os.path.dirname(FIXTURES), "..", "diffq", "assets", "dit_fm_ema.npz"))
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 1))
  t, y = jnp.array([0, 100, 200, 300, 500, 700, 900, 999]), jnp.arange(8) % 10
  f32 = dit.DiT(config=cfg).apply({"params": params}, x, t, y)
  bf = dit.DiT(config=cfg, dtype="bfloat16").apply({"params": params}, x, t, y)
  assert bf.dtype == jnp.float32
  rel = np.sqrt(np.mean(np.square(bf - f32), axis=(1, 2, 3)) / np.mean(np.square(f32), axis=(1, 2, 3)))
  assert 1e-4 < rel.max() < 1.5e-2, rel
  c = sample_config.get_config("quick")
  c.num_samples, c.batch_size, c.evaluate = 16, 16, False
  plan = plan_lib.make_plan(1000, "ddim10")
  a, _ = sample.generate(c, plan, cfg, {"params": params}, parallel.make_mesh(1))
  c.compute_dtype = "bfloat16"
  b, _ = sample.generate(c, plan, cfg, {"params": params}, parallel.make_mesh(1))
  d = np.abs(a.astype(int) - b.astype(int))
  assert 0 < d.mean() < 2.0, d.mean()
  c.compute_dtype = "float16"
  with pytest.raises(ValueError, match="choose one of"):
    sample.check_settings(c, parallel.make_mesh(1))
