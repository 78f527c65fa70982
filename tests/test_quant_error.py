import pytest

from diffq.seam import inputs, rules, spec as spec_lib
from experiments import quant_error

BOUNDARY = rules.scalar_spec(8, 8, 2)
BODY = rules.scalar_spec(2, 4, 2)
TABLE = (("x_embedder", BOUNDARY), ("*", BODY))
PATHS = ["blocks_0/attn/qkv", "blocks_0/mlp/fc1", "blocks_1/mlp/fc1", "x_embedder"]


def test_float_acts_in_changes_only_the_matching_layers_activations():
  table = quant_error.float_acts_in(TABLE, "*/mlp/fc1", PATHS)
  for path in PATHS:
    want = spec_lib.resolve(path, TABLE)
    got = spec_lib.resolve(path, table)
    if path.endswith("mlp/fc1"):
      assert got.input == inputs.Float() and got.weight == want.weight
    else:
      assert got == want
  boundary = spec_lib.resolve("x_embedder", quant_error.float_acts_in(TABLE, "x_embedder", PATHS))
  assert boundary.input == inputs.Float() and boundary.weight.bits == 8  # keeps the boundary layer's own 8-bit weights


def test_float_acts_everywhere_is_weight_only():
  every = TABLE
  for p in PATHS:
    every = quant_error.float_acts_in(every, p, PATHS)
  only_w = quant_error.weight_only(TABLE)
  assert all(spec_lib.resolve(p, every) == spec_lib.resolve(p, only_w) for p in PATHS)


def test_unknown_group_is_a_clear_error():
  with pytest.raises(SystemExit, match="matches no layer"):
    quant_error.float_acts_in(TABLE, "*/mlp/fc3", PATHS)
