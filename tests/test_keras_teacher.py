"""Keras models as teachers (`teacher.init_from=model.keras`,
`teacher_variables_from_keras`):
weights mapped onto the architecture string give Keras' features and logits
on the same inputs; a mismatch is one error naming the layer; ResNet-50 from
keras.applications converts onto configs/imagenet.py's body."""
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest

from helpers import needs_fmnist, tiny_config
import tcn_jax as tcn
from tcn_jax import data as data_lib
from tcn_jax import keras_convert
from tcn_jax import models
from tcn_jax import pipeline

keras = pytest.importorskip('keras')
L = keras.layers


def _randomize_bn(model, seed=0):
  """Moving statistics and affine parameters away from identity, so the
  BatchNorm layout (gamma, beta, mean, variance) matters."""
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, L.BatchNormalization):
      c = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0, .2, c).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(.5, 2, c).astype(np.float32))
      layer.gamma.assign(rng.uniform(.5, 1.5, c).astype(np.float32))
      layer.beta.assign(rng.normal(0, .2, c).astype(np.float32))


def _fmnist_teacher():
  """The paper's Fashion-MNIST teacher as the authors' notebooks write it."""
  keras.utils.set_random_seed(0)
  return keras.Sequential([
      keras.Input((28, 28, 1)),
      L.Conv2D(32, (3, 3), activation='relu'),
      L.Conv2D(64, (3, 3), activation='relu'),
      L.MaxPooling2D((2, 2)), L.Dropout(0.25), L.Flatten(),
      L.Dense(256, activation='relu'), L.Dense(256, activation='relu'),
      L.Dropout(0.5), L.Dense(10, activation='softmax')])


def _logits_and_features(model, x):
  """Keras' pre-softmax logits and the output layer's input."""
  feats = np.asarray(keras.Model(model.inputs[0], model.layers[-1].input)(x))
  out = model.layers[-1]
  return feats @ out.kernel.numpy() + out.bias.numpy(), feats


@pytest.fixture(scope='module')
def x28():
  return np.random.RandomState(0).rand(16, 28, 28, 1).astype(np.float32)


def test_fmnist_teacher_from_keras_and_h5_files(tmp_path, x28):
  """.keras and whole-model .h5 files give Keras' logits and features."""
  model = _fmnist_teacher()
  want_logits, want_feats = _logits_and_features(model, x28)
  teacher = tcn.Teacher('C32 C64 MP Do.25 F D256r D256r', 10)
  for name in ('teacher.keras', 'teacher.h5'):
    model.save(tmp_path / name)
    variables = tcn.load_teacher(str(tmp_path / name), teacher, x28)
    np.testing.assert_allclose(teacher.apply(variables, x28), want_logits,
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(tcn.teacher_features(teacher, variables, x28),
                               want_feats, atol=1e-4, rtol=0)


def test_batchnorm_teacher_from_keras_model(x28):
  """BatchNorm (moving stats, epsilon), 'same' padding, linear convs."""
  keras.utils.set_random_seed(1)
  model = keras.Sequential([
      keras.Input((28, 28, 1)), L.Conv2D(8, 3, padding='same'),
      L.BatchNormalization(), L.Activation('relu'), L.MaxPooling2D(),
      L.Conv2D(8, 5, use_bias=False), L.BatchNormalization(epsilon=1e-5),
      L.ReLU(), L.Flatten(), L.Dense(16, activation='relu'),
      L.BatchNormalization(), L.Dense(10)])
  _randomize_bn(model)
  teacher = tcn.Teacher('C8samelin BN R MP C5-8lin BN1e-5 R F D16r', 10,
                        head_bn=True)
  variables = tcn.teacher_variables_from_keras(model, teacher, x28)
  np.testing.assert_allclose(teacher.apply(variables, x28),
                             np.asarray(model(x28)), atol=1e-4, rtol=0)
  other = tcn.Teacher('C8samelin BN R MP C5-8lin BN R F D16r', 10,
                      head_bn=True)
  with pytest.raises(tcn.TCNError, match=r"epsilon 1e-05, teacher layer "
                     r"trunk/BatchNorm_1 \('BN'\) uses 0.001"):
    tcn.teacher_variables_from_keras(model, other, x28)


@pytest.mark.parametrize('body, match', [
    ('C32 C64 MP Do.25 F D128r D256r',
     r"Keras layer 'dense\w*' \(Dense\) kernel has shape \(9216, 256\), "
     r"teacher layer trunk/Dense_0 \('D128r'\) needs \(9216, 128\)"),
    ('C32 C64 MP Do.25 F D256r',
     r"Keras layer 'dense\w*' \(Dense\) kernel has shape \(256, 256\), "
     r"teacher layer head/out \('head Dense10'\) needs \(256, 10\)"),
    ('C32 C64 MP Do.25 F D256r D256r D10r',
     r"5 layers with weights, the teacher .* 6: teacher layer head/out "
     r"\('head Dense10'\) has no Keras counterpart"),
    ('C32 C64 MP Do.25 F BN D256r D256r',
     r"Keras layer 'dense\w*' \(Dense\) meets teacher layer "
     r"trunk/BatchNorm_0 \('BN'"),
    ('C32 C64lin MP Do.25 F D256r D256r', 'different outputs'),
])
def test_mismatch_is_one_error_naming_the_layer(body, match, x28):
  with pytest.raises(tcn.TCNError, match=match):
    tcn.teacher_variables_from_keras(_fmnist_teacher(), tcn.Teacher(body, 10),
                                     x28)


def test_keras_file_errors(tmp_path, x28):
  teacher = tcn.Teacher('C32 C64 MP Do.25 F D256r D256r', 10)
  with pytest.raises(tcn.TCNError, match='init_from .*missing.keras.*no such'):
    tcn.load_teacher(str(tmp_path / 'missing.keras'), teacher, x28)
  (tmp_path / 'junk.h5').write_bytes(b'not hdf5')
  with pytest.raises(tcn.TCNError, match='junk.h5.*not an HDF5 file'):
    tcn.load_teacher(str(tmp_path / 'junk.h5'), teacher, x28)


@pytest.mark.slow
def test_keras_resnet50_onto_imagenet_config(tmp_path):
  """keras.applications.ResNet50 (random weights, random BatchNorm
  statistics) gives configs/imagenet.py's ResNet-50 Keras' logits at 64x64
  (on Keras' preprocess_input of the same images): stem padding and
  pooling, strides and epsilon match layer for layer."""
  import imagenet  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3),
                                      classes=10, classifier_activation=None)
  _randomize_bn(model)
  path = str(tmp_path / 'resnet50.weights.h5')
  model.save_weights(path)
  x = np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32)
  teacher = tcn.Teacher(imagenet.get_config().teacher.body, 10,
                        head_dropout=0.0, impl='xla')
  # The conversion's own output check is this test's assertion.
  variables = tcn.teacher_variables_from_keras(path, teacher, x, check=False)
  assert models.num_params(variables['params']) == model.count_params() \
      - sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
  keras_x = keras.applications.resnet50.preprocess_input(x * 255.0)
  np.testing.assert_allclose(keras_convert.keras_input(teacher, x),
                             keras_x, atol=1e-4, rtol=0)
  np.testing.assert_allclose(jax.jit(teacher.apply)(variables, x),
                             np.asarray(model(keras_x)), atol=1e-4, rtol=0)


