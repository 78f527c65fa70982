"""FlexiDiT: resize matrices against independent references, exact preservation of the powerful mode, plans with
patch sizes, the sampler's per-size segments and the FLOPs accounting of the paper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import plan as plan_lib, sampler
from diffq.eval import flops
from diffq.models import dit, flexi
from diffq.seam import rules, spec as spec_lib
from tests.test_flops import jaxpr_dot_macs

SMALL = dict(hidden_size=32, depth=2, num_heads=2)


def _perturbed(cfg, seed=0):
  """Params of `cfg` with every leaf perturbed (adaLN-Zero and the zero-init final layer would hide errors)."""
  params = dit.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)


def _kind(p=0, guide=0):
  return plan_lib.KINDS[plan_lib.at_patch("full", p, guide)]


@pytest.mark.parametrize("a,b", [(8, 4), (4, 2), (4, 8), (5, 3), (3, 7)])
def test_bilinear_matrix_matches_jax_image_resize(a, b):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((a, a))
  ref = jax.image.resize(jnp.asarray(x, jnp.float32), (b, b), "bilinear", antialias=False)
  np.testing.assert_allclose(flexi.bilinear_matrix(a, b) @ x.ravel(), np.asarray(ref).ravel(), atol=1e-5)


def test_embed_matrix_solves_the_least_squares_problem():
  """W_p = argmin ||B_{p'->p}ᵀ W_p - W'||: the token of the resized patch best matches the underlying token."""
  rng = np.random.default_rng(1)
  w = rng.standard_normal((64, 3))
  ref = np.linalg.lstsq(flexi.bilinear_matrix(8, 4).T, w, rcond=None)[0]
  np.testing.assert_allclose(flexi.embed_matrix(8, 4) @ w, ref, atol=1e-5)
  np.testing.assert_array_equal(flexi.embed_matrix(8, 8), np.eye(64, dtype=np.float32))
  np.testing.assert_array_equal(flexi.deembed_matrix(8, 8), np.eye(64, dtype=np.float32))


@pytest.mark.parametrize("preset,kw,weak", [("FM", SMALL, 8),  # the embedded model at {4, 8}
                                            ("DiT-XL/2", dict(SMALL, num_classes=10), 4)])  # XL/2's {2, 4}, small
def test_powerful_mode_equals_the_plain_model_bit_for_bit(preset, kw, weak):
  plain_cfg, cfg = dit.preset(preset, **kw), dit.preset(preset, **kw, patch_sizes=(weak,))
  plain = _perturbed(plain_cfg)
  params = flexi.from_plain(plain, cfg, dit.init_params(cfg, jax.random.key(5)))
  x = jax.random.normal(jax.random.key(2), (3, cfg.input_size, cfg.input_size, cfg.in_channels))
  t, y = jnp.array([3, 400, 999]), jnp.array([0, 7, 10])
  ref = dit.DiT(config=plain_cfg).apply({"params": plain}, x, t, y)
  out = dit.DiT(config=cfg).apply({"params": params}, x, t, y)
  np.testing.assert_array_equal(out, ref)


def test_weak_token_is_the_powerful_embedding_of_the_pooled_patch():
  """At init a patch-8 token is the patch-4 embedding of the 2x2-average-pooled 8x8 patch, and the weak output
  patch the powerful one upsampled by nearest neighbour (flexi's docstring)."""
  plain_cfg, cfg = dit.preset("FM", **SMALL), dit.preset("FM", **SMALL, patch_sizes=(8,))
  plain = _perturbed(plain_cfg)
  params = flexi.from_plain(plain, cfg, dit.init_params(cfg, jax.random.key(5)))
  x = np.random.default_rng(3).standard_normal((2, 32, 32, 1)).astype(np.float32)
  pooled = x.reshape(2, 16, 2, 16, 2, 1).mean((2, 4))
  weak = dit.patchify(jnp.asarray(x), 8) @ params["x_embedder_p8"]["kernel"]
  ref = dit.patchify(jnp.asarray(pooled), 4) @ plain["x_embedder"]["kernel"]
  np.testing.assert_allclose(weak, ref, atol=1e-5)
  v = params["final_layer"]["linear_p8"]["kernel"].reshape(32, 8, 8, 2)
  np.testing.assert_array_equal(v, np.repeat(np.repeat(plain["final_layer"]["linear"]["kernel"].reshape(
      32, 4, 4, 2), 2, 1), 2, 2))


def test_tie_recomputes_the_derived_sizes_and_untie_drops_them():
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,))
  params = _perturbed(cfg)  # derived leaves perturbed away from their tied values
  tied = flexi.tie(params, cfg)
  assert not np.array_equal(tied["x_embedder"]["kernel"], params["x_embedder"]["kernel"])
  np.testing.assert_allclose(tied["x_embedder"]["kernel"],
                             flexi.resize_embedding(params["x_embedder_p8"]["kernel"], 8, 4, 1), atol=0)
  trained = flexi.untie(tied, cfg)
  assert "x_embedder" not in trained and "linear" not in trained["final_layer"]
  assert jax.tree.all(jax.tree.map(np.array_equal, flexi.tie(trained, cfg), tied))


