"""`Linear`: the one seam every DiT matmul goes through, a fixed pipeline over the parts of its `LayerSpec`.

    cached step (the cache part reads):   y = cache.read(x)
    otherwise:   y = input((x / s) R) @ weight(Rᵀ ((W + A B) * s[:, None])) [+ x A_p B_p] + b;   cache.write(x, y)

with @ the matmul part's product (float operands, or int8 codes: diffq/seam/matmuls.py), s the smoothing
pre-scale (if `spec.smooth`), R the block-Hadamard rotation (if `spec.rotate`), A B LoRA
(if `spec.lora_rank`) and A_p B_p a FlexiDiT adapter, a float LoRA in `params` applied only at its patch size p
(`adapters`; A_p B_p is not part of an ICC cache's low-rank increment). The parts' variables live
in their collections (`quant` for quantizers, LoRA, smoothing and ICC factors; `cache` for sampler state), float
weights in `params`. See diffq/seam/ for the parts.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffq import plan
from diffq.seam import matmuls, spec as spec_lib


class Linear(nn.Module):
  """y = x @ kernel + bias, kernel (in, out); what runs is set by `spec` (see the module docstring)."""
  features: int
  spec: spec_lib.LayerSpec = spec_lib.FLOAT
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  adapters: tuple[tuple[int, int], ...] = ()  # FlexiDiT: (patch size, rank) of a LoRA used only at that size
  dtype: str = "float32"  # compute dtype of the matmul operands and the output; accumulation is float32

  @nn.compact
  def __call__(self, x, ctx: plan.StepContext | None = None):
    """y (..., features) of x (..., in) at step `ctx` (a plan.StepContext; None: step 0, a full step)."""
    ctx = plan.StepContext() if ctx is None else ctx
    s, cd = self.spec, jnp.dtype(self.dtype)
    q = {name: self._variable(name, v) for name, v in s.variables(x.shape[-1], self.features).items()}
    if s.cache.reads(ctx.kind):
      return s.cache.read(self, x, q).astype(cd)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32) \
        if s.weight.needs_kernel else None
    # The parts (smoothing, rotation, fake-quant, their state) run in float32 whatever the compute dtype, so
    # integer grids are the float32 run's; only the matmul operands are cast.
    x_in = s.transform_input(x.astype(jnp.float32), q)
    y = s.matmul(s, self, x_in, q, ctx, lambda: s.effective_weight(kernel, q), cd)
    for p, rank in self.adapters:  # standard LoRA start: A ~ N(0, 1/in), B = 0 (the adapter adds nothing)
      if self.is_initializing() or ctx.kind.patch_size == p:
        a = self.param(f"lora_a_p{p}", nn.initializers.lecun_normal(), (x.shape[-1], rank), jnp.float32)
        b = self.param(f"lora_b_p{p}", nn.initializers.zeros, (rank, self.features), jnp.float32)
        if ctx.kind.patch_size == p:
          y = y + matmuls.dot(matmuls.dot(x, a, cd), b, cd)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32)
    s.cache.write(self, x, y, ctx.kind, q)
    return y.astype(cd)

  def _variable(self, name: str, v):
    if v.init is not None:
      make = lambda: v.init(self.make_rng("params"), v.shape, v.dtype)
    else:
      make = lambda: jnp.full(v.shape, v.fill, v.dtype)
    return self.variable(v.collection, name, make).value
