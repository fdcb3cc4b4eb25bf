"""Tests for the im2col layers against the XLA reference, and model shapes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcn_jax import layers
from tcn_jax import models

TOL = dict(rtol=1e-4, atol=1e-4)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _assert_trees_close(a, b):
  ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert ta == tb
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


CONV_CASES = {
    '2d_3x3_valid': dict(shape=(2, 9, 9, 3), features=4, kernel=(3, 3),
                         strides=(1, 1), padding='VALID'),
    '2d_5x5_valid': dict(shape=(2, 11, 10, 2), features=3, kernel=(5, 5),
                         strides=(1, 1), padding='VALID'),
    '2d_stride2': dict(shape=(2, 11, 12, 3), features=4, kernel=(3, 3),
                       strides=(2, 2), padding='VALID'),
    '2d_same': dict(shape=(2, 8, 7, 3), features=4, kernel=(3, 3),
                    strides=(1, 1), padding='SAME'),
    '2d_same_stride2': dict(shape=(2, 9, 8, 2), features=3, kernel=(5, 5),
                            strides=(2, 2), padding='SAME'),
    '1d_stride3': dict(shape=(2, 40, 8), features=6, kernel=(7,),
                       strides=(3,), padding='VALID'),
    '1d_stride3_same': dict(shape=(2, 41, 5), features=4, kernel=(3,),
                            strides=(3,), padding='SAME'),
}


@pytest.mark.parametrize('case', CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_im2col_matches_xla(case):
  """Forward pass and input/param gradients agree between the two paths."""
  x = _normal(0, case['shape'])

  def make(impl):
    return layers.Conv(case['features'], case['kernel'], case['strides'],
                       case['padding'], impl=impl)

  params = make('xla').init(jax.random.key(0), x)['params']
  # A non-zero bias makes the bias path visible in the forward check.
  params = dict(params, bias=_normal(1, params['bias'].shape))

  cotangent = _normal(2, jax.eval_shape(make('xla').apply,
                                        {'params': params}, x).shape)

  @jax.jit
  def run(p, xx):
    out = {}
    for impl in ('xla', 'im2col'):
      fwd = lambda p_, x_, impl=impl: make(impl).apply({'params': p_}, x_)
      y, vjp = jax.vjp(fwd, p, xx)
      out[impl] = (y, *vjp(cotangent))
    return out

  out = run(params, x)
  y_ref, dp_ref, dx_ref = out['xla']
  y_new, dp_new, dx_new = out['im2col']
  assert y_new.shape == y_ref.shape
  np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_ref), **TOL)
  np.testing.assert_allclose(np.asarray(dx_new), np.asarray(dx_ref), **TOL)
  _assert_trees_close(dp_new, dp_ref)


def test_conv_output_shapes_match_flax_conv():
  """Output shapes follow nn.Conv for valid, strided and 'SAME' cases."""
  for case in CONV_CASES.values():
    x = jnp.zeros(case['shape'])
    ref = nn.Conv(case['features'], case['kernel'], case['strides'],
                  case['padding'])
    ours = layers.Conv(case['features'], case['kernel'], case['strides'],
                       case['padding'], impl='im2col')
    expected = jax.eval_shape(lambda: ref.init_with_output(
        jax.random.key(0), x)[0]).shape
    got = jax.eval_shape(lambda: ours.init_with_output(
        jax.random.key(0), x)[0]).shape
    assert got == expected


@pytest.mark.parametrize('impl', ['im2col', 'xla'])
def test_conv_params_and_outputs_match_flax_conv(impl):
  """Same param names and shapes as nn.Conv, and the same outputs with them."""
  x = _normal(3, (2, 10, 10, 3))
  ours = layers.Conv(5, (3, 3), (2, 2), 'SAME', impl=impl)
  ref = nn.Conv(5, (3, 3), (2, 2), 'SAME')
  p_ours = ours.init(jax.random.key(0), x)
  p_ref = ref.init(jax.random.key(0), x)
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, t)
  assert shapes(p_ours) == shapes(p_ref)
  assert set(p_ours['params']) == {'kernel', 'bias'}
  params = {'params': dict(p_ref['params'],
                           bias=_normal(4, p_ref['params']['bias'].shape))}
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)),
                             np.asarray(ref.apply(params, x)), **TOL)


POOL_CASES = {
    'valid_13x13': ((2, 13, 13, 3), 'VALID'),
    'valid_12x9': ((2, 12, 9, 2), 'VALID'),
    'same_13x13': ((2, 13, 13, 3), 'SAME'),
    'same_7x10': ((2, 7, 10, 2), 'SAME'),
    'valid_1d_odd': ((2, 15, 4), 'VALID'),
    'same_1d_odd': ((2, 15, 4), 'SAME'),
}


@pytest.mark.parametrize('shape,padding', POOL_CASES.values(),
                         ids=POOL_CASES.keys())
def test_max_pool_im2col_matches_nn_max_pool(shape, padding):
  """Reshape pooling equals nn.max_pool, forward and gradient."""
  x = _normal(5, shape)  # Continuous values: no ties in any window.
  nd = len(shape) - 2

  def ref(xx):
    return nn.max_pool(xx, (2,) * nd, (2,) * nd, padding)

  def ours(xx):
    return layers.max_pool(xx, 2, padding, impl='im2col')

  y_ref, vjp_ref = jax.vjp(ref, x)
  y_new, vjp_new = jax.vjp(ours, x)
  assert y_new.shape == y_ref.shape
  np.testing.assert_array_equal(np.asarray(y_new), np.asarray(y_ref))
  assert np.isfinite(np.asarray(y_new)).all()
  cotangent = _normal(6, y_ref.shape)
  np.testing.assert_allclose(np.asarray(vjp_new(cotangent)[0]),
                             np.asarray(vjp_ref(cotangent)[0]), **TOL)


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
def test_overlapping_max_pool_im2col_matches_nn_max_pool(padding):
  """3x3 windows, stride 2 (ResNet's stem): shifted slices == nn.max_pool."""
  x = jax.random.normal(jax.random.key(3), (2, 9, 10, 3))
  np.testing.assert_array_equal(
      np.asarray(layers.max_pool(x, 3, padding, 'im2col', stride=2)),
      np.asarray(nn.max_pool(x, (3, 3), (2, 2), padding)))


def test_max_pool_xla_path_is_nn_max_pool():
  """impl='xla' is the reference pooling."""
  x = _normal(7, (2, 13, 13, 3))
  np.testing.assert_array_equal(
      np.asarray(layers.max_pool(x, 2, 'SAME', impl='xla')),
      np.asarray(nn.max_pool(x, (2, 2), (2, 2), 'SAME')))


def test_resolve_impl():
  """'auto' picks im2col on CPU; explicit choices pass; bad ones raise."""
  expected = 'im2col' if jax.default_backend() == 'cpu' else 'xla'
  assert layers.resolve_impl('auto') == expected
  assert layers.resolve_impl('im2col') == 'im2col'
  assert layers.resolve_impl('xla') == 'xla'
  with pytest.raises(ValueError, match='cudnn'):
    layers.resolve_impl('cudnn')


def test_conv_bad_impl_raises():
  """A bad impl is rejected when the layer runs."""
  with pytest.raises(ValueError, match='layers.impl'):
    layers.Conv(2, (3, 3), impl='fast').init(jax.random.key(0),
                                             jnp.zeros((1, 5, 5, 1)))


def test_parse_rejects_unknown_token():
  """The error names the offending token."""
  with pytest.raises(ValueError, match="'Q7'"):
    models.parse('C32 MP Q7 F')


def test_parse_tokens():
  """Each notation maps to the layer it describes."""
  got = models.parse('C5-32s2same MPsame Do.25 F D16r D8 BN R Emb100-4 '
                     'C8samelin ELU RB16s2 BB4 GAP ZP3 MP3s2 BN1.001e-5 '
                     'BB64s2k CAFFE')
  assert got == [
      dict(kind='conv', features=32, kernel=5, stride=2, padding='SAME',
           relu=True),
      dict(kind='pool', padding='SAME', window=2, stride=2),
      dict(kind='dropout', rate=0.25),
      dict(kind='flatten'),
      dict(kind='dense', features=16, relu=True),
      dict(kind='dense', features=8, relu=False),
      dict(kind='bn', epsilon=1e-3),
      dict(kind='relu'),
      dict(kind='embed', vocab=100, features=4),
      dict(kind='conv', features=8, kernel=3, stride=1, padding='SAME',
           relu=False),
      dict(kind='elu'),
      dict(kind='basic', features=16, stride=2, keras=False),
      dict(kind='bottleneck', features=4, stride=1, keras=False),
      dict(kind='gap'),
      dict(kind='zeropad', pad=3),
      dict(kind='pool', padding='VALID', window=3, stride=2),
      dict(kind='bn', epsilon=1.001e-5),
      dict(kind='bottleneck', features=64, stride=2, keras=True),
      dict(kind='caffe'),
  ]


def test_residual_blocks_shapes_and_batch_stats():
  """Blocks keep or halve the spatial size, project the shortcut when the
  shape changes, and carry BatchNorm statistics that train mode updates."""
  net = models.Net('C8same RB8 RB16s2 BB4s2 GAP')
  x = _normal(3, (2, 16, 16, 3))
  out, variables = net.init_with_output(jax.random.key(0), x)
  assert out.shape == (2, 16)           # Bottleneck output: 4 x 4 filters.
  assert set(variables) == {'params', 'batch_stats'}
  _, updated = net.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree_util.tree_map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      variables['batch_stats'], updated['batch_stats'])
  assert all(jax.tree_util.tree_leaves(changed))
  # Inference mode does not depend on the batch: one example alone agrees.
  np.testing.assert_allclose(net.apply(variables, x[:1]),
                             net.apply(variables, x)[:1], atol=1e-5)


def test_fmnist_student_param_count_and_shape():
  """The n=4 F-MNIST student has the reference 21,712 parameters."""
  net = models.student('C32 C32 MP C16 C16 MP Do.25 F D16r Do.3', 64)
  x = _normal(8, (3, 28, 28, 1))
  out, variables = jax.jit(net.init_with_output)(jax.random.key(0), x)
  assert models.num_params(variables['params']) == 21_712
  assert out.shape == (3, 64)


def test_fmnist_teacher_param_count_and_features():
  """The F-MNIST teacher has 2,446,730 parameters and a post-ReLU feature."""
  teacher = models.Teacher('C32 C64 MP Do.25 F D256r D256r', 10)
  x = _normal(9, (3, 28, 28, 1))
  logits, variables = jax.jit(teacher.init_with_output)(jax.random.key(0), x)
  assert logits.shape == (3, 10)
  assert models.num_params(variables['params']) == 2_446_730
  feats = jax.jit(lambda v, xx: teacher.apply(
      v, xx, method=teacher.features))(variables, x)
  assert feats.shape == (3, 256)
  assert (np.asarray(feats) >= 0).all()
  assert (np.asarray(feats) > 0).any()