def test_config_errors():
  with pytest.raises(ValueError, match="not divisible by patch_size 5"):
    dit.preset("FM", patch_sizes=(5,))
  with pytest.raises(ValueError, match="distinct"):
    dit.preset("FM", patch_sizes=(4,))
  with pytest.raises(ValueError, match="runs at patch sizes"):
    dit.preset("FM").patch(8)


def test_weak_first_plan_and_validation():
  plan = plan_lib.make_plan(1000, "ddim10", weak_patch=8, t_weak=3, t_weak_guide=5)
  assert plan.kinds == ("full@p8",) * 3 + ("full@g8",) * 2 + ("full",) * 5
  assert plan.segments == ((0, 3), (3, 10))
  with pytest.raises(ValueError, match="t_weak_guide"):
    plan_lib.make_plan(1000, "ddim10", weak_patch=8, t_weak=4, t_weak_guide=2)
  icc = plan_lib.kinds_from_pattern("period:2", 10)
  with pytest.raises(ValueError, match="reads a cache"):  # the powerful segment would start on a cached step
    plan_lib.make_plan(1000, "ddim10", kinds=icc, weak_patch=8, t_weak=3)
  ok = plan_lib.make_plan(1000, "ddim10", kinds=icc, weak_patch=8, t_weak=4)
  assert ok.kinds[:5] == ("full@p8", "cached@p8", "full@p8", "cached@p8", "full")


def _sample(cfg, variables, plan, specs=(), cfg_scale=3.0, n=2):
  model = dit.DiT(config=cfg, specs=tuple(specs))
  labels, ids = jnp.arange(n) % 10, jnp.arange(n)
  rows = n * (2 if cfg_scale != 1.0 else 1)
  fn = jax.jit(lambda v: sampler.sample(dit.model_fn(model), v, jax.random.key(0), labels, ids, plan=plan,
                                        shape=(32, 32, 1), cfg_scale=cfg_scale, null_class=10,
                                        state=dit.init_states(model, v, rows, plan)))
  return np.asarray(fn(variables))


