"""What the tests import: a tiny real-data config (as flags and as a config
object), the repository root, and the Fashion-MNIST skip mark. Fixtures are
in conftest.py."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, 'configs') not in sys.path:
  sys.path.insert(0, os.path.join(ROOT, 'configs'))

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason='needs apt-get install -y dataset-fashion-mnist')


# A seconds-long run of the whole pipeline (small nets, 300 examples, two
# epochs per stage), as --config flags and as a config object.
TINY = {'num_students': 2, 'data.train_size': 300, 'data.test_size': 200,
        'teacher.epochs': 2, 'teacher.body': 'C8 MP F D64r D32r',
        'students.epochs': 2, 'students.arch': 'C4 MP F D8r',
        'head.epochs': 2}
SMOKE = os.path.join(ROOT, 'configs/fashion_mnist.py:smoke')
TINY_FLAGS = [f'--config.{k}={v}' for k, v in TINY.items()]


def tiny_config(**overrides):
  """The smoke config with TINY and `overrides` ('a__b' sets a.b) applied."""
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('smoke')
  for path, value in [*TINY.items(), *((k.replace('__', '.'), v)
                                       for k, v in overrides.items())]:
    *parents, field = path.split('.')
    section = config
    for p in parents:
      section = section[p]
    with section.ignore_type():   # Lets tests build wrongly typed configs.
      section[field] = value
  return config
