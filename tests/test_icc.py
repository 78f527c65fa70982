"""ICC (increment-calibrated caching) on the seam: the paper's identities (full rank == full compute, rank 0 ==
naive reuse), the weighted SVD against numpy, per-kind MACs against traced counts and the paper's table, cached
plans on 8 devices == 1 device, state shapes under guidance, clear errors, and the job end to end."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dit_icc
from diffq import calibrate, parallel, plan as plan_lib
from diffq.cache import icc
from diffq.eval import flops
from diffq.jobs import icc as icc_job, quantize, sample
from diffq.models import dit, layers
from diffq.seam import caches, rules, spec as spec_lib
from tests.test_calibrate import tiny_setup
from tests.test_flops import jaxpr_dot_macs

CFG = dit.preset("FM", hidden_size=32, depth=2, num_heads=2)
CACHED = plan_lib.StepContext(1, plan_lib.CACHED)


def icc_table(rank, svd="plain", cfg=CFG, mlp="layers", ranks=None):
  ranks = ranks or dict.fromkeys(rules.ICC_LAYERS, rank)
  return spec_lib.with_parts((), dit.layer_paths(cfg), rules.icc_rules(ranks, svd, "float32", mlp), "cache")


class _ns(dict):
  __getattr__ = dict.__getitem__


@pytest.fixture(scope="module")
def model():
  cfg, params, cal = tiny_setup()
  return cfg, params, cal


def refresh_then_read(cfg, variables, table, x_full, x_read, t, y):
  """(read-step output at x_read after a refresh step at x_full, full output at x_read)."""
  m = dit.DiT(config=cfg, specs=tuple(table))
  state = dit.init_state(m, variables, x_full.shape[0])
  fn = dit.model_fn(m)
  _, state = fn(variables, state, x_full, t, y, plan_lib.StepContext(0))
  read, _ = fn(variables, state, x_read, t - 50, y, CACHED)
  full = dit.DiT(config=cfg).apply({"params": variables["params"]}, x_read, t - 50, y)
  return read, full, state


def inputs(n=4):
  k1, k2 = jax.random.split(jax.random.key(7))
  x = jax.random.normal(k1, (n, 32, 32, 1))
  return x, x + 0.1 * jax.random.normal(k2, x.shape), jnp.full((n,), 700), jnp.arange(n) % 10


def test_full_rank_plain_svd_equals_full_compute(model):
  cfg, params, cal = model
  table = icc_table(32)  # = min(in, out / splits) of every cached layer (hidden 32)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, None, table, parts=("cache",))
  x0, x1, t, y = inputs()
  read, full, _ = refresh_then_read(cfg, {"params": params, "quant": quant}, table, x0, x1, t, y)
  np.testing.assert_allclose(read, full, rtol=1e-4, atol=1e-4 * float(jnp.abs(full).max()))
  stale, _, _ = refresh_then_read(cfg, {"params": params, "quant": quant}, icc_table(0), x0, x1, t, y)
  assert float(jnp.abs(stale - full).max()) > 100 * float(jnp.abs(read - full).max())  # reuse is far off


def test_bfloat16_state_is_the_float32_read_of_the_rounded_state(model):
  """Reference: the float32-state read with the state rounded to bfloat16 by hand (same rounding, no other change)."""
  cfg, params, cal = model
  table = icc_table(8)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, None, table, parts=("cache",))
  v = {"params": params, "quant": quant}
  x0, x1, t, y = inputs()
  _, _, state = refresh_then_read(cfg, v, table, x0, x1, t, y)
  rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), state)
  fn = lambda tab, st: dit.model_fn(dit.DiT(config=cfg, specs=tab))(v, st, x1, t - 50, y, CACHED)[0]
  want = fn(table, rounded)
  bf16 = spec_lib.with_parts((), dit.layer_paths(cfg), rules.icc_rules(dict.fromkeys(rules.ICC_LAYERS, 8), "plain",
                                                                        "bfloat16"), "cache")
  _, _, state16 = refresh_then_read(cfg, v, bf16, x0, x1, t, y)
  assert {a.dtype for a in jax.tree.leaves(state16)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_allclose(fn(bf16, state16), want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(fn(table, state) - want).max()) > 1e-4  # the rounding is visible, so the check can fail
  with pytest.raises(ValueError, match="Unknown ICC state_dtype"):
    caches.ICC(4, state_dtype="float16")


@pytest.mark.parametrize("rank", [4, 32])
def test_chained_mlp_is_the_linearised_mlp_through_the_factors(model, rank):
  """Reference (numpy, float64), per block: the refresh step's MLP output is the plain MLP at x_c, and the cached
  step's is y2_c + ((x - x_c) B1 A1 diag(GELU'(y1_c))) B2 A2 with the calibrated factors; at full rank (32) the
  factors are the weights, so this is the MLP's Jacobian step from x_c."""
  cfg, params, _ = model
  table = icc_table(rank, mlp="chain", ranks=dict(fc1=rank, fc2=rank))
  quant, _ = calibrate.calibrate(cfg, {"params": params}, None, table, parts=("cache",))
  v = {"params": params, "quant": quant}
  x0, x1, t, y = inputs()
  m = dit.DiT(config=cfg, specs=table)
  fn = dit.model_fn(m)
  fresh = dit.init_state(m, v, x0.shape[0])

  def mlp_io(state, x, tt, ctx):  # {block: (MLP input, MLP output)} of one network call
    got = {}

    def keep(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, dit.MLP) and context.method_name == "__call__":
        got[context.module.scope.path[0]] = (np.asarray(args[0], np.float64), np.asarray(out, np.float64))
      return out

    with nn.intercept_methods(keep):
      _, new = fn(v, state, x, tt, y, ctx)
    return got, new

  refresh, state = mlp_io(fresh, x0, t, plan_lib.StepContext(0))
  cached, _ = mlp_io(state, x1, t - 50, CACHED)
  gelu = lambda u: np.asarray(nn.gelu(jnp.asarray(u, jnp.float32), approximate=True), np.float64)
  gelu_grad = lambda u: np.asarray(jax.vmap(jax.grad(lambda z: nn.gelu(z, approximate=True)))(
      jnp.asarray(u.ravel(), jnp.float32)), np.float64).reshape(u.shape)
  for i in range(cfg.depth):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params[f"blocks_{i}"]["mlp"])
    f1, f2 = quant[f"blocks_{i}"]["mlp"]["fc1"], quant[f"blocks_{i}"]["mlp"]["fc2"]
    b1, a1, b2, a2 = (np.asarray(a[0], np.float64) for a in (f1["icc_b"], f1["icc_a"], f2["icc_b"], f2["icc_a"]))
    if rank == 32:
      np.testing.assert_allclose(b1 @ a1, p["fc1"]["kernel"], atol=1e-5)
      np.testing.assert_allclose(b2 @ a2, p["fc2"]["kernel"], atol=1e-5)
    (xc, yc), (x, got) = refresh[f"blocks_{i}"], cached[f"blocks_{i}"]
    y1c = xc @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    np.testing.assert_allclose(yc, gelu(y1c) @ p["fc2"]["kernel"] + p["fc2"]["bias"], rtol=1e-4, atol=1e-4)
    want = yc + ((((x - xc) @ b1 @ a1) * gelu_grad(y1c)) @ b2) @ a2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(got - yc).max() > 100 * np.abs(got - want).max()  # the increment is far from zero


