"""Training a group of identical models in one compiled program.

A group's state (`state.MemberState`, each leaf with a leading member axis)
trains through one `Trainer`: a `jax.jit` of a `lax.scan` over batches, with
the shardings of `mesh.Layout` on the run's device mesh (`tcn_jax.mesh`; one
device is a 1x1 mesh). Members are split over the mesh's 'students' axis
(padded with copies of member 0, whose results are dropped), each batch
over 'data'; only a member's own gradient is summed over its batch's
devices. Inside a device, its members run

  vmap      `jax.vmap` over the member axis (best on GPU/TPU);
  unrolled  one after another in the same program (best on XLA:CPU, where
            vmapped convolutions are slow; only where members are not split
            over devices);
  sharded   vmap, with every device on 'students' (`mesh.from_config`; the
            Python API without a mesh: this process's devices);
  auto      unrolled on CPU, vmap elsewhere.

A call trains the batches it is given (`Resident`: an in-memory epoch
gathered on device; `Fed`: host batches, e.g. a chunk of a streamed epoch),
the steps being the epoch's `offset`, offset + 1, ..., so chunks of an
epoch give the whole epoch's numbers. Member i's randomness (init, dropout)
comes from `fold_in(key, member_id)`, so a member trained in a group gets
the same numbers as trained alone.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from tcn_jax import config as config_lib
from tcn_jax import mesh as mesh_lib
from tcn_jax.errors import TCNError
from tcn_jax.state import MemberState

STRATEGIES = tuple(config_lib.STRATEGIES.names())

# loss_fn(params, x, target, dropout_key) -> scalar loss for one member.
LossFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def check_strategy(strategy: str):
  """TCNError unless `strategy` is one of STRATEGIES (no JAX backend is
  started: `jax.distributed` may still have to be joined)."""
  if strategy not in STRATEGIES:
    raise TCNError(f'unknown strategy {strategy!r} (config.students.strategy); '
                   f'choose one of {STRATEGIES}')


def resolve_strategy(strategy: str) -> str:
  """'vmap' or 'unrolled': how a device runs its members."""
  check_strategy(strategy)
  if strategy == 'auto':
    return 'unrolled' if jax.default_backend() == 'cpu' else 'vmap'
  return 'vmap' if strategy == 'sharded' else strategy


def group_mesh(strategy: str, mesh=None):
  """The mesh a group trains on: `mesh`, else the one in use
  (`mesh.use`), else for 'sharded' every local device on 'students', else
  a 1x1 mesh of this process's first device."""
  mesh = mesh if mesh is not None else mesh_lib.active()
  if mesh is not None:
    return mesh
  if strategy == 'sharded' and jax.local_device_count() > 1:
    return mesh_lib.make_mesh(1, -1, jax.local_devices())
  return mesh_lib.make_mesh(1, 1, jax.local_devices()[:1])


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
  """A member step: one optimizer step on loss_fn, over a `MemberState`.

  With a model state (BatchNorm statistics, ...) loss_fn(params,
  model_state, x, target, key) -> (loss, new model_state), else
  loss_fn(params, x, target, key) -> loss. The metrics are {'loss'}.
  """
  def member_step(state: MemberState, x, target, key):
    model_state = state.model_state
    if model_state:
      (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, model_state, x, target, key)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, x, target, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, model_state=model_state), {
                             'loss': loss}
  return member_step


class Resident(NamedTuple):
  """An in-memory epoch: x (N, ...) and targets, a pytree of (members, N,
  ...), gathered by `order` (steps, batch) of indices."""
  x: Any
  targets: Any
  order: np.ndarray


class Fed(NamedTuple):
  """Host batches: xs (steps, batch, ...) and ts, a pytree of (steps,
  members, batch, ...). With several processes each holds only `rows` =
  (start, stop) of global batches of `batch_size` (`Layout.fed`)."""
  xs: Any
  ts: Any
  rows: tuple | None = None
  batch_size: int | None = None


def _pad_host(tree, padded):
  """Appends copies of member 0 until the member axis is `padded` long."""
  def pad(a):
    a = np.asarray(a)
    extra = padded - a.shape[0]
    return a if not extra else np.concatenate([a, np.repeat(a[:1], extra, 0)])
  return jax.tree_util.tree_map(pad, tree)


