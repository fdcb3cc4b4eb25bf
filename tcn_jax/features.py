"""Teacher features and their split into the students' chunks (paper Sec. 3).

Chunks are contiguous, non-overlapping and in order. When the feature width
D is not divisible by n, the first D % n chunks get one extra column (sizes
differ by at most 1), as `numpy.array_split` does.
"""
import jax
import jax.numpy as jnp
import numpy as np

from tcn_jax import engine
from tcn_jax.errors import TCNError


def teacher_features(teacher, variables, x,
                     batch_size: int = 1000) -> np.ndarray:
  """(N, D) features of the teacher's feature layer, inference mode, batched.

  variables: the teacher's Flax variables ({'params', ['batch_stats']}).
  """
  fn = jax.jit(lambda xb: teacher.apply(variables, xb,
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


# PCA chunking (the paper's "SVD" alternative): students regress chunks of
# the features' principal-component coefficients instead of raw slices.
PCA_ASSIGNMENTS = ('ordered', 'balanced')


def fit_pca(features) -> dict:
  """Mean, principal directions (rows, by falling variance) and variances."""
  x = jnp.asarray(features, jnp.float32)
  mean = x.mean(0)
  _, s, vt = jnp.linalg.svd(x - mean, full_matrices=False)
  return {'mean': np.asarray(mean), 'components': np.asarray(vt),
          'variance': np.asarray(s ** 2 / max(len(x) - 1, 1))}


def pca_order(variance, n: int, assignment: str = 'ordered') -> np.ndarray:
  """Component indices in the order the n students' chunks take them.

  'ordered': student 1 gets the top components, and so on. 'balanced': each
  student gets about the same share of variance (greedy: the next largest
  component goes to the student with the least variance that has room).
  """
  sizes = chunk_sizes(len(variance), n)
  if assignment == 'ordered':
    return np.arange(len(variance))
  if assignment != 'balanced':
    raise TCNError(f'unknown pca_assignment {assignment!r}; choose one of '
                   f'{PCA_ASSIGNMENTS}')
  owned, total = [[] for _ in sizes], np.zeros(n)
  for c in np.argsort(-np.asarray(variance), kind='stable'):
    free = [i for i in range(n) if len(owned[i]) < sizes[i]]
    i = min(free, key=lambda j: (total[j], j))
    owned[i].append(int(c))
    total[i] += variance[c]
  return np.concatenate([np.array(o, int) for o in owned])


def pca_basis(pca: dict, order) -> dict:
  """The fixed linear map from concatenated student outputs (coefficients
  in `order`) back to feature space: feature = coeffs @ matrix + mean."""
  return {'matrix': np.asarray(pca['components'])[np.asarray(order)],
          'mean': np.asarray(pca['mean'])}


def to_coefficients(features, basis: dict) -> np.ndarray:
  """Inverse of the basis map (the matrix is orthonormal)."""
  return (np.asarray(features) - basis['mean']) @ basis['matrix'].T
