"""Tests for IDX reading, dataset loading, the validation split and TFDS."""
import collections
import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
from tcn_jax import augment
from tcn_jax import config as config_lib
from tcn_jax import data
from tcn_jax.errors import TCNError

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801

needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz')),
    reason='Fashion-MNIST IDX files are not installed')


def _idx_bytes(array, magic):
  array = np.asarray(array, np.uint8)
  header = struct.pack('>I', magic) + struct.pack(f'>{array.ndim}I',
                                                  *array.shape)
  return header + array.tobytes()


def _write(path, payload):
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(payload)
  return str(path)


def _write_split(directory, split, images, labels, style='gz'):
  """Writes one split's two IDX files in the given naming style."""
  for stem, array, magic in zip(data.IDX_NAMES[split], (images, labels),
                                (IMAGES_MAGIC, LABELS_MAGIC)):
    name = {'gz': stem + '.gz', 'raw': stem,
            'dotted': stem.replace('-idx', '.idx')}[style]
    _write(os.path.join(directory, name), _idx_bytes(array, magic))


def _synthetic(n, seed, num_classes=10):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, num_classes, size=n, dtype=np.uint8)
  return images, labels


def _cfg(**kw):
  """A resolved data section of dataset 'fashion_mnist' with fields `kw`."""
  c = config_lib.data_config(name='fashion_mnist')
  c.update(kw)
  return c


def _hashes(x):
  """Digests of each image's bytes (x float in [0, 1] or uint8)."""
  if x.dtype != np.uint8:
    x = np.rint(x * 255).astype(np.uint8)
  return [hashlib.sha1(row.tobytes()).digest() for row in x]


# Real Fashion-MNIST.


@needs_fmnist
def test_read_idx_real_files():
  """The real train files: 60,000 28x28 uint8 images, 6,000 per class."""
  x = data.read_idx(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz'),
                    IMAGES_MAGIC)
  y = data.read_idx(os.path.join(FMNIST_DIR, 'train-labels-idx1-ubyte.gz'),
                    LABELS_MAGIC)
  assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
  assert y.shape == (60000,) and y.dtype == np.uint8
  assert y.min() >= 0 and y.max() < 10
  np.testing.assert_array_equal(np.bincount(y, minlength=10), [6000] * 10)


@pytest.fixture(scope='module')
def fmnist_seed0():
  if not os.path.isdir(FMNIST_DIR):
    pytest.skip('Fashion-MNIST IDX files are not installed')
  return data.load(_cfg(split_seed=0))


def test_load_real_sizes_and_values(fmnist_seed0):
  """48k/12k/10k split, float32 images in [0, 1], int32 labels."""
  d = fmnist_seed0
  assert (len(d.train), len(d.val), len(d.test)) == (48000, 12000, 10000)
  assert d.num_classes == 10 and d.source == FMNIST_DIR
  for split in (d.train, d.val, d.test):
    assert split.x.shape[1:] == (28, 28, 1)
    assert split.x.dtype == np.float32
    assert split.y.dtype == np.int32
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0
  assert d.train.x.max() == 1.0  # Scaled by 255, not by the batch maximum.


def test_load_real_val_disjoint_from_train(fmnist_seed0):
  """Train and val partition the original train images exactly."""
  d = fmnist_seed0
  train_h, val_h = _hashes(d.train.x), _hashes(d.val.x)
  assert not set(train_h) & set(val_h)
  raw = data.read_idx(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz'),
                      IMAGES_MAGIC)
  assert (collections.Counter(train_h + val_h)
          == collections.Counter(_hashes(raw)))


def test_load_real_split_seed(fmnist_seed0):
  """The same split_seed gives the same split; another seed, another one."""
  a = fmnist_seed0
  b = data.load(_cfg(split_seed=0))
  np.testing.assert_array_equal(a.val.y, b.val.y)
  np.testing.assert_array_equal(a.val.x, b.val.x)
  np.testing.assert_array_equal(a.train.x[:500], b.train.x[:500])
  del b
  c = data.load(_cfg(split_seed=1))
  assert len(c.val) == len(a.val)
  assert set(_hashes(c.val.x[:500])) != set(_hashes(a.val.x[:500]))
  assert not np.array_equal(c.val.y, a.val.y)
  # The test split is untouched by the seed when test_size is 0.
  np.testing.assert_array_equal(c.test.x, a.test.x)