def _scan_fn(member_step, num_members: int, strategy: str, resident: bool,
             target_fn=None, view=None):
  """`run(state, data, keys, epoch, offset, context) -> (state, metrics
  (steps, members))`, a scan over the batches of `data`: (x, targets,
  order) gathered on device (`resident`) or fed (xs, ts). view = (fn,
  seed): each batch and its targets are replaced by fn(key, xb, tb), key
  depending only on (seed, epoch, step), so every member sees the same
  view (and, with mixup, the labels mixed as the images). target_fn(
  context, xb) -> a dict of (members, batch, ...) targets computed from
  each (viewed) batch (online features) is added to its targets."""
  def run(state, data, keys, epoch, offset, context):
    epoch_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, epoch + 1)
    if view is not None:
      view_key = jax.random.fold_in(jax.random.key(view[1]), epoch)
    if resident:
      x, targets, order = data
      inputs = (order, offset + jnp.arange(order.shape[0]))
    else:
      inputs = (*data, offset + jnp.arange(data[0].shape[0]))

    def batch(inp):
      if resident:
        idx, i = inp
        xb, tb = x[idx], jax.tree_util.tree_map(lambda t: t[:, idx], targets)
      else:
        xb, tb, i = inp
      if view is not None:
        xb, tb = view[0](jax.random.fold_in(view_key, i), xb, tb)
      if target_fn is not None:
        tb = {**tb, **target_fn(context, xb)}
      return xb, tb, jax.vmap(jax.random.fold_in, (0, None))(epoch_keys, i)

    if strategy == 'vmap':
      vstep = jax.vmap(member_step, in_axes=(0, None, 0, 0))
      return jax.lax.scan(lambda carry, inp: vstep(carry, *batch(inp)),
                          state, inputs)

    def body(carry, inp):   # 'unrolled'.
      xb, tb, kb = batch(inp)
      out = [member_step(s, xb, jax.tree_util.tree_map(
          lambda t, m=m: t[m], tb), kb[m]) for m, s in enumerate(carry)]
      return tuple(s for s, _ in out), stack([m for _, m in out])

    carry, metrics = jax.lax.scan(
        body, tuple(unstack(state, num_members)), inputs)
    return stack(carry), metrics

  return run


class Trainer:
  """`trainer(state, batches, keys, epoch, offset=0, context=None) ->
  (state, metrics)`: trains a group's stacked `state` on `batches`
  (`Resident` or `Fed`) in one compiled program per batch layout, on
  `group_mesh(strategy, mesh)`. keys: the members' keys (`member_keys`);
  view: (fn(key, x, targets) -> (x, targets), seed), each batch's random
  view (`_scan_fn`);
  context: the argument of target_fn (e.g. a frozen teacher's variables),
  placed once while the same object. Runs asynchronously: the metrics, a
  dict of (steps, members), are device arrays (read them to wait). The
  state is donated; it comes back in the layout's `state_spec`."""

  def __init__(self, member_step, num_members: int, strategy: str,
               mesh=None, target_fn=None, view=None):
    self.member_step, self.num_members = member_step, num_members
    self.strategy = resolve_strategy(strategy)
    self.mesh = group_mesh(strategy, mesh)
    self.target_fn, self.view = target_fn, view
    self._programs, self._placed = {}, {}

  def layout(self, batch_size: int) -> mesh_lib.Layout:
    return self.program(batch_size, False)[0]

  def program(self, batch_size: int, resident: bool):
    """(layout, jitted program) for batches of `batch_size`, in-memory on
    one device (`resident`) or fed."""
    if (batch_size, resident) in self._programs:
      return self._programs[batch_size, resident]
    layout = mesh_lib.Layout(self.mesh, self.num_members, batch_size)
    if batch_size % layout.batch_devices:
      raise TCNError(f'batch size {batch_size} does not split over the '
                     f'{layout.batch_devices} devices of the mesh\'s '
                     f'{"/".join(layout.batch_axes)} axes (config.mesh)')
    local = 'vmap' if layout.member_axis else self.strategy
    body = _scan_fn(self.member_step, layout.padded, local, resident,
                    self.target_fn, self.view)
    members = layout.sharding(layout.member_axis)
    data = layout.sharding() if resident else (
        layout.sharding(None, layout.batch_axes),
        layout.sharding(None, layout.member_axis, layout.batch_axes))
    program = jax.jit(
        body, in_shardings=(members, data, members, None, None,
                            layout.sharding()),
        out_shardings=(members, layout.sharding(None, layout.member_axis)),
        donate_argnums=(0,))
    self._programs[batch_size, resident] = layout, program
    return layout, program

  def _once(self, name, value, place):
    """`place(value)`, computed once while the same object comes back."""
    if name not in self._placed or self._placed[name][0] is not value:
      self._placed[name] = (value, place(value))
    return self._placed[name][1]

  def __call__(self, state, batches, keys, epoch, offset=0, context=None):
    n, mesh = self.num_members, self.mesh
    resident = isinstance(batches, Resident) and mesh.size == 1
    size = (batches.order.shape[1] if isinstance(batches, Resident)
            else batches.batch_size or np.shape(batches.xs)[1])
    layout, program = self.program(size, resident)
    replicate = lambda tree: jax.tree_util.tree_map(
        lambda a: mesh_lib.put(mesh, P(), mesh_lib.to_host(a)), tree)
    if resident:   # On the one device, once.
      data = (self._once('x', batches.x, replicate),
              self._once('targets', batches.targets, replicate),
              np.asarray(batches.order))
    elif isinstance(batches, Resident):   # Host-gathered, rows per process.
      x, order = np.asarray(batches.x), np.asarray(batches.order)
      data = (layout.batches(x, order), layout.member_batches(
          jax.tree_util.tree_map(np.asarray, batches.targets), order))
    else:
      data = layout.fed(batches.xs, batches.ts, batches.rows, size)
    if context is not None:
      context = self._once('context', context, replicate)
    padded = layout.padded != n
    if mesh.size > 1 or padded:
      keys = jax.random.wrap_key_data(mesh_lib.put(
          mesh, P(layout.member_axis),
          _pad_host(np.asarray(jax.random.key_data(keys)), layout.padded)),
                                      impl=jax.random.key_impl(keys))
    state = layout.place_state(state)
    if padded:
      state = layout.pad(state)
    state, metrics = program(state, data, keys, epoch, offset, context)
    if padded:
      state = layout.cut(state, n)
      metrics = jax.tree_util.tree_map(lambda m: m[:, :n], metrics)
    return state, metrics


