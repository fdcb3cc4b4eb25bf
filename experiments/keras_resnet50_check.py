"""keras.applications.ResNet50 (random weights, random BatchNorm statistics)
converted onto configs/imagenet.py's teacher: max |logit difference| on the
same images, at ImageNet's size. The test suite checks 64x64 (faster).

  KERAS_BACKEND=jax python experiments/keras_resnet50_check.py [--size 224]
"""
import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault('KERAS_BACKEND', 'jax')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'configs'))

import imagenet  # pylint: disable=g-import-not-at-top
import jax
import keras
import numpy as np

import tcn_jax as tcn


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--size', type=int, default=224)
  p.add_argument('--classes', type=int, default=1000)
  args = p.parse_args()
  jax.config.update('jax_default_matmul_precision', 'highest')
  keras.utils.set_random_seed(0)
  model = keras.applications.ResNet50(
      weights=None, input_shape=(args.size, args.size, 3),
      classes=args.classes, classifier_activation=None)
  rng = np.random.RandomState(0)
  for layer in model.layers:   # BatchNorm away from identity.
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0, .2, c).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(.5, 2, c).astype(np.float32))
      layer.gamma.assign(rng.uniform(.5, 1.5, c).astype(np.float32))
      layer.beta.assign(rng.normal(0, .2, c).astype(np.float32))
  x = rng.rand(2, args.size, args.size, 3).astype(np.float32)   # [0, 1] RGB
  teacher = tcn.Teacher(imagenet.get_config().teacher.body, args.classes,
                        head_dropout=0.0)
  out = {'size': args.size, 'classes': args.classes,
         'backend': jax.default_backend()}
  with tempfile.TemporaryDirectory() as d:
    for name in ('resnet50.keras', 'resnet50.weights.h5'):
      path = os.path.join(d, name)
      if name.endswith('.keras'):
        model.save(path)
      else:
        model.save_weights(path)
      variables = tcn.load_teacher(path, teacher, x)
      ref = np.asarray(model(keras.applications.resnet50.preprocess_input(
          x * 255.0)))
      ours = np.asarray(jax.jit(teacher.apply)(variables, x))
      out[name] = {'max_abs_logit_diff': float(np.abs(ours - ref).max()),
                   'max_abs_logit': float(np.abs(ref).max())}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
