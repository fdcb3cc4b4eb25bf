"""Training a group of identical models in one compiled program.

A group's parameters are one pytree with a leading member axis. One call of
the epoch function runs a whole epoch on device (`lax.scan` over batches) for
every member at once, with one of these strategies:

  vmap      `jax.vmap` over the member axis (best on GPU/TPU);
  unrolled  the members' steps written out one after another inside the same
            jit (best on XLA:CPU, where vmapped convolutions are slow);
  sharded   the member axis split over a `Mesh` of this process's devices
            (`jax.local_devices()`), each device running `jax.vmap` over its
            share inside one `shard_map` program; a member count that does
            not divide evenly is padded with copies of member 0 whose results
            are dropped (see `member_mesh`). One device: exactly vmap.
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
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding

from tcn_jax.errors import TCNError

STRATEGIES = ('auto', 'vmap', 'unrolled', 'sharded')
MEMBER_AXIS = 'students'   # The mesh axis of the 'sharded' strategy.

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


def gradient_step(loss_fn, tx: optax.GradientTransformation):
  """A member step for `make_group_epoch`: one optimizer step on loss_fn.

  The state is {'params', 'opt_state'} and, for models with mutable
  collections such as BatchNorm statistics, 'model_state'; then
  loss_fn(params, model_state, x, target, key) -> (loss, new model_state),
  else loss_fn(params, x, target, key) -> loss. The metrics are {'loss'}.
  """
  def member_step(state, x, target, key):
    params, opt_state = state['params'], state['opt_state']
    new = {}
    if 'model_state' in state:
      (loss, new['model_state']), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params, state['model_state'], x, target, key)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, x, target, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return {'params': optax.apply_updates(params, updates),
            'opt_state': opt_state, **new}, {'loss': loss}
  return member_step


def member_mesh(num_members: int, devices=None):
  """(mesh, padded member count) of the 'sharded' strategy.

  Each device gets k = ceil(members / devices) members, the fewest any
  split allows, and only ceil(members / k) devices are used, so at most
  k - 1 dummy members pad the axis (n=3 on 4 devices: 3 devices, no dummy;
  n=5 on 4: 3 devices x 2, one dummy; n=2 on 4: 2 devices).
  """
  devices = list(jax.local_devices() if devices is None else devices)
  per = -(-num_members // len(devices))
  used = -(-num_members // per)
  return Mesh(np.array(devices[:used]), (MEMBER_AXIS,)), per * used


def _pad_members(tree, padded):
  """Appends copies of member 0 until the member axis is `padded` long."""
  def pad(a):
    extra = padded - a.shape[0]
    return a if not extra else jnp.concatenate(
        [a, jnp.repeat(a[:1], extra, axis=0)])
  return jax.tree_util.tree_map(pad, tree)


def epoch_body(member_step, num_members: int, strategy: str):
  """The unjitted `epoch(state, x, targets, order, keys, epoch)` of a
  resolved 'vmap' or 'unrolled' strategy (see `make_group_epoch`)."""
  def epoch_fn(state, x, targets, order, keys, epoch):
    epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, epoch + 1)
    steps = jnp.arange(order.shape[0])

    def batch(idx, i):
      tb = jax.tree_util.tree_map(lambda t: t[:, idx], targets)
      return x[idx], tb, jax.vmap(
          jax.random.fold_in, (0, None))(epoch_keys, i)

    if strategy == 'vmap':
      vstep = jax.vmap(member_step, in_axes=(0, None, 0, 0))

      def body(carry, inp):
        xb, tb, kb = batch(*inp)
        return vstep(carry, xb, tb, kb)

      return jax.lax.scan(body, state, (order, steps))

    def body(carry, inp):
      xb, tb, kb = batch(*inp)
      out = [member_step(s, xb, jax.tree_util.tree_map(lambda t, m=m: t[m], tb),
                         kb[m]) for m, s in enumerate(carry)]
      return tuple(s for s, _ in out), stack([m for _, m in out])

    carry, metrics = jax.lax.scan(body, tuple(unstack(state, num_members)),
                                  (order, steps))
    return stack(carry), metrics

  return epoch_fn


def make_group_epoch(member_step, num_members: int, strategy: str):
  """Returns jitted `epoch(state, x, targets, order, keys, epoch)`.

  member_step(state, x, target, key) -> (state, metrics) is one training
  step of one member (any state pytree: params, optimizer state, batch
  statistics, a discriminator, ...); metrics is a pytree of scalars.
  state: stacked over members; x: (N, ...) shared by all members; targets:
  a pytree (e.g. a dict) of (members, N, ...) arrays; order: the epoch's
  (steps, batch) indices; keys: (members,) member keys. Returns the new state and the metrics stacked as
  (steps, members). The state is donated.
  """
  strategy = resolve_strategy(strategy)
  if strategy == 'sharded':
    mesh, padded = member_mesh(num_members)
    if mesh.size > 1:
      return _sharded_epoch(member_step, num_members, mesh, padded)
    strategy = 'vmap'   # One device: the vmap program itself.
  return jax.jit(epoch_body(member_step, num_members, strategy),
                 donate_argnums=(0,))


def _sharded_epoch(member_step, num_members, mesh, padded):
  """make_group_epoch's 'sharded' strategy on a mesh of several devices.

  One `shard_map` program: every device runs the vmap epoch over its
  padded / mesh.size members, with no communication between devices. The
  state is padded and placed on the mesh for the call and cut back to
  `num_members` after it; x (replicated), targets and keys (sharded) are
  placed once and reused while the caller passes the same objects. The
  new state and metrics come back on one device.
  """
  members = NamedSharding(mesh, P(MEMBER_AXIS))
  local = epoch_body(member_step, padded // mesh.size, 'vmap')
  program = jax.jit(jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(MEMBER_AXIS), P(), P(MEMBER_AXIS), P(), P(MEMBER_AXIS), P()),
      out_specs=(P(MEMBER_AXIS), P(None, MEMBER_AXIS)), check_vma=False),
                    donate_argnums=(0,))
  pad = jax.jit(lambda t: _pad_members(t, padded))
  place = lambda t: jax.device_put(pad(t), members)
  replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))
  # Results go back to one device, like vmap's: Orbax records an array's
  # sharding, and a checkpoint (or TCN) of mesh-sharded arrays would only
  # restore on the same device count.
  cut = jax.jit(lambda state, metrics: (
      jax.tree_util.tree_map(lambda a: a[:num_members], state),
      jax.tree_util.tree_map(lambda a: a[:, :num_members], metrics)))
  home = SingleDeviceSharding(jax.local_devices()[0])
  cache = {}

  def placed(name, value, fn):
    if name not in cache or cache[name][0] is not value:
      cache[name] = (value, fn(value))
    return cache[name][1]

  def epoch_fn(state, x, targets, order, keys, epoch):
    state, metrics = program(
        place(state), placed('x', x, replicate),
        placed('targets', targets, place), np.asarray(order),
        placed('keys', keys, place), epoch)
    return jax.device_put(cut(state, metrics), home)

  return epoch_fn


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
  """`(params, x) -> (members, batch, ...)`: every member on one batch
  (jitted; for 'sharded' a function that places its inputs, see below)."""
  strategy = resolve_strategy(strategy)
  vmapped = jax.jit(jax.vmap(apply_fn, in_axes=(0, None)))
  if strategy == 'sharded':
    mesh, padded = member_mesh(num_members)
    if mesh.size > 1:
      return _sharded_apply(apply_fn, num_members, mesh, padded, vmapped)
    strategy = 'vmap'
  if strategy == 'vmap':
    return vmapped

  def unrolled(params, x):
    return jnp.stack([apply_fn(p, x) for p in unstack(params, num_members)])

  return jax.jit(unrolled)


def _sharded_apply(apply_fn, num_members, mesh, padded, vmapped):
  """make_apply_fn's 'sharded' strategy on a mesh of several devices.

  Called with arrays, it places the (padded) parameters on the mesh, once
  while the same object comes back, replicates x, runs each device's
  members and returns the outputs on one device. A jit cannot mix arrays
  committed to one device with a program on several, so called inside
  another jit (tracers) it runs the vmap program on that jit's device:
  the same numbers, not spread over devices.
  """
  members = NamedSharding(mesh, P(MEMBER_AXIS))
  replicated = NamedSharding(mesh, P())
  home = SingleDeviceSharding(jax.local_devices()[0])
  program = jax.jit(jax.shard_map(
      jax.vmap(apply_fn, in_axes=(0, None)), mesh=mesh,
      in_specs=(P(MEMBER_AXIS), P()), out_specs=P(MEMBER_AXIS),
      check_vma=False))
  pad = jax.jit(lambda t: _pad_members(t, padded))
  cut = jax.jit(lambda y: y[:num_members])
  cache = {}

  def apply(params, x):
    if any(isinstance(leaf, jax.core.Tracer)
           for leaf in jax.tree_util.tree_leaves((params, x))):
      return vmapped(params, x)
    if 'params' not in cache or cache['params'][0] is not params:
      cache['params'] = (params, jax.device_put(pad(params), members))
    out = program(cache['params'][1], jax.device_put(x, replicated))
    return jax.device_put(cut(out), home)

  return apply


def batched(fn, x: np.ndarray, batch_size: int = 1000, axis: int = 0):
  """Applies jitted `fn` over `x` in fixed-size batches (last one padded);
  x is an array or a streamed split (`input_pipeline.Stream`, read in
  order through Grain)."""
  outs = []
  if hasattr(x, 'in_order'):   # A Stream (not imported: it imports engine).
    batches = (b['image'] for b in x.in_order(batch_size))
  else:
    batches = (x[s:s + batch_size] for s in range(0, len(x), batch_size))
  for xb in batches:
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
    out = np.asarray(fn(xb))
    outs.append(np.take(out, np.arange(batch_size - pad), axis=axis))
  return np.concatenate(outs, axis=axis)
