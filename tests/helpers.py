"""What the tests import: a tiny real-data config (as flags and as a config
object), the repository root, the Fashion-MNIST skip mark, and functions
only the tests use, over the library's own (the library keeps what a run or
the public API calls). Fixtures are in conftest.py."""
import os
import shutil
import sys

import numpy as np
import pytest

from tcn_jax import chunking
from tcn_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, 'configs') not in sys.path:
  sys.path.insert(0, os.path.join(ROOT, 'configs'))

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason='needs apt-get install -y dataset-fashion-mnist')


# A seconds-long run of the whole pipeline (small nets, 300 examples, two
# epochs per stage), as --config flags and as a config object.
TINY = {'num_students': 2, 'data.train_size': 300, 'data.test_size': 200,
        'teacher.epochs': 2, 'teacher.body': 'C8 MP F D64r D32r',
        'students.epochs': 2, 'students.arch': 'C4 MP F D8r',
        'head.epochs': 2}
SMOKE = os.path.join(ROOT, 'configs/fashion_mnist.py:smoke')
TINY_FLAGS = [f'--config.{k}={v}' for k, v in TINY.items()]


def tiny_config(**overrides):
  """The smoke config with TINY and `overrides` ('a__b' sets a.b) applied."""
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('smoke')
  for path, value in [*TINY.items(), *((k.replace('__', '.'), v)
                                       for k, v in overrides.items())]:
    *parents, field = path.split('.')
    section = config
    for p in parents:
      section = section[p]
    with section.ignore_type():   # Lets tests build wrongly typed configs.
      section[field] = value
  return config


def forced_devices_env(count: int) -> dict:
  """os.environ for a subprocess with `count` forced host CPU devices, the
  XLA flags the tests run with kept (conftest.py)."""
  flags = os.environ.get('XLA_FLAGS', '')
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(filter(
      None, [flags, f'--xla_force_host_platform_device_count={count}'])))


def reuse_teacher(finished: str, workdir: str) -> None:
  """Starts `workdir` from a finished run's teacher, features and stage keys,
  so that a run there trains only what its config changes downstream of the
  teacher (the stage keys decide, as for any resumed run)."""
  os.makedirs(workdir)
  shutil.copytree(os.path.join(finished, 'teacher'),
                  os.path.join(workdir, 'teacher'))
  for name in ('features.npz', 'stage_keys.json'):
    shutil.copy(os.path.join(finished, name), workdir)


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
