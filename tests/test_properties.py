"""Property-based tests (Hypothesis): whatever a user gives `config.resolve`
(random overrides of every field, of every type) or the Python API (random
shapes, dtypes and value ranges), the result is a value or one `TCNError`
on one line; an exception of another type fails the test. Examples found
by the search are kept below as `@example` regression cases.

Deterministic (derandomize=True) and small (max_examples), so it runs in
the suite in seconds.
"""
import math
import os

from hypothesis import example
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import tcn_jax as tcn
from tcn_jax import config as config_lib
from tcn_jax.errors import TCNError
from test_api_inputs import net  # pylint: disable=unused-import

# TCN_HYPOTHESIS_EXAMPLES=500 searches longer (e.g. before a release).
FAST = settings(max_examples=int(os.environ.get('TCN_HYPOTHESIS_EXAMPLES',
                                                60)), deadline=None, derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


def _fields():
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  out = []
  def walk(d, prefix=''):
    for k, v in d.items():
      if hasattr(v, 'items'):
        walk(v, f'{prefix}{k}.')
      else:
        out.append(f'{prefix}{k}')
  walk(fashion_mnist.get_config('smoke'))
  return out


FIELDS = _fields()
# Values of every type a flag or a config file can hold, and edge values.
VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 3), st.sampled_from([0, 1, 2, 33, 10 ** 9, -10 ** 9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-30, 1e30]),
    st.text(max_size=12),
    st.sampled_from(['', ' ', 'auto', 'adam', 'C4 MP F D8r', 'h:1',
                     'localhost:0', '/nonexistent', 'crop_flip', 'online',
                     'cached', 'pca', 'ff', 'gan', 'flip', 'float16',
                     'bfloat16', 'stablehlo,onnx', 'image_folder', 'imdb',
                     'C4 MP F D8r|C4 MP F D8r']),
    st.lists(st.integers(0, 3), max_size=2))


def _one_line_or_config(overrides):
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('smoke')
  for path, value in overrides:
    *parents, field = path.split('.')
    section = config
    for p in parents:
      section = section[p]
    with section.ignore_type():
      section[field] = value
  try:
    resolved = config_lib.resolve(config)
  except TCNError as e:
    assert str(e) and '\n' not in str(e), repr(str(e))
    return None
  assert resolved.num_students >= 1
  return resolved


@FAST
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1,
                max_size=3))
@example([('gan.disc_by_n.4', False)])   # Found: a TypeError.
@example([('distributed.timeout_s', math.nan)])
@example([('distributed.num_processes', 0), ('distributed.process_id', 1)])
@example([('students.features', 'cached'), ('students.augment', 'flip')])
@example([('num_students', 1.0)])
@example([('students.arch', None)])
@example([('export.formats', 0)])
@example([('mesh.data', 'a')])
@example([('teacher.body', '')])
@example([('data.name', 'image_folder')])
def test_resolve_gives_a_config_or_one_error(overrides):
  _one_line_or_config(overrides)


DTYPES = ['float16', 'bfloat16', 'float32', 'float64', 'uint8', 'int8',
          'int32', 'int64', 'bool', 'complex64', 'uint16']


@st.composite
def _arrays(draw):
  ndim = draw(st.integers(0, 5))
  shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 8, 9]),
                              min_size=ndim, max_size=ndim)))
  dtype = jnp.dtype(draw(st.sampled_from(DTYPES)))
  scale = draw(st.sampled_from([1.0, 255.0, -1.0, 1e6, math.nan, math.inf]))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  values = rng.random(shape) * scale
  with np.errstate(invalid='ignore', over='ignore'):
    if np.issubdtype(dtype, np.integer):
      values = np.nan_to_num(values, nan=0, posinf=0, neginf=0)
      info = np.iinfo(dtype)
      values = np.clip(values, info.min, info.max)
    return values.astype(dtype)


@FAST
@given(_arrays())
@example(np.zeros((2, 8, 8, 1), np.float16))
@example(np.zeros((2, 8, 8, 1), jnp.bfloat16))
@example(np.zeros((2, 8, 8, 1), np.complex64))
@example(np.full((1, 8, 8, 1), 255, np.uint8))
@example(np.zeros((0, 8, 8, 1), np.float32))
@example(np.zeros((2, 8, 8, 1, 1), np.float32))
def test_predict_gives_logits_or_one_error(net, images):
  predict = tcn.make_predict(net[0])
  try:
    out = np.asarray(predict(images))
  except TCNError as e:
    assert '\n' not in str(e) and str(e).startswith('predict: '), str(e)
    return
  assert out.shape == (len(images), 3) and np.all(np.isfinite(out))


@FAST
@given(_arrays(), st.lists(st.integers(-2, 5), max_size=4),
       st.sampled_from(DTYPES))
@example(np.zeros((1, 0), np.float16), [], 'float16')   # Found: ValueError.
@example(np.zeros((4, 8, 8, 1), np.float32), [0, 1, 2, 3], 'int32')
@example(np.zeros((4, 8, 8, 1), np.float32), [0, 1, 2, 1], 'float32')
@example(np.zeros((4, 8, 8, 1), np.float32), [0, 1, 2, 1], 'bool')
def test_evaluate_gives_accuracy_or_one_error(net, images, labels, dtype):
  predict = tcn.make_predict(net[0])
  with np.errstate(invalid='ignore'):
    y = np.asarray(labels).astype(jnp.dtype(dtype))
  try:
    acc = tcn.evaluate(predict, images, y)
  except TCNError as e:
    assert '\n' not in str(e) and str(e).startswith(('evaluate: ',
                                                     'predict: ')), str(e)
    return
  assert 0 <= acc <= 1


@FAST
@given(st.one_of(st.integers(-2, 5), st.floats(), st.booleans(), st.none(),
                 st.text(max_size=3)),
       st.sampled_from([(16, 4), (16, 0), (15, 4), (16, 1)]))
@example(0, (16, 4))
@example(5, (16, 4))
def test_train_students_counts_give_one_error(n, feature_shape):
  from test_api_inputs import _images  # pylint: disable=g-import-not-at-top
  try:
    groups, _ = tcn.train_students('C2 MP F', _images(16),
                                   np.zeros(feature_shape, np.float32), n,
                                   epochs=0, batch_size=4)
  except TCNError as e:
    assert '\n' not in str(e), str(e)
    return
  assert sum(len(g.member_ids) for g in groups) == n


if __name__ == '__main__':
  pytest.main([__file__, '-q'])
