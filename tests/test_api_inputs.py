"""The Python API's input contract (`tcn_jax.inputs`): every public entry
point (predict from make_predict / load_tcn, train_teacher, teacher_features,
train_students, finetune_head, evaluate) refuses a bad input with one
TCNError naming the function and the argument, before any work; uint8
pixels are scaled exactly as the data loader scales them."""
import dataclasses
import os

import jax
import numpy as np
import pytest

import tcn_jax as tcn
from tcn_jax import assemble
from tcn_jax import data as data_lib
from tcn_jax import engine
from tcn_jax import inputs
from tcn_jax.errors import TCNError

SHAPE = (8, 8, 1)


def _images(n, seed=0, shape=SHAPE):
  return np.random.default_rng(seed).random((n, *shape), np.float32)


def _dataset(n=16, shape=SHAPE, labels=None):
  split = data_lib.Split(_images(n, shape=shape), np.zeros(n, np.int32)
                         if labels is None else labels)
  return data_lib.Dataset(split, data_lib.Split(_images(4, 1, shape),
                                                np.zeros(4, np.int32)),
                          data_lib.Split(_images(4, 2, shape),
                                         np.zeros(4, np.int32)), 2, 'test')


@pytest.fixture(scope='module')
def net():
  """An untrained TCN of two students on 8x8x1 images (what the checks see
  does not depend on training), with its teacher."""
  teacher = tcn.Teacher('C2 MP F D8r', num_classes=3)
  t_vars = teacher.init(jax.random.key(0), _images(1))
  groups = assemble.group_students(['C2 MP F'] * 2, [4, 4])
  for g in groups:
    model = g.model()
    g.variables = engine.init_group(lambda k, m=model: m.init(k, _images(1)),
                                    0, g.member_ids)
    g.input_shape = SHAPE
  return (tcn.TCN(groups, 3, 0.5, head_variables=tcn.teacher_head(t_vars)),
          teacher, t_vars)


def _one_error(fn, *args, match, **kwargs):
  """One TCNError on one line; a training function given a workdir has
  written nothing there (the checks come before any work)."""
  with pytest.raises(TCNError, match=match) as e:
    fn(*args, **kwargs)
  assert '\n' not in str(e.value)
  if 'workdir' in kwargs:
    assert not os.path.exists(kwargs['workdir'])
  return str(e.value)


# (id, images, expected text): inputs refused by predict.
BAD_IMAGES = [
    ('no channel axis', _images(5)[..., 0],
     r'predict: images has shape \(5, 8, 8\); this network takes \(N, 8, 8, '
     r'1\).*the channel axis is missing'),
    ('NCHW', _images(5).transpose(0, 3, 1, 2),
     r'images has shape \(5, 1, 8, 8\).*channels first \(NCHW\)'),
    ('another image size', _images(5, shape=(9, 9, 1)),
     r'takes \(N, 8, 8, 1\)'),
    ('one image without batch axis', _images(1)[0, ..., 0],
     r'predict: images has shape \(8, 8\)'),
    ('scalar', np.float32(0.5), r'must be a batch \(N, \.\.\.\)'),
    ('empty batch', _images(0), 'images is an empty batch'),
    ('all NaN', np.full((3, *SHAPE), np.nan, np.float32),
     'holds 192 non-finite values'),
    ('one inf', np.where(np.arange(64).reshape(1, 8, 8, 1) == 5, np.inf,
                         _images(1)).astype(np.float32), 'non-finite'),
    ('float pixels 0..255', 255 * _images(3),
     r'values in \[[\d.]+, 2\d\d[\d.]*\]; images must be floats in \[0, 1\]'),
    ('negative (standardised) values', _images(3) - 0.5,
     r'images must be floats in \[0, 1\]'),
    ('int32 pixels', (255 * _images(3)).astype(np.int32),
     'has dtype int32; give float images in'),
    ('bool', _images(3) > 0.5, 'has dtype bool'),
    ('strings', np.array([['a']]), r'has shape \(1, 1\)'),
]


@pytest.mark.parametrize('images, match', [c[1:] for c in BAD_IMAGES],
                         ids=[c[0] for c in BAD_IMAGES])
def test_predict_refuses(net, images, match):
  _one_error(tcn.make_predict(net[0]), images, match=match)