def test_weak_segment_runs_at_its_own_token_count_with_icc_state():
  """A weak-first plan with ICC caches: each segment's state has its own token count (a plan mixing the
  sizes in one segment could not run); the weak steps change the samples."""
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,))
  icc = spec_lib.with_parts((), dit.layer_paths(cfg), rules.icc_rules(dict.fromkeys(rules.ICC_LAYERS, 4),
                                                                         "plain"), "cache")
  x = jnp.zeros((1, 32, 32, 1))
  quant = dit.DiT(config=cfg, specs=icc).init(jax.random.key(0), x, jnp.zeros(1, int), jnp.zeros(1, int))["quant"]
  rng = np.random.default_rng(0)
  variables = {"params": _perturbed(cfg),
               "quant": jax.tree.map(lambda a: 0.1 * rng.standard_normal(a.shape).astype(np.float32), quant)}
  kinds = plan_lib.kinds_from_pattern("period:2", 6)
  weak_plan = plan_lib.make_plan(1000, "ddim6", kinds=kinds, weak_patch=8, t_weak=2)
  state = dit.init_states(dit.DiT(config=cfg, specs=icc), variables, 2, weak_plan)
  assert state[8]["cache"]["blocks_0"]["mlp"]["fc1"]["y"].shape == (2, 16, 128)
  assert state[0]["cache"]["blocks_0"]["mlp"]["fc1"]["y"].shape == (2, 64, 128)
  weak = _sample(cfg, variables, weak_plan, icc)
  plain = _sample(cfg, variables, plan_lib.make_plan(1000, "ddim6", kinds=kinds), icc)
  assert np.isfinite(weak).all() and not np.allclose(weak, plain, atol=1e-3)


def test_weak_guidance_combines_the_two_conditional_predictions():
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,))
  params = _perturbed(cfg)
  model = dit.model_fn(dit.DiT(config=cfg))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  t, y = jnp.array([500, 500]), jnp.array([1, 2])
  ctx = plan_lib.StepContext(0, _kind(0, 8))
  out, _ = sampler.guided(model, {"params": params}, {}, x, t, y, ctx, 4.0, 10)
  cond, _ = model({"params": params}, {}, x, t, y, plan_lib.StepContext(0, _kind()))
  guide, _ = model({"params": params}, {}, x, t, y, plan_lib.StepContext(0, _kind(8)))
  s2 = 1 - (1 - 4.0) / 2.5
  np.testing.assert_allclose(out[..., :1], guide[..., :1] + s2 * (cond[..., :1] - guide[..., :1]), atol=1e-6)
  np.testing.assert_array_equal(out[..., 1:], cond[..., 1:])
  with pytest.raises(ValueError, match="cannot carry sampler state"):
    sampler.guided(model, {"params": params}, {"cache": {}}, x, t, y, ctx, 4.0, 10)


@pytest.mark.parametrize("rank", [0, 4])
def test_weak_call_macs_match_the_traced_dots(rank):
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,), flexi_lora_rank=rank)
  assert flops.macs_per_call(cfg, _kind(8)) == jaxpr_dot_macs(cfg, 8)[0]
  assert flops.macs_per_call(cfg, _kind()) == jaxpr_dot_macs(cfg)[0]


@pytest.mark.parametrize("cond,guide,percent", [(250, 250, 100.0), (200, 200, 84.9), (150, 150, 69.8),
                                                (130, 130, 63.8), (100, 100, 54.7), (70, 70, 45.6),
                                                (90, 50, 45.6), (50, 50, 39.6), (30, 0, 29.0), (0, 0, 24.5)])
def test_macs_reproduce_the_papers_dit_xl2_percentages(cond, guide, percent):
  """x/y: the powerful model for the last x steps of the conditional branch and the last y of the guidance
  branch of DDPM-250 (../shared/research/flexidit.md §4.3)."""
  xl = dit.preset("DiT-XL/2", patch_sizes=(4,))
  plan = plan_lib.make_plan(1000, "250", weak_patch=4, t_weak=250 - cond, t_weak_guide=250 - guide)
  full = flops.macs_per_image(xl, plan_lib.make_plan(1000, "250"), 4.0)
  assert flops.macs_per_call(xl, _kind()) / 1e9 == pytest.approx(118.6, rel=2e-3)
  assert 100 * flops.macs_per_image(xl, plan, 4.0) / full == pytest.approx(percent, abs=0.05)


