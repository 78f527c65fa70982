import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import plan as plan_lib
from diffq.models import dit, layers
from diffq.seam import caches, inputs, rules, spec as spec_lib, weights
from tests.test_quant_ops import np_fake_quant


def test_fakequant_linear_matches_numpy():
  pol = rules.scalar_spec(3, 4, 5, smooth=True, lora_rank=2, mixed=True)
  lin = layers.Linear(6, spec=pol)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  v = lin.init(jax.random.key(0), x)
  q = dict(w_scale=rng.uniform(0.05, 0.2, (1, 6)), w_zero=rng.uniform(0, 6, (1, 6)),
           w_bits=np.array([[2, 3, 4, 3, 3, 2]]),
           smooth=rng.uniform(0.5, 2, (8,)), a_scale=rng.uniform(0.1, 0.3, (5,)), a_zero=rng.uniform(0, 15, (5,)),
           lora_a=rng.normal(size=(8, 2)) * 0.1, lora_b=rng.normal(size=(2, 6)) * 0.1)
  q = {k: np.asarray(a, np.int32 if k == "w_bits" else np.float32) for k, a in q.items()}
  v = {"params": v["params"], "quant": q}
  y = lin.apply(v, x, plan_lib.StepContext(3))
  w = (np.asarray(v["params"]["kernel"]) + q["lora_a"] @ q["lora_b"]) * q["smooth"][:, None]
  wq = np_fake_quant(w, q["w_scale"], q["w_zero"], q["w_bits"])
  xq = np_fake_quant(x / q["smooth"], q["a_scale"][3], q["a_zero"][3], 4)
  np.testing.assert_allclose(y, xq @ wq + np.asarray(v["params"]["bias"]), rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(lin.apply(v, x, plan_lib.StepContext(0))) - np.asarray(y)).max() > 0  # another step, other quantizer


def test_spec_validation_names_the_problem():
  with pytest.raises(ValueError, match="weight bits must lie in 1..8"):
    rules.scalar_spec(9)
  with pytest.raises(ValueError, match="mixed"):
    rules.scalar_spec(8, mixed=True)
  with pytest.raises(ValueError, match="cannot carry LoRA"):
    spec_lib.LayerSpec(weight=weights.Codes(4), lora_rank=2)
  with pytest.raises(ValueError, match="Unknown weight part type 'int4'"):
    spec_lib.from_dict(dict(weight={"type": "int4"}, input={"type": "float"}, cache={"type": "none"}))
  vq_spec = spec_lib.LayerSpec(weight=weights.VQ(3, 6, 4, "all", update_codes=True), train=True)
  assert spec_lib.from_dict(spec_lib.to_dict(vq_spec)) == vq_spec  # the VQ part serialises like the others
  with pytest.raises(ValueError, match="splits=3 does not divide"):
    layers.Linear(8, spec=spec_lib.LayerSpec(cache=caches.ICC(2, splits=3))).init(jax.random.key(0),
                                                                                   jnp.zeros((1, 4)))


def test_spec_dict_form_round_trips_and_wave1_policies_convert():
  spec = rules.scalar_spec(3, 4, 5, smooth=True, lora_rank=2, mixed=True, grad="lsq").replace(
      cache=caches.ICC(8, 3, "ca"))
  assert spec_lib.from_dict(json.loads(json.dumps(spec_lib.to_dict(spec)))) == spec
  legacy = dict(kind="intweight", w_bits=2, a_bits=4, w_symmetric=False, w_group_size=0, a_steps=20,
                mixed_bits=True, smooth=True, lora_rank=0, grad="ste")
  assert spec_lib.from_legacy_policy(legacy) == rules.scalar_spec(2, 4, 20, mixed=True, smooth=True).deployed()
  assert spec_lib.from_legacy_policy(dict(legacy, kind="fakequant", lora_rank=32)).trainable() == {
      "w_scale": "weight_quant", "w_zero": "weight_quant", "a_scale": "act_quant", "a_zero": "act_quant",
      "lora_a": "lora", "lora_b": "lora"}
  assert spec_lib.from_legacy_policy(dict(legacy, a_bits=0)).input == inputs.Float()


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_dynamic_input_matches_numpy_min_max(granularity):
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  y = inputs.Dynamic(4, granularity)(None, jnp.asarray(x), {}, plan_lib.StepContext())
  axes = (0, 1, 2) if granularity == "tensor" else (2,)
  lo = np.minimum(x.min(axes, keepdims=True), 0)
  hi = np.maximum(x.max(axes, keepdims=True), 0)
  s = np.maximum((hi - lo) / 15, 1e-8)
  np.testing.assert_allclose(y, np_fake_quant(x, s, np.round(-lo / s), 4), rtol=1e-5, atol=1e-6)


def test_dit_with_spec_table_creates_quant_collection():
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  pol = rules.scalar_spec(2, 4, 20)
  model = dit.DiT(config=cfg, specs=(("blocks_*", pol),))
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, int), jnp.zeros(1, int))
  assert set(v["quant"]) == {"blocks_0", "blocks_1"}
  assert v["quant"]["blocks_0"]["attn"]["qkv"]["a_scale"].shape == (20,)
  assert v["quant"]["blocks_1"]["mlp"]["fc2"]["w_scale"].shape == (1, 32)


def test_bfloat16_compute_keeps_fake_quant_in_float32():
  """compute_dtype bfloat16: smoothing and fake-quant run in float32 (the integer grid is float32's), only the
  matmul operands are rounded to bfloat16, the sum is float32 (numpy reference with ml_dtypes' bfloat16)."""
  import ml_dtypes
  pol = rules.scalar_spec(4, 8, 1, smooth=True)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 64)).astype(np.float32)
  lin = layers.Linear(32, spec=pol, dtype="bfloat16")
  v = lin.init(jax.random.key(0), x)
  q = dict(w_scale=rng.uniform(0.05, 0.2, (1, 32)), w_zero=rng.uniform(0, 15, (1, 32)),
           smooth=rng.uniform(0.5, 2, (64,)), a_scale=rng.uniform(0.01, 0.03, (1,)), a_zero=rng.uniform(100, 150, (1,)))
  v = {"params": v["params"], "quant": {k: np.asarray(a, np.float32) for k, a in q.items()}}
  y = np.asarray(lin.apply(v, x))
  assert y.dtype == ml_dtypes.bfloat16
  w = np.asarray(v["params"]["kernel"]) * q["smooth"][:, None].astype(np.float32)
  wq = np_fake_quant(w, v["quant"]["w_scale"], v["quant"]["w_zero"], 4)
  xq = np_fake_quant(x / v["quant"]["smooth"], v["quant"]["a_scale"][0], v["quant"]["a_zero"][0], 8)
  bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float64)
  ref = bf(xq) @ bf(wq) + np.asarray(v["params"]["bias"])
  np.testing.assert_allclose(y.astype(np.float64), ref, rtol=8e-3, atol=8e-3)  # bfloat16 rounding of the output
  f32 = np.asarray(layers.Linear(32, spec=pol).apply(v, x))
  assert np.abs(f32 - ref).max() > 1e-3  # the reference is bfloat16's, not float32's
