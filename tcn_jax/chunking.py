"""How the teacher's feature is split between the n students (paper Sec. 3).

A `Chunker` is fitted once on the training features and then used alike by
training (`encode`, `split`), the assembled network and distributed
inference (`decode`), and saving (`basis`):

  contiguous  the paper: n contiguous, non-overlapping slices in order; when
              D is not divisible by n the first D % n chunks get one extra
              column (as `numpy.array_split`).
  pca         not in the paper (its "SVD" alternative): students regress
              chunks of the features' principal-component coefficients,
              assigned 'ordered' (student 1 the top components) or
              'balanced' (about equal variance per student).

A memory-mapped feature cache (a streamed split's `features.train.npy`) is
never read whole: PCA is fitted from a covariance accumulated block by
block and the features are encoded block by block into another memory map.

A new method is one `fit` function registered in `CHUNKINGS`.
"""
import dataclasses
import os
import tempfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from tcn_jax import data as data_lib

from tcn_jax.errors import TCNError
from tcn_jax.registry import Registry

CHUNKINGS = Registry('chunking', 'chunking')
PCA_ASSIGNMENTS = Registry('pca_assignment', 'pca_assignment')
PCA_ASSIGNMENTS.register('ordered', 'student 1 gets the top components')
PCA_ASSIGNMENTS.register('balanced', 'about equal variance per student')


