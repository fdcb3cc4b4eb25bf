"""The head stage on a streamed training split: the students' outputs go to
a memory-mapped `.npy` under workdir/head/ (reused for the same inputs) and
the head trains from it as a Stream, equal to the in-memory head. With
views (`head.views`) the outputs are of each batch's view, in the step."""
import glob
import os

import jax
import numpy as np
import pytest

import tcn_jax as tcn
from tcn_jax import data as data_lib
from tcn_jax import head
from tcn_jax import input_pipeline as ip

_RNG = np.random.default_rng(0)
_X = _RNG.random((128, 8, 8, 1)).astype(np.float32)
_Y = _RNG.integers(0, 3, 128).astype(np.int32)


def _dataset(train_x):
  split = lambda a, b: data_lib.Split(_X[a:b], _Y[a:b])
  return data_lib.Dataset(data_lib.Split(train_x, _Y[:80]), split(80, 104),
                          split(104, 128), 3, 'test')


def test_streamed_head_equals_in_memory_and_reuses_its_outputs(tmp_path):
  feats = _RNG.random((80, 6)).astype(np.float32)
  groups, _ = tcn.train_students('C4 MP F', _X[:80], feats, 2, epochs=0)
  t_vars = tcn.Teacher('F D6r', 3).init(jax.random.key(0), _X[:1])
  net = tcn.TCN(groups, 3, 0.5, tcn.teacher_head(t_vars))
  kw = dict(epochs=2, batch_size=16, eval_batch_size=32, seed=3)
  memory, m_info = tcn.finetune_head(net, _dataset(_X[:80]), **kw)
  stream = ip.Stream(ip.ArraySource(_X[:80], _Y[:80]))
  streamed, s_info = tcn.finetune_head(net, _dataset(stream),
                                       workdir=str(tmp_path / 's'), **kw)
  # Same outputs, same batches and keys: bitwise on the CPU.
  for a, b in zip(jax.tree_util.tree_leaves(memory.head_variables),
                  jax.tree_util.tree_leaves(streamed.head_variables)):
    np.testing.assert_array_equal(a, b)
  for k in ('test_acc_before', 'test_acc_after'):
    assert m_info[k] == s_info[k]
  [npy] = glob.glob(str(tmp_path / 's' / 'head' / 'outputs.train.*.npy'))
  assert np.load(npy, mmap_mode='r').shape == (80, 6)
  # The same digest reuses the file (fn None is not called); another
  # replaces it.
  head_dir = str(tmp_path / 's' / 'head')
  for digest, fn in (('a', lambda xb: xb.reshape(len(xb), -1)[:, :5]),
                     ('a', None), ('b', lambda xb: xb[:, 0, :2, 0])):
    got = head.train_outputs(head_dir, fn, stream, 32, digest)
    [path] = glob.glob(os.path.join(head_dir, 'outputs.train.*.npy'))
    assert got.source.paths[0] == path != npy and len(got) == 80
    np.testing.assert_array_equal(got[:], _X[:80, 0, :2, 0] if digest == 'b'
                                  else _X[:80].reshape(80, -1)[:, :5])


def _net():
  groups, _ = tcn.train_students('C4 MP F', _X[:80], _RNG.random(
      (80, 6)).astype(np.float32), 2, epochs=0)
  t_vars = tcn.Teacher('F D6r', 3).init(jax.random.key(0), _X[:1])
  return tcn.TCN(groups, 3, 0.5, tcn.teacher_head(t_vars))


def test_head_on_flipped_views_of_mirror_images_equals_the_cached_head():
  """Images equal to their mirrors look the same flipped, so the head
  trained on the students' outputs of flipped views (computed in the step)
  is the head trained on the cached outputs, in memory and streamed."""
  sym = (_X + _X[:, :, ::-1]) / 2
  split = lambda a, b: data_lib.Split(sym[a:b], _Y[a:b])
  net, kw = _net(), dict(epochs=2, batch_size=16, eval_batch_size=32, seed=3)
  heads = []
  for views, train_x in (('', sym[:80]), ('flip', sym[:80]), ('flip', ip.Stream(
      ip.ArraySource(sym[:80], _Y[:80])))):
    ds = data_lib.Dataset(data_lib.Split(train_x, _Y[:80]), split(80, 104),
                          split(104, 128), 3, 'test')
    heads.append(tcn.finetune_head(net, ds, views=views, **kw)[0])
  for h in heads[1:]:
    for a, b in zip(jax.tree_util.tree_leaves(heads[0].head_variables),
                    jax.tree_util.tree_leaves(h.head_variables)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_head_on_mixup_views_is_seeded_and_differs_from_the_plain_head():
  net, kw = _net(), dict(epochs=2, batch_size=16, eval_batch_size=32)
  leaves = lambda views, seed: jax.tree_util.tree_leaves(tcn.finetune_head(
      net, _dataset(_X[:80]), views=views, seed=seed, **kw)[0].head_variables)
  a, b = leaves('pad_crop_flip_mixup', 3), leaves('pad_crop_flip_mixup', 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for other in (leaves('pad_crop_flip_mixup', 4), leaves('', 3)):
    assert any(not np.array_equal(x, y) for x, y in zip(a, other))


def test_head_views_must_be_drawn_on_device():
  from tcn_jax.errors import TCNError  # pylint: disable=g-import-not-at-top
  with pytest.raises(TCNError, match="config.head.views='crop_flip'"):
    tcn.finetune_head(_net(), _dataset(_X[:80]), epochs=1,
                      views='crop_flip')
