import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import export_dit as export_config
from configs import sample as sample_config
from diffq import data, parallel, plan as plan_lib
from diffq.io import diffusers_vae, npz
from diffq.jobs import export_dit, sample
from diffq.models import dit, vae

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "diffusers_vae_tiny")


def _io():
  return np.load(os.path.join(FIXTURES, "diffusers_vae_tiny_io.npz"), allow_pickle=False)


def _rel_err(ours_nhwc, ref_nchw):
  ours = np.asarray(ours_nhwc).transpose(0, 3, 1, 2)
  return np.abs(ours - ref_nchw).max() / np.abs(ref_nchw).max()


def test_diffusers_vae_parity():
  """Converted AutoencoderKL weights reproduce diffusers' encode (posterior mean) and decode at 1e-5 on a
  3-level, 3-latent-channel, 4-group model and 16x24 images (fixture: make_diffusers_vae_fixture.py)."""
  cfg, params = diffusers_vae.load_diffusers_vae(TINY)
  assert cfg.block_out_channels == (8, 16, 16) and cfg.latent_channels == 3 and cfg.downsample_factor == 4
  io = _io()
  assert _rel_err(vae.encode(cfg, params, jnp.asarray(io["x"].transpose(0, 2, 3, 1))), io["mean"]) < 1e-5
  assert _rel_err(vae.decode(cfg, params, jnp.asarray(io["z"].transpose(0, 2, 3, 1))), io["decoded"]) < 1e-5


def test_default_config_is_sd_vae():
  """VAEConfig() has exactly the parameter count of diffusers' AutoencoderKL at sd-vae-ft-ema's config."""
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(vae.variable_shapes(vae.VAEConfig())))
  assert n == int(_io()["sd_vae_params"])


def _legacy(sd):
  """The mid-block attention as sd-vae-ft-ema's files store it: query/key/value/proj_attn, optionally as 1x1
  convs (CompVis layout)."""
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  out = {}
  for k, w in sd.items():
    for new, old in names.items():
      if f".attentions.0.{new}." in k:
        k, w = k.replace(f".{new}.", f".{old}."), (w[:, :, None, None] if w.ndim == 2 else w)
    out[k] = w
  return out


def test_legacy_attention_names_convert_identically():
  cfg, params = diffusers_vae.load_diffusers_vae(TINY)
  sd = load_file(os.path.join(TINY, diffusers_vae.WEIGHTS_NAME))
  legacy = _legacy(sd)
  assert "encoder.mid_block.attentions.0.query.weight" in legacy
  jax.tree.map(np.testing.assert_array_equal, diffusers_vae.params_from_state_dict(legacy, cfg), params)


def test_converter_errors_name_the_problem(tmp_path):
  cfg, _ = diffusers_vae.load_diffusers_vae(TINY)
  sd = load_file(os.path.join(TINY, diffusers_vae.WEIGHTS_NAME))
  with pytest.raises(ValueError, match="lacks 1 VAE parameters"):
    diffusers_vae.params_from_state_dict({k: v for k, v in sd.items() if k != "decoder.conv_in.bias"}, cfg)
  with pytest.raises(ValueError, match="has no place"):
    diffusers_vae.params_from_state_dict({**sd, "decoder.extra.weight": sd["decoder.conv_in.weight"]}, cfg)
  with pytest.raises(ValueError, match="shape"):
    diffusers_vae.params_from_state_dict({**sd, "decoder.conv_in.bias": np.zeros(3, np.float32)}, cfg)
  d = tmp_path / "vae"
  shutil.copytree(TINY, d)
  c = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**c, "up_block_types": ["AttnUpDecoderBlock2D"] * 3}))
  with pytest.raises(ValueError, match="only UpDecoderBlock2D"):
    diffusers_vae.load_diffusers_vae(str(d))
  (d / "config.json").write_text(json.dumps({**c, "shift_factor": 0.1159}))
  with pytest.raises(ValueError, match="shift_factor"):
    diffusers_vae.load_diffusers_vae(str(d))
  (d / "config.json").write_text(json.dumps({**c, "_class_name": "AutoencoderTiny"}))
  with pytest.raises(ValueError, match="Expected an AutoencoderKL"):
    diffusers_vae.load_diffusers_vae(str(d))
  with pytest.raises(FileNotFoundError, match="AutoencoderKL directory"):
    diffusers_vae.load_diffusers_vae(str(tmp_path / "nope"))


