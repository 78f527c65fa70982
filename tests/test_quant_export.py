import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import calibrate, parallel, plan as plan_lib
from diffq.io import npz
from diffq.jobs import sample
from diffq.seam import rules
from diffq.models import dit
from diffq.seam import inputs, spec as spec_lib, weights
from diffq.io import quantized
from diffq.quant import pack

CFG = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
PARAMS = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                      dit.init_params(CFG, jax.random.key(0)))
BOUNDARY = rules.scalar_spec(8, 8, 2)
CASES = {
    "w2a4": dict(w_bits=2, a_bits=4),
    "symmetric_w3": dict(w_bits=3, a_bits=4, symmetric=True),
    "group8_w4": dict(w_bits=4, a_bits=8, group_size=8),
    "mixed_w2_smooth": dict(w_bits=2, a_bits=4, mixed=True, smooth=True),
    "lora_smooth_w2": dict(w_bits=2, a_bits=4, smooth=True, lora_rank=4),
    "rotate_smooth_w4a4": dict(w_bits=4, a_bits=4, smooth=True, rotate=True, lora_rank=4),
}
STATEFUL = {  # their forward needs the sampler's state: compared through sampling
    "rotate_modiff_static_w4a4": dict(w_bits=4, a_bits=4, rotate=True, act=inputs.Modulated(4, "static", steps=2)),
}


def quantized_model(case):
  """A fake-quant tiny DiT with realistic, non-trivial quantizer state (random smoothing, rotation signs, OMQ
  bits, LoRA)."""
  table = (("x_embedder", BOUNDARY), ("*", rules.scalar_spec(steps=2, **{**CASES, **STATEFUL}[case])))
  quant = jax.tree.map(np.array, calibrate.quant_template(CFG, table))
  rng = np.random.default_rng(0)
  for p in quantized.quantized_layer_paths(quant):
    q, spec = quantized._get(quant, p), spec_lib.resolve(p, table)
    kernel = quantized._get(PARAMS, p)["kernel"]
    if spec.smooth:
      q["smooth"] = rng.uniform(0.5, 2.0, kernel.shape[0]).astype(np.float32)
    if spec.rotate:
      q["rot_signs"] = rng.choice([-1.0, 1.0], kernel.shape[0]).astype(np.float32)
    if spec.lora_rank:
      q["lora_b"] = rng.normal(0, 0.05, q["lora_b"].shape).astype(np.float32)
    if spec.weight.mixed:
      q["w_bits"] = rng.integers(1, 4, (1, kernel.shape[1])).astype(np.int32)
    w = spec.replace(lora_rank=0).effective_weight(kernel, q)
    q["w_scale"], q["w_zero"] = map(np.asarray, weights.weight_ranges(
        w, spec.weight, q["w_bits"] if spec.weight.mixed else None))
    q["a_scale"] = rng.uniform(0.02, 0.1, 2).astype(np.float32)
    q["a_zero"] = rng.integers(0, 2 ** spec.input.bits, 2).astype(np.float32)
  return table, quant


def batch():
  k = jax.random.key(3)
  return jax.random.normal(k, (4, 32, 32, 1)), jnp.array([10, 500, 900, 999]), jnp.array([0, 3, 7, 10])


def shapes(tree):
  return jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), tree)