def test_rank_zero_equals_naive_reuse_of_the_branch_outputs(model):
  """Reference: the FP network with each block's attn/proj and mlp/fc2 outputs replaced by those of the refresh
  step (FORA-style reuse), written with an interceptor, independent of the cache part."""
  cfg, params, _ = model
  x0, x1, t, y = inputs()
  read, _, _ = refresh_then_read(cfg, {"params": params}, icc_table(0), x0, x1, t, y)
  stored = {}

  def keep(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.Linear):
      stored["/".join(context.module.scope.path)] = out
    return out

  def reuse(next_fun, args, kwargs, context):
    path = "/".join(context.module.scope.path) if isinstance(context.module, layers.Linear) else ""
    return stored[path] if path.endswith(("attn/proj", "mlp/fc2")) else next_fun(*args, **kwargs)

  m = dit.DiT(config=cfg)
  with nn.intercept_methods(keep):
    m.apply({"params": params}, x0, t, y)
  with nn.intercept_methods(reuse):
    want = m.apply({"params": params}, x1, t - 50, y)
  np.testing.assert_allclose(read, want, rtol=1e-6, atol=1e-6)


def test_cache_state_has_one_row_per_network_row(model):
  cfg, params, _ = model
  m = dit.DiT(config=cfg, specs=icc_table(4))
  v = {"params": params, "quant": calibrate.quant_template(cfg, icc_table(4))}
  state = dit.init_state(m, v, rows=2 * 3)  # 3 images under guidance
  qkv = state["cache"]["blocks_0"]["attn"]["qkv"]
  assert qkv["xb"].shape == (6, cfg.num_tokens, 3, 4) and qkv["y"].shape == (6, cfg.num_tokens, 96)
  assert state["cache"]["blocks_1"]["mlp"]["fc2"]["xb"].shape == (6, cfg.num_tokens, 1, 4)
  reuse = dit.init_state(dit.DiT(config=cfg, specs=icc_table(0)), {"params": params}, rows=6)
  assert set(reuse["cache"]["blocks_0"]["mlp"]["fc1"]) == {"y"}  # rank 0 stores no input


