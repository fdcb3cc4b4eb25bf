"""Training a group of identical models in one compiled program.

A group's parameters are one pytree with a leading member axis. One call of
the epoch function runs a whole epoch on device (`lax.scan` over batches) for
every member at once, with one of these strategies:

  vmap      `jax.vmap` over the member axis (best on GPU/TPU);
  unrolled  the members' steps written out one after another inside the same
            jit (best on XLA:CPU, where vmapped convolutions are slow);
  auto      unrolled on CPU, vmap elsewhere.

Member i's randomness (init, dropout) comes from `fold_in(key, member_id)`, so
a member trained in a group gets the same numbers as trained alone.
The same engine trains the teacher and the head (groups of one).
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcn_jax.errors import TCNError

STRATEGIES = ('auto', 'vmap', 'unrolled')

# loss_fn(params, x, target, dropout_key) -> scalar loss for one member.
LossFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def resolve_strategy(strategy: str) -> str:
  if strategy not in STRATEGIES:
    raise TCNError(f'unknown strategy {strategy!r} (config.students.strategy); '
                   f'choose one of {STRATEGIES}')
  if strategy == 'auto':
    return 'unrolled' if jax.default_backend() == 'cpu' else 'vmap'
  return strategy


def stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, n):
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(n)]


def member_keys(seed: int, ids) -> jax.Array:
  """One PRNG key per member, depending only on (seed, member id)."""
  base = jax.random.key(seed)
  return jnp.stack([jax.random.fold_in(base, int(i)) for i in ids])


def init_group(init_fn, seed: int, ids):
  """Stacked parameters: init_fn(key) for each member's own key."""
  keys = member_keys(seed, ids)
  return stack([init_fn(jax.random.fold_in(k, 0)) for k in keys])


def batch_order(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
  """The epoch's shuffled batches (steps, batch) of indices; drops the tail."""
  steps = n // batch_size
  if steps == 0:
    raise TCNError(f'batch size {batch_size} is larger than the {n} '
                   'training examples')
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def gradient_step(loss_fn: LossFn, tx: optax.GradientTransformation):
  """A member step for `make_group_epoch`: one optimizer step on loss_fn.

  The state is {'params', 'opt_state'}; the metrics are {'loss'}.
  """
  def member_step(state, x, target, key):
    params, opt_state = state['params'], state['opt_state']
    loss, grads = jax.value_and_grad(loss_fn)(params, x, target, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {'params': optax.apply_updates(params, updates),
            'opt_state': opt_state}, {'loss': loss}
  return member_step


def make_group_epoch(member_step, num_members: int, strategy: str):
  """Returns jitted `epoch(state, x, targets, order, keys, epoch)`.

  member_step(state, x, target, key) -> (state, metrics) is one training
  step of one member (any state pytree: params, optimizer state, batch
  statistics, a discriminator, ...); metrics is a pytree of scalars.
  state: stacked over members; x: (N, ...) shared by all members; targets:
  (members, N, ...); order: the epoch's (steps, batch) indices; keys:
  (members,) member keys. Returns the new state and the metrics stacked as
  (steps, members). The state is donated.
  """
  strategy = resolve_strategy(strategy)

  def epoch_fn(state, x, targets, order, keys, epoch):
    epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, epoch + 1)
    steps = jnp.arange(order.shape[0])

    def batch(idx, i):
      return x[idx], targets[:, idx], jax.vmap(
          jax.random.fold_in, (0, None))(epoch_keys, i)

    if strategy == 'vmap':
      vstep = jax.vmap(member_step, in_axes=(0, None, 0, 0))

      def body(carry, inp):
        xb, tb, kb = batch(*inp)
        return vstep(carry, xb, tb, kb)

      return jax.lax.scan(body, state, (order, steps))

    def body(carry, inp):
      xb, tb, kb = batch(*inp)
      out = [member_step(s, xb, tb[m], kb[m]) for m, s in enumerate(carry)]
      return tuple(s for s, _ in out), stack([m for _, m in out])

    carry, metrics = jax.lax.scan(body, tuple(unstack(state, num_members)),
                                  (order, steps))
    return stack(carry), metrics

  return jax.jit(epoch_fn, donate_argnums=(0,))


def make_epoch_fn(loss_fn: LossFn, tx: optax.GradientTransformation,
                  num_members: int, strategy: str):
  """Gradient-descent epochs of `loss_fn` for a group (see make_group_epoch).

  Returns jitted `epoch(params, opt_state, x, targets, order, keys, epoch)`
  -> (params, opt_state, losses (steps, members)).
  """
  group_epoch = make_group_epoch(gradient_step(loss_fn, tx), num_members,
                                 strategy)

  def epoch_fn(params, opt_state, x, targets, order, keys, epoch):
    state, metrics = group_epoch({'params': params, 'opt_state': opt_state},
                                 x, targets, order, keys, epoch)
    return state['params'], state['opt_state'], metrics['loss']

  return epoch_fn


def make_apply_fn(apply_fn, num_members: int, strategy: str):
  """Jitted `(params, x) -> (members, batch, ...)`: every member on one batch."""
  if resolve_strategy(strategy) == 'vmap':
    return jax.jit(jax.vmap(apply_fn, in_axes=(0, None)))

  def unrolled(params, x):
    return jnp.stack([apply_fn(p, x) for p in unstack(params, num_members)])

  return jax.jit(unrolled)


def batched(fn, x: np.ndarray, batch_size: int = 1000, axis: int = 0):
  """Applies jitted `fn` over `x` in fixed-size batches (last one padded)."""
  outs = []
  for start in range(0, len(x), batch_size):
    xb = x[start:start + batch_size]
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
    out = np.asarray(fn(xb))
    outs.append(np.take(out, np.arange(batch_size - pad), axis=axis))
  return np.concatenate(outs, axis=axis)
