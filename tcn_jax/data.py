"""Loading datasets as in-memory arrays, with a seeded validation split.

Source order for MNIST-style datasets: an explicit directory of IDX files
(`config.data.dir`), else the system copy (Debian's `dataset-fashion-mnist`
puts it in /usr/share/datasets/fashion-mnist/), else TFDS through
`tfds.data_source` (random access, no TensorFlow needed).
"""
import dataclasses
import gzip
import os
import struct
import zlib

import numpy as np

from tcn_jax.errors import TCNError

IDX_NAMES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
SYSTEM_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist',
               'mnist': '/usr/share/datasets/mnist'}
HOW_TO_GET = {
    'fashion_mnist': 'apt-get install -y dataset-fashion-mnist, or pass '
                     '--config.data.dir=DIR_WITH_IDX_FILES, or download it '
                     'with TFDS (tfds build fashion_mnist)',
    'mnist': 'pass --config.data.dir=DIR_WITH_IDX_FILES, or download it '
             'with TFDS (tfds build mnist)',
}
DATASETS = tuple(HOW_TO_GET)


@dataclasses.dataclass
class Split:
  x: np.ndarray
  y: np.ndarray

  def __len__(self):
    return len(self.y)


@dataclasses.dataclass
class Dataset:
  train: Split
  val: Split
  test: Split
  num_classes: int
  source: str


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Reads one (optionally gzipped) IDX file; raises TCNError on bad files."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise TCNError(f'cannot read IDX file {path}: {e}') from None
  if len(raw) < 4 or struct.unpack('>I', raw[:4])[0] != expected_magic:
    raise TCNError(f'{path} is not an IDX file of the expected kind '
                   f'(magic number should be {expected_magic:#010x})')
  ndim = expected_magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise TCNError(f'{path} is truncated: its {len(raw)} bytes end inside '
                   f'the {header}-byte header')
  shape = struct.unpack(f'>{ndim}I', raw[4:header])
  size = int(np.prod(shape))
  if len(raw) - header != size:
    raise TCNError(f'{path} is truncated or padded: header says {size} '
                   f'values, file holds {len(raw) - header}')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(directory, stem):
  for name in (stem, stem + '.gz', stem.replace('-idx', '.idx')):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise TCNError(f'no IDX file {stem}[.gz] in {directory}')


def load_idx(directory: str, split: str) -> Split:
  images, labels = (_find(directory, s) for s in IDX_NAMES[split])
  x = read_idx(images, 0x00000803)
  y = read_idx(labels, 0x00000801)
  if len(x) != len(y):
    raise TCNError(f'{images} holds {len(x)} images but {labels} holds '
                   f'{len(y)} labels')
  return Split(x[..., None], y.astype(np.int32))


def load_tfds(name: str, split: str, data_dir: str | None = None) -> Split:
  """Random-access TFDS source (works without TensorFlow) to numpy arrays."""
  import tensorflow_datasets as tfds  # Imported lazily: slow to import.
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
  except Exception as e:  # TFDS raises many types for a missing dataset.
    how = HOW_TO_GET.get(name, f'download it with TFDS (tfds build {name})')
    raise TCNError(f'dataset {name!r} ({split}) is not available: {how} '
                   f'[{type(e).__name__}]') from None
  records = [source[i] for i in range(len(source))]
  x = np.stack([r['image'] for r in records])
  y = np.asarray([r['label'] for r in records], np.int32)
  return Split(x, y)


def load_split(name: str, split: str, data_dir: str = '') -> tuple[Split, str]:
  """Loads the raw 'train' or 'test' split; returns (split, source)."""
  if name not in DATASETS:
    raise TCNError(f'unknown dataset {name!r} (config.data.name); '
                   f'choose one of {DATASETS}')
  if data_dir:
    if not os.path.isdir(data_dir):
      raise TCNError(f'config.data.dir {data_dir!r} is not a directory')
    return load_idx(data_dir, split), data_dir
  system = SYSTEM_DIRS.get(name)
  if system and os.path.isdir(system):
    return load_idx(system, split), system
  return load_tfds(name, split), 'tfds'


def load(cfg) -> Dataset:
  """Loads `cfg.name`, carves a seeded validation split from train, scales.

  Images become float32 in [0, 1]. `cfg.train_size` / `cfg.test_size` (0 =
  all) take seeded subsets, used by tests and quick runs.
  """
  train, source = load_split(cfg.name, 'train', cfg.dir)
  test, _ = load_split(cfg.name, 'test', cfg.dir)
  rng = np.random.default_rng(cfg.split_seed)
  order = rng.permutation(len(train))
  n_val = int(round(len(train) * cfg.val_fraction))
  val_idx, train_idx = order[:n_val], order[n_val:]
  if cfg.train_size:
    train_idx = train_idx[:cfg.train_size]
    val_idx = val_idx[:max(cfg.train_size // 4, 1)]
  test_idx = np.arange(len(test))
  if cfg.test_size:
    test_idx = rng.permutation(len(test))[:cfg.test_size]
  num_classes = 10
  for part in (train, test):
    if part.y.min() < 0 or part.y.max() >= num_classes:
      raise TCNError(f'labels of {cfg.name} outside [0, {num_classes}): '
                     f'found {part.y.min()}..{part.y.max()}')

  def take(split, idx):
    return Split(split.x[idx].astype(np.float32) / 255.0, split.y[idx])

  return Dataset(take(train, train_idx), take(train, val_idx),
                 take(test, test_idx), num_classes, source)