def test_weighted_svd_is_the_weighted_optimum_and_exact_at_full_rank():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(12, 9))
  r, l = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 9)
  b, a = icc.weighted_svd(w, 9, r, l)
  np.testing.assert_allclose(b @ a, w, atol=1e-5)
  err = lambda m: np.linalg.norm(r[:, None] * (w - m) * l[None, :])
  bw, aw = icc.weighted_svd(w, 3, r, l)
  bp, ap = icc.weighted_svd(w, 3)
  u, s, vt = np.linalg.svd(r[:, None] * w * l[None, :])
  assert err(bw @ aw) == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-5)  # Eckart-Young in the weighted norm
  assert err(bw @ aw) < err(bp @ ap)
  np.testing.assert_allclose(icc.channel_weights(np.array([[4.0, 1e-9], [4.0, 1e-9]])), [2 + 1e-6, 2e-3 + 1e-6])


def test_channel_aware_factors_come_from_one_statistics_pass(model):
  cfg, params, cal = model
  quant, _ = calibrate.calibrate(cfg, {"params": params}, cal, icc_table(8, "ca"), parts=("cache",))
  q = quant["blocks_0"]["attn"]["qkv"]
  assert q["icc_b"].shape == (3, 32, 8) and q["icc_a"].shape == (3, 8, 32)
  plain, _ = calibrate.calibrate(cfg, {"params": params}, None, icc_table(8), parts=("cache",))
  assert not np.allclose(q["icc_b"], plain["blocks_0"]["attn"]["qkv"]["icc_b"])
  cd, _ = calibrate.calibrate(cfg, {"params": params}, cal, icc_table(8, "cd"), parts=("cache",))
  assert np.isfinite(cd["blocks_1"]["mlp"]["fc2"]["icc_a"]).all()


