"""Additive vector quantization of weight matrices (AQLM, Egiazarian et al. 2024; AQUATIC-Diff's stage 1).

Output channel o's weight row is cut into G = in / g groups of g inputs; group j is a scaled sum of M codewords,

    Ŵ[o, j] = s_o Σ_m C_m[B[o, j, m]],      C_m (K = 2^b, g) codebooks, B (out, G, M) codes, s (out,) scales,

and (B, C, s) minimise the layer's output error on its calibration inputs X (rows of W = output channels):

    L = tr((W - Ŵ) H (W - Ŵ)ᵀ) / tr(W H Wᵀ),     H = XᵀX                    (AQLM eq. 2, relative)

from a residual k-means start, alternating Adam on (C, s) with B fixed and one Hessian-aware beam-search sweep
over B (`beam_search`: groups in random order, then codebooks, the top `beam_size` partial code sets kept per
row) with (C, s) fixed, until an epoch improves L by less than `tolerance`. Layers may share one codebook set
(`quantize_weights`): their codes are searched apart, the codebooks fitted to the sum of their losses.

Codebooks and scales are used at float16 (what an export stores), so the model computes exactly what ships.
`lut_matmul` is the deployed multiply-free form: per token a table of input-codeword products, gathered per output.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

MAX_CODE_BITS = 16  # codes are stored as uint16 at most
STORED_FLOAT_BITS = 16  # codebooks and scales are stored as float16


class VQWeight(NamedTuple):
  """codes (out, G, M) int32 in [0, K); codebooks (M, K, g) float32; scales (out,) float32."""
  codes: jax.Array
  codebooks: jax.Array
  scales: jax.Array


@dataclasses.dataclass(frozen=True)
class FitSettings:
  """How `quantize_weights` fits (AQLM's defaults: beam 1, 100 Adam steps per epoch, lr 1e-4, betas (0, 0.95),
  amsgrad, stop below 1% relative improvement; k-means from random points, at most 100 Lloyd iterations)."""
  beam_size: int = 1
  steps_per_epoch: int = 100
  lr: float = 1e-4
  max_epochs: int = 100
  tolerance: float = 0.01
  kmeans_iters: int = 100
  kmeans_tol: float = 0.0  # k-means stops once at most this fraction of assignments changes
  kmeans_points: int = 0  # k-means fits on at most this many random groups (0: all, as AQLM)
  seed: int = 0

  def __post_init__(self):
    if self.beam_size < 1 or self.steps_per_epoch < 0 or self.max_epochs < 1 or self.kmeans_iters < 0 \
        or self.kmeans_points < 0:
      raise ValueError(f"VQ fitting needs beam_size >= 1, steps_per_epoch >= 0, max_epochs >= 1, kmeans_iters >= 0 "
                       f"and kmeans_points >= 0; got {self}.")
    if not 0.0 <= self.tolerance < 1.0 or self.lr <= 0:
      raise ValueError(f"VQ fitting needs 0 <= tolerance < 1 and lr > 0; got {self}.")


def check_shape(n_in: int, num_codebooks: int, codebook_bits: int, group_size: int, what: str = "layer") -> None:
  """Raises a ValueError naming the fix if the code layout is impossible for a layer of `n_in` inputs."""
  if num_codebooks < 1:
    raise ValueError(f"num_codebooks must be >= 1; got {num_codebooks}.")
  if not 1 <= codebook_bits <= MAX_CODE_BITS:
    raise ValueError(f"codebook_bits must lie in 1..{MAX_CODE_BITS} (codes are stored as uint16); got "
                     f"{codebook_bits}.")
  if group_size < 1 or n_in % group_size:
    raise ValueError(f"VQ group_size {group_size} does not divide the {what}'s {n_in} inputs; choose a divisor "
                     f"of {n_in}.")


def as_stored(a):
  """The float16 value an export stores, as float32 (identity gradient)."""
  return a.astype(jnp.float16).astype(jnp.float32)


def decode_rows(codes, codebooks, scales):
  """Ŵ rows (out, G g): s_o Σ_m C_m[B[o, j, m]] with float16-rounded codebooks and scales."""
  cb, s = as_stored(codebooks), as_stored(scales)
  m = jnp.arange(cb.shape[0])
  groups = jnp.sum(cb[m, codes], axis=-2)  # (out, G, g)
  return s[:, None] * groups.reshape(codes.shape[0], -1)


def dequantize(w: VQWeight):
  """The (in, out) kernel of a VQ weight."""
  return decode_rows(*w).T


def stored_bits(n_in: int, n_out: int, num_codebooks: int, codebook_bits: int, group_size: int,
                shared_by: int = 1) -> dict[str, float]:
  """Stored bits of one layer: codes out (in/g) M b, its share of the codebooks M 2^b g 16 / shared_by, scales
  16 out."""
  return dict(codes=n_out * (n_in // group_size) * num_codebooks * codebook_bits,
              codebooks=num_codebooks * 2 ** codebook_bits * group_size * STORED_FLOAT_BITS / shared_by,
              scales=STORED_FLOAT_BITS * n_out)


def lut_matmul(x, w: VQWeight):
  """y = x Ŵ (..., out) of x (..., in) without multiplying by weights: per token the table
  T[j, m, k] = <x_j, C_m[k]> (d M K multiply-adds), then y_o = s_o Σ_j Σ_m T[j, m, B[o, j, m]] (gathers and
  adds)."""
  codes, codebooks, scales = w
  n_out, groups, m = codes.shape
  k, g = codebooks.shape[1:]
  table = jnp.einsum("...jg,mkg->...jmk", x.reshape(*x.shape[:-1], groups, g), as_stored(codebooks))
  flat = (jnp.arange(groups)[:, None] * m + jnp.arange(m)) * k + codes  # (out, G, M) into T's (G M K)
  gathered = jnp.take(table.reshape(*x.shape[:-1], -1), flat.reshape(n_out, -1), axis=-1)
  return jnp.sum(gathered, axis=-1) * as_stored(scales)


def lut_flops(n_in: int, n_out: int, num_codebooks: int, codebook_bits: int, group_size: int) -> dict[str, int]:
  """Per token: the table's 2 d M K flops and the gather-sum's out (d/g) M additions, vs a dense 2 d out."""
  return dict(table=2 * n_in * num_codebooks * 2 ** codebook_bits,
              gather=n_out * (n_in // group_size) * num_codebooks, dense=2 * n_in * n_out)


def relative_error(w_rows, w_hat_rows, h):
  """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of rows (out, in)."""
  d = w_rows - w_hat_rows
  return jnp.sum((d @ h) * d) / jnp.sum((w_rows @ h) * w_rows)


def _row_errors(w_rows, w_hat_rows, h):
  d = w_rows - w_hat_rows
  return jnp.sum((d @ h) * d, axis=-1)


@jax.jit
def _nearest(points, c):
  return jnp.argmin(jnp.sum(c * c, axis=-1) - 2 * points @ c.T, axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(points, key, *, k: int, iters: int, tol: float = 0.0):
  """Lloyd's k-means of points (n, g) from k random distinct points (with repeats if n < k): (centroids (k, g),
  assignment (n,)), after `iters` iterations or once at most a fraction `tol` of the assignments changed. An
  empty cluster keeps its centroid."""
  n = points.shape[0]
  start = points[jax.random.choice(key, n, (k,), replace=n < k)]

  def step(carry):
    i, c, a, _ = carry
    onehot = jax.nn.one_hot(a, k, dtype=points.dtype)  # a matmul: XLA's CPU scatter-add is slow
    sums, counts = onehot.T @ points, jnp.sum(onehot, axis=0)[:, None]
    c = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), c)
    new = _nearest(points, c)
    return i + 1, c, new, jnp.mean(new != a)

  _, c, a, _ = jax.lax.while_loop(lambda s: (s[0] < iters) & (s[3] > tol), step,
                                  (0, start, _nearest(points, start), jnp.float32(1.0)))
  return c, a


def residual_kmeans(groups, key, *, num_codebooks: int, codebook_bits: int, iters: int, tol: float,
                    max_points: int):
  """(codebooks (M, K, g), codes (n, M)) of group vectors (n, g): codebook m is k-means of what the first m
  left over (fitted on at most `max_points` random groups, 0: all; then every group assigned its nearest
  codeword)."""
  books, codes, residual = [], [], groups
  fit = jax.random.permutation(jax.random.fold_in(key, num_codebooks), groups.shape[0])[:max_points or None]
  for m in range(num_codebooks):
    c, _ = kmeans(residual[fit], jax.random.fold_in(key, m), k=2 ** codebook_bits, iters=iters, tol=tol)
    a = _nearest(residual, c)
    books.append(c)
    codes.append(a)
    residual = residual - c[a]
  return jnp.stack(books), jnp.stack(codes, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("beam_size",))
def beam_search(h, w_rows, codebooks, codes, scales, order, *, beam_size: int):
  """New codes (out, G, M) by one sweep over the (group, codebook) pairs `order` (P, 2) minimising
  (W_o - Ŵ_o) H (W_o - Ŵ_o)ᵀ per row, each row keeping its `beam_size` best partial code sets. Swapping C_m[c]
  for C_m[c'] in group j of a row with error e changes its loss by
      ΔL(c') = -2 s <c', (rH)_j> + s² c' H_jj c'ᵀ,   r = e + s C_m[c] in slot j   (c' = c gives L(r) - L(e) back)
  (AQLM's beam_search_xtx). A row whose final loss is not below its start keeps its old codes, so a sweep never
  increases the loss."""
  cb, s_all = as_stored(codebooks), as_stored(scales)
  n_m, n_k, g = cb.shape
  d = h.shape[0]
  hjj = jnp.stack([h[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(d // g)])  # (G, g, g)
  chc = jnp.einsum("mkg,jgh,mkh->jmk", cb, hjj, cb)  # c H_jj cᵀ per (group, codebook, codeword)
  w_hat = decode_rows(codes, codebooks, scales)
  err0 = w_rows - w_hat
  loss0 = jnp.sum((err0 @ h) * err0, axis=-1)

  def row(e, code, loss, s):
    inf = jnp.full((beam_size - 1,), jnp.inf, loss.dtype)
    beams = (jnp.broadcast_to(code, (beam_size, *code.shape)), jnp.broadcast_to(e, (beam_size, d)),
             jnp.concatenate([loss[None], inf]))

    def step(carry, jm):
      bcodes, be, bloss = carry
      j, m = jm[0], jm[1]
      hj = jax.lax.dynamic_slice(h, (0, j * g), (d, g))
      a = be @ hj  # (beam, g): (eH)_j
      old = cb[m][bcodes[:, j, m]]  # (beam, g)
      old_h = old @ hjj[j]
      ra = a + s * old_h
      removed = bloss + 2 * s * jnp.sum(old * a, -1) + s * s * jnp.sum(old_h * old, -1)  # L(r)
      scores = removed[:, None] - 2 * s * ra @ cb[m].T + s * s * chc[j, m][None, :]  # (beam, K)
      neg, idx = jax.lax.top_k(-scores.reshape(-1), beam_size)
      src, new = idx // n_k, idx % n_k
      bcodes = bcodes[src].at[:, j, m].set(new.astype(bcodes.dtype))
      slot = jax.lax.dynamic_slice(be[src], (0, j * g), (beam_size, g)) + s * (old[src] - cb[m][new])
      be = jax.lax.dynamic_update_slice(be[src], slot, (0, j * g))
      return (bcodes, be, -neg), None

    (bcodes, _, _), _ = jax.lax.scan(step, beams, order)
    return bcodes[0]

  new = jax.vmap(row)(err0, codes, loss0, s_all)
  new_hat = decode_rows(new, codebooks, scales)
  better = _row_errors(w_rows, new_hat, h) < loss0
  return jnp.where(better[:, None, None], new, codes)


@functools.partial(jax.jit, static_argnames=("max_update_fraction", "beam_size"))
def l2_beam_search(target_rows, codebooks, codes, scales, order, max_update_fraction: float, *, beam_size: int):
  """PV-tuning's discrete step: new codes (out, G, M) whose decoded weight is closest in L2 to `target_rows`
  (out, in), codebooks in the order `order` (M,), each group keeping its `beam_size` best partial code sets;
  only the ceil(fraction x out G) groups farthest from their target are searched and may change (AQLM's
  max_update_fraction). Per group with residual r = target / s - Σ_m C_m[B_m] + C_m[B_m] (codeword m taken
  out), candidate k scores ||r - C_m[k]||²."""
  cb, s = as_stored(codebooks), as_stored(scales)
  n_out, n_g, n_m = codes.shape
  g = cb.shape[-1]
  ref = (target_rows / s[:, None]).reshape(-1, g)
  flat = codes.reshape(-1, n_m)
  dist = jnp.sum((ref - jnp.sum(cb[jnp.arange(n_m), flat], axis=1)) ** 2, -1)
  k = min(int(np.ceil(max_update_fraction * dist.shape[0])), dist.shape[0])
  if k == 0:
    return codes
  _, pick = jax.lax.top_k(dist, k)

  def group(r, code):
    residual = r - jnp.sum(cb[jnp.arange(n_m), code], axis=0)
    beams = (jnp.broadcast_to(code, (beam_size, n_m)), jnp.broadcast_to(residual, (beam_size, g)),
             jnp.concatenate([jnp.sum(residual ** 2)[None], jnp.full((beam_size - 1,), jnp.inf)]))

    def step(carry, m):
      bcodes, bres, bloss = carry
      back = bres + cb[m][bcodes[:, m]]  # (beam, g)
      scores = jnp.where(jnp.isfinite(bloss), 0.0, jnp.inf)[:, None] + jnp.sum(back ** 2, -1)[:, None] \
          - 2 * back @ cb[m].T + jnp.sum(cb[m] ** 2, -1)[None, :]
      neg, idx = jax.lax.top_k(-scores.reshape(-1), beam_size)
      src, new = idx // cb.shape[1], idx % cb.shape[1]
      return (bcodes[src].at[:, m].set(new.astype(bcodes.dtype)), back[src] - cb[m][new], -neg), None

    (bcodes, _, _), _ = jax.lax.scan(step, beams, order)
    return bcodes[0]

  return flat.at[pick].set(jax.vmap(group)(ref[pick], flat[pick])).reshape(codes.shape)


def _search_order(key, groups: int, num_codebooks: int):
  """(G M, 2) (group, codebook) pairs: groups in random order, each group's codebooks in random order."""
  kg, km = jax.random.split(key)
  js = jax.random.permutation(kg, groups)
  ms = jax.vmap(lambda k: jax.random.permutation(k, num_codebooks))(jax.random.split(km, groups))
  return jnp.stack([jnp.repeat(js, num_codebooks), ms.reshape(-1)], axis=-1).astype(jnp.int32)


def _loss(params, rows, hs, codes):
  """Σ_layers relative_error of the layers sharing `params["codebooks"]`."""
  return sum(relative_error(w, decode_rows(c, params["codebooks"], s), h)
             for w, h, c, s in zip(rows, hs, codes, params["scales"]))


@functools.partial(jax.jit, static_argnames=("steps", "optimizer"))
def _adam_steps(params, opt_state, rows, hs, codes, *, steps: int, optimizer):
  """`steps` optimizer steps on (codebooks, scales) with codes fixed; returns the best (params, opt_state,
  loss) seen (the start included), so an epoch never increases the loss."""
  grad = jax.value_and_grad(_loss)

  def step(carry, _):
    p, st, best = carry
    loss, g = grad(p, rows, hs, codes)
    best = jax.tree.map(lambda b, c: jnp.where(loss < best[2], c, b), best, (p, st, loss))
    upd, st = optimizer.update(g, st, p)
    return (optax.apply_updates(p, upd), st, best), None

  start = (params, opt_state, _loss(params, rows, hs, codes))
  (p, st, best), _ = jax.lax.scan(step, (params, opt_state, start), None, length=steps)
  last = _loss(p, rows, hs, codes)
  return jax.tree.map(lambda b, c: jnp.where(last < best[2], c, b), best, (p, st, last))


def quantize_weights(kernels: Sequence, hs: Sequence, *, num_codebooks: int, codebook_bits: int, group_size: int,
                     settings: FitSettings = FitSettings()) -> tuple[list[VQWeight], dict]:
  """VQ weights (one shared codebook set) of layers with kernels (in_l, out_l) and input second moments
  hs (in_l, in_l) = X_lᵀ X_l; info {losses: Σ relative errors at each epoch start and the end, epochs,
  seconds, start_errors / errors: each layer's relative error after k-means and at the end}. Initial scales are the row norms; k-means runs on the pooled scaled groups of all layers."""
  t0 = time.perf_counter()
  for kern, h in zip(kernels, hs):
    check_shape(kern.shape[0], num_codebooks, codebook_bits, group_size)
    if h.shape != (kern.shape[0],) * 2:
      raise ValueError(f"H must be (in, in) = {(kern.shape[0],) * 2} for a kernel {kern.shape}; got {h.shape}.")
  if settings.beam_size > 2 ** codebook_bits:
    raise ValueError(f"beam_size {settings.beam_size} exceeds the {2 ** codebook_bits} codewords per codebook.")
  key = jax.random.key(settings.seed)
  rows = [jnp.asarray(k, jnp.float32).T for k in kernels]
  hs = [jnp.asarray(h, jnp.float32) for h in hs]
  scales = [jnp.linalg.norm(w, axis=1) + 1e-9 for w in rows]
  groups = jnp.concatenate([(w / s[:, None]).reshape(-1, group_size) for w, s in zip(rows, scales)])
  codebooks, flat = residual_kmeans(groups, jax.random.fold_in(key, 0), num_codebooks=num_codebooks,
                                    codebook_bits=codebook_bits, iters=settings.kmeans_iters,
                                    tol=settings.kmeans_tol, max_points=settings.kmeans_points)
  sizes = np.cumsum([0] + [w.shape[0] * (w.shape[1] // group_size) for w in rows])
  codes = [flat[a:b].reshape(w.shape[0], -1, num_codebooks) for a, b, w in zip(sizes[:-1], sizes[1:], rows)]
  optimizer = optax.amsgrad(settings.lr, b1=0.0, b2=0.95)
  params = dict(codebooks=codebooks, scales=scales)
  errors = lambda: [float(relative_error(w, decode_rows(c, params["codebooks"], s), h))
                    for w, h, c, s in zip(rows, hs, codes, params["scales"])]
  start_errors = errors()
  opt_state = optimizer.init(params)
  losses, epochs = [], 0
  for epoch in range(settings.max_epochs):
    loss = float(_loss(params, rows, hs, codes))
    if losses and loss > losses[-1] * (1 - settings.tolerance):
      losses.append(loss)
      break
    losses.append(loss)
    epochs = epoch + 1
    params, opt_state, _ = _adam_steps(params, opt_state, rows, hs, codes, steps=settings.steps_per_epoch,
                                       optimizer=optimizer)
    order_key = jax.random.fold_in(key, epoch + 1)
    codes = [beam_search(h, w, params["codebooks"], c, s, _search_order(jax.random.fold_in(order_key, i),
                                                                       w.shape[1] // group_size, num_codebooks),
                         beam_size=settings.beam_size)
             for i, (w, h, c, s) in enumerate(zip(rows, hs, codes, params["scales"]))]
  else:
    losses.append(float(_loss(params, rows, hs, codes)))
  out = [VQWeight(c, params["codebooks"], s) for c, s in zip(codes, params["scales"])]
  return out, dict(losses=losses, epochs=epochs, seconds=time.perf_counter() - t0, start_errors=start_errors,
                   errors=errors())


def quantize_weight(kernel, h, *, num_codebooks: int, codebook_bits: int, group_size: int, beam_size: int = 1,
                    steps_per_epoch: int = 100, lr: float = 1e-4, max_epochs: int = 100, tolerance: float = 0.01,
                    kmeans_iters: int = 100, kmeans_tol: float = 0.0, kmeans_points: int = 0,
                    seed: int = 0) -> tuple[VQWeight, dict]:
  """(VQ weight, info) of one kernel (in, out) from its H = XᵀX (in, in); see `quantize_weights`."""
  settings = FitSettings(beam_size, steps_per_epoch, lr, max_epochs, tolerance, kmeans_iters, kmeans_tol,
                         kmeans_points, seed)
  (w,), info = quantize_weights([kernel], [h], num_codebooks=num_codebooks, codebook_bits=codebook_bits,
                                group_size=group_size, settings=settings)
  return w, info
