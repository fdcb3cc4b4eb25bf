"""Tests for the TFDS-only datasets: CIFAR-10, IMDB and ImageNet.

`tfds.testing.mock_data` generates records without TensorFlow; fake
random-access sources (lists of records) pin exact values and reads.
"""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tcn_jax import config as config_lib
from tcn_jax import data
from tcn_jax.errors import TCNError

MOCK_N = 40  # Records per mocked split (train and test alike).


def _cfg(**kw):
  """A resolved data section of dataset 'cifar10' with fields `kw`."""
  c = config_lib.data_config(name='cifar10')
  c.update(kw)
  return c


class FakeSource:
  """A random-access source over a list of records that counts its reads."""

  def __init__(self, records):
    self.records, self.reads = records, []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads.append(i)
    return self.records[i]


def _fake_tfds(monkeypatch, sources):
  """tfds.data_source serves sources[(tfds_name, split)]."""
  def data_source(name, split, data_dir=None, download=True):
    del data_dir, download
    return sources[(name, split)]
  monkeypatch.setattr(tfds, 'data_source', data_source)


def _assert_same(a, b):
  for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
    np.testing.assert_array_equal(x.x, y.x)
    np.testing.assert_array_equal(x.y, y.y)


# Mocked TFDS: shapes, dtypes, ranges, determinism.

MOCKED = {  # name: (extra config, x shape per example, num_classes)
    'cifar10': ({}, (32, 32, 3), 10),
    'imdb': ({'max_len': 24, 'vocab_size': 12}, (24,), 2),
    'imagenet': ({'image_size': 32}, (32, 32, 3), 1000),
}


@pytest.fixture(scope='module', params=sorted(MOCKED))
def mocked(request):
  name = request.param
  extra, _, _ = MOCKED[name]
  with tfds.testing.mock_data(num_examples=MOCK_N):
    first = data.load(_cfg(name=name, **extra))
    second = data.load(_cfg(name=name, **extra))
  return name, first, second


def test_mocked_shapes_and_values(mocked):
  name, d, _ = mocked
  _, shape, num_classes = MOCKED[name]
  assert d.num_classes == num_classes and d.source == 'tfds'
  assert (len(d.train), len(d.val), len(d.test)) == (32, 8, MOCK_N)
  for split in (d.train, d.val, d.test):
    assert split.x.shape[1:] == shape
    assert split.y.dtype == np.int32
    assert split.y.min() >= 0 and split.y.max() < num_classes
    if name == 'imdb':
      assert split.x.dtype == np.int32
      assert split.x.min() >= 0 and split.x.max() < 12
    else:
      assert split.x.dtype == np.float32
      assert split.x.min() >= 0.0 and split.x.max() <= 1.0


def test_mocked_deterministic(mocked):
  """The same config and seed give identical arrays."""
  _, a, b = mocked
  _assert_same(a, b)


def test_mocked_imdb_padding_and_start():
  """Mock reviews are short: zeros first, then one start marker."""
  with tfds.testing.mock_data(num_examples=MOCK_N):
    d = data.load(_cfg(name='imdb', test_size=10))
  assert d.train.x.shape == (32, data.MAX_LEN) and len(d.test) == 10
  for row in np.concatenate([d.train.x, d.val.x, d.test.x]):
    start = np.flatnonzero(row)[0]
    assert row[start] == data.START and start > 0
    assert not row[:start].any() and (row[start + 1:] >= data.OOV).all()
    assert row.max() < data.VOCAB_SIZE


def test_mocked_other_seed_other_split():
  with tfds.testing.mock_data(num_examples=MOCK_N):
    a = data.load(_cfg(split_seed=0))
    b = data.load(_cfg(split_seed=1))
  assert not np.array_equal(a.val.x, b.val.x)
  np.testing.assert_array_equal(a.test.x, b.test.x)


# The IMDB tokenizer and vocabulary.

CORPUS = ['The cat sat.<br />The dog didn\'t sit!',
          b'the cat ran 3 times', 'A dog; a CAT.<BR>']


def test_tokenize():
  assert data.tokenize("The dog didn't sit!<br />'Quoted' 42x") == [
      'the', 'dog', "didn't", 'sit', 'quoted', 'x']
  assert data.tokenize(b'Caf\xc3\xa9<br/>OK') == ['caf\xe9', 'ok']


def test_build_vocab_ranks_and_ties():
  """Counts first (cat 3, the 3, a 2, dog 2, ...), ties alphabetically;
  ids start at 4 (3 is unused, as in Keras) and stay below vocab_size."""
  assert data.build_vocab(CORPUS, vocab_size=8) == {
      'cat': 4, 'the': 5, 'a': 6, 'dog': 7}
  full = data.build_vocab(CORPUS, vocab_size=100)
  assert [w for w, _ in sorted(full.items(), key=lambda kv: kv[1])][4:] == [
      "didn't", 'ran', 'sat', 'sit', 'times']
  assert data.build_vocab(CORPUS, vocab_size=4) == {}


def test_encode_pads_truncates_and_oov():
  vocab = data.build_vocab(CORPUS, vocab_size=8)
  x = data.encode(['the cat', 'A dog the cat sat a dog', 'cat dog a the',
                   ''], vocab, max_len=5)
  assert x.dtype == np.int32
  np.testing.assert_array_equal(x, [
      [0, 0, 1, 5, 4],     # Pre-padded.
      [5, 4, 2, 6, 7],     # Pre-truncated: the end stays; sat is OOV.
      [1, 4, 7, 6, 5],     # Exactly max_len with the start marker.
      [0, 0, 0, 0, 1]])


