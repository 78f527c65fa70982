import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import calibrate, sampler
from diffq.io import npz
from diffq.models import dit, layers
from diffq.quant import export

CFG = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
PARAMS = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                      dit.init_params(CFG, jax.random.key(0)))
BOUNDARY = layers.LayerPolicy(kind="fakequant", w_bits=8, a_bits=8, a_steps=2)
CASES = {
    "w2a4": dict(w_bits=2, a_bits=4),
    "symmetric_w3": dict(w_bits=3, a_bits=4, w_symmetric=True),
    "group8_w4": dict(w_bits=4, a_bits=8, w_group_size=8),
    "mixed_w2_smooth": dict(w_bits=2, a_bits=4, mixed_bits=True, smooth=True),
    "lora_smooth_w2": dict(w_bits=2, a_bits=4, smooth=True, lora_rank=4),
}


def quantized_model(case):
  """A fake-quant tiny DiT with realistic, non-trivial quantizer state (random smoothing, OMQ bits, LoRA)."""
  table = (("x_embedder", BOUNDARY), ("*", layers.LayerPolicy(kind="fakequant", a_steps=2, **CASES[case])))
  quant = jax.tree.map(np.array, calibrate.quant_template(CFG, table))
  rng = np.random.default_rng(0)
  for p in export._layer_paths(quant):
    q, pol = export._get(quant, p), layers.resolve_policy(p, table)
    kernel = export._get(PARAMS, p)["kernel"]
    if pol.smooth:
      q["smooth"] = rng.uniform(0.5, 2.0, kernel.shape[0]).astype(np.float32)
    if pol.lora_rank:
      q["lora_b"] = rng.normal(0, 0.05, q["lora_b"].shape).astype(np.float32)
    if pol.mixed_bits:
      q["w_bits"] = rng.integers(1, 4, (1, kernel.shape[1])).astype(np.int32)
    q["w_scale"], q["w_zero"] = map(np.asarray, calibrate.weight_ranges(
        kernel, pol, q.get("smooth"), q["w_bits"] if pol.mixed_bits else None))
    q["a_scale"] = rng.uniform(0.02, 0.1, 2).astype(np.float32)
    q["a_zero"] = rng.integers(0, 2 ** pol.a_bits, 2).astype(np.float32)
  return table, quant


def batch():
  k = jax.random.key(3)
  return jax.random.normal(k, (4, 32, 32, 1)), jnp.array([10, 500, 900, 999]), jnp.array([0, 3, 7, 10])


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_import_reproduces_the_fakequant_model_bit_for_bit(case, tmp_path):
  table, quant = quantized_model(case)
  path = str(tmp_path / "q.npz")
  stats = export.export_quantized(path, CFG, PARAMS, quant, table)
  cfg, variables, int_table = export.import_quantized(path)
  x, t, y = batch()
  fake = dit.DiT(config=CFG, policies=table).apply({"params": PARAMS, "quant": quant}, x, t, y, step=1)
  real = dit.DiT(config=cfg, policies=int_table).apply(variables, x, t, y, step=1)
  np.testing.assert_array_equal(np.asarray(real), np.asarray(fake))
  flat = npz.flatten(npz.import_npz(path)[0])
  assert "params/blocks_0/mlp/fc1/kernel" not in flat and "params/x_embedder/kernel" not in flat
  assert "params/y_embedder/embedding_table/embedding" in flat and "quant/blocks_0/mlp/fc1/lora_a" not in flat
  assert stats["model_bytes"] < stats["fp_model_bytes"] / 2


def test_mixed_bits_pack_each_channel_at_its_width_and_keep_the_mean(tmp_path):
  table, quant = quantized_model("mixed_w2_smooth")
  stats = export.export_quantized(str(tmp_path / "q.npz"), CFG, PARAMS, quant, table)
  flat = npz.flatten(npz.import_npz(str(tmp_path / "q.npz"))[0])
  bits = quant["blocks_1"]["mlp"]["fc2"]["w_bits"].reshape(-1)
  assert flat["quant/blocks_1/mlp/fc2/w_packed"].size == sum(-(-128 * int(b) // 8) for b in bits)
  # Expected mean stored bits over every matmul kernel + embedding: x_embedder at 8, float label table at 32.
  total = bits_sum = 0
  for p in export._layer_paths(quant):
    k = export._get(PARAMS, p)["kernel"]
    b = 8 if p == "x_embedder" else export._get(quant, p)["w_bits"].reshape(-1)
    bits_sum += np.sum(np.broadcast_to(b, (k.shape[1],))) * k.shape[0]
    total += k.size
  emb = PARAMS["y_embedder"]["embedding_table"]["embedding"].size
  assert stats["bits_per_weight"] == pytest.approx((bits_sum + 32 * emb) / (total + emb))


def test_reimported_model_draws_identical_samples(tmp_path):
  table, quant = quantized_model("lora_smooth_w2")
  export.export_quantized(str(tmp_path / "q.npz"), CFG, PARAMS, quant, table)
  cfg, variables, int_table = export.import_quantized(str(tmp_path / "q.npz"))
  plan = sampler.make_plan(1000, "ddim2")

  def draw(policies, v):
    model = dit.DiT(config=cfg, policies=policies)
    fn = lambda vv, x, t, y, step: model.apply(vv, x, t, y, step=step)
    return jax.jit(lambda vv: sampler.sample(fn, vv, jax.random.key(0), jnp.arange(6) % 10, jnp.arange(6),
                                             plan=plan, shape=(32, 32, 1), cfg_scale=2.0, null_class=10))(v)

  a = draw(table, {"params": PARAMS, "quant": quant})
  b = draw(int_table, variables)
  assert float(jnp.std(a)) > 0
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_refused(tmp_path):
  with pytest.raises(ValueError, match="lora_rank=0"):
    layers.LayerPolicy(kind="intweight", lora_rank=4)
  npz.export_npz(str(tmp_path / "fp.npz"), PARAMS, metadata=dict(kind="dit_params"))
  with pytest.raises(ValueError, match="not a quantized DiT export"):
    export.import_quantized(str(tmp_path / "fp.npz"))
  table, quant = quantized_model("w2a4")
  int_table = export.intweight_table(table)
  assert all(pol.kind == "intweight" and pol.lora_rank == 0 for _, pol in int_table)
  assert dataclasses.replace(int_table[1][1], kind="fakequant") == table[1][1]