@pytest.mark.parametrize("case", sorted(CASES))
def test_integer_model_and_its_export_reproduce_the_fakequant_model_bit_for_bit(case, tmp_path):
  table, quant = quantized_model(case)
  x, t, y = batch()
  fake = dit.DiT(config=CFG, specs=table).apply({"params": PARAMS, "quant": quant}, x, t, y, ctx=plan_lib.StepContext(1))
  int_model = dit.DiT(config=CFG, specs=quantized.deployed_table(table))
  quant_int = quantized.integer_codes(PARAMS, quant, table)
  template = int_model.init(jax.random.key(0), x[:1], t[:1], y[:1])
  assert shapes(quant_int) == shapes(template["quant"])  # exactly the variables the intweight Linear creates
  direct = int_model.apply({"params": PARAMS, "quant": quant_int}, x, t, y, ctx=plan_lib.StepContext(1))
  np.testing.assert_array_equal(np.asarray(direct), np.asarray(fake))

  path = str(tmp_path / "q.npz")
  stats = quantized.export_quantized(path, CFG, PARAMS, quant, table)
  cfg, variables, int_table = quantized.import_quantized(path)
  assert cfg == CFG and int_table == quantized.deployed_table(table)
  assert shapes(variables) == shapes(template)  # no float kernel of a quantized layer is stored
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables["quant"]), jax.tree.leaves(quant_int)))
  real = dit.DiT(config=cfg, specs=int_table).apply(variables, x, t, y, ctx=plan_lib.StepContext(1))
  np.testing.assert_array_equal(np.asarray(real), np.asarray(fake))
  flat = npz.flatten(npz.import_npz(path)[0])
  assert "params/blocks_0/mlp/fc1/kernel" not in flat and "params/x_embedder/kernel" not in flat
  assert "params/y_embedder/embedding_table/embedding" in flat and "quant/blocks_0/mlp/fc1/lora_a" not in flat
  assert stats["model_bytes"] == stats["code_bytes"] + stats["scale_bytes"] + stats["float_bytes"]
  assert stats["model_bytes"] < stats["fp_model_bytes"] / 2