def test_the_xl2_sampling_config_runs_the_papers_64_percent_point():
  from configs import dit_flexi
  from diffq.jobs import sample
  c = dit_flexi.get_config("xl2")
  assert (c.method, c.spacing, c.cfg_scale, c.weak_patch) == ("ddpm", "250", 1.5, 4)
  xl = dit.preset("DiT-XL/2", patch_sizes=(4,))
  plan = plan_lib.make_plan(c.diffusion_steps, c.spacing, weak_patch=c.weak_patch, t_weak=c.t_weak)
  full = flops.macs_per_image(xl, plan_lib.make_plan(1000, "250"), c.cfg_scale)
  assert 100 * flops.macs_per_image(xl, plan, c.cfg_scale) / full == pytest.approx(63.8, abs=0.05)
  assert sample.weak_settings(c) == dict(t_weak=120, t_weak_guide=-1, weak_patch=4)


def _flexi_steps(num_devices, init, steps=2):
  from configs import train_flexidit_fm
  from diffq import configlib, parallel
  from diffq.jobs import train
  c = train_flexidit_fm.get_config("variant=shared,tiny")
  c.init, c.flexi.distill, c.flexi.anchor = init, 1.0, 1.0
  c.model.flexi_tied = True  # the shared variant: training updates the underlying boundary kernels only
  model_cfg = configlib.dit_config(c.model)
  mesh = parallel.make_mesh(num_devices)
  state = jax.device_put(train.init_state(c, model_cfg), parallel.replicated(mesh))
  fns = train.compile_train_steps(c, model_cfg, mesh, state)
  rng = np.random.default_rng(0)
  for p in (8, 4)[:steps]:
    x = rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    state, metrics = fns[p](state, *parallel.shard_batch((x, y), mesh))
  return jax.device_get(state), jax.device_get(metrics), model_cfg


def test_flexi_fine_tuning_step_on_8_devices_equals_1(tiny_export):
  """A weak (distilled) step then a powerful one: the same params on 1 and 8 devices; the trained tree holds
  the underlying boundary kernels only."""
  s1, m1, _ = _flexi_steps(1, tiny_export)
  s8, m8, cfg = _flexi_steps(8, tiny_export)
  assert "x_embedder" not in s8["params"] and "x_embedder_p8" in s8["params"]
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1["params"], s8["params"])


def test_patch_size_draws_follow_the_probabilities():
  from configs import train_flexidit_fm
  from diffq import configlib
  from diffq.jobs import train
  c = train_flexidit_fm.get_config("variant=shared,tiny")
  cfg = configlib.dit_config(c.model)
  draws = [train.patch_size_at(c, cfg, s) for s in range(2000)]
  assert draws == [train.patch_size_at(c, cfg, s) for s in range(2000)]  # a function of (seed, step)
  assert 0.45 < np.mean(np.array(draws) == 8) < 0.55
  c.flexi.probs = "1,0"
  assert {train.patch_size_at(c, cfg, s) for s in range(50)} == {4}
  c.flexi.probs = "0.5"
  with pytest.raises(ValueError, match="one per patch size"):
    train.flexi_probs(c, cfg)


@pytest.fixture(scope="module")
def flexi_export(tiny_export, tmp_path_factory):
  """The tiny export as a FlexiDiT {4, 8} (from_plain, then every leaf perturbed so the weak mode differs)."""
  from diffq.io import npz
  from diffq.jobs import sample
  plain_cfg, plain = sample.load_dit(tiny_export)
  cfg = dit.DiTConfig(**{**plain_cfg.__dict__, "patch_sizes": (8,)})
  params = flexi.from_plain(plain, cfg, _perturbed(cfg, seed=3))
  path = str(tmp_path_factory.mktemp("flexi") / "flexi.npz")
  npz.export_npz(path, jax.device_get(params), metadata=dict(kind="dit_params", model=cfg.__dict__))
  return path


