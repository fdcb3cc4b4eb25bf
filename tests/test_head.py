"""The head stage on a streamed training split: the students' outputs go to
a memory-mapped `.npy` under workdir/head/ (reused for the same inputs) and
the head trains from it as a Stream, equal to the in-memory head."""
import glob
import os

import jax
import numpy as np

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
