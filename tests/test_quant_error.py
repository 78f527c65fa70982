import pytest

from diffq.models import layers
from experiments import quant_error

BOUNDARY = layers.LayerPolicy(kind="fakequant", w_bits=8, a_bits=8, a_steps=2)
BODY = layers.LayerPolicy(kind="fakequant", w_bits=2, a_bits=4, a_steps=2)
TABLE = (("x_embedder", BOUNDARY), ("*", BODY))
PATHS = ["blocks_0/attn/qkv", "blocks_0/mlp/fc1", "blocks_1/mlp/fc1", "x_embedder"]


def test_float_acts_in_changes_only_the_matching_layers_activations():
  table = quant_error.float_acts_in(TABLE, "*/mlp/fc1", PATHS)
  for path in PATHS:
    want = layers.resolve_policy(path, TABLE)
    got = layers.resolve_policy(path, table)
    if path.endswith("mlp/fc1"):
      assert got.a_bits == 0 and got.w_bits == want.w_bits and got.a_steps == want.a_steps
    else:
      assert got == want
  boundary = layers.resolve_policy("x_embedder", quant_error.float_acts_in(TABLE, "x_embedder", PATHS))
  assert boundary.a_bits == 0 and boundary.w_bits == 8  # keeps the boundary layer's own 8-bit weights


def test_float_acts_everywhere_is_weight_only():
  every = TABLE
  for p in PATHS:
    every = quant_error.float_acts_in(every, p, PATHS)
  only_w = quant_error.weight_only(TABLE)
  assert all(layers.resolve_policy(p, every) == layers.resolve_policy(p, only_w) for p in PATHS)


def test_unknown_group_is_a_clear_error():
  with pytest.raises(SystemExit, match="matches no layer"):
    quant_error.float_acts_in(TABLE, "*/mlp/fc3", PATHS)
