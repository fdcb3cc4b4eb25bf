"""Any teacher from Python: a Flax module no architecture string describes
(and a branching Keras model) goes through teacher_features, train_students,
TCN(head_variables=teacher_head(...)) and finetune_head."""
import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import pytest

import tcn_jax as tcn
from tcn_jax import data as data_lib


class GatedMLP(nn.Module):
  """Gated residual MLP with LayerNorm: no architecture string says this."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    h = nn.gelu(nn.Dense(32)(x))
    h = h + nn.LayerNorm()(nn.Dense(32)(h)) * nn.sigmoid(nn.Dense(32)(x))
    f = nn.relu(nn.Dense(24, name='fc')(h))
    self.sow('intermediates', 'feature', f)
    return nn.Dense(10, name='logits')(f)


@pytest.fixture(scope='module')
def flax_teacher():
  x = np.random.RandomState(0).rand(600, 8, 8, 1).astype(np.float32)
  module = GatedMLP()
  variables = module.init(jax.random.key(0), x[:1])
  return module, variables, x


def test_flax_teacher_end_to_end(flax_teacher):
  module, variables, x = flax_teacher
  want = np.asarray(module.apply(variables, x))
  for layer in ('feature', 'fc'):   # A sown value; a submodule's output.
    teacher, t_vars = tcn.teacher_from_flax(module, variables, layer,
                                            x_example=x[:8])
    feats = tcn.teacher_features(teacher, t_vars, x, batch_size=200)
    assert feats.shape == (600, 24)
    # The TCN head, as the teacher's output layer, gives its logits.
    head = tcn.Head(teacher.num_classes, 0.0)
    np.testing.assert_allclose(head.apply(tcn.teacher_head(t_vars), feats),
                               want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(teacher.apply(t_vars, x), want, atol=1e-6)
  y = want.argmax(-1).astype(np.int32)   # Labels the teacher gets right.
  split = lambda a, b: data_lib.Split(x[a:b], y[a:b])
  ds = tcn.Dataset(split(0, 400), split(400, 500), split(500, 600), 10, 'x')
  val = (ds.val.x, feats[400:500])
  groups, info = tcn.train_students('F D16r', ds.train.x, feats[:400],
                                    num_students=2, epochs=4, batch_size=50,
                                    val=val)
  for mse in info['val_mse']:   # The students learn their chunks.
    assert mse[-1] < mse[0]
  net = tcn.TCN(groups, teacher.num_classes, head_dropout=0.0,
                head_variables=tcn.teacher_head(t_vars))
  net, info = tcn.finetune_head(net, ds, epochs=2, batch_size=50,
                                eval_batch_size=100)
  assert 'test_acc_before' in info and info['history']   # Fine-tuned; the head keeps its shapes.
  assert tcn.make_predict(net)(ds.test.x[:5]).shape == (5, 10)


def test_flax_teacher_errors(flax_teacher):
  module, variables, x = flax_teacher
  with pytest.raises(tcn.TCNError, match="feature_layer='nope'.*no submodule"):
    tcn.teacher_from_flax(module, variables, 'nope', x_example=x[:4])
  # Dense_1's output is not what the output layer reads.
  with pytest.raises(tcn.TCNError, match=r"feature_layer='Dense_1'.*32 "
                     'values per example, the output layer reads 24'):
    tcn.teacher_from_flax(module, variables, 'Dense_1', x_example=x[:4],
                          output_layer='logits')
  with pytest.raises(tcn.TCNError, match='not its output layer applied'):
    tcn.teacher_from_flax(module, variables, 'Dense_1', x_example=x[:4],
                          output_layer='fc')
  with pytest.raises(tcn.TCNError, match="output_layer 'LayerNorm_0' is no"):
    tcn.teacher_from_flax(module, variables, 'feature', x_example=x[:4],
                          output_layer='LayerNorm_0')


def test_keras_teacher_from_python():
  """A branching Keras model runs through JAX: features and logits as
  Keras computes them."""
  keras = pytest.importorskip('keras')
  L = keras.layers
  keras.utils.set_random_seed(0)
  inp = keras.Input((8, 8, 1))
  flat = L.Flatten(name='flatten')(inp)
  feat = L.Concatenate(name='feat')([
      L.ReLU()(L.Dense(8, activation='tanh')(flat)),
      L.Dense(8, activation='relu')(flat)])
  model = keras.Model(inp, L.Dense(10, activation='softmax')(feat))
  x = np.random.RandomState(1).rand(32, 8, 8, 1).astype(np.float32)
  teacher, t_vars = tcn.teacher_from_keras(model, x_example=x[:8])
  want = np.asarray(keras.Model(inp, feat)(x))
  np.testing.assert_allclose(tcn.teacher_features(teacher, t_vars, x), want,
                             atol=1e-6)
  np.testing.assert_allclose(teacher.apply(t_vars, x), np.asarray(model(x)),
                             atol=1e-6)
  with pytest.raises(tcn.TCNError, match="feature_layer='flatten'.*64 values "
                     'per example, the output layer reads 16'):
    tcn.teacher_from_keras(model, x_example=x[:8], feature_layer='flatten')
