"""configs/imagenet.py:smoke end to end with keras.applications.ResNet50
(random weights, 32x32, 1000 classes) as teacher.init_from, on TFDS mock
ImageNet data (no download): the teacher is converted, not trained.

  KERAS_BACKEND=jax python experiments/imagenet_keras_teacher_mock.py
"""
import json
import os
import sys
import tempfile
import time

os.environ.setdefault('KERAS_BACKEND', 'jax')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'configs'))

import imagenet  # pylint: disable=g-import-not-at-top
import keras
import tensorflow_datasets as tfds

from tcn_jax import pipeline


def main():
  work = tempfile.mkdtemp(prefix='imagenet_keras_')
  keras.utils.set_random_seed(0)
  model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3),
                                      classes=1000)
  path = os.path.join(work, 'resnet50_32.keras')
  model.save(path)
  c = imagenet.get_config('smoke')   # Smoke students, 32x32 images.
  c.teacher.body, c.teacher.init_from = imagenet.RESNET50, path
  t = time.time()
  with tfds.testing.mock_data(num_examples=300):
    r = pipeline.run(c, os.path.join(work, 'run'))
  keys = ('data_source', 'teacher_test_acc', 'tcn_test_acc_after_finetune',
          'train_seconds', 'params')
  print(json.dumps({**{k: r[k] for k in keys},
                    'wall_seconds': time.time() - t}, indent=1))


if __name__ == '__main__':
  main()