def test_quantized_flexidit_keeps_boundary_quantizers_per_patch_size(flexi_export, tmp_path):
  """W2A4 PTQ of a FlexiDiT on a weak-first plan: the patch-8 boundary layers are W8A8 layers of their own
  shapes, calibrated at the weak steps; the export samples as the job did, and only under its plan."""
  from configs import dit_w2a4, sample as sample_config
  from diffq import parallel
  from diffq.io import quantized
  from diffq.jobs import quantize, sample
  c = dit_w2a4.get_config("quick,method=uniform")
  c.params, c.num_devices = flexi_export, 1
  c.sample.update(num_samples=10, batch_size=10, spacing="ddim4", evaluate=False, t_weak=2, weak_patch=8)
  c.distill.trajectories = 0
  quantize.run(c, str(tmp_path))
  model_cfg, variables, table = quantized.import_quantized(str(tmp_path / "quantized.npz"))
  q = variables["quant"]
  assert q["x_embedder_p8"]["w_scale"].shape[-1] == 32 and q["x_embedder"]["w_scale"].shape[-1] == 32
  assert q["final_layer"]["linear_p8"]["w_scale"].shape[-1] == 128 and q["final_layer"]["linear"]["w_scale"].shape[-1] == 32
  assert spec_lib.resolve("x_embedder_p8", table).weight.bits == 8
  plan = plan_lib.make_plan(1000, "ddim4", weak_patch=8, t_weak=2)
  again, _ = sample.generate(c.sample, plan, model_cfg, variables, parallel.make_mesh(1), table)
  with np.load(tmp_path / "samples.npz") as f:
    np.testing.assert_array_equal(again, f["arr_0"])
  s = sample_config.get_config("quick")
  s.update(params=str(tmp_path / "quantized.npz"), num_samples=10, batch_size=10, spacing="ddim4", evaluate=False,
           num_devices=1)
  with pytest.raises(ValueError, match="another timestep plan"):
    sample.run(s, str(tmp_path / "no_weak"))


def test_weak_first_plan_with_modiff_restarts_the_modulation_per_segment():
  """MoDiff's reconstruction state is per segment: the powerful segment starts with a warm-up (float) call,
  so its first step equals the same step of an all-powerful plan run from the same x_t."""
  from diffq.seam import inputs
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,))
  params = _perturbed(cfg)
  table = (("blocks_*", spec_lib.LayerSpec(input=inputs.Modulated(4, "dynamic"))),)
  model = dit.DiT(config=cfg, specs=table)
  plan = plan_lib.make_plan(1000, "ddim6", weak_patch=8, t_weak=3)
  states = dit.init_states(model, {"params": params}, 4, plan)
  assert states[8]["modulation"]["blocks_0"]["mlp"]["fc1"]["x_hat"].shape == (4, 16, 32)
  assert states[0]["modulation"]["blocks_0"]["mlp"]["fc1"]["x_hat"].shape == (4, 64, 32)
  out = _sample(cfg, {"params": params}, plan, table)
  assert np.isfinite(out).all()
  x = jax.random.normal(jax.random.key(4), (2, 32, 32, 1))
  fn = dit.model_fn(model)
  first, _ = fn({"params": params}, dit.init_state(model, {"params": params}, 2), x, jnp.array([300, 300]), jnp.array([1, 2]),
                plan_lib.StepContext(3, _kind()))
  plain = dit.DiT(config=cfg).apply({"params": params}, x, jnp.array([300, 300]), jnp.array([1, 2]))
  np.testing.assert_array_equal(first, plain)


