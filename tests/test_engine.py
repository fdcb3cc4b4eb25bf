"""The group engine: every strategy equals training each member alone."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tcn_jax import engine
from tcn_jax import input_pipeline
from tcn_jax import losses as losses_lib
from tcn_jax import models
from tcn_jax.errors import TCNError

SPEC = 'C4 MP C4 MP Do.2 F D8r Do.1'


def train_group(ids, strategy, epochs=2, n_data=96, batch=32):
  """A few epochs of tiny students `ids`: (params, losses (steps, members))."""
  model = models.student(SPEC, 5, impl='im2col')
  rng = np.random.default_rng(0)
  x = rng.random((n_data, 12, 12, 1), np.float32)
  targets = rng.standard_normal((8, n_data, 5)).astype(np.float32)[ids]
  params = engine.init_group(
      lambda k: model.init(k, x[:1])['params'], 7, ids)
  tx = optax.adam(1e-2)
  opt_state = jax.vmap(tx.init)(params)

  def loss_fn(p, xb, tb, key):
    pred = model.apply({'params': p}, xb, train=True, rngs={'dropout': key})
    return losses_lib.mse(pred, tb)

  epoch_fn = engine.make_epoch_fn(loss_fn, tx, len(ids), strategy)
  keys = engine.member_keys(7, ids)
  losses = []
  for e in range(epochs):
    order = input_pipeline.batch_order(3, e, n_data, batch)
    params, opt_state, l = epoch_fn(params, opt_state, jnp.asarray(x),
                                    jnp.asarray(targets), order, keys, e)
    losses.append(np.asarray(l))
  return params, np.concatenate(losses)


def test_strategies_equal_training_alone():
  ids = [0, 1, 2]
  vmap_params, vmap_losses = train_group(ids, 'vmap')
  unrolled_params, unrolled_losses = train_group(ids, 'unrolled')
  for i, member in enumerate(ids):
    alone, alone_losses = train_group([member], 'unrolled')
    for got in (vmap_params, unrolled_params):
      jax.tree_util.tree_map(
          lambda a, b, i=i: np.testing.assert_allclose(a[i], b[0], atol=2e-5,
                                                       rtol=2e-5), got, alone)
    np.testing.assert_allclose(vmap_losses[:, i], alone_losses[:, 0],
                               rtol=1e-4)
    np.testing.assert_allclose(unrolled_losses[:, i], alone_losses[:, 0],
                               rtol=1e-4)


def test_members_differ_and_losses_fall():
  params, losses = train_group([0, 1], 'unrolled', epochs=6)
  leaf = jax.tree_util.tree_leaves(params)[0]
  assert not np.allclose(leaf[0], leaf[1])
  assert (losses[-3:].mean(0) < losses[:3].mean(0)).all()


def test_batch_order_is_seeded_and_drops_tail():
  a = input_pipeline.batch_order(0, 1, 100, 32)
  assert a.shape == (3, 32) and len(set(a.ravel())) == 96
  np.testing.assert_array_equal(a, input_pipeline.batch_order(0, 1, 100, 32))
  assert not np.array_equal(a, input_pipeline.batch_order(0, 2, 100, 32))
  assert not np.array_equal(a, input_pipeline.batch_order(1, 1, 100, 32))
  with pytest.raises(TCNError, match='batch size'):
    input_pipeline.batch_order(0, 0, 10, 32)


def test_strategy_resolution():
  assert engine.resolve_strategy('auto') == (
      'unrolled' if jax.default_backend() == 'cpu' else 'vmap')
  with pytest.raises(TCNError, match='unknown strategy'):
    engine.resolve_strategy('magic')


def test_apply_fn_strategies_agree():
  model = models.student(SPEC, 5, impl='im2col')
  x = np.random.default_rng(1).random((4, 12, 12, 1), np.float32)
  params = engine.init_group(lambda k: model.init(k, x[:1])['params'], 0,
                             [0, 1, 2])
  fn = lambda p, xb: model.apply({'params': p}, xb)
  a = engine.make_apply_fn(fn, 3, 'vmap')(params, x)
  b = engine.make_apply_fn(fn, 3, 'unrolled')(params, x)
  assert a.shape == (3, 4, 5)
  np.testing.assert_allclose(a, b, atol=1e-5)