# Synthetic IDX files.


@pytest.mark.parametrize('style', ['gz', 'raw', 'dotted'])
def test_load_split_synthetic(tmp_path, style):
  """load_split reads gzipped and raw IDX files from data_dir."""
  tx, ty = _synthetic(12, seed=0)
  ex, ey = _synthetic(7, seed=1)
  _write_split(tmp_path, 'train', tx, ty, style)
  _write_split(tmp_path, 'test', ex, ey, style)
  for split, x, y in (('train', tx, ty), ('test', ex, ey)):
    got, source = helpers.load_split('fashion_mnist', split,
                                  data_dir=str(tmp_path))
    assert source == str(tmp_path)
    assert got.x.shape == (len(x), 28, 28, 1) and got.x.dtype == np.uint8
    assert got.y.dtype == np.int32
    np.testing.assert_array_equal(got.x[..., 0], x)
    np.testing.assert_array_equal(got.y, y)


def test_load_synthetic_split_and_subsets(tmp_path):
  """data.load on a data dir: seeded split sizes and train/test subsets."""
  tx, ty = _synthetic(40, seed=2)
  ex, ey = _synthetic(10, seed=3)
  _write_split(tmp_path, 'train', tx, ty)
  _write_split(tmp_path, 'test', ex, ey)
  d = data.load(_cfg(dir=str(tmp_path), val_fraction=0.25))
  assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 10)
  assert d.source == str(tmp_path)
  assert (collections.Counter(_hashes(d.train.x) + _hashes(d.val.x))
          == collections.Counter(_hashes(tx)))
  np.testing.assert_array_equal(d.test.x[..., 0], ex / np.float32(255))
  small = data.load(_cfg(dir=str(tmp_path), val_fraction=0.25, train_size=8,
                         test_size=4))
  assert (len(small.train), len(small.val), len(small.test)) == (8, 2, 4)
  assert set(_hashes(small.train.x)) <= set(_hashes(d.train.x))
  assert set(_hashes(small.val.x)) <= set(_hashes(d.val.x))


@pytest.mark.parametrize('split', ['train', 'test'])
def test_load_labels_out_of_range(tmp_path, split):
  """A label >= 10 in either split is a TCNError."""
  tx, ty = _synthetic(20, seed=4)
  ex, ey = _synthetic(6, seed=5)
  if split == 'train':
    ty[3] = 10
  else:
    ey[0] = 255
  _write_split(tmp_path, 'train', tx, ty)
  _write_split(tmp_path, 'test', ex, ey)
  with pytest.raises(TCNError, match='labels'):
    data.load(_cfg(dir=str(tmp_path)))


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_read_idx_wrong_magic(tmp_path, suffix):
  """A labels file read as images is rejected, naming the path."""
  path = _write(tmp_path / f'labels{suffix}',
                _idx_bytes(np.zeros(5), LABELS_MAGIC))
  with pytest.raises(TCNError) as e:
    data.read_idx(path, IMAGES_MAGIC)
  assert path in str(e.value)


@pytest.mark.parametrize('keep', [2, 9, 16 + 28 * 28 - 1])
def test_read_idx_truncated_raw(tmp_path, keep):
  """Truncation anywhere (magic, header, body) raises, naming the path."""
  full = _idx_bytes(np.zeros((2, 28, 28)), IMAGES_MAGIC)
  path = _write(tmp_path / 'images', full[:keep])
  with pytest.raises(TCNError) as e:
    data.read_idx(path, IMAGES_MAGIC)
  assert path in str(e.value)


def test_read_idx_padded_raw(tmp_path):
  """Extra bytes after the data are rejected too."""
  full = _idx_bytes(np.zeros((2, 4, 4)), IMAGES_MAGIC)
  path = _write(tmp_path / 'images', full + b'\0')
  with pytest.raises(TCNError, match='padded'):
    data.read_idx(path, IMAGES_MAGIC)


