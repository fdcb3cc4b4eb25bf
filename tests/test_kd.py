"""Hinton KD baseline: the loss, and a run on a real subset."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import needs_fmnist
from tcn_jax import train


def test_kd_loss_limits():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  target = jnp.concatenate([logits, labels[:, None].astype(jnp.float32)], 1)
  # alpha = 0: plain cross-entropy on labels.
  np.testing.assert_allclose(train.kd_loss(4.0, 0.0)(logits * 2, target),
                             train.ce_loss(logits * 2, labels), rtol=1e-6)
  # alpha = 1: minimised (zero gradient) where student logits = teacher's.
  grad = jax.grad(lambda l: train.kd_loss(4.0, 1.0)(l, target))(logits)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  grad = jax.grad(lambda l: train.kd_loss(4.0, 1.0)(l, target))(logits * 0)
  assert np.abs(grad).max() > 1e-3


@needs_fmnist
def test_kd_baseline_in_pipeline(tmp_path):
  import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config('smoke')
  config.num_students = 2
  config.kd.enabled = True
  results = train.run(config, str(tmp_path))
  kd = results['kd']
  assert kd['params'] == 45_625      # ~ the two students' 45,600 in all
  assert kd['test_acc'] > 0.5        # chance is 0.1
  assert (kd['temperature'], kd['alpha']) == (4.0, 0.9)