@pytest.mark.parametrize("mlp", ["layers", "chain"])
def test_cached_step_macs_match_traced_matmuls_and_the_paper(mlp):
  cfg = dit.preset("FM", hidden_size=64, depth=2, num_heads=4)
  table = icc_table(8, cfg=cfg, mlp=mlp, ranks=dict(qkv=8, proj=8, fc1=8, fc2=4))
  v = jax.eval_shape(lambda: dit.DiT(config=cfg, specs=table).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, int), jnp.zeros(1, int)))
  v = {k: c for k, c in v.items() if k != "cache"}
  m = dit.DiT(config=cfg, specs=table)
  state = jax.eval_shape(lambda vv: dit.init_state(m, vv, 1), v)
  for ctx in (CACHED, plan_lib.StepContext(0, plan_lib.FULL)):  # a refresh step also projects x_c B for the cache
    fn = lambda vv, st, c=ctx: dit.model_fn(m)(vv, st, jnp.zeros((1, 32, 32, 1)), jnp.zeros(1, int),
                                               jnp.zeros(1, int), c)
    traced = _count_dots(jax.make_jaxpr(fn)(v, state).jaxpr)
    assert flops.macs_per_call(cfg, ctx.kind, table) == traced
  if mlp == "chain":
    return
  table = icc_table(8, cfg=cfg)
  assert flops.macs_per_call(cfg, plan_lib.FULL) == jaxpr_dot_macs(cfg)[0]
  # research/icc.md §6, DiT-XL/2 at 256^2: full 118.62 G, ICC r = 128 23.49 G, reuse only 0.24 G per call
  xl = dit.preset("DiT-XL/2")
  assert flops.macs_per_call(xl, plan_lib.CACHED, icc_table(128, cfg=xl)) / 1e9 == pytest.approx(23.49, rel=0.01)
  assert flops.macs_per_call(xl, plan_lib.CACHED, icc_table(0, cfg=xl)) / 1e9 == pytest.approx(0.24, rel=0.05)
  p2 = plan_lib.make_plan(1000, "ddim20", pattern="period:2")
  assert flops.macs_per_image(cfg, p2, 3.0, table) == 20 * (flops.macs_per_call(cfg, plan_lib.FULL, table) +
                                                             flops.macs_per_call(cfg, plan_lib.CACHED, table))


def _count_dots(jaxpr):
  total = 0
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      (lc, _), _ = e.params["dimension_numbers"]
      total += int(np.prod(e.outvars[0].aval.shape) * np.prod([e.invars[0].aval.shape[i] for i in lc]))
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      total += _count_dots(sub)
  return total


def test_cached_plan_on_8_devices_equals_1_device(model):
  cfg, params, _ = model
  table = icc_table(4)
  quant, _ = calibrate.calibrate(cfg, {"params": params}, None, table, parts=("cache",))
  plan = plan_lib.make_plan(1000, "ddim6", pattern="FCCFCF")
  conf = _ns(method="ddim", eta=0.0, cfg_scale=2.0, clip_x0=True)
  v = {"params": params, "quant": quant}
  draw = lambda n: np.asarray(sample.make_sample_fn(cfg, plan, conf, parallel.make_mesh(n), table)(
      v, jax.random.key(0), jnp.arange(8) % 10, jnp.arange(8)))
  one, eight = draw(1), draw(8)
  np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
  full = np.asarray(sample.make_sample_fn(cfg, plan_lib.make_plan(1000, "ddim6"), conf, parallel.make_mesh(1), ())(
      {"params": params}, jax.random.key(0), jnp.arange(8) % 10, jnp.arange(8)))
  assert 0 < np.abs(one - full).max() < 0.5 * np.abs(full).max()  # cached steps change the samples, a little


def test_bad_plans_and_specs_are_clear_errors(tiny_export, tmp_path):
  with pytest.raises(ValueError, match="no earlier step of its segment"):
    plan_lib.make_plan(1000, "ddim4", pattern="CFFF")
  with pytest.raises(ValueError, match="4 letters F"):
    plan_lib.make_plan(1000, "ddim4", pattern="FCX")
  with pytest.raises(ValueError, match="period must be a positive integer"):
    plan_lib.make_plan(1000, "ddim4", pattern="period:0")
  with pytest.raises(ValueError, match="Unknown ICC layer types"):
    rules.icc_rules(dict(qkvv=4), "ca")
  with pytest.raises(ValueError, match="Unknown ICC factorisation"):
    caches.ICC(4, svd="fisher")
  with pytest.raises(ValueError, match="needs ICC ranks > 0 on fc1 and fc2"):
    rules.icc_rules(dict(fc1=4, fc2=0), "plain", mlp="chain")
  with pytest.raises(ValueError, match="chained ICC layer needs rank > 0 and one output split"):
    caches.ICC(4, splits=3, chain="first")
  with pytest.raises(ValueError, match="Unknown icc.mlp"):
    rules.icc_rules(dict(fc1=4), "plain", mlp="fused")
  with pytest.raises(ValueError, match=r"needs ICC\(chain='first'\) on fc1"):
    caches.chained(caches.ICC(4, chain="first"), caches.ICC(4))
  with pytest.raises(ValueError, match="exceeds the rank"):
    icc.weighted_svd(np.ones((4, 3)), 5)
  c = job_cfg(tiny_export)
  c.sample.cache_pattern = ""
  with pytest.raises(ValueError, match="no cached step"):
    icc_job.run(c, str(tmp_path))
  conf = _ns(num_samples=2, batch_size=2)
  with pytest.raises(ValueError, match="no layer of the model has a cache part"):
    sample.generate(conf, plan_lib.make_plan(1000, "ddim4", pattern="period:2"), CFG, {}, parallel.make_mesh(1))
  q = dit_icc_quantize_cfg(tiny_export)
  with pytest.raises(ValueError, match="cache_pattern=''"):
    quantize.run(q, str(tmp_path / "q"))


