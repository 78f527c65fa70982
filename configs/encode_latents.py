"""Encode an ImageNet split (TFDS imagenet2012, array_record) into SD-VAE latent shards (diffq/imagenet.py).

  python main.py --config=configs/encode_latents.py --workdir=imagenet_latents            # train, 256 px, flips
  python main.py --config=configs/encode_latents.py --config.data.split=validation --workdir=imagenet_latents

The dataset comes from $TFDS_DATA_DIR (or --config.data.dir); see diffq/imagenet.py for preparing it. On a pod,
every host runs the same command with --config.distributed=True (or main.py's coordinator flags), so each knows
its process index, and encodes its own shards on its own devices.
"""
from configs import sample as sample_config
from diffq import configlib


def get_config(arg=None):
  configlib.parse_arg(arg)
  c = configlib.ml_collections.ConfigDict()
  c.job = "encode_latents"
  c.vae = sample_config.XL2_VAE           # a VAE export (configs/export_dit.py of sd-vae-ft-ema)
  c.data = dict(dir="", split="train")    # dir "" = $TFDS_DATA_DIR; split: TFDS split or slice ("train[:1%]")
  c.image_size = 256                      # DiT's center crop: 256 -> 32x32x4 latents
  c.flip = True                           # also the horizontally flipped images (DiT's augmentation)
  c.batch_size = 64                       # images (+ flips) per encoder call on this host's devices
  c.shard_size = 10000                    # examples per shard file
  c.limit = 0                             # the first N examples of the split (0 = all)
  c.num_devices = 0                       # this host's devices (0 = all)
  c.distributed = False
  return c
