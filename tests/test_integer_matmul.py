"""The integer matmul (diffq/seam/matmuls.py) against an exact int64 numpy reference and the fake-quant model."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import plan as plan_lib
from diffq.io import quantized
from diffq.models import dit, layers
from diffq.seam import inputs, matmuls, spec as spec_lib, weights
from tests import test_quant_export as qe

LAYERS = {  # (weight part, input part)
    "w8a8": (weights.Codes(8), inputs.Static(8, 3)),
    "w4a4_symmetric": (weights.Codes(4, symmetric=True), inputs.Static(4, 3)),
    "w2a4_mixed": (weights.Codes(2, mixed=True), inputs.Static(4, 3)),
    "w4a8_dynamic_token": (weights.Codes(4), inputs.Dynamic(8, "token")),
    "w8a8_dynamic_tensor": (weights.Codes(8), inputs.Dynamic(8, "tensor")),
    "w3a8_symmetric_mixed": (weights.Codes(3, symmetric=True, mixed=True), inputs.Static(8, 3)),
}


def layer_variables(weight, act, n_in, n_out, rng):
  """Random deployed weight variables of `weight` and per-step input ranges at `act`'s bits (zero points over
  their whole range, so the correction terms are exercised at their largest)."""
  bits = rng.integers(1, 4, (1, n_out)) if weight.mixed else np.full((1, n_out), weight.bits)
  qmax = 2 ** bits - 1
  lo = -(qmax + 1) // 2 if weight.symmetric else np.zeros_like(qmax)
  hi = (qmax - 1) // 2 if weight.symmetric else qmax
  q = dict(w_codes=rng.integers(lo, hi + 1, (n_in, n_out)), w_scale=rng.uniform(0.01, 0.1, (1, n_out)),
           w_zero=np.zeros((1, n_out)) if weight.symmetric else rng.integers(0, qmax + 1),
           a_scale=rng.uniform(0.02, 0.05, 3), a_zero=rng.integers(0, 2 ** act.bits, 3))
  if weight.mixed:
    q["w_bits"] = bits
  return {k: np.asarray(v, np.int32 if k in ("w_codes", "w_bits") else np.float32) for k, v in q.items()}


def exact_reference(x, q, act, ctx_index):
  """s_a s_w Σ (x_q - z_a)(w_q - z_w) with the integer sum in int64 (numpy), the rescale in float64."""
  if isinstance(act, inputs.Static):
    s, z, qmax = q["a_scale"][ctx_index], q["a_zero"][ctx_index], 2 ** act.bits - 1
  else:
    axes = tuple(range(x.ndim)) if act.granularity == "tensor" else (x.ndim - 1,)
    qmax = 2 ** act.bits - 1
    lo, hi = np.minimum(x.min(axes, keepdims=True), 0), np.maximum(x.max(axes, keepdims=True), 0)
    s = np.maximum((hi - lo) / qmax, 1e-8).astype(np.float32)
    z = np.round(-lo / s)
  x_q = np.clip(np.round(x / s) + np.round(z), 0, qmax).astype(np.int64) - np.round(z).astype(np.int64)
  w_q = q["w_codes"].astype(np.int64) - np.round(q["w_zero"]).astype(np.int64)
  return (x_q @ w_q).astype(np.float64) * (np.float64(s) * q["w_scale"].astype(np.float64))


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_integer_matmul_is_the_exact_integer_product_and_the_fake_quant_one_up_to_rounding(case):
  weight, act = LAYERS[case]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 96)).astype(np.float32)
  spec = spec_lib.LayerSpec(weight=weight, input=act)
  fake, integer = layers.Linear(24, spec=spec, use_bias=False), \
      layers.Linear(24, spec=spec.replace(matmul=matmuls.Integer()), use_bias=False)
  v = {"quant": layer_variables(weight, act, 96, 24, rng)}
  ctx = plan_lib.StepContext(2)
  y_int = np.asarray(jax.jit(integer.apply)(v, x, ctx))
  y_fake = np.asarray(jax.jit(fake.apply)(v, x, ctx))
  ref = exact_reference(x, v["quant"], act, 2)
  scale = np.abs(ref).max()
  assert scale > 0.1
  np.testing.assert_allclose(y_int, ref, rtol=0, atol=4e-7 * scale)  # only the final float32 rescale rounds
  np.testing.assert_allclose(y_fake, ref, rtol=0, atol=4e-6 * scale)  # float products and partial sums round


def test_integer_matmul_refuses_parts_it_cannot_run():
  cases = {"'scalar'": weights.Scalar(8), "one scale per group of 8": weights.Codes(4, group_size=8),
           "'vq'": weights.VQ()}
  for msg, w in cases.items():
    with pytest.raises(ValueError, match=msg):
      spec_lib.LayerSpec(weight=w, input=inputs.Static(8), matmul=matmuls.Integer())
  for msg, a in {"'float'": inputs.Float(), "'modulated'": inputs.Modulated(4)}.items():
    with pytest.raises(ValueError, match=msg):
      spec_lib.LayerSpec(weight=weights.Codes(8), input=a, matmul=matmuls.Integer())
  overflow = layers.Linear(2, spec=spec_lib.LayerSpec(weight=weights.Codes(8), input=inputs.Dynamic(8),
                                                      matmul=matmuls.Integer()))
  with pytest.raises(ValueError, match="overflow its int32 accumulator"):
    jax.eval_shape(overflow.init, jax.random.key(0), jnp.zeros((1, 1 << 15)))


def test_dict_form_keeps_the_matmul_and_older_specs_read_as_float():
  spec = spec_lib.LayerSpec(weight=weights.Codes(4, mixed=True), input=inputs.Static(4, 20),
                            matmul=matmuls.Integer())
  assert spec_lib.from_dict(json.loads(json.dumps(spec_lib.to_dict(spec)))) == spec
  float_dict = spec_lib.to_dict(spec.replace(matmul=matmuls.Float()))
  assert "matmul" not in float_dict and spec_lib.from_dict(float_dict).matmul == matmuls.Float()


@pytest.mark.parametrize("case", ["w2a4", "symmetric_w3", "mixed_w2_smooth", "rotate_smooth_w4a4", "group8_w4"])
def test_integer_model_matches_the_deployed_model_up_to_rounding(case):
  table, quant = qe.quantized_model(case)
  deployed = quantized.deployed_table(table)
  int_table, kept = spec_lib.with_integer_matmuls(deployed, dit.layer_paths(qe.CFG))
  quantized_paths = quantized.quantized_layer_paths(quant)
  n_int = sum(isinstance(s.matmul, matmuls.Integer) for _, s in int_table)
  if case == "group8_w4":  # grouped body layers keep the float matmul; only the W8A8 boundary layer converts
    assert n_int == 1 and set(kept) == set(quantized_paths) - {"x_embedder"}
    assert all("group of 8" in r for r in kept.values())
  else:
    assert n_int == len(quantized_paths) and not kept
  variables = {"params": qe.PARAMS, "quant": quantized.integer_codes(qe.PARAMS, quant, table)}
  x, t, y = qe.batch()
  run = lambda tab: np.asarray(dit.DiT(config=qe.CFG, specs=tab).apply(variables, x, t, y,
                                                                      ctx=plan_lib.StepContext(1)))
  a, b = run(deployed), run(int_table)
  err = np.abs(a - b)
  # A float-rounding difference can move an activation across a rounding boundary in the next quantized layer;
  # nearly every output is unaffected.
  assert np.mean(err < 1e-5 * np.abs(a).max()) > 0.99 and err.max() < 0.05 * np.abs(a).max()