def chunk_sizes(dim: int, n: int) -> list[int]:
  """Widths of the n contiguous chunks of a `dim`-wide feature.

  Args:
    dim: D, the feature width.
    n: the number of students.

  Returns:
    n widths summing to D; the first D % n are one wider.
  """
  if not isinstance(n, int) or n < 1:
    raise TCNError(f'num_students must be a positive integer, got {n!r}')
  if n > dim:
    raise TCNError(f'num_students={n} is larger than the feature width {dim}')
  return [dim // n + (1 if i < dim % n else 0) for i in range(n)]


def chunk_bounds(dim: int, n: int) -> list[tuple[int, int]]:
  edges = np.cumsum([0] + chunk_sizes(dim, n))
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def chunk(features, n: int) -> list:
  """Splits features into the students' contiguous chunks (the paper's).

  Args:
    features: (N, D) features.
    n: the number of students.

  Returns:
    n arrays (N, D_i), in feature order (widths: `chunk_sizes`).
  """
  return [features[:, a:b] for a, b in chunk_bounds(features.shape[-1], n)]


def encode_with(basis, features):
  """Features -> the space the chunks are cut from, for a fitted `basis`
  (None: the features themselves); numpy or jax-traceable (online
  features encode inside the students' step)."""
  if basis is None:
    return features
  return (features - basis['mean']) @ basis['matrix'].T


@dataclasses.dataclass(frozen=True)
class Chunker:
  """A fitted split of D-wide features between `num_students` students.

  Attributes:
    num_students: n.
    dim: D, the feature width.
    basis: None (contiguous slices of the feature) or {'matrix': (D, D),
      'mean': (D,)}, a fixed linear map from the concatenated students'
      outputs back to feature space: feature = out @ matrix + mean.
  """
  num_students: int
  dim: int
  basis: Any = None

  def widths(self) -> list[int]:
    return chunk_sizes(self.dim, self.num_students)

  def bounds(self) -> list[tuple[int, int]]:
    return chunk_bounds(self.dim, self.num_students)

  def encode(self, features) -> np.ndarray:
    """Features -> the space the students' chunks are cut from (a memory
    map is encoded block by block into another, `encode_blocks`)."""
    if self.basis is None:
      return features
    if isinstance(features, np.memmap):
      return encode_blocks(features, self.basis)
    return encode_with(self.basis, np.asarray(features))

  def decode(self, outputs):
    """Concatenated student outputs -> teacher features (jax-traceable)."""
    if self.basis is None:
      return outputs
    return outputs @ self.basis['matrix'] + self.basis['mean']

  def split(self, encoded) -> list:
    """The n chunks (students' targets) of encoded features."""
    return chunk(encoded, self.num_students)


def fit(name: str, features, num_students: int,
        pca_assignment: str = 'balanced') -> Chunker:
  """Fits chunking `name` ('contiguous', 'pca') on (N, D) training
  features."""
  if not isinstance(features, np.memmap):   # A memory map stays on disk.
    features = np.asarray(features)
  return CHUNKINGS.get(name)(features, num_students, pca_assignment)


@CHUNKINGS.register('contiguous')
def _contiguous(features, n, unused_assignment):
  chunk_sizes(features.shape[1], n)   # Fails on n > D.
  return Chunker(n, features.shape[1])


@CHUNKINGS.register('pca')
def _pca(features, n, assignment):
  pca = fit_pca(features)
  return Chunker(n, features.shape[1], pca_basis(
      pca, pca_order(pca['variance'], n, assignment)))


def fit_pca(features) -> dict:
  """Mean, principal directions (rows, by falling variance) and variances.

  In-memory features: the SVD of the centred features. A memory map (a
  large cache, `features.train.npy`): `fit_pca_blocks`, never read whole.
  """
  if isinstance(features, np.memmap):
    return fit_pca_blocks(features)
  x = jnp.asarray(features, jnp.float32)
  mean = x.mean(0)
  _, s, vt = jnp.linalg.svd(x - mean, full_matrices=False)
  return {'mean': np.asarray(mean), 'components': np.asarray(vt),
          'variance': np.asarray(s ** 2 / max(len(x) - 1, 1))}


# Bytes of float64 rows per block when a memory map is read block by block.
BLOCK_BYTES = 64 * 2**20


def _blocks(features):
  """Row slices of about BLOCK_BYTES (as float64) covering `features`."""
  step = max(1, BLOCK_BYTES // (8 * max(features.shape[1], 1)))
  return [slice(a, min(a + step, len(features)))
          for a in range(0, len(features), step)]


def fit_pca_blocks(features) -> dict:
  """`fit_pca` of (N, D) features read block by block (a memory map): the
  mean and the covariance accumulated in float64 over row blocks, its
  eigenvectors the principal directions (float32, as `fit_pca`'s; each
  direction's sign is arbitrary in both)."""
  n, d = features.shape
  total = np.zeros(d, np.float64)
  for rows in _blocks(features):
    total += np.asarray(features[rows], np.float64).sum(0)
    data_lib.drop_pages(features)
  mean = total / max(n, 1)
  cov = np.zeros((d, d), np.float64)
  for rows in _blocks(features):
    x = np.asarray(features[rows], np.float64) - mean
    cov += x.T @ x
    data_lib.drop_pages(features)
  variance, vectors = np.linalg.eigh(cov / max(n - 1, 1))
  order = np.argsort(-variance, kind='stable')
  return {'mean': mean.astype(np.float32),
          'components': np.ascontiguousarray(vectors[:, order].T, np.float32),
          'variance': np.maximum(variance[order], 0).astype(np.float32)}


def encode_blocks(features, basis: dict) -> np.memmap:
  """`Chunker.encode` of a memory map, block by block, into an unnamed
  memory-mapped file beside it (removed when no longer mapped)."""
  mean, matrix = basis['mean'], basis['matrix']
  directory = os.path.dirname(os.path.abspath(features.filename or '.'))
  dtype = np.result_type(features.dtype, mean.dtype, matrix.dtype)
  out = np.memmap(tempfile.TemporaryFile(dir=directory), dtype, 'w+',
                  shape=(len(features), matrix.shape[0]))
  for rows in _blocks(features):
    out[rows] = (np.asarray(features[rows]) - mean) @ matrix.T
    data_lib.drop_pages(features)
  out.flush()
  data_lib.drop_pages(out)
  return out


def pca_order(variance, n: int, assignment: str = 'ordered') -> np.ndarray:
  """Component indices in the order the n students' chunks take them
  ('balanced': greedy, the next largest component goes to the student with
  the least variance that has room)."""
  sizes = chunk_sizes(len(variance), n)
  PCA_ASSIGNMENTS.get(assignment)
  if assignment == 'ordered':
    return np.arange(len(variance))
  owned, total = [[] for _ in sizes], np.zeros(n)
  for c in np.argsort(-np.asarray(variance), kind='stable'):
    free = [i for i in range(n) if len(owned[i]) < sizes[i]]
    i = min(free, key=lambda j: (total[j], j))
    owned[i].append(int(c))
    total[i] += variance[c]
  return np.concatenate([np.array(o, int) for o in owned])


def pca_basis(pca: dict, order) -> dict:
  """The map from concatenated coefficients (in `order`) to features."""
  return {'matrix': np.asarray(pca['components'])[np.asarray(order)],
          'mean': np.asarray(pca['mean'])}