def test_null_space_start_changes_only_what_the_weak_mode_sees():
  plain_cfg, cfg = dit.preset("FM", **SMALL), dit.preset("FM", **SMALL, patch_sizes=(8,))
  plain, init = _perturbed(plain_cfg), dit.init_params(cfg, jax.random.key(5))
  exact = flexi.from_plain(plain, cfg, init)
  broken = flexi.from_plain(plain, cfg, init, null_scale=0.25)
  np.testing.assert_allclose(broken["x_embedder"]["kernel"], plain["x_embedder"]["kernel"], atol=1e-6)
  diff = (broken["x_embedder_p8"]["kernel"] - exact["x_embedder_p8"]["kernel"]).reshape(8, 8, 32)
  assert np.abs(diff).max() > 1e-3  # a random component, zero on every 2x2 block mean
  np.testing.assert_allclose(diff.reshape(4, 2, 4, 2, 32).sum((1, 3)), 0, atol=1e-6)


def test_untied_boundary_layers_keep_the_plain_ones_and_train_apart():
  plain_cfg = dit.preset("FM", **SMALL)
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,), flexi_tied=False)
  plain = _perturbed(plain_cfg)
  params = flexi.from_plain(plain, cfg, dit.init_params(cfg, jax.random.key(5)), null_scale=0.25)
  assert flexi.untie(params, cfg) is params and flexi.tie(params, cfg) is params
  np.testing.assert_array_equal(params["x_embedder"]["kernel"], plain["x_embedder"]["kernel"])
  np.testing.assert_array_equal(params["final_layer"]["linear"]["kernel"], plain["final_layer"]["linear"]["kernel"])
  assert dit.preset("FM").record() == {k: v for k, v in dit.preset("FM").__dict__.items()
                                       if k not in ("patch_sizes", "flexi_tied", "flexi_lora_rank")}


def test_sampler_with_weak_and_weak_guided_steps_matches_a_python_loop():
  """The jitted scan over a plan of weak (both branches at patch 8), weak-guided and powerful steps equals a
  step-by-step numpy DDIM written from the paper's rules: CFG at the step's size, or eps = eps_8(c) +
  s2 (eps_4(c) - eps_8(c)) with s2 = 1 - (1 - s1) / 2.5."""
  cfg = dit.preset("FM", **SMALL, patch_sizes=(8,))
  variables = {"params": _perturbed(cfg)}
  plan = plan_lib.make_plan(1000, "ddim6", weak_patch=8, t_weak=2, t_weak_guide=4)
  assert plan.kinds == ("full@p8",) * 2 + ("full@g8",) * 2 + ("full",) * 2
  s1, n = 3.0, 2
  out = _sample(cfg, variables, plan, cfg_scale=s1, n=n)

  model = dit.model_fn(dit.DiT(config=cfg))
  labels, null = np.arange(n) % 10, np.full(n, 10)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(n))
  x = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (32, 32, 1)))(keys), np.float64)
  acp = plan.schedule.alphas_cumprod
  acp_prev = plan.schedule.alphas_cumprod_prev

  def eps(p, y, t_model):
    o, _ = model(variables, {}, jnp.asarray(x, jnp.float32), jnp.full(n, t_model), jnp.asarray(y),
                 plan_lib.StepContext(0, _kind(p)))
    return np.asarray(o[..., :1], np.float64)

  for i, (t, t_model) in enumerate(zip(plan.steps, plan.model_timesteps)):
    if i < 2:
      e = eps(8, null, t_model) + s1 * (eps(8, labels, t_model) - eps(8, null, t_model))
    elif i < 4:
      weak = eps(8, labels, t_model)
      e = weak + (1 - (1 - s1) / 2.5) * (eps(0, labels, t_model) - weak)
    else:
      e = eps(0, null, t_model) + s1 * (eps(0, labels, t_model) - eps(0, null, t_model))
    x0 = (x - np.sqrt(1 - acp[t]) * e) / np.sqrt(acp[t])
    x = np.sqrt(acp_prev[t]) * x0 + np.sqrt(1 - acp_prev[t]) * e
  np.testing.assert_allclose(out, x, atol=2e-4)


