"""Teacher features and their split into the students' chunks (paper Sec. 3).

Chunks are contiguous, non-overlapping and in order. When the feature width
D is not divisible by n, the first D % n chunks get one extra column (sizes
differ by at most 1), as `numpy.array_split` does.
"""
import jax
import numpy as np

from tcn_jax import engine
from tcn_jax.errors import TCNError


def teacher_features(teacher, params, x, batch_size: int = 1000) -> np.ndarray:
  """(N, D) features of the teacher's feature layer, inference mode, batched."""
  fn = jax.jit(lambda xb: teacher.apply({'params': params}, xb,
                                        method=teacher.features))
  return engine.batched(fn, np.asarray(x), batch_size)


def chunk_sizes(dim: int, n: int) -> list[int]:
  """Widths of the n contiguous chunks of a `dim`-wide feature."""
  if not isinstance(n, int) or n < 1:
    raise TCNError(f'num_students must be a positive integer, got {n!r}')
  if n > dim:
    raise TCNError(f'num_students={n} is larger than the feature width {dim}')
  return [dim // n + (1 if i < dim % n else 0) for i in range(n)]


def chunk_bounds(dim: int, n: int) -> list[tuple[int, int]]:
  edges = np.cumsum([0] + chunk_sizes(dim, n))
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def chunk(features, n: int) -> list:
  """Splits (N, D) features into n contiguous (N, D_i) chunks, in order."""
  return [features[:, a:b] for a, b in chunk_bounds(features.shape[-1], n)]


def unchunk(chunks) -> np.ndarray:
  """Inverse of `chunk`: concatenates chunks in order."""
  return np.concatenate([np.asarray(c) for c in chunks], axis=-1)
