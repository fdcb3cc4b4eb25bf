"""Tests for splitting teacher features into chunks and computing them."""
import jax
import numpy as np
import pytest

import helpers
from tcn_jax import chunking
from tcn_jax import features
from tcn_jax import models
from tcn_jax.errors import TCNError

BODY = 'C32 C64 MP Do.25 F D256r D256r'


def _features(n_rows, dim, seed=0):
  return np.random.default_rng(seed).normal(size=(n_rows, dim)).astype(
      np.float32)


@pytest.mark.parametrize('n', [1, 2, 4, 8])
def test_chunk_round_trip_and_order(n):
  """Chunks are contiguous equal slices in order; unchunk restores them."""
  f = _features(5, 256)
  chunks = chunking.chunk(f, n)
  assert len(chunks) == n
  width = 256 // n
  for i, c in enumerate(chunks):
    assert c.shape == (5, width)
    np.testing.assert_array_equal(c, f[:, i * width:(i + 1) * width])
  np.testing.assert_array_equal(helpers.unchunk(chunks), f)


def test_chunk_uneven():
  """D=10, n=3 gives widths [4, 3, 3], like numpy.array_split."""
  f = _features(4, 10)
  assert chunking.chunk_sizes(10, 3) == [4, 3, 3]
  assert chunking.chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
  chunks = chunking.chunk(f, 3)
  assert [c.shape[1] for c in chunks] == [4, 3, 3]
  for c, ref in zip(chunks, np.array_split(f, 3, axis=1)):
    np.testing.assert_array_equal(c, ref)
  np.testing.assert_array_equal(helpers.unchunk(chunks), f)


def test_chunk_sizes_cover_dim():
  """Widths sum to D and differ by at most one, larger ones first."""
  for dim in (1, 7, 10, 64, 256):
    for n in range(1, min(dim, 12) + 1):
      sizes = chunking.chunk_sizes(dim, n)
      assert sum(sizes) == dim
      assert max(sizes) - min(sizes) <= 1
      assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize('n', [0, -1, 11])
def test_bad_num_students_raise(n):
  """n < 1 and n > D are user errors, reported with the value."""
  f = _features(2, 10)
  with pytest.raises(TCNError, match=str(n)):
    chunking.chunk(f, n)
  with pytest.raises(TCNError):
    chunking.chunk_sizes(10, n)


@pytest.fixture(scope='module')
def teacher_and_params():
  teacher = models.Teacher(BODY, 10)
  x = np.zeros((1, 28, 28, 1), np.float32)
  variables = jax.jit(teacher.init)(jax.random.key(0), x)
  return teacher, variables


def _images(n, seed=1):
  return np.random.default_rng(seed).uniform(size=(n, 28, 28, 1)).astype(
      np.float32)


def _trunk_direct(variables, x):
  """The trunk applied on its own, with the teacher's trunk parameters."""
  trunk = models.Net(BODY, 'glorot_uniform')
  return np.asarray(jax.jit(trunk.apply)(
      models.submodule_variables(variables, 'trunk'), x))


@pytest.mark.parametrize('n,batch_size', [(37, 16), (32, 16), (5, 16)])
def test_teacher_features_match_trunk(teacher_and_params, n, batch_size):
  """Batched features equal the trunk's output, padding or not."""
  teacher, params = teacher_and_params
  x = _images(n)
  got = features.teacher_features(teacher, params, x, batch_size=batch_size)
  assert got.shape == (n, 256)
  assert isinstance(got, np.ndarray)
  np.testing.assert_allclose(got, _trunk_direct(params, x),
                             rtol=1e-5, atol=1e-5)


def test_teacher_features_rows_independent_of_batching(teacher_and_params):
  """A row's feature does not depend on the batch it falls in."""
  teacher, params = teacher_and_params
  x = _images(37, seed=2)
  a = features.teacher_features(teacher, params, x, batch_size=16)
  b = features.teacher_features(teacher, params, x, batch_size=37)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert (a >= 0).all()