def test_export_job_writes_a_vae_export_every_job_reads(tmp_path):
  c = export_config.get_config()
  c.source, c.dest = TINY, str(tmp_path / "vae.npz")
  assert export_dit.run(c, str(tmp_path / "w"))["kind"] == sample.VAE_KIND
  cfg, params = sample.load_vae(c.dest)
  ref_cfg, ref = diffusers_vae.load_diffusers_vae(TINY)
  assert cfg == ref_cfg
  jax.tree.map(np.testing.assert_array_equal, params, ref)
  with pytest.raises(ValueError, match="num_heads is for .pt"):
    export_dit.run(_with(c, num_heads=4), str(tmp_path / "w2"))
  with pytest.raises(ValueError, match="not a VAE export"):
    sample.load_vae(os.path.join(os.path.dirname(FIXTURES), "..", "diffq", "assets", "dit_fm_ema.npz"))


def _with(c, **kw):
  c = c.copy_and_resolve_references()
  c.update(kw)
  return c


def test_latent_sampling_decodes_on_8_devices(tmp_path):
  """A latent DiT + the tiny VAE through the sample job on 8 devices: samples.npz holds the decoded images of the
  sampler's latents (reference: the 1-device sampler, then vae.decode of latents / scaling_factor)."""
  e = export_config.get_config()
  e.source, e.dest = TINY, str(tmp_path / "vae.npz")
  export_dit.run(e, str(tmp_path / "e"))
  cfg = dit.DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                      num_classes=10)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                        jax.device_get(dit.init_params(cfg, jax.random.key(0))))
  npz.export_npz(str(tmp_path / "dit.npz"), params, metadata=dict(kind="dit_params", model=cfg.__dict__))
  c = sample_config.get_config("quick")
  c.update(dict(params=str(tmp_path / "dit.npz"), vae=e.dest, num_samples=16, batch_size=8, spacing="ddim3",
                evaluate=False, clip_x0=False, num_devices=8, grid_classes="1,3", grid_per_class=2))
  with pytest.raises(ValueError, match="set --config.vae"):
    sample.prepare_outputs(sample_config.get_config(), dit.DiTConfig(in_channels=4))
  with pytest.raises(ValueError, match="3 latent channels, the model samples 4"):
    sample.prepare_outputs(c, dit.DiTConfig(in_channels=4))
  with pytest.raises(ValueError, match=r"grid_classes \[10\] are not classes"):
    sample.prepare_outputs(_with(c, grid_classes="1,10"), cfg)
  sample.run(c, str(tmp_path / "s"))
  with np.load(tmp_path / "s" / "samples.npz", allow_pickle=False) as f:
    images = f["arr_0"]
  assert images.shape == (16, 32, 32, 3) and images.std() > 0
  assert (tmp_path / "s" / "grid.png").exists()
  plan = plan_lib.make_plan(c.diffusion_steps, c.spacing)
  fn = sample.make_sample_fn(cfg, plan, c, parallel.make_mesh(1))
  ids = np.arange(16, dtype=np.int32)
  z = np.concatenate([np.asarray(fn({"params": params}, jax.random.key(c.seed), ids[s:s + 8] % 10, ids[s:s + 8]))
                      for s in (0, 8)])
  vae_cfg, vae_params = diffusers_vae.load_diffusers_vae(TINY)
  ref = data.to_uint8(np.asarray(vae.decode(vae_cfg, vae_params, jnp.asarray(z) / vae_cfg.scaling_factor)))
  assert np.abs(images.astype(int) - ref.astype(int)).max() <= 1