def test_uint8_is_scaled_as_the_data_loader_scales_it(net):
  """uint8 pixels give bitwise the logits (and features) of the float32
  images the data loader makes of them: x.astype(float32) / 255."""
  x8 = np.random.default_rng(3).integers(0, 256, (6, *SHAPE), np.uint8)
  scaled = x8.astype(np.float32) / 255.0
  predict = tcn.make_predict(net[0])
  np.testing.assert_array_equal(np.asarray(predict(x8)),
                                np.asarray(predict(scaled)))
  teacher, t_vars = net[1:]
  np.testing.assert_array_equal(tcn.teacher_features(teacher, t_vars, x8),
                                tcn.teacher_features(teacher, t_vars, scaled))
  # A valid float input is used as it is: the checks change no number.
  t = dataclasses.replace(net[0], impl='im2col')
  outputs = assemble.student_outputs_fn(t)([g.variables for g in t.groups],
                                           scaled)
  direct = assemble.tcn_head(t).apply(t.head_variables, outputs)
  np.testing.assert_array_equal(
      np.asarray(tcn.make_predict(t, impl='im2col')(scaled)),
      np.asarray(direct))


def test_saved_tcn_keeps_its_input_shape(net, tmp_path):
  tcn.save_tcn(str(tmp_path / 'tcn'), net[0])
  predict, loaded = tcn.load_tcn(str(tmp_path / 'tcn'))
  assert loaded.input_shape == SHAPE
  _one_error(predict, _images(2).transpose(0, 3, 1, 2), match='NCHW')


def test_tcn_without_input_shape_is_checked_against_its_parameters(net):
  """A TCN saved before students recorded their input shape: a shape that
  its parameters cannot take is still one TCNError naming the argument."""
  old = dataclasses.replace(net[0], groups=[
      dataclasses.replace(g, input_shape=None) for g in net[0].groups])
  predict = tcn.make_predict(old)
  assert predict(_images(2)).shape == (2, 3)
  _one_error(predict, np.zeros((2, 8, 8, 3), np.float32),
             match=r"predict: images of shape \(2, 8, 8, 3\) does not fit "
             "the network's parameters")


def test_teacher_features_refuses(net):
  teacher, t_vars = net[1:]
  _one_error(tcn.teacher_features, teacher, t_vars,
             _images(4).transpose(0, 3, 1, 2),
             match=r'teacher_features: x of shape \(4, 1, 8, 8\) does not '
             r"fit the network's parameters.*NCHW")
  _one_error(tcn.teacher_features, teacher, t_vars, _images(0),
             match='teacher_features: x is an empty batch')
  _one_error(tcn.teacher_features, teacher, t_vars,
             np.full((2, *SHAPE), np.nan, np.float32), match='non-finite')


@pytest.mark.parametrize('epochs', [-1, 1.5, True, '3'])
def test_epochs_must_be_a_count(net, epochs, tmp_path):
  x, feats = _images(16), np.zeros((16, 4), np.float32)
  wd = str(tmp_path / 'run')
  _one_error(tcn.train_students, 'C2 MP F', x, feats, 2, epochs=epochs,
             batch_size=4, workdir=wd,
             match='train_students: epochs must be an integer')
  teacher = net[1]
  _one_error(tcn.train_teacher, teacher, _dataset(), epochs=epochs,
             workdir=wd, match='train_teacher: epochs must be an integer')
  _one_error(tcn.finetune_head, net[0], _dataset(), epochs=epochs,
             workdir=wd, match='finetune_head: epochs must be an integer')


STUDENT_CASES = [
    ('features with another row count', {'features': np.zeros((12, 4))},
     r'train_students: features has shape \(12, 4\); expected \(16, D\)'),
    ('NaN features', {'features': np.full((16, 4), np.nan, np.float32)},
     'features holds non-finite values'),
    ('1-D features', {'features': np.zeros(16, np.float32)},
     r'features has shape \(16,\)'),
    ('empty batch', {'x': _images(0), 'features': np.zeros((0, 4))},
     'train_students: x is an empty batch'),
    ('uint16 images', {'x': np.zeros((16, *SHAPE), np.uint16)},
     'x has dtype uint16'),
    ('val of another shape', {'val': (_images(4, shape=(9, 9, 1)),
                                      np.zeros((4, 4), np.float32))},
     r'val\[0\] has shape \(4, 9, 9, 1\); this network takes \(N, 8, 8, 1\)'),
    ('val features of another width', {'val': (_images(4),
                                               np.zeros((4, 6), np.float32))},
     r'val\[1\] has shape \(4, 6\); expected \(4, 4\)'),
]