@pytest.mark.slow
@needs_fmnist
def test_pipeline_with_keras_teacher_skips_training(tmp_path):
  """init_from=<.keras file>: no teacher is trained; the run's teacher is
  the Keras model (its test accuracy is Keras'), taken whole, or with
  keras_mode='body' mapped onto teacher.body (a mismatch: one line)."""
  keras.utils.set_random_seed(2)
  model = keras.Sequential([
      keras.Input((28, 28, 1)), L.Conv2D(8, 3, activation='relu'),
      L.MaxPooling2D(), L.Flatten(), L.Dense(64, activation='relu'),
      L.Dense(32, activation='relu'), L.Dense(10, activation='softmax')])
  path = str(tmp_path / 'teacher.keras')
  model.save(path)
  with pytest.raises(tcn.TCNError, match=r"init_from '.*teacher.keras': "
                     r"Keras layer 'dense\w*' \(Dense\) kernel has shape "
                     r"\(1352, 64\), teacher layer trunk/Dense_0 \('D32r'\)"):
    pipeline.run(tiny_config(teacher__init_from=path, teacher__keras_mode=
                             'body', teacher__body='C8 MP F D32r D32r'),
                 str(tmp_path / 'refused'))
  assert not os.path.exists(tmp_path / 'refused')   # Nothing written.
  config = tiny_config(teacher__init_from=path, students__epochs=1,
                       head__epochs=1)
  # An untrained model is near chance: stopped (a class-order mismatch?)
  # unless allowed.
  with pytest.raises(tcn.TCNError, match='near chance.*allow_chance'):
    pipeline.run(config, str(tmp_path / 'chance'))
  config.teacher.allow_chance = True
  results = pipeline.run(config, str(tmp_path / 'run'))
  assert results['train_seconds']['teacher'] == 0.0
  assert not os.path.exists(tmp_path / 'run' / 'teacher')
  test = data_lib.load(config.data).test
  keras_acc = float(np.mean(np.argmax(model.predict(test.x, verbose=0), -1)
                            == test.y))
  assert results['teacher_test_acc'] == pytest.approx(keras_acc)
