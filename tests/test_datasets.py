"""Every dataset config runs every stage on TFDS mock data (no downloads):
teacher, features, students (FF and GAN), head, KD and KDGAN baselines."""
import importlib
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import reuse_teacher
from tcn_jax import assemble
from tcn_jax import data
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import pipeline
from tcn_jax.errors import TCNError

CONFIGS = ['mnist', 'cifar10', 'imdb', 'imagenet']
KD_CONFIGS = ('mnist', 'imdb')   # Images and token ids.


def _config(name, preset):
  config = importlib.import_module(name).get_config(preset)
  config.num_students = 2
  config.data.train_size, config.data.test_size = 200, 100
  # The KD baselines' code is the same for every dataset: two suffice (the
  # ResNets' compiles make the others slow).
  config.kd.enabled = config.kdgan.enabled = name in KD_CONFIGS
  config.teacher.epochs, config.students.epochs = 1, 2
  config.head.epochs, config.kd.epochs, config.kdgan.epochs = 1, 1, 1
  if name == 'mnist':   # Its smoke preset keeps the paper's (slow) nets.
    config.teacher.body, config.students.arch = 'C8 MP F D32r', 'C4 MP F D8r'
    config.kd.arch, config.gan.disc = 'C4 MP F D16r', '16 16 32'
  return config


@pytest.mark.slow
@pytest.mark.parametrize('name', CONFIGS)
def test_every_stage_on_mock_data(name, tmp_path):
  ff_dir, gan_dir = str(tmp_path / 'ff'), str(tmp_path / 'gan')
  with tfds.testing.mock_data(num_examples=300):
    ff = pipeline.run(_config(name, 'smoke'), ff_dir)
    # The GAN run reuses the trained teacher (a resumed stage) and features,
    # with the keys they were computed from.
    reuse_teacher(ff_dir, gan_dir)
    config = _config(name, 'gan,smoke')
    config.kd.enabled = config.kdgan.enabled = False   # Done in the FF run.
    gan = pipeline.run(config, gan_dir)
    ds = data.load(_config(name, 'smoke').data)
  assert ff['data_source'] == gan['data_source'] == 'tfds'
  assert gan['digests']['teacher'] == ff['digests']['teacher']
  assert ff['method'] == 'ff' and gan['method'] == 'gan'
  assert gan['gan']['disc_widths']
  if name == 'cifar10':   # Its GAN smoke students have BatchNorm.
    _, tcn = assemble.load_tcn(os.path.join(gan_dir, 'tcn'))
    assert all('batch_stats' in g.variables for g in tcn.groups)
  assert gan['kd'] is None
  if name in KD_CONFIGS:   # The baselines ran (random labels: no floor).
    assert 'test_acc' in ff['kd'] and 'test_acc' in ff['kdgan']
  else:
    assert ff['kd'] is None and ff['kdgan'] is None
  for r in (ff, gan):
    assert len(r['student_val_mse']) == 2
    assert all(np.isfinite(m) for m in r['student_val_mse'])
  # The saved TCN predicts like the pipeline's assembled network.
  predict, tcn = assemble.load_tcn(os.path.join(gan_dir, 'tcn'))
  logits = np.asarray(predict(ds.test.x[:16]))
  assert logits.shape == (16, ds.num_classes)
  acc = metrics.evaluate(predict, ds.test.x, ds.test.y, 50)
  assert acc == pytest.approx(gan['tcn_test_acc_after_finetune'])
  assert tcn.num_students == 2


# The paper's architectures per config, checked by parameter count (reference
# Sec. 1 and 3) without training them.
PAPER_PARAMS = {
    # Reference: ~14.87M, Keras' count (BatchNorm moving statistics included).
    ('cifar10', 'teacher'): 14_866_506,
    ('cifar10', '1'): 1_358_816, ('cifar10', '2'): 321_968,
    ('cifar10', '4'): 320_880, ('cifar10', '8'): 320_336,
    ('mnist:gan', '1'): 65_792, ('mnist:gan', '2'): 42_272,
    ('mnist:gan', '4'): 17_456, ('mnist:gan', '8'): 9_464,
    ('imdb', '1'): 178_192, ('imdb', '2'): 100_240, ('imdb', '4'): 41_744,
    ('imdb', '8'): 21_312,
    # keras.applications.ResNet50's total (conv biases and BN statistics).
    ('imagenet', 'teacher'): 25_636_712,
}
INPUTS = {'mnist': ((28, 28, 1), np.float32, 256),
          'cifar10': ((32, 32, 3), np.float32, 256),
          'imdb': ((500,), np.int32, 256),
          'imagenet': ((224, 224, 3), np.float32, 2048)}


def _count(module, shape, dtype):
  """Parameters plus BatchNorm statistics, as Keras counts them."""
  variables = jax.eval_shape(module.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, *shape), dtype))
  return models.num_params(variables)


@pytest.mark.parametrize('key', sorted(PAPER_PARAMS))
def test_paper_architectures(key):
  name, which = key
  name, _, preset = name.partition(':')
  config = importlib.import_module(name).get_config(preset)
  shape, dtype, width = INPUTS[name]
  if which == 'teacher':
    classes = 1000 if name == 'imagenet' else 10
    module = models.Teacher(config.teacher.body, classes,
                            head_bn=config.teacher.head_bn)
  else:
    module = models.student(config.students.arch_by_n[which],
                            width // int(which))
  assert _count(module, shape, dtype) == PAPER_PARAMS[key]


def test_flip_on_text_fails_before_training(tmp_path):
  """':flip' on IMDB (token ids, not images) fails at once, naming the
  field, before the teacher trains."""
  with tfds.testing.mock_data(num_examples=300):
    with pytest.raises(TCNError, match=r"config.data.augment='mirror' "
                       r'needs images .* shape \(\d+,\)'):
      pipeline.run(_config('imdb', 'smoke,flip'), str(tmp_path))
  assert not (tmp_path / 'teacher').exists()
  assert not list(tmp_path.iterdir())   # Nothing written to the workdir.
