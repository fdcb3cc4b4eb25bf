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

On a mesh of several devices (`tcn_jax.mesh`, passed as `mesh=`) every
strategy runs as one GSPMD program instead: members over the mesh's
'students' axis, each batch over 'data' (see `_mesh_epoch`); the strategy
then only picks vmap or unrolled for a device's members.

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

from tcn_jax import mesh as mesh_lib
from tcn_jax.errors import TCNError

STRATEGIES = ('auto', 'vmap', 'unrolled', 'sharded')
MEMBER_AXIS = 'students'   # The mesh axis of the 'sharded' strategy.

# loss_fn(params, x, target, dropout_key) -> scalar loss for one member.
LossFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def check_strategy(strategy: str):
  """TCNError unless `strategy` is one of STRATEGIES (no JAX backend is
  started: `jax.distributed` may still have to be joined)."""
  if strategy not in STRATEGIES:
    raise TCNError(f'unknown strategy {strategy!r} (config.students.strategy); '
                   f'choose one of {STRATEGIES}')


def resolve_strategy(strategy: str) -> str:
  check_strategy(strategy)
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


def _pad_host(tree, padded):
  """`_pad_members` of host (numpy) arrays, in numpy."""
  def pad(a):
    a = np.asarray(a)
    extra = padded - a.shape[0]
    return a if not extra else np.concatenate([a, np.repeat(a[:1], extra, 0)])
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

    return _unrolled_scan(member_step, batch, state, num_members,
                          (order, steps))

  return epoch_fn


def _unrolled_scan(member_step, batch, state, num_members, inputs):
  """One epoch of a stacked group with its members unrolled in one program:
  a scan over `inputs`, `batch(*inp)` -> (x, targets, keys) per step."""
  def body(carry, inp):
    xb, tb, kb = batch(*inp)
    out = [member_step(s, xb, jax.tree_util.tree_map(lambda t, m=m: t[m], tb),
                       kb[m]) for m, s in enumerate(carry)]
    return tuple(s for s, _ in out), stack([m for _, m in out])

  carry, metrics = jax.lax.scan(body, tuple(unstack(state, num_members)),
                                inputs)
  return stack(carry), metrics


def make_group_epoch(member_step, num_members: int, strategy: str,
                     mesh: Mesh | None = None):
  """Returns jitted `epoch(state, x, targets, order, keys, epoch)`.

  member_step(state, x, target, key) -> (state, metrics) is one training
  step of one member (any state pytree: params, optimizer state, batch
  statistics, a discriminator, ...); metrics is a pytree of scalars.
  state: stacked over members; x: (N, ...) shared by all members; targets:
  a pytree (e.g. a dict) of (members, N, ...) arrays; order: the epoch's
  (steps, batch) indices; keys: (members,) member keys. Returns the new state and the metrics stacked as
  (steps, members). The state is donated. With a `mesh` of several devices:
  `_mesh_epoch`.
  """
  strategy = resolve_strategy(strategy)
  if mesh is not None and mesh.size > 1:
    return _mesh_epoch(member_step, num_members, strategy, mesh)
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


def make_apply_fn(apply_fn, num_members: int, strategy: str,
                  mesh: Mesh | None = None):
  """`(params, x) -> (members, batch, ...)`: every member on one batch
  (jitted; for 'sharded' or a `mesh` of several devices a function that
  places its inputs, see below)."""
  strategy = resolve_strategy(strategy)
  vmapped = jax.jit(jax.vmap(apply_fn, in_axes=(0, None)))
  if mesh is not None and mesh.size > 1:
    return _mesh_apply(apply_fn, num_members, mesh, vmapped)
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


