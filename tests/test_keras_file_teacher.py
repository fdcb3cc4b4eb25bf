"""A Keras teacher file is self-describing (`teacher.init_from=model.keras`
alone): the image folder follows its input shape, it is taken whole (any
architecture, `teacher.keras_mode`), a conflicting data field is one line
naming the field; configs/image_folder.py's default students are sized to
the image, and a student whose trunk shrinks the input to 1x1 is refused
before any work."""
import json
import os
import subprocess
import sys

os.environ.setdefault('KERAS_BACKEND', 'jax')

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest

from tcn_jax import config as config_lib
from tcn_jax import input_pipeline
from tcn_jax import given_teacher
from tcn_jax import models
from tcn_jax import pipeline
from tcn_jax.errors import TCNError

keras = pytest.importorskip('keras')
L = keras.layers
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 4
# Small schedules and batches for a folder of a few images.
SMALL = dict(teacher__batch_size=8, students__batch_size=8,
             head__batch_size=8, students__epochs=1, head__epochs=1,
             teacher__allow_chance=True, eval_batch_size=16)


def _grey_folder(root, per_class=6, size=28, seed=0):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for split, n in (('train', per_class), ('val', 2)):
    for c in range(CLASSES):
      d = os.path.join(root, split, f'class{c}')
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        a = (rng.random((size, size)) * 255).astype(np.uint8)
        Image.fromarray(a, 'L').save(os.path.join(d, f'{i}.png'))
  return root


def _residual_model():
  """A functional model no architecture string mirrors (a residual Add,
  LayerNormalization, global pooling), 28x28 grey, CLASSES outputs."""
  keras.utils.set_random_seed(0)
  x = keras.Input((28, 28, 1))
  h = L.Conv2D(8, 3, padding='same', activation='relu')(x)
  h = L.Add()([h, L.Conv2D(8, 1)(h)])
  h = L.LayerNormalization()(h)
  h = L.GlobalAveragePooling2D()(h)
  h = L.Dense(16, activation='relu')(h)
  return keras.Model(x, L.Dense(CLASSES, activation='softmax')(h))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('keras_file')
  model = _residual_model()
  path = str(root / 'teacher.keras')
  model.save(path)
  model.save(str(root / 'teacher.h5'))
  return dict(model=model, keras=path, h5=str(root / 'teacher.h5'),
              folder=_grey_folder(str(root / 'images')))


def _config(files, **overrides):
  import image_folder  # pylint: disable=g-import-not-at-top
  c = image_folder.get_config()
  c.data.dir = files['folder']
  c.teacher.init_from = files['keras']
  for k, v in {**SMALL, **overrides}.items():
    *parents, field = k.split('__')
    section = c
    for p in parents:
      section = section[p]
    section[field] = v
  return c


def test_folder_follows_the_keras_file(files):
  """init_from alone: image size, channels from the file (.keras and .h5);
  the file is taken whole; the default students are sized to 28x28."""
  for name in ('keras', 'h5'):
    r = config_lib.resolve(_config(files, teacher__init_from=files[name]))
    assert (r.data.image_size, r.data.channels) == (28, 1)
    assert given_teacher.kind(r) == 'keras'
  assert r.students.arch == 'C16 MP C32 MP F D32r Do.3'
  trunk = models.output_shape('C16 MP C32 MP', (28, 28, 1))
  assert trunk[:2] == (5, 5)
  assert config_lib.resolve(r).to_dict() == r.to_dict()   # Idempotent.
  # The 'bn' preset on the 'auto' students: sized, then BatchNorm added.
  import image_folder  # pylint: disable=g-import-not-at-top
  c = image_folder.get_config('bn')
  c.data.dir, c.teacher.init_from = files['folder'], files['keras']
  assert config_lib.resolve(c).students.arch == (
      'C16lin BN R MP C32lin BN R MP F D32 BN R Do.3')


@pytest.mark.parametrize('overrides, line', [
    (dict(data__channels=3), 'data.channels=3 but the teacher teacher.keras '
     'takes 1 channel; set --config.data.channels=1'),
    (dict(data__image_size=64), 'data.image_size=64 but the teacher '
     'teacher.keras takes 28x28 images; set --config.data.image_size=28'),
    (dict(teacher__keras_mode='whole'), 'config.teacher.keras_mode must be'),
])
def test_conflicting_fields_one_line(files, tmp_path, overrides, line):
  with pytest.raises(TCNError) as e:
    pipeline.run(_config(files, **overrides), str(tmp_path / 'run'))
  assert line in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run')


def test_pipeline_with_a_whole_keras_model(files, tmp_path):
  """API: any architecture distils; the teacher's accuracy is Keras'."""
  c = _config(files)
  results = pipeline.run(c, str(tmp_path / 'run'))
  assert results['teacher_source']['source'] == 'keras'
  assert results['teacher_source']['input_shape'] == [28, 28, 1]
  assert results['train_seconds']['teacher'] == 0.0
  ds = input_pipeline.load(config_lib.resolve(c).data)
  probs = files['model'].predict(ds.test.x, verbose=0)
  assert results['teacher_test_acc'] == pytest.approx(
      float(np.mean(np.argmax(probs, -1) == ds.test.y)))
  # keras_mode='body' maps the weights onto teacher.body, which cannot
  # mirror this model: one line naming the layer, nothing written.
  with pytest.raises(TCNError, match=r"Keras layer .* has weights that no "
                     'layer of an architecture string holds'):
    pipeline.run(_config(files, teacher__keras_mode='body'),
                 str(tmp_path / 'body'))
  assert not os.path.exists(tmp_path / 'body')


def test_too_deep_student_refused_before_any_work(files, tmp_path):
  deep = 'C16 MP C32 MP C32 MP F D32r Do.3'   # The old 64x64 default.
  with pytest.raises(TCNError) as e:
    pipeline.run(_config(files, students__arch=deep), str(tmp_path / 'run'))
  assert (f"config.students.arch {deep!r} shrinks the 28x28 input "
          '(data.image_size) to 1x1 before its F') in str(e.value)
  assert not os.path.exists(tmp_path / 'run')


def test_cli_with_init_from_alone(files, tmp_path):
  """The README's own-teacher command: no image size, channels or body."""
  work = tmp_path / 'cli'
  flags = [f'--config.{k.replace("__", ".")}={v}' for k, v in SMALL.items()]
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config',
         os.path.join(REPO, 'configs', 'image_folder.py'),
         f'--config.data.dir={files["folder"]}',
         f'--config.teacher.init_from={files["keras"]}', *flags,
         f'--workdir={work}']
  env = dict(os.environ, KERAS_BACKEND='jax')
  bad = subprocess.run(cmd[:-1] + ['--config.data.channels=3',
                                   f'--workdir={tmp_path / "bad"}'],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      'error: data.channels=3 but the teacher teacher.keras takes 1 channel; '
      'set --config.data.channels=1')
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(work / 'config.json') as f:
    config = json.load(f)
  assert (config['data']['image_size'], config['data']['channels']) == (28, 1)
  assert config['students']['arch'] == 'C16 MP C32 MP F D32r Do.3'
  with open(work / 'results.json') as f:
    assert json.load(f)['teacher_source']['source'] == 'keras'