@pytest.mark.parametrize('kwargs, match', [c[1:] for c in STUDENT_CASES],
                         ids=[c[0] for c in STUDENT_CASES])
def test_train_students_refuses(kwargs, match, tmp_path):
  args = dict(x=_images(16), features=np.zeros((16, 4), np.float32),
              workdir=str(tmp_path / 'run'))
  args.update(kwargs)
  _one_error(tcn.train_students, 'C2 MP F', args.pop('x'),
             args.pop('features'), 2, epochs=1, batch_size=4, match=match,
             **args)


def test_train_teacher_refuses(net, tmp_path):
  teacher, wd = net[1], str(tmp_path / 'run')
  _one_error(tcn.train_teacher, teacher, _dataset(labels=np.zeros(10,
                                                                  np.int32)),
             epochs=1, workdir=wd,
             match=r'train_teacher: ds.train.y has shape \(10,\); '
             r'expected \(16,\)')
  _one_error(tcn.train_teacher, teacher, _dataset(labels=np.full(16, 3)),
             epochs=1, match=r'ds.train.y holds labels 3..3, outside \[0, 3\)')
  ds = _dataset()
  ds.val = data_lib.Split(_images(4, shape=(8, 8, 3)), np.zeros(4, np.int32))
  _one_error(tcn.train_teacher, teacher, ds, epochs=1,
             match=r'ds.val.x has shape \(4, 8, 8, 3\); this network takes '
             r'\(N, 8, 8, 1\)')
  ds = _dataset()
  ds.train = data_lib.Split(255 * ds.train.x, ds.train.y)
  _one_error(tcn.train_teacher, teacher, ds, epochs=1,
             match=r'ds.train.x holds values in')


def test_finetune_head_refuses(net, tmp_path):
  _one_error(tcn.finetune_head, net[0], _dataset(shape=(8, 8)), epochs=1,
             workdir=str(tmp_path / 'run'),
             match=r'finetune_head: ds.train.x has shape \(16, 8, 8\); this '
             r'network takes \(N, 8, 8, 1\)')
  _one_error(tcn.finetune_head, net[0], _dataset(labels=np.full(16, 5)),
             epochs=1, match='outside \\[0, 3\\)')


def test_evaluate_refuses(net):
  predict = tcn.make_predict(net[0])
  _one_error(tcn.evaluate, predict, _images(4), np.zeros(3, np.int32),
             match=r'evaluate: y has shape \(3,\); expected \(4,\)')
  _one_error(tcn.evaluate, predict, _images(0), np.zeros(0, np.int32),
             match='evaluate: x is an empty batch')
  _one_error(tcn.evaluate, predict, _images(4), np.zeros(4, np.float32),
             match='y must be integer labels')
  assert 0 <= tcn.evaluate(predict, _images(4), np.zeros(4, np.int32)) <= 1


def test_token_ids_for_embedding_networks():
  """Networks that start with an embedding take integer ids in range."""
  ids = np.zeros((3, 5), np.int32)
  assert inputs.batch('f', 'x', ids, spec='Emb10-4 F') is ids
  with pytest.raises(TCNError, match=r'token ids 0..10, outside the '
                     r'vocabulary \[0, 10\)'):
    inputs.batch('f', 'x', np.arange(11).reshape(1, 11), spec='Emb10-4 F')
  with pytest.raises(TCNError, match='must be integer token ids'):
    inputs.batch('f', 'x', ids.astype(np.float32), spec='Emb10-4 F')


def test_a_stop_signal_is_not_taken_for_a_shape_error():
  """SIGTERM while a shape is tried (the handler raises Interrupted) stays
  the stop it is, not a 'does not fit' error."""
  import signal  # pylint: disable=g-import-not-at-top
  from tcn_jax.errors import Interrupted  # pylint: disable=g-import-not-at-top

  def stopped(x):
    raise Interrupted(signal.SIGTERM)
  with pytest.raises(Interrupted):
    inputs.fits('teacher_features', 'x', _images(2), stopped)
