import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from diffq import plan as plan_lib
from diffq.eval import flops
from diffq.models import dit


def jaxpr_dot_macs(cfg, patch_size: int = 0):
  """Independent count: MACs of every dot_general in the traced forward of one image (at `patch_size`)."""
  params = jax.eval_shape(lambda: dit.init_params(cfg, jax.random.key(0)))
  ctx = plan_lib.StepContext(kind=plan_lib.StepKind("full", patch_size=patch_size))
  fn = lambda p: dit.DiT(config=cfg).apply({"params": p}, jnp.zeros((1, cfg.input_size, cfg.input_size,
                                                                      cfg.in_channels)), jnp.zeros(1, int),
                                           jnp.zeros(1, int), ctx=ctx)
  total = 0

  def walk(jaxpr):
    nonlocal total
    for e in jaxpr.eqns:
      if e.primitive.name == "dot_general":
        (lc, rc), (lb, _) = e.params["dimension_numbers"]
        lhs = e.invars[0].aval.shape
        contract = np.prod([lhs[i] for i in lc])
        out = np.prod(e.outvars[0].aval.shape)
        total += int(out * contract)
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(params).jaxpr)
  return total, fn, params


@pytest.mark.parametrize("kw", [dict(hidden_size=64, depth=2, num_heads=4), dict(hidden_size=32, depth=3,
                                                                                   num_heads=2, patch_size=2)])
def test_analytic_macs_equal_traced_and_compiled_counts(kw):
  cfg = dit.preset("FM", **kw)
  traced, fn, params = jaxpr_dot_macs(cfg)
  assert flops.macs_per_call(cfg) == traced
  xla = jax.jit(fn).lower(params).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  # XLA counts 2 flops per MAC plus elementwise work (norms, GELU, softmax): a few percent more
  assert 2 * traced <= xla["flops"] <= 1.15 * 2 * traced


def test_dit_xl2_gflops_match_paper():
  # DiT paper Table 1/4: XL/2 118.64 Gflops, S/8 0.36 (they count MACs as "flops")
  assert flops.macs_per_call(dit.preset("DiT-XL/2")) / 1e9 == pytest.approx(118.64, rel=0.01)
  assert flops.macs_per_call(dit.preset("DiT-B/4")) / 1e9 == pytest.approx(5.56, rel=0.01)


def test_bitops_and_per_image():
  cfg = dit.preset("FM", hidden_size=32, depth=1, num_heads=2)
  m = flops.macs_per_call(cfg)
  assert flops.bitops_per_call(cfg) == m * 32 * 32
  layers = flops.dit_layer_macs(cfg)
  w = {k: 4 for k in layers}
  a = {k: 8 for k in layers}
  attn = sum(v for k, v in layers.items() if k.endswith(flops.ATTENTION_PRODUCTS))
  assert flops.bitops_per_call(cfg, w, a) == (m - attn) * 32 + attn * 64
  assert flops.macs_per_image(cfg, plan_lib.make_plan(1000, "ddim20"), cfg_scale=1.5) == 40 * m
