"""Tests for the Grain input pipeline and the streamed training loop.

Sources (arrays, .npy memory maps, an image folder of generated PNG/JPEG
files, TFDS mock data), batch order and per-process slices, seeded
augmentation (the same with worker processes), iterator state, and
training on a stream: equal to the in-memory path, and a stop mid-epoch
resumed from a step checkpoint bitwise equal to an uninterrupted run.
"""
import os
import pickle

from absl import flags
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tcn_jax import checkpoint
from tcn_jax import engine
from tcn_jax import fit
from tcn_jax import input_pipeline as ip
from tcn_jax import losses
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import optim
from tcn_jax.errors import TCNError


def make_folder(root, classes=3, per_class=8, size=(20, 24), seed=0):
  """Class sub-folders of random RGB images, PNG and JPEG alternately;
  returns the images (PNG ones are lossless) by path."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  images = {}
  for c in range(classes):
    os.makedirs(os.path.join(root, f'class{c}'), exist_ok=True)
    for i in range(per_class):
      a = (rng.random(size + (3,)) * 255).astype(np.uint8)
      path = os.path.join(root, f'class{c}', f'{i:03d}.{"png" if i % 2 else "jpg"}')
      Image.fromarray(a).save(path)
      images[path] = a
  with open(os.path.join(root, 'class0', 'notes.txt'), 'w') as f:
    f.write('not an image')
  return images


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('images'))
  return root, make_folder(root)


def test_array_and_npy_sources(tmp_path):
  x = np.arange(5 * 4 * 4, dtype=np.float32).reshape(5, 4, 4, 1)
  y = np.arange(5, dtype=np.int32)
  np.save(tmp_path / 'x.npy', x)
  np.save(tmp_path / 'y.npy', y)
  npy = ip.NpySource(str(tmp_path / 'x.npy'), str(tmp_path / 'y.npy'))
  assert isinstance(npy.x, np.memmap)   # Not read whole.
  again = pickle.loads(pickle.dumps(npy))   # What a worker process gets.
  assert isinstance(again.x, np.memmap) and len(pickle.dumps(npy)) < 500
  for src in (ip.ArraySource(x, y), npy, again):
    stream = ip.Stream(src)
    assert stream.shape == (5, 4, 4, 1) and len(stream) == 5
    np.testing.assert_array_equal(stream[1:4], x[1:4])
    np.testing.assert_array_equal(stream.labels, y)
  with pytest.raises(TCNError, match='cannot open .npy'):
    ip.NpySource(str(tmp_path / 'missing.npy'))


def test_image_folder_source(folder):
  root, images = folder
  src = ip.ImageFolderSource(root)
  assert src.classes == ['class0', 'class1', 'class2'] and len(src) == 24
  np.testing.assert_array_equal(src.labels, np.repeat(np.arange(3), 8))
  stream = ip.Stream(src)   # No resize: the decoded pixels / 255.
  for i, path in enumerate(src.files):
    if path.endswith('.png'):
      np.testing.assert_array_equal(stream[i], images[path] / np.float32(255))
  small = ip.Stream(src, ip.Transform(image_size=12, channels=1))
  assert small.shape == (24, 12, 12, 1)
  assert 0 <= small[:3].min() and small[:3].max() <= 1


def test_image_folder_errors(tmp_path):
  with pytest.raises(TCNError, match='config.data.dir .* is not a directory'):
    ip.ImageFolderSource(str(tmp_path / 'nope'))
  with pytest.raises(TCNError, match='no class sub-folders'):
    ip.ImageFolderSource(str(tmp_path))
  os.makedirs(tmp_path / 'a')
  with pytest.raises(TCNError, match='a classifier needs at least 2'):
    ip.ImageFolderSource(str(tmp_path))
  os.makedirs(tmp_path / 'b')
  with pytest.raises(TCNError, match='no JPEG or PNG'):
    ip.ImageFolderSource(str(tmp_path))


def test_tfds_source_mock_data():
  with tfds.testing.mock_data(num_examples=20):
    src = ip.TfdsSource('cifar10', 'train')
    stream = ip.Stream(src)
    batch = next(stream.batches(0, 0, 8))
    assert batch['image'].shape == (8, 32, 32, 3)
    for row, i in zip(batch['image'], batch['index']):
      np.testing.assert_array_equal(row, src[i]['image'] / np.float32(255))
      assert src[i]['label'] == batch['label'][list(batch['index']).index(i)]


def test_batches_follow_batch_order_and_split_over_processes():
  x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
  stream = ip.Stream(ip.ArraySource(x, np.arange(50)), rows=np.arange(50)[::-1])
  order = ip.batch_order(3, 1, 50, 10)
  got = list(stream.batches(3, 1, 10))
  assert len(got) == 5
  for batch, idx in zip(got, order):
    np.testing.assert_array_equal(batch['index'], idx)
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], 49 - idx)
  halves = [list(stream.batches(3, 1, 10, process=(k, 2))) for k in range(2)]
  for b, (a, c) in enumerate(zip(*halves)):
    np.testing.assert_array_equal(
        np.concatenate([a['index'], c['index']]), order[b])
  with pytest.raises(TCNError, match='does not split over 3'):
    stream.batches(3, 1, 10, process=(0, 3))


def test_augmentation_seeded_and_same_with_workers(folder):
  flags.FLAGS.mark_as_parsed()   # Grain's worker processes read flags.
  src = ip.ImageFolderSource(folder[0])
  aug = ip.Transform(image_size=16, channels=3, crop=True, flip=True)
  stream = ip.Stream(src, aug)
  first = [b['image'] for b in stream.batches(0, 0, 8)]
  again = [b['image'] for b in stream.batches(0, 0, 8)]
  other = [b['image'] for b in stream.batches(0, 1, 8)]
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.array_equal(np.stack(first), np.stack(other))
  plain = next(ip.Stream(src, ip.Transform(16, 3)).batches(0, 0, 8))
  assert not np.array_equal(first[0], plain['image'])   # It augments.
  workers = ip.Stream(src, aug, workers=1)
  it = workers.batches(0, 0, 8)
  got = [next(it)['image']]
  state = it.get_state()   # Resume in the middle with workers too.
  got += [b['image'] for b in workers.batches(0, 0, 8, state=state)]
  np.testing.assert_array_equal(np.stack(got), np.stack(first))


def test_iterator_state_resumes(folder):
  stream = ip.Stream(ip.ImageFolderSource(folder[0]),
                     ip.Transform(16, 3, crop=True, flip=True))
  whole = [b['image'] for b in stream.batches(5, 2, 6)]
  it = stream.batches(5, 2, 6)
  next(it), next(it)
  rest = [b['image'] for b in stream.batches(5, 2, 6, state=it.get_state())]
  np.testing.assert_array_equal(np.stack(rest), np.stack(whole[2:]))


# Training on a stream.

_X = np.random.default_rng(0).random((120, 8, 8, 1)).astype(np.float32)
_Y = np.random.default_rng(1).integers(0, 3, 120).astype(np.int32)


def _train(x, workdir=None, epochs=2):
  teacher = models.Teacher('C4 MP F D16r', 3, 0.5, 'auto', False)
  variables = engine.init_group(lambda k: teacher.init(k, _X[:1]), 0, [0])
  out, history, _ = fit.fit(
      workdir, name='t', model=teacher, loss=losses.classification,
      tx=optim.make_optimizer('adam', 1e-3, 'x'), variables=variables, x=x,
      targets={'label': _Y[None]}, ids=[0], epochs=epochs, batch_size=16,
      seed=1, strategy='auto', val_x=_X[:40], val_targets=_Y[None, :40],
      val_metric=metrics.accuracy, writer=None)
  return checkpoint.digest(out), [{k: v for k, v in h.items()
                                    if k != 'seconds'} for h in history]


class Stop(Exception):
  pass


class StoppingStream(ip.Stream):
  """Raises after `stop_after` batches in all; counts the batches read."""

  def __init__(self, *args, stop_after=None, **kwargs):
    super().__init__(*args, **kwargs)
    self.stop_after, self.read = stop_after, 0

  def batches(self, *args, **kwargs):
    return _Counting(self, super().batches(*args, **kwargs))


class _Counting:
  """An iterator of batches that counts them and stops where told."""

  def __init__(self, stream, it):
    self.stream, self.it = stream, it

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.it)
    if self.stream.read == self.stream.stop_after:
      raise Stop
    self.stream.read += 1
    return batch

  def get_state(self):
    return self.it.get_state()


def test_stream_trains_like_in_memory_and_resumes_mid_epoch(tmp_path):
  """Same batches, same per-step keys: the in-memory model, bitwise on CPU;
  a stop mid-epoch loses at most K steps and resumes bitwise."""
  src = ip.ArraySource(_X, _Y)
  expected = _train(_X)
  # 7 steps an epoch; checkpoints every 3 steps; stop in epoch 2 at step 5.
  stopped = StoppingStream(src, checkpoint_every_steps=3, stop_after=7 + 5)
  with pytest.raises(Stop):
    _train(stopped, str(tmp_path / 'cut'))
  resumed = StoppingStream(src, checkpoint_every_steps=3)
  assert _train(resumed, str(tmp_path / 'cut')) == expected
  assert resumed.read == 7 - 3   # Lost steps 4 and 5 only: at most K.


# configs/image_folder.py: checks and a whole run.

def _folder_config(root, **data):
  import image_folder  # pylint: disable=g-import-not-at-top
  c = image_folder.get_config('smoke')
  c.data.dir = root
  c.data.update(data)
  return c


def test_image_folder_config_errors(tmp_path, folder):
  from tcn_jax import config as config_lib
  with pytest.raises(TCNError, match='config.data.dir must name'):
    config_lib.resolve(_folder_config(''))
  with pytest.raises(TCNError, match='config.data.dir .* is not a directory'):
    config_lib.resolve(_folder_config(str(tmp_path / 'nope')))
  with pytest.raises(TCNError, match=r'has no train/ folder'):
    config_lib.resolve(_folder_config(folder[0]))
  with pytest.raises(TCNError, match='config.data.streaming must be one of'):
    config_lib.resolve(_folder_config(folder[0], streaming='maybe'))
  with pytest.raises(TCNError, match='config.data.channels must be 1 or 3'):
    config_lib.resolve(_folder_config(folder[0], channels=2))


@pytest.fixture(scope='module')
def split_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('split'))
  make_folder(os.path.join(root, 'train'), per_class=16)
  make_folder(os.path.join(root, 'val'), per_class=4, seed=1)   # ILSVRC's.
  return root


def test_image_folder_in_memory_equals_stream(split_folder):
  memory = ip.load(_folder_config(split_folder, streaming='never').data)
  stream = ip.load(_folder_config(split_folder, streaming='always').data)
  assert memory.classes == ['class0', 'class1', 'class2']
  assert memory.num_classes == 3 and 'in memory' in memory.source
  assert isinstance(stream.train.x, ip.Stream) and 'streamed' in stream.source
  for a, b in zip((memory.train, memory.val, memory.test),
                  (stream.train, stream.val, stream.test)):
    np.testing.assert_array_equal(a.x, b.x[:])
    np.testing.assert_array_equal(a.y, b.y)
  assert memory.train.x.shape == (38, 16, 16, 3) and len(memory.test) == 12


@pytest.mark.slow
def test_image_folder_whole_run_streamed(split_folder, tmp_path):
  """Teacher, features, students and head on a streamed, augmented folder."""
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  c = _folder_config(split_folder, streaming='always', augment='crop_flip',
                     checkpoint_every_steps=1)
  c.teacher.epochs = c.students.epochs = c.head.epochs = 1
  c.num_students, c.teacher.body = 1, 'C4 MP F D16r'
  first = tcn.run(c, str(tmp_path))
  assert 'streamed' in first['data_source']
  assert os.path.isdir(tmp_path / 'students' / 'group0' / 'steps')
  assert first['params']['head'] == (16 + 1) * 3   # 3 classes: 3 outputs.


# Teacher features: online (inside the students' step) or cached.

def test_online_features_equal_cached():
  from tcn_jax import chunking  # pylint: disable=g-import-not-at-top
  from tcn_jax import features  # pylint: disable=g-import-not-at-top
  from tcn_jax import students  # pylint: disable=g-import-not-at-top
  teacher = models.Teacher('C4 MP F D12r', 3, 0.0, 'auto', False)
  t_vars = teacher.init(jax.random.key(0), _X[:1])
  train, val = _X[:96], _X[96:]
  f_train = features.teacher_features(teacher, t_vars, train)
  f_val = features.teacher_features(teacher, t_vars, val)
  chunker = chunking.fit('pca', f_train, 1)
  kw = dict(epochs=1, batch_size=16, val=(val, chunker.encode(f_val)))
  cached, c_info = students.train_students(
      'C4 MP F D8r', train, chunker.encode(f_train), 1, **kw)
  online, o_info = students.train_students(
      'C4 MP F D8r', train, None, 1, **kw, objective=students.Objective(
          online={'teacher': teacher, 'variables': t_vars,
                  'chunker': chunker}))
  for a, b in zip(jax.tree_util.tree_leaves([g.variables for g in cached]),
                  jax.tree_util.tree_leaves([g.variables for g in online])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(c_info['val_mse'], o_info['val_mse'], rtol=1e-5)


def test_features_written_as_memory_map(tmp_path, folder):
  from tcn_jax import features  # pylint: disable=g-import-not-at-top
  stream = ip.Stream(ip.ImageFolderSource(folder[0]), ip.Transform(8, 3))
  teacher = models.Teacher('C4 MP F D6r', 3, 0.0, 'auto', False)
  t_vars = teacher.init(jax.random.key(0), stream[:1])
  path = str(tmp_path / 'f.npy')
  got = features.write_features(path, teacher, t_vars, stream, 10)
  assert isinstance(got, np.memmap) and got.shape == (24, 6)
  want = features.teacher_features(teacher, t_vars, stream[:], 10)
  np.testing.assert_allclose(got, want, atol=1e-6)
  rows = ip.StackedRows([got[:, :2], got[:, 2:4]])
  assert rows.shape == (2, 24, 2) and np.ndim(rows) == 3
  np.testing.assert_array_equal(
      np.take(rows, [5, 1], 1), np.stack([got[[5, 1], :2], got[[5, 1], 2:4]]))


def test_auto_features_mode(split_folder):
  from tcn_jax import features  # pylint: disable=g-import-not-at-top
  from tcn_jax import record  # pylint: disable=g-import-not-at-top

  def mode(**data):
    c = _folder_config(split_folder, **data)
    return features.choose_mode(record.Run(c, '', ip.load(c.data), ''))
  assert mode(streaming='never')[0] == 'cached'
  assert mode(streaming='always')[0] == 'cached'
  assert mode(augment='flip') == ('online', 'the training images are '
                                  'augmented every epoch')


def test_imagenet_config_reads_an_ilsvrc_folder(tmp_path):
  import imagenet  # pylint: disable=g-import-not-at-top
  from tcn_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from tcn_jax import pipeline  # pylint: disable=g-import-not-at-top
  from PIL import Image
  for split, n in (('train', 4), ('val', 2)):
    for wnid in ('n01440764', 'n01443537'):
      os.makedirs(tmp_path / split / wnid)
      for i in range(n):
        Image.new('RGB', (40 + i, 30), (i * 40, 0, 0)).save(
            tmp_path / split / wnid / f'{wnid}_{i}.JPEG', format='JPEG')
  c = imagenet.get_config('smoke')
  c.data.layout, c.data.dir = 'folder', str(tmp_path)
  c.data.val_fraction = 0.25
  c = config_lib.resolve(c)
  ds = ip.load(c.data)
  assert ds.classes == ['n01440764', 'n01443537'] and ds.num_classes == 2
  assert ds.train.x.shape[1:] == (32, 32, 3) and len(ds.test) == 4
  c.teacher.batch_size = c.students.batch_size = c.head.batch_size = 2
  c.kd.batch_size = 2
  c.data.augment = 'mirror'
  c.data.streaming = 'always'
  with pytest.raises(TCNError, match="config.data.augment='flip'"):
    pipeline.check_data(c, ip.load(c.data))
  c.data.layout = 'tfrecord'
  with pytest.raises(TCNError, match='config.data.layout must be'):
    config_lib.resolve(c)
