"""Hinton KD baseline: the loss, and a run on a real subset."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import needs_fmnist
from tcn_jax import chunking
from tcn_jax import engine
from tcn_jax import kdgan
from tcn_jax import losses
from tcn_jax import optim
from tcn_jax import pipeline
from tcn_jax.state import MemberState


def test_kd_loss_limits():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  target = {'logits': logits, 'label': labels}
  # alpha = 0: plain cross-entropy on labels.
  np.testing.assert_allclose(losses.kd(4.0, 0.0)(logits * 2, target),
                             losses.ce(logits * 2, labels), rtol=1e-6)
  # alpha = 1: minimised (zero gradient) where student logits = teacher's.
  grad = jax.grad(lambda l: losses.kd(4.0, 1.0)(l, target))(logits)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  grad = jax.grad(lambda l: losses.kd(4.0, 1.0)(l, target))(logits * 0)
  assert np.abs(grad).max() > 1e-3


def test_gumbel_straight_through_is_one_hot_with_gradient():
  logits = jnp.asarray([[0.5, 1.0, -1.0], [2.0, 0.0, 0.0]])
  sample = kdgan.gumbel_softmax_st(jax.random.key(0), logits, 1.0)
  np.testing.assert_array_equal(np.sort(np.asarray(sample), 1),
                                [[0, 0, 1], [0, 0, 1]])
  grad = jax.grad(lambda l: (kdgan.gumbel_softmax_st(
      jax.random.key(0), l, 1.0) * jnp.arange(3.0)).sum())(logits)
  assert np.abs(grad).max() > 1e-3


def _kdgan_vs_kd(adv_weight, steps=3):
  """Classifier params after KDGAN steps and after plain KD steps."""
  from tcn_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((16, 8, 8, 1)), jnp.float32)
  t_logits = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  feats = jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
  net = models.Net('C4 MP F Do.2 D4', 'glorot_uniform', 'im2col')
  disc = kdgan.LabelDiscriminator((8,))
  tx, d_tx = optim.make_optimizer('adam', 1e-2, ''), optim.make_optimizer(
      'adam', 1e-2, '')
  loss = losses.kd(4.0, 0.9)
  state = kdgan.init_state(net, disc, tx, d_tx, jax.random.key(1), x[:1], 6,
                           4)
  step = jax.jit(kdgan.make_member_step(net, disc, tx, d_tx, loss, 4,
                                        adv_weight=adv_weight))
  kd_step = jax.jit(engine.gradient_step(
      lambda p, xb, tb, key: loss(net.apply(
          {'params': p}, xb, train=True, rngs={'dropout': jax.random.split(
              key)[0]}), tb), tx))
  kd_state = MemberState(state.params, state.opt_state)
  target = {'logits': t_logits, 'feature': feats, 'label': labels}
  for i in range(steps):
    key = jax.random.key(10 + i)
    state, metrics = step(state, x, target, key)
    kd_state, _ = kd_step(kd_state, x, {'logits': t_logits, 'label': labels},
                          key)
  return state, kd_state, metrics


def test_kdgan_without_adversary_is_kd_and_with_it_differs():
  state, kd_state, metrics = _kdgan_vs_kd(0.0)
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(kd_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics['d_loss']))
  state, kd_state, _ = _kdgan_vs_kd(1.0)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(state.params),
      jax.tree_util.tree_leaves(kd_state.params)))


def test_logit_matching_loss():
  """MSE alone at weight 0; at the true chunk the KL term is zero with zero
  gradient; elsewhere it adds a positive term."""
  from tcn_jax import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)
  head = models.Head(5, 0.5)
  head_vars = head.init(jax.random.key(0), feats)
  offset, width = 4, 4    # The second of three 4-wide chunks.
  chunk = feats[:, offset:offset + width]
  target = {'chunk': chunk, 'feature': feats,
            'offset': jnp.full((8,), offset, jnp.int32)}
  pred = chunk + 0.3 * jnp.asarray(rng.standard_normal((8, width)),
                                   jnp.float32)
  loss = lambda w: losses.logit_matching(
      width, head=head, head_variables=head_vars, weight=w, temperature=2.0,
      chunker=chunking.Chunker(3, 12))
  assert losses.STUDENT_LOSSES.get('logit_matching') is losses.logit_matching
  np.testing.assert_allclose(loss(0.0)(pred, target),
                             losses.mse(pred, chunk), rtol=1e-6)
  assert float(loss(1.0)(pred, target)) > float(loss(0.0)(pred, target))
  np.testing.assert_allclose(loss(1.0)(chunk, target), 0.0, atol=1e-6)
  np.testing.assert_allclose(jax.grad(loss(1.0))(chunk, target), 0.0,
                             atol=1e-6)


@pytest.mark.slow
@needs_fmnist
def test_logit_matching_students_in_pipeline(tiny_run, tmp_path):
  """A tiny real-data run with the logit-matching loss: finite, and other
  students than plain MSE gives."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  plain = tiny_run.results
  matched = pipeline.run(tiny_config(students__logit_weight=1.0),
                         str(tmp_path / 'matched'))
  assert all(np.isfinite(m) for m in matched['student_val_mse'])
  assert matched['digests']['teacher'] == plain['digests']['teacher']
  assert matched['digests']['tcn'] != plain['digests']['tcn']
