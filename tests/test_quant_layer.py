import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import plan as plan_lib
from diffq.models import dit, layers
from tests.test_quant_ops import np_fake_quant


def test_fakequant_linear_matches_numpy():
  pol = layers.LayerPolicy(kind="fakequant", w_bits=3, a_bits=4, a_steps=5, smooth=True, lora_rank=2,
                           mixed_bits=True)
  lin = layers.Linear(6, policy=pol)
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


def test_policy_validation():
  with pytest.raises(ValueError, match="w_bits must lie in 1..8"):
    layers.LayerPolicy(kind="fakequant", w_bits=9)
  with pytest.raises(ValueError, match="mixed_bits"):
    layers.LayerPolicy(kind="fakequant", w_bits=8, mixed_bits=True)
  with pytest.raises(ValueError, match="Unknown layer policy kind"):
    layers.LayerPolicy(kind="int4")


def test_dit_with_policy_table_creates_quant_collection():
  cfg = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
  pol = layers.LayerPolicy(kind="fakequant", w_bits=2, a_bits=4, a_steps=20)
  model = dit.DiT(config=cfg, policies=(("blocks_*", pol),))
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, int), jnp.zeros(1, int))
  assert set(v["quant"]) == {"blocks_0", "blocks_1"}
  assert v["quant"]["blocks_0"]["attn"]["qkv"]["a_scale"].shape == (20,)
  assert v["quant"]["blocks_1"]["mlp"]["fc2"]["w_scale"].shape == (1, 32)
