"""Step plans and the stateful sampler contract: validation, state carried across steps and reset per segment,
kind branches compiled under lax.switch, 8 devices == 1 device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import parallel, plan as plan_lib, sampler
from diffq.models import dit

REUSE = plan_lib.register_kind(plan_lib.StepKind("test_reuse", cache="read"))
COARSE = plan_lib.register_kind(plan_lib.StepKind("test_coarse", patch_size=8))


def toy_model(variables, state, x, t, y, ctx):
  """Refresh steps compute h = tanh(w x + t/1000 + y/10) and store it; read steps return the stored h (naive
  reuse). state['count'] counts the steps since the segment began (it must restart at each segment)."""
  if ctx.kind.cache == "refresh":
    h = jnp.tanh(variables["w"] * x + t[:, None, None, None] / 1000.0 + y[:, None, None, None] / 10.0)
  else:
    h = state["h"]
  new = dict(h=h, count=state["count"] + 1)
  return jnp.concatenate([h + 0.2 * state["count"][:, None, None, None], 0.5 * h], axis=-1), new


def zero_state(rows, shape=(4, 4, 1)):
  return dict(h=jnp.zeros((rows, *shape)), count=jnp.zeros((rows,)))


def loop_reference(plan, labels, ids, cfg_scale, reset=True):
  """The same sampling as a Python loop over steps (no scan, no switch), state reset at segment starts."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.asarray(ids))
  x = jax.vmap(lambda k: jax.random.normal(k, (4, 4, 1)))(keys)
  rows = len(labels) * (2 if cfg_scale != 1.0 else 1)
  starts = {s for s, _ in plan.segments} if reset else {0}
  for i, (step, kind) in enumerate(zip(plan.steps, plan.step_kinds)):
    state = zero_state(rows) if i in starts else state
    t = jnp.full((len(labels),), int(plan.model_timesteps[i]))
    out, state = sampler.guided(toy_model, {"w": 0.7}, state, x, t, jnp.asarray(labels),
                                plan_lib.StepContext(i, kind), cfg_scale, 10)
    x = sampler.denoise_step(plan.schedule, "ddim", 0.0, out, x, step, jnp.zeros_like(x))
  return np.asarray(x)


def draw(plan, labels, ids, cfg_scale, mesh=None):
  rows = len(labels) * (2 if cfg_scale != 1.0 else 1)
  fn = lambda v, y, i: sampler.sample(toy_model, v, jax.random.key(0), y, i, plan=plan, shape=(4, 4, 1),
                                      cfg_scale=cfg_scale, null_class=10, state=zero_state(rows))
  if mesh is not None:
    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return np.asarray(jax.jit(fn, in_shardings=(rep, bat, bat), out_shardings=bat)(
        {"w": 0.7}, *parallel.shard_batch((jnp.asarray(labels), jnp.asarray(ids)), mesh)))
  return np.asarray(jax.jit(fn)({"w": 0.7}, jnp.asarray(labels), jnp.asarray(ids)))


def close_tolerance(ref):
  """Scan/jit vs eager loop: the same float32 operations in another fusion order. 1e3 eps of the output's scale
  covers their round-off through 6 DDIM steps and CFG (<= 7x); a wrong state or reset is off by far more."""
  return 1e3 * np.finfo(np.float32).eps * np.abs(ref).max()


MIXED = ("full", "test_reuse", "test_reuse", "full", "test_coarse", "test_coarse")


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_state_rides_the_carry_per_kind_and_resets_at_each_segment(cfg_scale):
  plan = plan_lib.make_plan(1000, "ddim6", MIXED)
  assert plan.segments == ((0, 4), (4, 6))
  labels, ids = [1, 2, 3, 4], [0, 1, 2, 3]
  got, ref = draw(plan, labels, ids, cfg_scale), loop_reference(plan, labels, ids, cfg_scale)
  tol = close_tolerance(ref)
  assert np.abs(got - ref).max() <= tol
  assert np.abs(got - loop_reference(plan, labels, ids, cfg_scale, reset=False)).max() > 10 * tol
  all_full = plan_lib.make_plan(1000, "ddim6")
  assert np.abs(draw(plan, labels, ids, cfg_scale) - draw(all_full, labels, ids, cfg_scale)).max() > 1e-3


def test_a_plan_with_cached_steps_on_8_devices_equals_1_device():
  plan = plan_lib.make_plan(1000, "ddim6", MIXED)
  labels, ids = list(range(8)), list(range(8))
  one = draw(plan, labels, ids, 3.0, parallel.make_mesh(1))
  assert np.abs(draw(plan, labels, ids, 3.0, parallel.make_mesh(8)) - one).max() <= close_tolerance(one)


def test_invalid_plans_and_kinds_are_refused():
  with pytest.raises(ValueError, match=r"Step 0 \('test_reuse'\) reads a cache, but no earlier step"):
    plan_lib.make_plan(1000, "ddim3", ("test_reuse", "full", "full"))
  with pytest.raises(ValueError, match=r"Step 2 \('test_reuse'\) reads a cache"):  # a new segment starts at 2
    plan_lib.make_plan(1000, "ddim3", ("test_coarse", "test_coarse", "test_reuse"))
  with pytest.raises(ValueError, match="Unknown step kinds"):
    plan_lib.make_plan(1000, "ddim2", ("full", "warp"))
  with pytest.raises(ValueError, match="one kind per step"):
    plan_lib.make_plan(1000, "ddim2", ("full",))
  with pytest.raises(ValueError, match="already registered"):
    plan_lib.register_kind(plan_lib.StepKind("full", cache="read"))
  with pytest.raises(ValueError, match="unknown cache mode"):
    plan_lib.StepKind("x", cache="sometimes")


def test_a_dit_without_stateful_parts_keeps_no_state():
  cfg = dit.preset("FM", hidden_size=32, depth=1, num_heads=2)
  model = dit.DiT(config=cfg)
  variables = {"params": dit.init_params(cfg, jax.random.key(0))}
  assert dit.init_state(model, variables, rows=4) == {}
  x, t = jnp.zeros((2, 32, 32, 1)), jnp.zeros((2,), jnp.int32)
  out, state = dit.model_fn(model)(variables, {}, x, t, t, plan_lib.StepContext(0))
  assert state == {} and out.shape == (2, 32, 32, 2)