class MeshLayout:
  """Where a group's arrays live on a ('data', 'students') mesh.

  Members are split over 'students' (padded with copies of member 0 to a
  multiple of its size) when the group has several and the axis several
  devices; otherwise they are replicated and a batch that divides the whole
  mesh is split over both axes (a single model uses every device). Batches
  are split over 'data' (and then 'students').
  """

  def __init__(self, mesh: Mesh, num_members: int, batch_size: int):
    self.mesh, self.num_members = mesh, num_members
    s = mesh.shape[mesh_lib.STUDENTS]
    self.member_axis = (mesh_lib.STUDENTS if num_members > 1 and s > 1
                        else None)
    self.padded = (mesh_lib.padded_members(num_members, mesh)
                   if self.member_axis else num_members)
    self.batch_axes = (mesh_lib.DATA,)
    if self.member_axis is None and batch_size % mesh.size == 0:
      self.batch_axes = mesh_lib.AXES
    self.batch_devices = int(np.prod([mesh.shape[a]
                                      for a in self.batch_axes]))
    # The state between epochs (what is checkpointed): unpadded, members
    # split over 'students' when they divide it, else replicated.
    self.state_spec = P(self.member_axis if self.padded == num_members
                        else None)

  def sharding(self, *spec):
    return NamedSharding(self.mesh, P(*spec))

  def abstract_state(self, state):
    """`state`'s shapes and dtypes in `state_spec` (a restore target)."""
    sharding = self.sharding(*self.state_spec)
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                                       sharding=sharding), state)

  def place_state(self, state):
    """`state` (any arrays: host, one device, another layout) as global
    arrays in `state_spec`."""
    target = self.sharding(*self.state_spec)

    def place(a):
      if isinstance(a, jax.Array) and a.sharding == target:
        return a
      return mesh_lib.put(self.mesh, self.state_spec,
                          np.asarray(mesh_lib.to_host(a)))
    return jax.tree_util.tree_map(place, state)

  def batches(self, x, order):
    """The epoch's (steps, batch, ...) inputs, this process's rows only."""
    def get(index):
      return x[order[index[0]][:, index[1]]][(slice(None),) * 2 + index[2:]]
    return mesh_lib.feed(self.mesh, P(None, self.batch_axes),
                         order.shape + x.shape[1:], get)

  def member_batches(self, targets, order):
    """(steps, padded members, batch, ...) of each (members, N, ...) target."""
    def one(t):
      def get(index):
        rows = order[index[0]][:, index[2]]
        members = np.arange(self.padded)[index[1]]
        members = np.where(members < len(t), members, 0)   # Dummies: member 0.
        block = t[members][:, rows]                  # (m, steps, batch, ...)
        return np.moveaxis(block, 0, 1)[(slice(None),) * 3 + index[3:]]
      return mesh_lib.feed(
          self.mesh, P(None, self.member_axis, self.batch_axes),
          (order.shape[0], self.padded, order.shape[1]) + t.shape[2:], get)
    return jax.tree_util.tree_map(lambda t: one(np.asarray(t)), targets)

  def process_rows(self, batch_size: int) -> tuple[int, int]:
    """(start, stop): the rows of every global batch that this process's
    devices hold (all of them where the batch is not split over the
    processes), so that a stream reads only those."""
    index = self.sharding(self.batch_axes).addressable_devices_indices_map(
        (batch_size,))
    rows = set()
    for (s,) in index.values():
      rows.update(range(*s.indices(batch_size)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:   # Not one block: read every row.
      return 0, batch_size
    return start, stop

  def fed(self, xs, ts, rows=None, batch_size=None):
    """Host batches as global arrays: xs (steps, batch, ...) over the
    batch axes; ts, a pytree of (steps, members, batch, ...), members
    padded (copies of member 0) and split over `member_axis`. xs and ts
    hold the rows `rows` = (start, stop) of global batches of `batch_size`
    (default: every row, one process): each process feeds only its own."""
    start = rows[0] if rows else 0
    size = batch_size or np.shape(xs)[1]

    def local(index, axis):   # A device's block, in this process's rows.
      s = index[axis].indices(size)
      return index[:axis] + (slice(s[0] - start, s[1] - start),) + index[
          axis + 1:]

    def one(t):
      t = np.asarray(t)
      if t.shape[1] < self.padded:
        t = np.concatenate([t, np.repeat(t[:, :1], self.padded - t.shape[1],
                                         1)], 1)
      shape = t.shape[:2] + (size,) + t.shape[3:]
      return mesh_lib.feed(self.mesh, P(None, self.member_axis,
                                        self.batch_axes), shape,
                           lambda index: t[local(index, 2)])
    xs = np.asarray(xs)
    return (mesh_lib.feed(self.mesh, P(None, self.batch_axes),
                          xs.shape[:1] + (size,) + xs.shape[2:],
                          lambda index: xs[local(index, 1)]),
            jax.tree_util.tree_map(one, ts))


def _mesh_epoch(member_step, num_members, strategy, mesh):
  """make_group_epoch on a mesh of several devices (see `MeshLayout`).

  The epoch's batches are fed from host memory, each process only its own
  devices' rows, into `_mesh_runner`'s program. The state comes back as
  global arrays in the layout's `state_spec`, the metrics as numpy
  (steps, members).
  """
  run = _mesh_runner(member_step, num_members, strategy, mesh)

  def epoch_fn(state, x, targets, order, keys, epoch):
    order = np.asarray(order)
    x, targets = np.asarray(x), jax.tree_util.tree_map(np.asarray, targets)
    return run(state, lambda layout: (layout.batches(x, order),
                                      layout.member_batches(targets, order)),
               order.shape[1], keys, epoch)

  return epoch_fn


def _mesh_runner(member_step, num_members, strategy, mesh, target_fn=None):
  """`run(state, feed, batch_size, keys, epoch, offset=0, context=None,
  host_metrics=True) -> (state, metrics)`: fed batches (feed(layout) ->
  global xs, ts) through one jitted GSPMD program per batch layout
  (`_batches_body`): members are vmapped (or unrolled when they are not
  split over 'students'); each member's gradient is summed over the batch
  devices by the partitioner and nothing else is exchanged. The state
  comes back as global arrays in the layout's `state_spec`; the metrics as
  numpy (steps, members), or with host_metrics=False as the program's
  (steps, padded members) global array (not waited for)."""
  programs, placed = {}, {}

  def build(layout):
    local = 'vmap' if layout.member_axis or strategy == 'sharded' else strategy
    body = _batches_body(member_step, layout.padded, local, target_fn)
    members = layout.sharding(layout.member_axis)
    batch = layout.sharding(None, layout.batch_axes)
    program = jax.jit(
        body, in_shardings=(members, batch,
                            layout.sharding(None, layout.member_axis,
                                            layout.batch_axes),
                            members, None, None, layout.sharding()),
        out_shardings=(members, layout.sharding(None, layout.member_axis)),
        donate_argnums=(0,))
    pad = jax.jit(lambda t: _pad_members(t, layout.padded),
                  out_shardings=members)
    cut = jax.jit(lambda t: jax.tree_util.tree_map(
        lambda a: a[:num_members], t),
                  out_shardings=layout.sharding(*layout.state_spec))
    return layout, program, pad, cut

  def run(state, feed, batch_size, keys, epoch, offset=0, context=None,
          host_metrics=True):
    if batch_size not in programs:
      programs[batch_size] = build(MeshLayout(mesh, num_members, batch_size))
    layout, program, pad, cut = programs[batch_size]
    if batch_size % layout.batch_devices:
      raise TCNError(f'batch size {batch_size} does not split over the '
                     f'{layout.batch_devices} devices of the mesh\'s '
                     f'{"/".join(layout.batch_axes)} axes (config.mesh)')
    keys = jax.random.wrap_key_data(mesh_lib.put(
        mesh, P(layout.member_axis),
        _pad_host(np.asarray(jax.random.key_data(keys)), layout.padded)),
                                    impl=jax.random.key_impl(keys))
    if context is not None:   # Replicated, once while the same object.
      if placed.get('id') is not context:
        placed.update(id=context, value=jax.tree_util.tree_map(
            lambda a: mesh_lib.put(mesh, P(), mesh_lib.to_host(a)), context))
      context = placed['value']
    xs, ts = feed(layout)
    state, metrics = program(pad(layout.place_state(state)), xs, ts, keys,
                             epoch, offset, context)
    if host_metrics:
      metrics = jax.tree_util.tree_map(lambda m: m[:, :num_members],
                                       mesh_lib.to_host(metrics))
    else:
      metrics = jax.tree_util.tree_map(lambda m: m[:, :num_members], metrics)
    return cut(state), metrics

  return run


def _batches_body(member_step, num_members: int, strategy: str,
                  target_fn=None):
  """`epoch(state, xs, ts, keys, epoch, offset=0, context=None)` over fed
  batches: xs (steps, batch, ...), ts (steps, members, batch, ...); as
  `epoch_body`, the batches being the epoch's steps offset, offset + 1, ...
  (a chunk of a streamed epoch). target_fn(context, xb) -> a dict of
  (members, batch, ...) targets computed from each batch (online features)
  is added to its ts."""
  def epoch_fn(state, xs, ts, keys, epoch, offset=0, context=None):
    epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, epoch + 1)
    steps = offset + jnp.arange(xs.shape[0])

    def batch(xb, tb, i):
      if target_fn is not None:
        tb = {**tb, **target_fn(context, xb)}
      return xb, tb, jax.vmap(jax.random.fold_in, (0, None))(epoch_keys, i)

    if strategy == 'vmap':
      vstep = jax.vmap(member_step, in_axes=(0, None, 0, 0))
      return jax.lax.scan(lambda carry, inp: vstep(carry, *batch(*inp)),
                          state, (xs, ts, steps))

    return _unrolled_scan(member_step, batch, state, num_members,
                          (xs, ts, steps))

  return epoch_fn


def make_chunk_fn(member_step, num_members: int, strategy: str,
                  mesh: Mesh | None = None, target_fn=None):
  """Returns `chunk(state, xs, ts, keys, epoch, offset, context) -> (state,
  metrics (steps, members))`: consecutive batches of an epoch fed from the
  host (a streamed epoch, chunk by chunk), trained as `make_group_epoch`
  trains them: xs (steps, batch, ...) and ts (steps, members, batch, ...)
  numpy, the steps being the epoch's offset, offset + 1, ... (their keys
  too), so chunks of an epoch give the in-memory epoch's numbers. Runs
  asynchronously: the metrics are device arrays (read them to wait). With
  a `mesh` of several devices: `_mesh_runner`'s program, and chunk takes
  `rows`, `batch_size`: the rows of the global batches xs holds, with
  several processes (`MeshLayout.fed`); 'sharded' on one process's devices
  runs as vmap. target_fn: see `_batches_body`."""
  strategy = resolve_strategy(strategy)
  if mesh is not None and mesh.size > 1:
    run = _mesh_runner(member_step, num_members, strategy, mesh, target_fn)

    def mesh_chunk(state, xs, ts, keys, epoch, offset, context, rows=None,
                   batch_size=None):
      size = batch_size or xs.shape[1]
      return run(state, lambda layout: layout.fed(xs, ts, rows, size), size,
                 keys, epoch, offset, context, host_metrics=False)

    return mesh_chunk
  if strategy == 'sharded':
    strategy = 'vmap'
  program = jax.jit(_batches_body(member_step, num_members, strategy,
                                  target_fn), donate_argnums=(0,))

  def chunk(state, xs, ts, keys, epoch, offset, context):
    return program(state, jnp.asarray(xs), jax.tree_util.tree_map(
        jnp.asarray, ts), keys, epoch, offset, context)

  return chunk


def _mesh_apply(apply_fn, num_members, mesh, vmapped):
  """make_apply_fn on a mesh of several devices: members over 'students'
  (padded), the batch over the remaining axes, outputs back as numpy on
  every process. Inside another jit (tracers) it is the vmap program."""
  programs, cache = {}, {}

  def apply(params, x):
    if any(isinstance(leaf, jax.core.Tracer)
           for leaf in jax.tree_util.tree_leaves((params, x))):
      return vmapped(params, x)
    x = np.asarray(x)
    if len(x) not in programs:
      layout = MeshLayout(mesh, num_members, len(x))
      programs[len(x)] = layout, jax.jit(
          jax.vmap(apply_fn, in_axes=(0, None)),
          out_shardings=layout.sharding(layout.member_axis,
                                        layout.batch_axes))
    layout, program = programs[len(x)]
    if cache.get('id') is not params or cache.get('layout') != (
        layout.member_axis, layout.padded):
      cache.update(id=params, layout=(layout.member_axis, layout.padded),
                   placed=jax.tree_util.tree_map(
                       lambda a: mesh_lib.put(mesh, P(layout.member_axis), a),
                       _pad_host(mesh_lib.to_host(params), layout.padded)))
    extra = -len(x) % layout.batch_devices
    xp = np.concatenate([x, np.repeat(x[-1:], extra, 0)]) if extra else x
    xg = mesh_lib.feed(mesh, P(layout.batch_axes), xp.shape,
                       lambda index: xp[index])
    out = mesh_lib.to_host(program(cache['placed'], xg))
    return out[:num_members, :len(x)]

  return apply