def test_read_idx_truncated_gzip(tmp_path):
  """A gzip stream cut short raises TCNError naming the path."""
  good = _write(tmp_path / 'good.gz',
                _idx_bytes(np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256,
                           IMAGES_MAGIC))
  with open(good, 'rb') as f:
    raw = f.read()
  path = str(tmp_path / 'cut.gz')
  with open(path, 'wb') as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(TCNError) as e:
    data.read_idx(path, IMAGES_MAGIC)
  assert path in str(e.value)


def test_read_idx_corrupt_gzip(tmp_path):
  """A damaged deflate stream raises TCNError, not a zlib error."""
  good = _write(tmp_path / 'good.gz',
                _idx_bytes(np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256,
                           IMAGES_MAGIC))
  with open(good, 'rb') as f:
    raw = bytearray(f.read())
  start = raw.index(b'good\0') + len(b'good\0')  # Past the FNAME field.
  raw[start] = 0x06  # Invalid deflate block type.
  path = str(tmp_path / 'bad.gz')
  with open(path, 'wb') as f:
    f.write(bytes(raw))
  with pytest.raises(TCNError) as e:
    data.read_idx(path, IMAGES_MAGIC)
  assert path in str(e.value)


def test_load_split_missing_files(tmp_path):
  """An empty data dir names the missing file and the directory."""
  with pytest.raises(TCNError) as e:
    helpers.load_split('fashion_mnist', 'train', data_dir=str(tmp_path))
  assert 'train-images-idx3-ubyte' in str(e.value)
  assert str(tmp_path) in str(e.value)


def test_load_split_missing_labels_only(tmp_path):
  """Images present but labels missing names the labels file."""
  tx, _ = _synthetic(3, seed=6)
  _write(tmp_path / 'train-images-idx3-ubyte.gz',
         _idx_bytes(tx, IMAGES_MAGIC))
  with pytest.raises(TCNError) as e:
    helpers.load_split('fashion_mnist', 'train', data_dir=str(tmp_path))
  assert 'train-labels-idx1-ubyte' in str(e.value)


def test_load_split_data_dir_not_a_directory(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(TCNError) as e:
    helpers.load_split('fashion_mnist', 'train', data_dir=missing)
  assert missing in str(e.value)


def test_load_split_count_mismatch(tmp_path):
  """Images and labels of different lengths are rejected, naming both."""
  tx, ty = _synthetic(5, seed=7)
  _write_split(tmp_path, 'train', tx, ty[:4])
  with pytest.raises(TCNError) as e:
    helpers.load_split('fashion_mnist', 'train', data_dir=str(tmp_path))
  msg = str(e.value)
  assert '5 images' in msg and '4 labels' in msg
  assert 'train-images-idx3-ubyte' in msg and 'train-labels-idx1-ubyte' in msg


def test_unknown_dataset(tmp_path):
  """An unknown name is reported by name, before touching the disk."""
  with pytest.raises(TCNError, match='cifar11'):
    helpers.load_split('cifar11', 'train', data_dir=str(tmp_path))
  with pytest.raises(TCNError, match='cifar11'):
    data.load(_cfg(name='cifar11'))


# TFDS.


def test_load_tfds_mock():
  """Random-access TFDS source: images (N, 28, 28, 1) and int32 labels."""
  with tfds.testing.mock_data(num_examples=20):
    split = helpers.load_tfds('mnist', 'train')
  assert split.x.shape == (20, 28, 28, 1)
  assert split.y.shape == (20,) and split.y.dtype == np.int32
  assert split.y.min() >= 0 and split.y.max() < 10


def test_load_tfds_missing(tmp_path):
  """A dataset TFDS does not have locally is a one-line TCNError."""
  with pytest.raises(TCNError) as e:
    helpers.load_tfds('mnist', 'train', data_dir=str(tmp_path))
  msg = str(e.value)
  assert 'tfds' in msg and 'mnist' in msg
  assert '\n' not in msg


def test_hflip_mirrors_images_and_refuses_other_inputs():
  x = np.arange(2 * 3 * 4 * 1).reshape(2, 3, 4, 1)
  y = augment.hflip(x)
  assert y.shape == x.shape and (y[:, :, 0] == x[:, :, -1]).all()
  assert (augment.hflip(y) == x).all()
  with pytest.raises(TCNError, match=r"config.data.augment='mirror' needs "
                     r'images .* shape \(500,\)'):
    augment.hflip(np.zeros((3, 500), np.int32))