def make_group_epoch(member_step, num_members: int, strategy: str,
                     mesh=None):
  """`epoch(state, x, targets, order, keys, epoch) -> (state, metrics)`:
  one in-memory epoch of a `Trainer` (x (N, ...); targets a pytree of
  (members, N, ...); order the epoch's (steps, batch) indices), metrics
  as numpy (steps, members)."""
  trainer = Trainer(member_step, num_members, strategy, mesh)

  def epoch_fn(state, x, targets, order, keys, epoch):
    state, metrics = trainer(state, Resident(x, targets, order), keys, epoch)
    return state, mesh_lib.to_host(metrics)

  return epoch_fn


def make_epoch_fn(loss_fn: LossFn, tx: optax.GradientTransformation,
                  num_members: int, strategy: str, mesh=None):
  """Gradient-descent epochs of `loss_fn` (see make_group_epoch):
  `epoch(params, opt_state, x, targets, order, keys, epoch) -> (params,
  opt_state, losses (steps, members))`."""
  group_epoch = make_group_epoch(gradient_step(loss_fn, tx), num_members,
                                 strategy, mesh)

  def epoch_fn(params, opt_state, x, targets, order, keys, epoch):
    state, metrics = group_epoch(MemberState(params, opt_state), x, targets,
                                 order, keys, epoch)
    return state.params, state.opt_state, metrics['loss']

  return epoch_fn


def make_apply_fn(apply_fn, num_members: int, strategy: str, mesh=None):
  """`(params, x) -> (members, batch, ...)`: every member on one batch, on
  `group_mesh(strategy, mesh)`: members over 'students' (padded), the batch
  over the other axes, outputs back whole (numpy with several devices).
  Inside another jit (tracers) it is the vmap program of that jit."""
  local = resolve_strategy(strategy)
  mesh = group_mesh(strategy, mesh)
  vmapped = jax.vmap(apply_fn, in_axes=(0, None))
  if mesh.size == 1:   # The plain programs, params wherever they are.
    if local == 'vmap':
      return jax.jit(vmapped)
    return jax.jit(lambda params, x: jnp.stack(
        [apply_fn(p, x) for p in unstack(params, num_members)]))
  programs, cache = {}, {}

  def apply(params, x):
    if any(isinstance(leaf, jax.core.Tracer)
           for leaf in jax.tree_util.tree_leaves((params, x))):
      return vmapped(params, x)
    x = np.asarray(x)
    if len(x) not in programs:
      layout = mesh_lib.Layout(mesh, num_members, len(x))
      programs[len(x)] = layout, jax.jit(vmapped, out_shardings=(
          layout.sharding(layout.member_axis, layout.batch_axes)))
    layout, program = programs[len(x)]
    where = (layout.member_axis, layout.padded)
    if cache.get('id') is not params or cache.get('layout') != where:
      cache.update(id=params, layout=where, placed=jax.tree_util.tree_map(
          lambda a: mesh_lib.put(mesh, P(layout.member_axis), a),
          _pad_host(mesh_lib.to_host(params), layout.padded)))
    extra = -len(x) % layout.batch_devices
    xp = np.concatenate([x, np.repeat(x[-1:], extra, 0)]) if extra else x
    xg = mesh_lib.feed(mesh, P(layout.batch_axes), xp.shape,
                       lambda index: xp[index])
    return mesh_lib.to_host(program(cache['placed'], xg))[
        :num_members, :len(x)]

  return apply
