"""ImageNet through TFDS on a tiny synthetic `imagenet2012` (the real registered builder reads it): DiT's center
crop, the encode job's latent shards (resumable), and FlexiDiT-XL/2 fine-tuning on them (reduced shapes)."""
import os

import jax
import numpy as np
import pytest

from configs import encode_latents, export_dit, train_flexidit_fm
from diffq import data, imagenet
from diffq.jobs import encode_latents as encode_job, export_dit as export_job, sample, train
from diffq.models import vae

REDUCED = "depth=2,hidden_size=64,num_heads=4,input_size=8"  # DiT-XL/2 blocks at 8x8x4 latents


def make_fake_imagenet(data_dir: str) -> None:
  """imagenet2012 5.1.0 with the real features (JPEG images of varied sizes, 1000 classes), 6 train and 2
  validation examples, in array_record."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  class FakeImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = imagenet.NAME
    VERSION = tfds.core.Version("5.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()),
          "file_name": tfds.features.Text()}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 6), "validation": self._generate_examples(6, 2)}

    def _generate_examples(self, start, n):
      rng = np.random.default_rng(start)
      for i in range(start, start + n):
        h, w = rng.integers(20, 60, 2)
        yield i, {"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "label": int(i * 97 % 1000),
                  "file_name": f"img_{i}.JPEG"}

  FakeImagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  make_fake_imagenet(str(root / "tfds"))
  out = {"tfds": str(root / "tfds")}
  for name, source, overrides in [("vae", "random:vae", "block_out_channels=(16,16),norm_num_groups=8,"
                                                         "layers_per_block=1"),
                                  ("dit", "random:DiT-XL/2", REDUCED)]:
    c = export_dit.get_config()
    c.update(source=source, overrides=overrides, dest=str(root / f"{name}.npz"))
    export_job.run(c, str(root / f"export_{name}"))
    out[name] = c.dest
  c = encode_config(out)
  encode_job.run(c, str(root / "latents"))
  out["latents"] = str(root / "latents")
  return out


def encode_config(setup):
  c = encode_latents.get_config()
  c.update(vae=setup["vae"], image_size=16, batch_size=8, shard_size=4)
  c.data.dir = setup["tfds"]
  return c


def test_center_crop_is_dits():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 255, (16, 40, 3), dtype=np.uint8)  # short side = size: the centre columns, unchanged
  np.testing.assert_array_equal(imagenet.center_crop(wide, 16), wide[:, 12:28])
  big = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)  # short side 2 size: 2x2 box means, then the centre
  box = big.reshape(16, 2, 24, 2, 3).astype(np.float64).mean((1, 3))
  assert np.abs(imagenet.center_crop(big, 16).astype(np.float64) - box[:, 4:20]).max() <= 1.0


def test_encode_job_writes_the_latents_of_center_crops_and_their_flips(setup):
  source = imagenet.open_split("train", setup["tfds"])
  z, labels = imagenet.load_latents(setup["latents"])
  assert z.shape == (12, 8, 8, 4) and z.dtype == np.float16  # 6 images and their flips, 2 shards (4 + 2)
  assert imagenet.shard_ranges(6, 4) == [(0, 4), (4, 6)]
  vae_cfg, params = sample.load_vae(setup["vae"])
  order = [(i, f) for s in ((0, 1, 2, 3), (4, 5)) for f in (False, True) for i in s]  # shard: images, then flips
  crops = np.stack([imagenet.center_crop(source[i]["image"], 16)[:, ::-1 if f else 1] for i, f in order])
  want = np.asarray(jax.jit(lambda p, x: vae.encode(vae_cfg, p, x))(params, data.from_uint8(crops)))
  np.testing.assert_allclose(z.astype(np.float32), want * vae_cfg.scaling_factor, rtol=2e-3, atol=2e-3)
  np.testing.assert_array_equal(labels, [source[i]["label"] for i, _ in order])


def test_a_rerun_keeps_finished_shards_rewrites_a_missing_one_and_refuses_other_settings(setup, tmp_path):
  c = encode_config(setup)
  c.data.split = "train[:5]"  # a TFDS slice: its own record and shards
  work = str(tmp_path / "latents")
  encode_job.run(c, work)
  first, second = (imagenet.shard_path(work, "train[:5]", a, b) for a, b in [(0, 4), (4, 5)])
  stamp, before = os.path.getmtime(first), np.load(second)["latents"]
  os.remove(second)
  with pytest.raises(FileNotFoundError, match="unfinished: 1 of 2 shards missing"):
    imagenet.load_latents(work, "train[:5]")
  out = encode_job.run(c, work)
  assert out["shards_written"] == 1 and os.path.getmtime(first) == stamp
  np.testing.assert_array_equal(np.load(second)["latents"], before)
  assert imagenet.load_latents(work, "train[:5]")[0].shape[0] == 10
  c.shard_size = 3
  with pytest.raises(ValueError, match=r"other settings \(shard_size: 4 -> 3\)"):
    encode_job.run(c, work)


def test_missing_dataset_names_the_tfds_build_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012 --manual_dir"):
    imagenet.open_split("train", str(tmp_path))


def test_flexidit_xl2_fine_tunes_on_the_latents(setup, tmp_path):
  c = train_flexidit_fm.get_config("xl2")
  assert (c.data.kind, c.lr, c.ema_decay, c.flexi.probs, c.model.patch_sizes) == ("latents", 1e-4, 0.9999,
                                                                                   "0.5,0.5", (4,))
  for key, value in dict(depth=2, hidden_size=64, num_heads=4, input_size=8).items():
    c.model[key] = value
  c.update(init=setup["dit"], batch_size=8, num_steps=2, log_every=1, checkpoint_every=1, compute_dtype="float32")
  c.data.dir = setup["latents"]
  out = train.run(c, str(tmp_path))
  assert out["steps"] == 2 and np.isfinite(out["train_loss"]) and (tmp_path / "ema_params.npz").exists()
  c.model.in_channels = 3  # latents of another shape are refused before training
  with pytest.raises(ValueError, match="the model takes"):
    train.run(c, str(tmp_path / "bad"))
