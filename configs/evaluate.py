"""Evaluate any ADM-format samples.npz against the Fashion-MNIST test split in the frozen evaluator's features.

  python main.py --config=configs/evaluate.py --config.samples=PATH --workdir=DIR
"""
from diffq import configlib


def get_config(arg=None):
  configlib.parse_arg(arg)
  c = configlib.ml_collections.ConfigDict()
  c.job = "evaluate"
  c.samples = ""
  c.eval = configlib.eval_config()
  return c
