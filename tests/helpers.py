"""Functions only the tests use, over the library's own (the library keeps
what a run or the public API calls)."""
import numpy as np

from tcn_jax import chunking
from tcn_jax import data


def unchunk(chunks) -> np.ndarray:
  """Inverse of `chunking.chunk`: (N, D_i) chunks concatenated in order."""
  return np.concatenate([np.asarray(c) for c in chunks], axis=-1)


def to_coefficients(features, basis: dict) -> np.ndarray:
  """Inverse of a PCA basis map (the matrix is orthonormal)."""
  return chunking.Chunker(1, len(basis['mean']), basis).encode(features)


def load_split(name: str, split: str, data_dir: str = '',
               image_size: int = data.IMAGE_SIZE):
  """The whole raw 'train' or 'test' split and where it was read: x uint8
  images (or IMDB's texts); data_dir an IDX directory or a TFDS data_dir."""
  size, read, source = data._open(name, split, data_dir, image_size)  # pylint: disable=protected-access
  return read(np.arange(size)), source


def load_tfds(name: str, split: str, data_dir: str | None = None,
              indices=None, image_size: int = data.IMAGE_SIZE):
  """Records `indices` (default: all) of a TFDS split as a `data.Split`."""
  source = data.tfds_source(name, split, data_dir)
  if indices is None:
    indices = range(len(source))
  return data._read_tfds(name, source, indices, image_size)  # pylint: disable=protected-access
