"""Train the frozen evaluator classifier on Fashion-MNIST (features for FD/sFID/precision/recall, logits for IS
and class accuracy).

  python main.py --config=configs/train_evaluator.py --workdir=/tmp/evaluator
  python main.py --config=configs/train_evaluator.py:tiny --workdir=/tmp/t   # seconds-long smoke run

Writes DIR/classifier.npz (+ .json manifest, kind=classifier). The committed copy is
diffq/assets/evaluator_fm.npz (model card diffq/assets/evaluator_fm.md); replacing it changes every metric.
"""
from diffq import configlib


def get_config(arg=None):
  arg = configlib.parse_arg(arg, tiny=False)
  c = configlib.ml_collections.ConfigDict()
  c.job = "train_classifier"
  c.seed = 0
  c.model = dict(widths=(16, 32, 64, 128), spatial_channels=16, num_classes=10)
  c.data = dict(dir="/usr/share/datasets/fashion-mnist")
  c.augment = dict(flip=True, max_shift=2)
  c.batch_size = 128
  c.num_epochs = 6.0  # of len(train) // batch_size steps
  c.lr = 3e-3
  c.warmup_steps = 200
  c.weight_decay = 0.05
  c.num_devices = 0  # 0 = all local devices
  c.distributed = False
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  if arg.tiny:
    c.model.widths, c.model.spatial_channels = (4, 8, 8), 4
    c.batch_size, c.warmup_steps, c.log_every, c.checkpoint_every = 16, 2, 2, 3
    c.num_epochs = 6 / (60000 // c.batch_size)  # 6 steps
  return c