def test_imdb_vocab_from_train_only(monkeypatch):
  """Words seen only in test are out of vocabulary; ids follow train counts."""
  train = [{'text': t.encode(), 'label': np.int64(i % 2)} for i, t in
           enumerate(['good good film', 'bad film', 'good plot'] * 4)]
  test = [{'text': b'zebra zebra zebra good', 'label': np.int64(1)}]
  _fake_tfds(monkeypatch, {('imdb_reviews', 'train'): FakeSource(train),
                           ('imdb_reviews', 'test'): FakeSource(test)})
  d = data.load(_cfg(name='imdb', max_len=6, vocab_size=6))
  # good (12) -> 4, film (8) -> 5; bad and plot (4 each) are past id 5.
  np.testing.assert_array_equal(d.test.x, [[0, 1, 2, 2, 2, 4]])
  seqs = {tuple(r) for r in np.concatenate([d.train.x, d.val.x])}
  assert seqs == {(0, 0, 1, 4, 4, 5), (0, 0, 0, 1, 2, 5), (0, 0, 0, 1, 4, 2)}


@pytest.mark.parametrize('field,value', [('vocab_size', 4), ('max_len', 0),
                                         ('image_size', 0)])
def test_bad_optional_fields(field, value):
  with pytest.raises(TCNError, match=field):
    data.load(_cfg(name='imdb', **{field: value}))


# ImageNet: resizing and reading only the records a subset needs.


def test_resize_center_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
  # Shorter side already the size: a pure centre crop.
  np.testing.assert_array_equal(data.resize_center_crop(image, 12),
                                image[:, 4:16])
  flat = np.full((30, 17, 3), 77, np.uint8)
  for size in (8, 17, 40):
    out = data.resize_center_crop(flat, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert (out == 77).all()
  # Halving averages 2x2 neighbourhoods of a smooth ramp.
  ramp = np.repeat(np.arange(0, 160, 10, dtype=np.uint8), 16)
  ramp = np.broadcast_to(ramp.reshape(16, 16, 1), (16, 16, 3))
  np.testing.assert_array_equal(data.resize_center_crop(ramp, 8)[1:-1, 0, 0],
                                np.arange(25, 145, 20)[:6])


def _images(n, seed, num_classes, side=0):
  """Records of random images, side x side or of varying sizes."""
  rng = np.random.default_rng(seed)
  shapes = rng.integers(6, 12, (n, 2)) if not side else np.full((n, 2), side)
  return [{'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
           'label': np.int64(rng.integers(0, num_classes))}
          for h, w in shapes]


def test_imagenet_subset_reads_only_needed(monkeypatch):
  """With train_size / test_size, only those records are decoded, and they
  are the same arrays a full load would give; test means validation."""
  train = FakeSource(_images(200, 0, 1000))
  val = FakeSource(_images(50, 1, 1000))
  _fake_tfds(monkeypatch, {('imagenet2012', 'train'): train,
                           ('imagenet2012', 'validation'): val})
  small = data.load(_cfg(name='imagenet', image_size=8, train_size=6,
                         test_size=3))
  assert (len(small.train), len(small.val), len(small.test)) == (6, 1, 3)
  assert len(train.reads) == 7 and len(val.reads) == 3
  full = data.load(_cfg(name='imagenet', image_size=8))
  assert small.train.x.shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(small.train.x, full.train.x[:6])
  np.testing.assert_array_equal(small.val.y, full.val.y[:1])
  assert (len(full.train), len(full.val), len(full.test)) == (160, 40, 50)


def test_tfds_labels_out_of_range(monkeypatch):
  records = _images(10, 2, 10, side=32)
  records[4]['label'] = np.int64(10)
  test = FakeSource(_images(3, 3, 10, side=32))
  _fake_tfds(monkeypatch, {('cifar10', 'train'): FakeSource(records),
                           ('cifar10', 'test'): test})
  with pytest.raises(TCNError, match=r'labels of cifar10 outside \[0, 10\)'):
    data.load(_cfg())


def test_decoder_missing_is_one_line(monkeypatch):
  """TFDS's ImportError for a missing Pillow/OpenCV becomes a TCNError."""

  class NoDecoder(FakeSource):

    def __getitem__(self, i):
      raise ImportError('Decoding images with NumPy requires either OpenCV '
                        'or PIL.\nWe recommend using OpenCV.')
  _fake_tfds(monkeypatch, {('cifar10', 'train'): NoDecoder([None] * 4),
                           ('cifar10', 'test'): NoDecoder([None] * 2)})
  with pytest.raises(TCNError) as e:
    data.load(_cfg())
  assert 'pillow' in str(e.value) and '\n' not in str(e.value)


# Missing datasets.


@pytest.mark.parametrize('name,tfds_name', [('cifar10', 'cifar10'),
                                            ('imdb', 'imdb_reviews'),
                                            ('imagenet', 'imagenet2012')])
def test_missing_dataset(tmp_path, name, tfds_name):
  """An empty TFDS data_dir is a one-line TCNError saying how to get it."""
  with pytest.raises(TCNError) as e:
    data.load(_cfg(name=name, dir=str(tmp_path)))
  msg = str(e.value)
  assert '\n' not in msg
  assert data.HOW_TO_GET[name] in msg and f'tfds build {tfds_name}' in msg


def test_missing_data_dir(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(TCNError, match='not a directory'):
    data.load(_cfg(name='cifar10', dir=missing))


def test_registry():
  assert {'cifar10', 'imdb', 'imagenet', 'mnist', 'fashion_mnist'} <= set(
      data.DATASETS)
  assert set(data.HOW_TO_GET) == set(data.DATASETS) == set(data.NUM_CLASSES)
