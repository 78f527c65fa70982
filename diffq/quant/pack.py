"""Exact bit packing of b-bit integer codes (1 <= b <= 16) into bytes, little-endian within each code."""
from __future__ import annotations

import numpy as np


def _dtype(bits: int):
  return np.uint8 if bits <= 8 else np.uint16


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes in [0, 2^bits) of any shape -> uint8 bytes of length ceil(size * bits / 8)."""
  if not 1 <= int(bits) <= 16:
    raise ValueError(f"bits must lie in 1..16; got {bits}.")
  c = np.asarray(codes).reshape(-1)
  if c.size and (c.min() < 0 or c.max() >= 2 ** bits):
    raise ValueError(f"Codes must lie in [0, {2 ** bits}) for {bits}-bit packing; got [{c.min()}, {c.max()}].")
  dtype = _dtype(bits)
  bit_planes = (c.astype(dtype)[:, None] >> np.arange(bits, dtype=dtype)) & 1  # (n, bits), LSB first
  return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of `pack`: codes of `shape` (uint8 up to 8 bits, else uint16)."""
  n = int(np.prod(shape))
  need = -(-n * bits // 8)
  if packed.dtype != np.uint8 or packed.size != need:
    raise ValueError(f"Packed buffer must be {need} uint8 bytes for {n} {bits}-bit codes; got "
                     f"{packed.dtype}[{packed.size}].")
  planes = np.unpackbits(packed, bitorder="little")[:n * bits].reshape(n, bits)
  dtype = _dtype(bits)
  return (planes.astype(dtype) << np.arange(bits, dtype=dtype)).sum(axis=1, dtype=dtype).reshape(shape)


def pack_rows(codes: np.ndarray, row_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-row bit widths (mixed precision): returns (bytes, row byte offsets (rows + 1,)). Each row packed alone."""
  codes = np.asarray(codes).reshape(len(row_bits), -1)
  chunks = [pack(row, int(b)) for row, b in zip(codes, row_bits)]
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
  return (np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)), offsets


def unpack_rows(packed: np.ndarray, offsets: np.ndarray, row_bits: np.ndarray, row_size: int) -> np.ndarray:
  return np.stack([unpack(packed[offsets[i]:offsets[i + 1]], int(b), (row_size,)) for i, b in enumerate(row_bits)])
