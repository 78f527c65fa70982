"""The additive-VQ weight part in the DiT: calibration from the statistics pass, codebook sharing, export."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffq import calibrate, parallel, plan as plan_lib
from diffq.io import npz, quantized
from diffq.jobs import sample
from diffq.models import dit, layers
from diffq.quant import vq
from diffq.seam import rules, spec as spec_lib, weights

from test_calibrate import tiny_setup

FIT = vq.FitSettings(steps_per_epoch=10, max_epochs=3, kmeans_iters=10)


def vq_table(share="type", a_bits=8, train=False, **kw):
  qcfg = ml_collections.ConfigDict(dict(
      weight="vq", w_bits=2, a_bits=a_bits, w_symmetric=False, w_group_size=0, grad="ste", keep_8bit="x_embedder,t_embedder/*,final_layer/*",
      smooth=False, omq=False, lora_rank=0, act="static",
      vq=dict(num_codebooks=2, codebook_bits=4, group_size=8, share=share, train=train, **kw)))
  return rules.quant_table(qcfg, 4)


def test_vq_linear_computes_x_times_the_decoded_kernel():
  rng = np.random.default_rng(0)
  part = weights.VQ(num_codebooks=2, codebook_bits=3, group_size=4)
  lin = layers.Linear(5, spec=spec_lib.LayerSpec(weight=part))
  x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  v = lin.init(jax.random.key(0), x)
  assert "kernel" not in v["params"] and v["quant"]["vq_codes"].shape == (5, 2, 2)
  q = dict(vq_codes=jnp.asarray(rng.integers(0, 8, (5, 2, 2)), jnp.int32),
           vq_codebooks=jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32),
           vq_scales=jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32))
  b = jnp.asarray(rng.normal(size=5), jnp.float32)
  y = lin.apply({"params": {"bias": b}, "quant": q}, x)
  books = np.asarray(q["vq_codebooks"]).astype(np.float16).astype(np.float64)
  s = np.asarray(q["vq_scales"]).astype(np.float16).astype(np.float64)
  w = np.stack([np.concatenate([s[o] * books[np.arange(2), np.asarray(q["vq_codes"])[o, j]].sum(0)
                                for j in range(2)]) for o in range(5)]).T  # (in, out)
  np.testing.assert_allclose(y, np.asarray(x, np.float64) @ w + np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", ["none", "all"])
def test_calibration_fits_each_layer_from_its_input_moment(share):
  cfg, params, cal = tiny_setup(num_images=4)
  table = vq_table(share)
  quant, report = calibrate.calibrate(cfg, {"params": params}, cal, table, vq_settings=FIT)
  stats = calibrate.statistics(cfg, {"params": params}, (), cal, {"blocks_1/mlp/fc2": ("in_xtx",)})
  h = stats["blocks_1/mlp/fc2"]["in_xtx"]
  q = quant["blocks_1"]["mlp"]["fc2"]
  kernel = params["blocks_1"]["mlp"]["fc2"]["kernel"]
  w_hat = vq.dequantize(vq.VQWeight(q["vq_codes"], q["vq_codebooks"], q["vq_scales"]))
  err = float(vq.relative_error(kernel.T, w_hat.T, h))
  assert err < 0.5 and report["blocks_1/mlp/fc2"]["vq_shared_by"] == {"none": 1, "all": 10}[share]
  same = np.array_equal(quant["blocks_0"]["mlp"]["fc2"]["vq_codebooks"], q["vq_codebooks"])
  assert same == (share != "none")
  assert "w_scale" in quant["x_embedder"]  # the boundary layer stays scalar W8A8


def test_statistics_xtx_on_8_devices_equals_1_device():
  cfg, params, cal = tiny_setup(num_images=8)
  req = {"blocks_0/attn/qkv": ("in_xtx",), "blocks_1/mlp/fc2": ("in_xtx",)}
  one = calibrate.statistics(cfg, {"params": params}, (), cal, req)
  mesh = parallel.make_mesh(8)
  sharded = calibrate.CalibrationSet(jax.device_put(cal.xs, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.DATA))), jax.device_put(cal.labels,
      parallel.batch_sharded(mesh)), cal.plan, cal.cfg_scale, cal.null_class)
  eight = calibrate.statistics(cfg, jax.device_put({"params": params}, parallel.replicated(mesh)), (), sharded, req)
  for p in req:
    np.testing.assert_allclose(eight[p]["in_xtx"], one[p]["in_xtx"], rtol=1e-5, atol=1e-4)


def test_export_round_trip_is_bit_exact_and_stores_shared_codebooks_once(tmp_path):
  cfg, params, cal = tiny_setup(num_images=4)
  table = vq_table("type", a_bits=4)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table, vq_settings=FIT)
  path = str(tmp_path / "vq.npz")
  stats = quantized.export_quantized(path, cfg, params, quant, table)
  flat = npz.flatten(npz.import_npz(path)[0])
  assert "quant/blocks_0/mlp/fc1/vq_codebooks" in flat and "quant/blocks_1/mlp/fc1/vq_codebooks" not in flat
  assert flat["quant/blocks_1/mlp/fc1/vq_packed"].dtype == np.uint8 and "params/blocks_1/mlp/fc1/kernel" not in flat
  # hand count: 4 + 4 body layers of each type over 2 blocks, 2x4-bit codes, fp16 scales and codebooks
  n = dict(adaLN_modulation=(32, 192), attn_qkv=(32, 96), attn_proj=(32, 32), mlp_fc1=(32, 128), mlp_fc2=(128, 32))
  body_bits = sum(2 * (i * o // 8 * 2 * 4 + 16 * o) + 2 * 16 * 8 * 16 for i, o in n.values())
  boundary = sum(v.size for k, v in npz.flatten(params).items() if k.endswith("kernel") and
                 k.startswith(("x_embedder", "t_embedder", "final_layer")))
  float_w = params["y_embedder"]["embedding_table"]["embedding"].size
  n_body = sum(2 * i * o for i, o in n.values())
  assert stats["bits_per_weight"] == pytest.approx((body_bits + 8 * boundary + 32 * float_w) /
                                                   (n_body + boundary + float_w))
  assert stats["bits_per_weight_total"] > stats["bits_per_weight"]  # the boundary's float scales
  cfg2, variables, int_table = quantized.import_quantized(path)
  plan = plan_lib.make_plan(1000, "ddim2")
  sample_cfg = types.SimpleNamespace(method="ddim", eta=0.0, cfg_scale=2.0, clip_x0=True)
  draw = lambda t, v: sample.make_sample_fn(cfg2, plan, sample_cfg, parallel.make_mesh(1), t)(
      v, jax.random.key(0), jnp.arange(4) % 10, jnp.arange(4))
  a = draw(table, {"params": params, "quant": quant})
  assert float(jnp.std(a)) > 0
  np.testing.assert_array_equal(np.asarray(a), np.asarray(draw(int_table, variables)))


def test_bad_vq_settings_are_refused():
  with pytest.raises(ValueError, match="does not divide"):
    dit.DiT(config=dit.preset("FM", hidden_size=36, depth=1, num_heads=2), specs=vq_table()).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
  with pytest.raises(ValueError, match="Unknown VQ codebook sharing"):
    weights.VQ(share="blocks")
  with pytest.raises(ValueError, match="no float kernel for LoRA"):
    rules.quant_table(ml_collections.ConfigDict(dict(weight="vq", omq=False, w_group_size=0, lora_rank=4)), 4)


@pytest.fixture(scope="module")
def pv_setup():
  cfg, params, cal = tiny_setup(num_images=4)
  pv = spec_lib.LayerSpec(weight=weights.VQ(2, 4, 8, "type", update_codes=True), train=True)
  table = (("blocks_*/attn/qkv", pv), ("blocks_*/mlp/fc2", pv))  # float elsewhere: a small step to compile
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, table, vq_settings=FIT)
  return cfg, params, cal.plan, table, quant


def pv_run(pv_setup, steps, mesh, **kw):
  from diffq import distill
  cfg, params, plan, table, quant = pv_setup
  d = distill.Distiller(cfg, plan, table, distill.DistillConfig(trajectories=2, images=8, trd_weight=0.0, **kw),
                        cfg_scale=1.5)
  state, frozen = d.init_state(quant)
  fn = d.jit_step(mesh, state)
  state, frozen, p = jax.device_put((state, frozen, params), parallel.replicated(mesh))
  metrics = []
  for _ in range(steps):
    x_T, y = d.trajectory_inputs(int(state["step"]) // len(plan.steps))
    state, m = fn(state, frozen, p, *parallel.shard_batch((x_T, y), mesh))
    metrics.append(jax.device_get(m))
  return d, jax.device_get(state), jax.device_get(frozen), metrics


def test_pv_tuning_moves_codebooks_tied_and_caps_code_changes(pv_setup):
  _, _, _, table, quant = pv_setup
  d, state, frozen, metrics = pv_run(pv_setup, 3, parallel.make_mesh(1), max_code_change=0.05, vq_lr=1e-2,
                                     code_lr=1.0)
  out = d.merged_quant(state, frozen)
  for layer in ("attn/qkv", "mlp/fc2"):
    a, b = (out[f"blocks_{i}"][layer.split("/")[0]][layer.split("/")[1]] for i in (0, 1))
    q0 = quant["blocks_0"][layer.split("/")[0]][layer.split("/")[1]]
    np.testing.assert_array_equal(a["vq_codebooks"], b["vq_codebooks"])  # one trained copy per sharing group
    assert not np.array_equal(a["vq_codebooks"], q0["vq_codebooks"])
    changed = np.any(np.asarray(a["vq_codes"]) != np.asarray(q0["vq_codes"]), axis=-1)
    assert 0 < changed.sum() <= 3 * np.ceil(0.05 * changed.size)  # at most the cap, each of 3 steps
  cap = (2 * np.ceil(0.05 * 96 * 4) + 2 * np.ceil(0.05 * 32 * 16)) / (2 * 96 * 4 + 2 * 32 * 16)  # qkv, fc2 groups
  assert all(m["code_change"] <= cap + 1e-6 for m in metrics) and metrics[-1]["code_change"] > 0
  assert "blocks_1/attn/qkv/vq_codebooks" not in state["quant"] and "blocks_0/attn/qkv/vq_codebooks" in state["quant"]


def test_pv_tuning_on_8_devices_equals_1_device(pv_setup):
  one = pv_run(pv_setup, 2, parallel.make_mesh(1), semi="code_change")
  eight = pv_run(pv_setup, 2, parallel.make_mesh(8), semi="code_change")
  np.testing.assert_array_equal(one[1]["discrete"]["blocks_0/mlp/fc2/vq_codes"],
                                eight[1]["discrete"]["blocks_0/mlp/fc2/vq_codes"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), one[1]["quant"], eight[1]["quant"])


def test_momentum_invalidation_zeroes_the_chosen_moments():
  import optax
  from diffq import distill
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  opt = distill.make_optimizer({"a": 0.1, "b": 0.1}, distill.DistillConfig(), 10, {"a": "vq", "b": "vq_target"})
  st = opt.init(params)
  _, st = opt.update({"a": jnp.ones(3), "b": jnp.ones((2, 2))}, st, params)
  def adam(s, key):  # the Adam state of the chain that holds leaf `key` (the others hold it masked)
    return next(x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(x, optax.ScaleByAdamState) and hasattr(x.mu[key], "shape"))
  cut = distill.zero_moments(st, {"a"})
  assert np.all(adam(cut, "a").mu["a"] == 0) and np.all(adam(cut, "a").nu["a"] > 0)
  assert np.all(adam(cut, "b").mu["b"] != 0)
  mask = {"b": jnp.array([[True, False], [False, False]])}
  cut = distill.zero_moments(st, {"b"}, ("mu", "nu"), mask)
  nu_b = np.asarray(adam(cut, "b").nu["b"])
  assert nu_b[0, 0] == 0 and np.all(nu_b.reshape(-1)[1:] > 0)


def test_pv_lamb_step_is_lr_times_the_leaf_norm():
  """AQLM's --lamb: a VQ leaf's update has norm lr x ||leaf|| (any gradient scale); plain Adam moves ~lr per entry."""
  from diffq import distill
  params = {"a": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.full((4,), 0.01)}
  grads = {"a": jnp.array([[1e3, -2e3, 5.0], [0.1, 7.0, -3.0]]), "b": jnp.array([1e-4, -2e-4, 3e-4, 1e-4])}
  lrs = {"a": 1e-2, "b": 3e-4}
  for lamb in (True, False):
    opt = distill.make_optimizer(lrs, distill.DistillConfig(vq_lamb=lamb), 10, {"a": "vq_target", "b": "vq"})
    upd, _ = opt.update(grads, opt.init(params), params)
    for k in params:
      norm = float(np.linalg.norm(np.asarray(upd[k])))
      want = lrs[k] * float(np.linalg.norm(np.asarray(params[k]))) if lamb else lrs[k] * np.sqrt(params[k].size)
      np.testing.assert_allclose(norm, want, rtol=1e-3, err_msg=f"lamb={lamb} {k}")
