"""FlexiDiT's flexible patch size (Anagnostidis et al. 2025, §3.1): one DiT runs at several patch sizes.

The patch embedding and the final (de-embedding) linear of every patch size p are fixed linear resizes of one
underlying kernel stored at the largest size p' (the paper's p' = 4 for DiT-XL/2 at {2, 4}; 8 here for the
embedded model at {4, 8}):

    embedding     W_p = Q_p W'        Q_p = pinv(B_{p'->p}ᵀ)  (p², p'²)   FlexiViT's PI-resize, per (c_in, d) slice
    de-embedding  V_p = V' B_{p'->p}ᵀ, c_p = c' B_{p'->p}ᵀ      the p'x p' output patch bilinearly resized to p

with B_{a->b} (b², a²) the half-pixel bilinear resize without antialiasing (tf.image.resize 'bilinear'). The
transformer blocks are shared. Initialising from a plain DiT at p_pow (`from_plain`) solves W_p_pow = Q W' and
V_p_pow = V' Bᵀ by least squares (W' = pinv(Q) W, V' = V pinv(B)ᵀ), so the p_pow forward is unchanged; for the
2x ratios of DiT (B = 2x2 average pooling) both resizes are sums of equal copies and the p_pow kernels come back
bit for bit. A weak (p > p_pow) token is then the p_pow embedding of the 2x2-average-pooled patch and its
output patch the p_pow output upsampled by nearest neighbour (the scale of the eps prediction is kept).

The de-embedding reading is diffq's: the paper's "pseudo-inverse of the bilinear interpolation, with flipped
dimensions" is ambiguous (../shared/research/flexidit.md §2.2). This one is the output-side mirror of the
input side (resize the underlying output patch), keeps the eps scale (reading (c) under-scales it 4x) and keeps
the p_pow kernels exact (reading (d)'s dense pseudo-inverse does not in float32).

In a model's params the underlying kernels are those of the largest size's layers (`x_embedder_p{p'}`,
`final_layer/linear_p{p'}`), and the smaller sizes' boundary kernels are derived from them (`tie`); training
updates the underlying ones only (`untie` drops the derived leaves).
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np


def layer_suffix(p: int, model_patch: int) -> str:
  """'' for the model's own patch size, '_p{p}' for another (the layer-name suffix of its boundary layers)."""
  return "" if p == model_patch else f"_p{p}"


@functools.lru_cache(maxsize=None)
def bilinear_matrix(a: int, b: int) -> np.ndarray:
  """B (b*b, a*a) float64: resizing a row-major a x a patch to b x b, bilinear with half-pixel centres and no
  antialiasing (tf.image.resize 'bilinear'; edges clamp). a -> a/2 is exact 2x2 average pooling."""
  r = np.zeros((b, a))
  for i in range(b):
    src = min(max((i + 0.5) * a / b - 0.5, 0.0), a - 1.0)
    lo = int(np.floor(src))
    hi = min(lo + 1, a - 1)
    r[i, lo] += 1.0 - (src - lo)
    r[i, hi] += src - lo
  return np.kron(r, r)


def _snap(m: np.ndarray) -> np.ndarray:
  """float32 of a float64 resize matrix with pseudo-inverse round-off (|x| < 1e-9, 1 +- 1e-15) removed, so that
  exact rationals such as 1 and 1/4 come out exact."""
  return np.round(m, 9).astype(np.float32)


@functools.lru_cache(maxsize=None)
def embed_matrix(underlying: int, p: int) -> np.ndarray:
  """Q_p = pinv(B_{p'->p}ᵀ) (p*p, p'*p'): W_p = Q_p W' (identity at p = p')."""
  return _snap(np.linalg.pinv(bilinear_matrix(underlying, p).T))


@functools.lru_cache(maxsize=None)
def deembed_matrix(underlying: int, p: int) -> np.ndarray:
  """B_{p'->p}ᵀ (p'*p', p*p): V_p = V' B_{p'->p}ᵀ (identity at p = p')."""
  return _snap(bilinear_matrix(underlying, p).T)