def test_flexi_sample_job_counts_every_call_at_its_patch_size(flexi_export, tmp_path):
  """configs/dit_flexi.py on a FlexiDiT export: samples are written and gmacs_per_image counts 2 calls at patch 8
  per weak step, one at 4 and one at 8 per weak-guided step, 2 at patch 4 per powerful step."""
  import json
  from configs import dit_flexi
  from diffq.jobs import sample
  c = dit_flexi.get_config("t_weak=1,t_weak_guide=3,quick")
  c.update(params=flexi_export, num_samples=4, batch_size=4, spacing="ddim5", evaluate=False, num_devices=1)
  sample.run(c, str(tmp_path))
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  cfg, _ = sample.load_dit(flexi_export)
  p4, p8 = flops.macs_per_call(cfg, _kind()), flops.macs_per_call(cfg, _kind(8))
  assert metrics["gmacs_per_image"] * 1e9 == pytest.approx(2 * p8 + 2 * (p4 + p8) + 2 * 2 * p4, rel=1e-12)
  with np.load(tmp_path / "samples.npz") as f:
    assert f["arr_0"].shape[0] == 4


def test_adapter_adds_its_lora_only_at_its_patch_size():
  from diffq.models import layers
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 16)).astype(np.float32)
  lin = layers.Linear(8, adapters=((8, 4),))
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                        lin.init(jax.random.key(0), x)["params"])
  assert params["lora_a_p8"].shape == (16, 4) and params["lora_b_p8"].shape == (4, 8)
  at = lambda p: np.asarray(lin.apply({"params": params}, x, plan_lib.StepContext(0, _kind(p))), np.float64)
  base = x.astype(np.float64) @ params["kernel"] + params["bias"]
  np.testing.assert_allclose(at(0), base, atol=1e-5)
  np.testing.assert_allclose(at(8), base + x @ params["lora_a_p8"].astype(np.float64) @ params["lora_b_p8"],
                             atol=1e-4)
  with pytest.raises(ValueError, match="set patch_sizes too"):
    dit.preset("FM", flexi_lora_rank=4)


def test_frozen_base_fine_tuning_keeps_the_powerful_mode_bit_for_bit(tiny_export):
  """The LoRA variant (configs/train_flexidit_fm.py default): after patch-8 steps the exported EMA's patch-4
  forward is the plain export's, bit for bit, while the patch-8 leaves (LoRAs included) moved."""
  from configs import train_flexidit_fm
  from diffq import configlib, parallel
  from diffq.jobs import sample, train
  c = train_flexidit_fm.get_config("tiny")
  c.init, c.flexi.distill, c.ema_decay = tiny_export, 1.0, 0.5
  cfg = configlib.dit_config(c.model)
  mesh = parallel.make_mesh(1)
  state = train.init_state(c, cfg)
  step = train.compile_train_steps(c, cfg, mesh, state)[8]
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = (rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32), rng.integers(0, 10, 16).astype(np.int32))
    state, _ = step(state, *parallel.shard_batch(batch, mesh))
  ema = jax.device_get(flexi.tie(state["ema"], cfg))
  plain_cfg, plain = sample.load_dit(tiny_export)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 1))
  t, y = jnp.array([10, 300, 600, 999]), jnp.array([0, 3, 7, 10])
  np.testing.assert_array_equal(dit.DiT(config=cfg).apply({"params": ema}, x, t, y),
                                dit.DiT(config=plain_cfg).apply({"params": plain}, x, t, y))
  lora = ema["blocks_0"]["mlp"]["fc1"]["lora_b_p8"]
  assert np.abs(lora).max() > 0 and np.abs(ema["patch_embed_p8"]).max() > 0
  bad = train_flexidit_fm.get_config("tiny")
  bad.flexi.probs = "0.5,0.5"
  with pytest.raises(ValueError, match="train nothing"):
    train.flexi_probs(bad, cfg)
  bad.model.flexi_tied = True
  with pytest.raises(ValueError, match="flexi_tied=False"):
    train.flexi_probs(bad, configlib.dit_config(bad.model))