def test_pca_basis_round_trip_and_balance():
  from tcn_jax import chunking as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16)) + 2.0
  pca = F.fit_pca(x)
  assert (np.diff(pca['variance']) <= 1e-4).all()       # falling variance
  shares = {}
  for assignment in F.PCA_ASSIGNMENTS.names():
    order = F.pca_order(pca['variance'], 4, assignment)
    assert sorted(order) == list(range(16))
    basis = F.pca_basis(pca, order)
    coeffs = helpers.to_coefficients(x, basis)
    np.testing.assert_allclose(coeffs @ basis['matrix'] + basis['mean'], x,
                               atol=1e-3)
    shares[assignment] = [pca['variance'][order[a:b]].sum()
                          for a, b in F.chunk_bounds(16, 4)]
    # The fitted Chunker holds that basis: encode is to_coefficients, decode
    # maps back, split cuts the coefficients into the students' chunks.
    chunker = F.fit('pca', x, 4, assignment)
    np.testing.assert_allclose(chunker.basis['matrix'], basis['matrix'])
    np.testing.assert_allclose(chunker.encode(x), coeffs, atol=1e-5)
    np.testing.assert_allclose(chunker.decode(chunker.encode(x)), x,
                               atol=1e-3)
    assert [c.shape[1] for c in chunker.split(coeffs)] == chunker.widths()
  assert np.ptp(shares['balanced']) < 0.2 * np.ptp(shares['ordered'])
  with pytest.raises(TCNError, match='pca_assignment'):
    F.pca_order(pca['variance'], 4, 'random')


def test_pca_of_a_memory_map_is_blockwise_and_equals_whole(tmp_path,
                                                           monkeypatch):
  """A memory-mapped cache: covariance accumulated in float64 over row
  blocks (64 rows here), encoded block by block into another memory map;
  equal to the in-memory SVD path to 1e-4 (directions up to their sign)."""
  monkeypatch.setattr(chunking, 'BLOCK_BYTES', 8 * 12 * 64)
  rng = np.random.default_rng(0)
  x = ((rng.standard_normal((500, 12)) * np.linspace(3, 0.3, 12))
       @ np.linalg.qr(rng.standard_normal((12, 12)))[0] + 2).astype(np.float32)
  np.save(tmp_path / 'f.npy', x)
  mapped = np.load(tmp_path / 'f.npy', mmap_mode='r')
  whole, blocks = chunking.fit_pca(x), chunking.fit_pca(mapped)
  np.testing.assert_allclose(blocks['mean'], whole['mean'], atol=1e-5)
  np.testing.assert_allclose(blocks['variance'], whole['variance'], rtol=1e-4)
  signs = np.sign(np.sum(blocks['components'] * whole['components'], 1))
  np.testing.assert_allclose(blocks['components'] * signs[:, None],
                             whole['components'], atol=1e-4)
  chunker = chunking.fit('pca', mapped, 3)
  in_memory = chunking.fit('pca', x, 3)
  np.testing.assert_allclose(np.abs(chunker.basis['matrix']),
                             np.abs(in_memory.basis['matrix']), atol=1e-4)
  encoded = chunker.encode(mapped)
  assert isinstance(encoded, np.memmap) and encoded.shape == (500, 12)
  np.testing.assert_allclose(encoded, chunker.encode(x), atol=1e-5)
  np.testing.assert_allclose(chunker.decode(np.asarray(encoded)), x,
                             atol=1e-4)


def test_contiguous_chunker_is_the_identity_map():
  """The paper's chunking: no basis; encode and decode leave features as
  they are and split is `chunk`."""
  f = _features(6, 10)
  chunker = chunking.fit('contiguous', f, 3)
  assert chunker.basis is None and chunker.widths() == [4, 3, 3]
  np.testing.assert_array_equal(chunker.encode(f), f)
  np.testing.assert_array_equal(chunker.decode(f), f)
  for a, b in zip(chunker.split(f), chunking.chunk(f, 3)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(TCNError, match="unknown chunking 'svd'"):
    chunking.fit('svd', f, 3)
  with pytest.raises(TCNError, match='11'):
    chunking.fit('contiguous', f, 11)


def test_teacher_head_with_and_without_batchnorm():
  """The kept head (BatchNorm and its statistics included) maps the teacher's
  features to the teacher's logits; the dropped-BN head has only 'out'."""
  from tcn_jax import assemble  # pylint: disable=g-import-not-at-top
  teacher = models.Teacher('C4same BN MPsame F D16', 10, head_bn=True)
  x = _images(12)
  variables = teacher.init(jax.random.key(0), x)
  # One train-mode pass so the moving statistics are not the initial ones.
  _, upd = teacher.apply(variables, x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(1)})
  variables = dict(variables, **upd)
  feats = features.teacher_features(teacher, variables, x)
  kept = assemble.teacher_head(variables, keep_bn=True)
  np.testing.assert_allclose(
      models.Head(10, bn=True).apply(kept, feats),
      teacher.apply(variables, x), rtol=1e-5, atol=1e-5)
  dropped = assemble.teacher_head(variables)
  assert set(dropped) == {'params'} and set(dropped['params']) == {'out'}