def test_mixed_bits_pack_each_channel_at_its_width_and_keep_the_mean(tmp_path):
  table, quant = quantized_model("mixed_w2_smooth")
  stats = quantized.export_quantized(str(tmp_path / "q.npz"), CFG, PARAMS, quant, table)
  flat = npz.flatten(npz.import_npz(str(tmp_path / "q.npz"))[0])
  bits = quant["blocks_1"]["mlp"]["fc2"]["w_bits"].reshape(-1)
  codes = np.asarray(quantized.integer_codes(PARAMS, quant, table)["blocks_1"]["mlp"]["fc2"]["w_codes"])
  row_bytes = [-(-codes.shape[0] * int(b) // 8) for b in bits]  # each output channel: ceil(bits * in / 8) bytes
  packed, offsets = flat["quant/blocks_1/mlp/fc2/w_packed"], np.cumsum([0] + row_bytes)
  assert packed.size == offsets[-1] and set(bits.tolist()) == {1, 2, 3}
  for c, b in enumerate(bits):
    np.testing.assert_array_equal(packed[offsets[c]:offsets[c + 1]], pack.pack(codes[:, c], int(b)))
  # Expected mean stored bits over every matmul kernel + embedding: x_embedder at 8, float label table at 32.
  total = bits_sum = 0
  for p in quantized.quantized_layer_paths(quant):
    k = quantized._get(PARAMS, p)["kernel"]
    b = 8 if p == "x_embedder" else quantized._get(quant, p)["w_bits"].reshape(-1)
    bits_sum += np.sum(np.broadcast_to(b, (k.shape[1],))) * k.shape[0]
    total += k.size
  emb = PARAMS["y_embedder"]["embedding_table"]["embedding"].size
  assert stats["bits_per_weight"] == pytest.approx((bits_sum + 32 * emb) / (total + emb))


@pytest.mark.parametrize("case", ["lora_smooth_w2", "rotate_smooth_w4a4", "rotate_modiff_static_w4a4"])
def test_reimported_model_draws_identical_samples(case, tmp_path):
  table, quant = quantized_model(case)
  quantized.export_quantized(str(tmp_path / "q.npz"), CFG, PARAMS, quant, table)
  cfg, variables, int_table = quantized.import_quantized(str(tmp_path / "q.npz"))
  plan = plan_lib.make_plan(1000, "ddim2")
  sample_cfg = types.SimpleNamespace(method="ddim", eta=0.0, cfg_scale=2.0, clip_x0=True)
  draw = lambda policies, v: sample.make_sample_fn(cfg, plan, sample_cfg, parallel.make_mesh(1), policies)(
      v, jax.random.key(0), jnp.arange(6) % 10, jnp.arange(6))

  a = draw(table, {"params": PARAMS, "quant": quant})
  b = draw(int_table, variables)
  assert float(jnp.std(a)) > 0
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_refused(tmp_path):
  with pytest.raises(ValueError, match="lora_rank=0"):
    spec_lib.LayerSpec(weight=weights.Codes(2), lora_rank=4)
  npz.export_npz(str(tmp_path / "fp.npz"), PARAMS, metadata=dict(kind="dit_params"))
  with pytest.raises(ValueError, match="not a quantized DiT export"):
    quantized.import_quantized(str(tmp_path / "fp.npz"))
  table, quant = quantized_model("w2a4")
  int_table = quantized.deployed_table(table)
  assert all(isinstance(s.weight, weights.Codes) and s.lora_rank == 0 and not s.train for _, s in int_table)
  assert int_table[1][1].input == table[1][1].input and int_table[1][1].weight.bits == table[1][1].weight.bits
  with pytest.raises(ValueError, match="come from a 'scalar'"):
    quantized.integer_codes(PARAMS, quant, int_table)
  path = str(tmp_path / "q.npz")
  quantized.export_quantized(path, CFG, PARAMS, quant, table)
  tree, manifest = npz.import_npz(path)
  tree["quant"]["blocks_0"]["mlp"]["fc1"]["w_packed"] = tree["quant"]["blocks_0"]["mlp"]["fc1"]["w_packed"][:-1]
  npz.export_npz(path, tree, manifest["metadata"])
  with pytest.raises(ValueError, match="quantized layer blocks_0/mlp/fc1 is malformed.*needs 1024 bytes"):
    quantized.import_quantized(path)
  del tree["quant"]["blocks_1"]
  npz.export_npz(path, tree, manifest["metadata"])
  with pytest.raises(ValueError, match="malformed quantized DiT export"):
    quantized.import_quantized(path)


def test_wave1_exports_with_policy_tables_still_import_to_the_same_model(tmp_path):
  """Exports written before the seam of parts record `policies` (LayerPolicy dicts of the fake-quant table)."""
  table, quant = quantized_model("mixed_w2_smooth")
  path = str(tmp_path / "q.npz")
  quantized.export_quantized(path, CFG, PARAMS, quant, table)
  tree, manifest = npz.import_npz(path)
  legacy = lambda s: dict(kind="fakequant", w_bits=s.weight.bits, a_bits=s.input.bits, w_symmetric=False,
                          w_group_size=0, a_steps=2, mixed_bits=s.weight.mixed, smooth=s.smooth,
                          lora_rank=s.lora_rank, grad="ste")
  meta = {k: v for k, v in manifest["metadata"].items() if k != "specs"}
  meta["policies"] = [[pat, legacy(s)] for pat, s in table]
  old = str(tmp_path / "old.npz")
  npz.export_npz(old, tree, meta)
  new_cfg, new_vars, new_table = quantized.import_quantized(path)
  old_cfg, old_vars, old_table = quantized.import_quantized(old)
  assert old_table == new_table and old_cfg == new_cfg
  x, t, y = batch()
  run = lambda tab, v: dit.DiT(config=CFG, specs=tab).apply(v, x, t, y, ctx=plan_lib.StepContext(1))
  np.testing.assert_array_equal(run(old_table, old_vars), run(new_table, new_vars))
  meta["policies"][1][1]["kind"] = "int4"
  npz.export_npz(old, tree, meta)
  with pytest.raises(ValueError, match="malformed quantized DiT export.*unknown kind 'int4'"):
    quantized.import_quantized(old)
