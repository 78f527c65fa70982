"""Every method's `:xl2` config end to end at reduced DiT-XL/2 shapes on 8 simulated devices: random weights from
the export job's `random:` sources (DiT-XL/2 and SD-VAE architectures at small depth and width; 4 latent
channels, 1000 classes), a few sampler steps, latents decoded to images in samples.npz and grid.png. Only the
sizes (and the step count) are reduced; every other setting is the config's."""
import json

import numpy as np
import pytest

from configs import dit_flexi, dit_icc, dit_modiff, dit_vq, dit_w2a4, export_dit, sample as sample_config
from diffq.jobs import export_dit as export_job, icc, quantize, sample

REDUCED = "depth=2,hidden_size=64,num_heads=4,input_size=8"  # DiT-XL/2 blocks at 8x8x4 latents (16 tokens)
VAE = "block_out_channels=(16,16),norm_num_groups=8,layers_per_block=1"  # 2x upsampling: 16x16 images


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("xl2")
  out = {}
  for name, source, overrides in [("dit", "random:DiT-XL/2", REDUCED),
                                  ("flexidit", "random:DiT-XL/2", REDUCED + ",patch_sizes=(4,)"),
                                  ("vae", "random:vae", VAE)]:
    c = export_dit.get_config()
    c.update(source=source, overrides=overrides, dest=str(root / f"{name}.npz"))
    export_job.run(c, str(root / f"export_{name}"))
    out[name] = c.dest
  return out


def reduce_sampling(s, exports, spacing):
  """The sample block of an :xl2 config at CI size: random exports, 8 images on 8 devices, `spacing` steps."""
  s.vae, s.num_samples, s.batch_size, s.grid_per_class = exports["vae"], 8, 8, 1
  s.spacing = spacing


def check_outputs(workdir, result):
  with np.load(workdir / "samples.npz") as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
  np.testing.assert_array_equal(labels, np.arange(8) % 1000)
  assert (workdir / "grid.png").exists() and json.loads((workdir / "metrics.json").read_text())
  assert result["num_samples"] == 8


def test_sample_xl2(exports, tmp_path):
  c = sample_config.get_config("xl2")
  assert (c.method, c.spacing, c.cfg_scale, c.cfg_channels, c.clip_x0) == ("ddpm", "250", 1.5, 3, False)
  c.params, c.num_devices = exports["dit"], 8
  reduce_sampling(c, exports, "4")
  check_outputs(tmp_path, sample.run(c, str(tmp_path)))


def quantize_config(module, arg, exports):
  c = module.get_config(arg)
  c.params, c.num_devices = exports["dit"], 8
  reduce_sampling(c.sample, exports, "ddim4")
  c.calib.update(num_images=8, omq_images_per_step=2, act_sample_size=1024)
  if c.distill.trajectories:
    c.distill.update(trajectories=1, images=8, checkpoint_every=10, log_every=1)
  return c


@pytest.mark.parametrize("name", ["mpqdm", "modiff", "vq_pv"])
def test_quantize_xl2(name, exports, tmp_path):
  module, arg = {"mpqdm": (dit_w2a4, "xl2"), "modiff": (dit_modiff, "xl2"), "vq_pv": (dit_vq, "xl2,pv")}[name]
  c = quantize_config(module, arg, exports)
  assert c.sample.spacing == "ddim4" and c.sample.cfg_channels == 3 and c.sample.vae == exports["vae"]
  if name == "modiff":
    assert (c.quant.w_bits, c.quant.a_bits, c.quant.act, c.quant.modiff.quantizer) == (8, 6, "modiff", "dynamic")
    c.sample.spacing = "50"  # the config's DDPM-50 grid is short enough to run as is
  if name == "vq_pv":
    c.quant.vq.update(max_epochs=1, steps_per_epoch=2, kmeans_iters=2)
  if name == "mpqdm":
    c.sample.execution = "integer"  # the W8A8 boundary layers as int8 matmuls next to the modulated body
  result = quantize.run(c, str(tmp_path))
  check_outputs(tmp_path, result)
  if name == "mpqdm":
    # x_embedder, t_embedder's two linears, final_layer's linear and adaLN: the keep_8bit boundary
    assert result["integer_layers"] == 5 and result["float_quantized_layers"] == 2 * 5  # qkv, proj, fc1, fc2, adaLN


def test_icc_xl2(exports, tmp_path):
  c = dit_icc.get_config("xl2,rank=8")
  assert (c.sample.spacing, c.sample.cfg_scale, c.sample.cache_pattern) == ("ddim100", 1.5, "period:2")
  c.params, c.num_devices = exports["dit"], 8
  reduce_sampling(c.sample, exports, "ddim4")
  c.calib.num_images = 8
  result = icc.run(c, str(tmp_path))
  check_outputs(tmp_path, result)
  assert result["cached_steps"] == 2


def test_flexidit_xl2(exports, tmp_path):
  c = dit_flexi.get_config("xl2,t_weak=2")
  c.params, c.num_devices = exports["flexidit"], 8
  reduce_sampling(c, exports, "4")
  result = sample.run(c, str(tmp_path))
  check_outputs(tmp_path, result)
  full = sample.run(dict_update(c, t_weak=0), str(tmp_path / "powerful"))
  assert result["gmacs_per_image"] < full["gmacs_per_image"]


def dict_update(c, **kw):
  c = c.copy_and_resolve_references()
  c.update(kw)
  return c