def _mix(m, w, axis: int, channels: int):
  """Applies m (new, old) to the spatial factor of `axis` of w, whose entries along it are ordered (p, q, c)
  with `channels` c fastest."""
  w = jnp.moveaxis(w, axis, 0)
  rest = w.shape[1:]
  w = w.reshape(m.shape[1], channels, -1)
  out = jnp.einsum("np,pcr->ncr", jnp.asarray(m), w, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(out.reshape(m.shape[0] * channels, *rest), 0, axis)


def resize_embedding(kernel, underlying: int, p: int, channels: int):
  """(p'*p'*C, D) underlying patch-embedding kernel -> (p*p*C, D) at patch size p (features ordered (p, q, c))."""
  return kernel if p == underlying else _mix(embed_matrix(underlying, p), kernel, 0, channels)


def resize_deembedding(kernel, underlying: int, p: int, channels: int):
  """(D, p'*p'*C) kernel or (p'*p'*C,) bias of the final linear -> (D, p*p*C) / (p*p*C,) at patch size p."""
  return kernel if p == underlying else _mix(deembed_matrix(underlying, p).T, kernel, kernel.ndim - 1, channels)


def boundary_paths(cfg, p: int) -> tuple[str, str]:
  """The (embedding, de-embedding) layer paths of patch size `p` in a DiT of config `cfg`."""
  s = layer_suffix(p, cfg.patch_size)
  return f"x_embedder{s}", f"final_layer/linear{s}"


def derived_sizes(cfg) -> tuple[int, ...]:
  """Patch sizes whose boundary kernels `tie` derives (every size but the largest, the underlying one; none when
  the config's boundary layers are untied, cfg.flexi_tied = False)."""
  sizes = cfg.patch_sizes_all
  return tuple(p for p in sizes if p != max(sizes)) if len(sizes) > 1 and cfg.flexi_tied else ()


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _with(tree, path, value):
  head, _, rest = path.partition("/")
  return {**tree, head: value if not rest else _with(tree[head], rest, value)}


def tie(params: dict, cfg) -> dict:
  """params with every derived size's boundary kernels and biases recomputed from the underlying ones (the
  largest size's); params of a single-size DiT are returned as they are."""
  if not derived_sizes(cfg):
    return params
  under = max(cfg.patch_sizes_all)
  src_e, src_d = boundary_paths(cfg, under)
  e, dd = _get(params, src_e), _get(params, src_d)
  c_in, c_out = cfg.in_channels, cfg.out_channels
  for p in derived_sizes(cfg):
    emb, de = boundary_paths(cfg, p)
    params = _with(params, emb, {"kernel": resize_embedding(e["kernel"], under, p, c_in), "bias": e["bias"]})
    params = _with(params, de, {"kernel": resize_deembedding(dd["kernel"], under, p, c_out),
                                "bias": resize_deembedding(dd["bias"], under, p, c_out)})
  return params


def untie(params: dict, cfg) -> dict:
  """params without the derived sizes' boundary leaves (what fine-tuning trains; `tie` restores them)."""
  for p in derived_sizes(cfg):
    for path in boundary_paths(cfg, p):
      parent, _, name = path.rpartition("/")
      sub = _get(params, parent) if parent else params
      sub = {k: v for k, v in sub.items() if k != name}
      params = _with(params, parent, sub) if parent else sub
  return params


def from_plain(plain: dict, cfg, init: dict, null_scale: float = 0.0) -> dict:
  """Flexible params of config `cfg` from a plain DiT's `plain` params at cfg.patch_size: shared leaves copied,
  the underlying boundary kernels solved by least squares so the p_pow ones are unchanged (module docstring),
  the per-size leaves (`init`'s, e.g. patch-size embeddings and affines) as initialised; then `tie`d.

  `null_scale` > 0 adds that fraction of `init`'s random underlying embedding kernel, projected on the null space
  of Q_p_pow (what a weak token sees of the pixels inside each p_pow-sized block, invisible at p_pow). The
  least-squares solution alone has none of it, nor does its de-embedding: a saddle that gradient descent leaves
  slowly, since the weak mode starts out unable to resolve anything finer than p_pow blocks. The p_pow kernels
  then equal the plain ones up to float rounding (Q N = 0 in exact arithmetic)."""
  under = max(cfg.patch_sizes_all)
  p0 = cfg.patch_size
  emb0, de0 = boundary_paths(cfg, p0)
  emb, de = boundary_paths(cfg, under)
  out = jax.tree.map(lambda x: x, init)
  for key, value in flax.traverse_util.flatten_dict(plain, sep="/").items():  # every plain leaf is shared, or is the p_pow boundary (derived by tie)
    out = _with(out, key, jnp.asarray(value))
  e, d = _get(plain, emb0), _get(plain, de0)
  q = np.linalg.pinv(embed_matrix(under, p0).astype(np.float64))
  b = np.linalg.pinv(deembed_matrix(under, p0).astype(np.float64))
  kernel = _mix(_snap(q), jnp.asarray(e["kernel"]), 0, cfg.in_channels)
  if null_scale:
    qe = embed_matrix(under, p0).astype(np.float64)
    null = np.eye(qe.shape[1]) - np.linalg.pinv(qe) @ qe  # (p'², p'²) projector on null(Q_p_pow)
    kernel = kernel + null_scale * _mix(null.astype(np.float32), jnp.asarray(_get(init, emb)["kernel"]), 0,
                                        cfg.in_channels)
  out = _with(out, emb, {"kernel": kernel, "bias": jnp.asarray(e["bias"])})
  out = _with(out, de, {"kernel": _mix(_snap(b).T, jnp.asarray(d["kernel"]), 1, cfg.out_channels),
                        "bias": _mix(_snap(b).T, jnp.asarray(d["bias"]), 0, cfg.out_channels)})
  return tie(out, cfg)  # untied (cfg.flexi_tied = False): the plain boundary layers stay as they were