def dit_icc_quantize_cfg(params):
  from configs import dit_w2a4
  c = dit_w2a4.get_config("quick,method=uniform")
  c.params, c.num_devices = params, 1
  c.sample.cache_pattern = "period:2"
  return c


def job_cfg(params, arg="quick,rank=4,period=2"):
  c = dit_icc.get_config(arg)
  c.params, c.num_devices = params, 1
  c.sample.update(num_samples=10, batch_size=10, spacing="ddim4", evaluate=False)
  return c


def test_icc_job_end_to_end(tiny_export, tmp_path):
  out = icc_job.run(job_cfg(tiny_export), str(tmp_path))
  for name in ("samples.npz", "grid.png", "metrics.json"):
    assert (tmp_path / name).exists(), name
  fp_macs = flops.macs_per_image(CFG, plan_lib.make_plan(1000, "ddim4"), 3.0) / 1e9
  assert out["cached_steps"] == 2 and 0.5 * fp_macs < out["gmacs_per_image"] < 0.75 * fp_macs
  assert out["macs_vs_full"] == pytest.approx(out["gmacs_per_image"] / fp_macs)
  assert out["icc_params"] == 2 * 4 * (32 * 3 + 96 + 32 + 32 + 32 + 128 + 128 + 32)  # 2 blocks x r x (in+out)
  # 2 rows x 2 blocks x 4 bytes x tokens x (y_c: out, x_c B: splits x r) over qkv, proj, fc1, fc2
  assert out["cache_bytes_per_image"] == 2 * 2 * 4 * CFG.num_tokens * (96 + 3 * 4 + 32 + 4 + 128 + 4 + 32 + 4)
  assert json.load(open(tmp_path / "metrics.json"))["icc_svd"] == "ca"


def test_icc_caches_a_quantized_export_factorising_the_weight_it_runs(tmp_path):
  from diffq.io import quantized
  from tests.test_quant_export import PARAMS, quantized_model
  table, quant = quantized_model("mixed_w2_smooth")
  path = str(tmp_path / "quantized.npz")
  quantized.export_quantized(path, CFG, PARAMS, quant, table,
                             metadata=dict(settings=dict(sampler=dict(diffusion_steps=1000, spacing="ddim4"))))
  c = job_cfg(path, "quick,rank=32,period=2,svd=plain")
  out = icc_job.run(c, str(tmp_path / "icc"))
  assert out["cached_steps"] == 2 and out["model"] == "quantized.npz"
  cfg, v, deployed = quantized.import_quantized(path)
  full = spec_lib.with_parts(deployed, dit.layer_paths(cfg), icc_table(32), "cache")
  q, _ = calibrate.calibrate(cfg, v, None, full, base_table=deployed, parts=("cache",))
  layer, spec = q["blocks_0"]["mlp"]["fc1"], spec_lib.resolve("blocks_0/mlp/fc1", deployed)
  w = spec.weight.matrix(layer, None) / layer["smooth"][:, None]  # dequantized codes, un-smoothed
  np.testing.assert_allclose(layer["icc_b"][0] @ layer["icc_a"][0], w, atol=1e-5 * float(np.abs(w).max()))
  np.testing.assert_array_equal(layer["w_codes"], v["quant"]["blocks_0"]["mlp"]["fc1"]["w_codes"])
