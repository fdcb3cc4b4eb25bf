"""The Python API's training functions check their inputs before any work:
one TCNError naming the stage, for a negative or non-integer epoch count and
for features or labels with another row count than the inputs."""
import numpy as np
import pytest

import tcn_jax as tcn
from tcn_jax import data as data_lib
from tcn_jax.errors import TCNError


def _images(n, seed=0):
  return np.random.default_rng(seed).random((n, 8, 8, 1), np.float32)


@pytest.mark.parametrize('epochs', [-1, 1.5, True])
def test_students_epochs_must_be_a_count(epochs):
  x, feats = _images(16), np.zeros((16, 4), np.float32)
  with pytest.raises(TCNError, match=r'students\[0\]: epochs must be an '
                     r'integer >= 0'):
    tcn.train_students('C2 MP F', x, feats, 2, epochs=epochs, batch_size=4)


def test_features_with_another_row_count_are_refused():
  x, feats = _images(16), np.zeros((12, 4), np.float32)
  with pytest.raises(TCNError, match='16 inputs but targets of shape'):
    tcn.train_students('C2 MP F', x, feats, 2, epochs=1, batch_size=4)


def test_teacher_labels_with_another_row_count_are_refused():
  split = data_lib.Split(_images(16), np.zeros(10, np.int32))
  ds = data_lib.Dataset(split, data_lib.Split(_images(4), np.zeros(4, np.int32)),
                        split, 2, 'test')
  teacher = tcn.Teacher('C2 MP F D8r', num_classes=2)
  with pytest.raises(TCNError, match='teacher: 16 inputs but targets'):
    tcn.train_teacher(teacher, ds, epochs=1, batch_size=4)
  with pytest.raises(TCNError, match='teacher: epochs must be'):
    tcn.train_teacher(teacher, ds, epochs=-1, batch_size=4)
