"""One device mesh for every stage: axes ('data', 'students').

The run's `jax.sharding.Mesh` spans every device of every process
(`jax.devices()`), shaped by `config.mesh` (-1: the devices left). While a
mesh of several devices is in use (`use`), every training stage runs on it
(`engine.make_group_epoch`): a group's members are sharded over 'students'
(padded with copies of member 0 to a multiple of its size), each batch over
'data', and the parameters are replicated over 'data', so a single model
(teacher, head, KD students) trains data-parallel and students never
communicate with each other (paper Sec. 4.5); only a member's own gradient
is summed over 'data'. Forward-only work (teacher features, validation,
the frozen students' outputs for the head, test accuracy) shards its
batches over every device (`data_parallel`, `forward`).

Inputs are fed per process: each process builds only the rows of a global
batch that its own devices hold (`feed`, `jax.make_array_from_callback`), so
with several processes (`tcn_jax.distributed`) no host moves another's data.
One device (or no mesh): nothing here is used and results stay bitwise
those of the single-device programs.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tcn_jax.errors import TCNError

DATA, STUDENTS = 'data', 'students'
AXES = (DATA, STUDENTS)
_CURRENT = []   # The stack of meshes in use (`use`).


def validate(section):
  """Checks config.mesh (data, students): integers >= 1, or -1 for the
  devices left, at most one -1; one line naming the field otherwise."""
  if section is None:
    return
  for field in AXES:
    v = section.get(field)
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      raise TCNError(f'config.mesh.{field} must be an integer >= 1, or -1 '
                     f'for the devices left, got {v!r}')
  if section.get(DATA) == section.get(STUDENTS) == -1:
    raise TCNError('config.mesh.data and config.mesh.students are both -1; '
                   'at most one axis takes the devices left')


def shape(data: int, students: int, num_devices: int) -> tuple[int, int]:
  """(data, students) with a -1 resolved to the devices left; TCNError
  unless the product is `num_devices`."""
  fixed = (data if data != -1 else 1) * (students if students != -1 else 1)
  if num_devices % fixed:
    raise TCNError(f'config.mesh (data={data}, students={students}) does not '
                   f'divide the {num_devices} devices of this run '
                   '(jax.device_count())')
  rest = num_devices // fixed
  out = (rest if data == -1 else data, rest if students == -1 else students)
  if out[0] * out[1] != num_devices:
    raise TCNError(f'config.mesh (data={data}, students={students}) uses '
                   f'{out[0] * out[1]} devices; this run has {num_devices} '
                   '(jax.device_count()); set one axis to -1')
  return out


def make_mesh(data: int = -1, students: int = 1, devices=None) -> Mesh:
  """A ('data', 'students') mesh over `devices` (default: every device of
  every process, in process order, so a process's devices are adjacent).

  Args:
    data: devices along the data axis (-1: the devices left).
    students: devices along the students axis (-1: the devices left).
    devices: the devices (default `jax.devices()`).
  """
  devices = list(jax.devices() if devices is None else devices)
  d, s = shape(data, students, len(devices))
  return Mesh(np.array(devices).reshape(d, s), AXES)


def from_config(config) -> Mesh:
  """The run's mesh from the resolved config. `students.strategy='sharded'`
  with the mesh left at its defaults puts every device on 'students'."""
  m = config.mesh
  data, students = m.data, m.students
  if config.students.strategy == 'sharded' and (data, students) == (-1, 1):
    data, students = 1, -1
  return make_mesh(data, students)


def check_batch_sizes(config, mesh: Mesh):
  """Every training batch must split evenly over the 'data' axis."""
  d = mesh.shape[DATA]
  sections = ['teacher', 'students', 'head'] + (
      ['kd'] if config.kd.enabled or config.kdgan.enabled else [])
  for section in sections:
    size = config[section].batch_size
    if size % d:
      raise TCNError(f'config.{section}.batch_size={size} does not split over '
                     f'the {d} devices of the mesh\'s data axis (config.mesh); '
                     f'use a multiple of {d}')


@contextlib.contextmanager
def use(mesh: Mesh | None):
  """Every stage trained inside the block runs on `mesh` (None: one
  device, the plain programs)."""
  _CURRENT.append(mesh)
  try:
    yield mesh
  finally:
    _CURRENT.pop()


def active() -> Mesh | None:
  """The mesh in use if it has several devices, else None."""
  mesh = _CURRENT[-1] if _CURRENT else None
  return mesh if mesh is not None and mesh.size > 1 else None


def padded_members(num_members: int, mesh: Mesh) -> int:
  """Members after padding to a multiple of the 'students' axis."""
  s = mesh.shape[STUDENTS]
  return -(-num_members // s) * s


def feed(mesh: Mesh, spec: P, global_shape, get) -> jax.Array:
  """A global array of `global_shape` sharded by `spec`: this process
  computes only its own devices' blocks, get(index) -> numpy block."""
  return jax.make_array_from_callback(
      tuple(global_shape), NamedSharding(mesh, spec), get)


def put(mesh: Mesh, spec: P, value) -> jax.Array:
  """A host value (the same on every process) as a global array."""
  value = np.asarray(value)
  return feed(mesh, spec, value.shape, lambda index: value[index])


def to_host(tree):
  """Every array of `tree` as a numpy array holding its global value, on
  every process (a collective when an array spans processes)."""
  def get(a):
    if not isinstance(a, jax.Array):
      return a
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(np.asarray(to_host(
          jax.random.key_data(a))), impl=jax.random.key_impl(a))
    if a.is_fully_addressable:
      return np.asarray(a)
    if a.is_fully_replicated:
      return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return jax.tree_util.tree_map(get, tree)


def data_parallel(fn, mesh: Mesh, batch_axis: int = 0):
  """`(params, x) -> numpy`: jitted fn(params, x) (forward only) with x's
  rows split over every device of the mesh and params replicated; the
  result (rows on `batch_axis`) comes back whole on every process. x is
  padded to a multiple of the mesh size and the padding dropped."""
  d = mesh.size
  rows = P(*([None] * batch_axis), AXES)
  program = jax.jit(fn, out_shardings=NamedSharding(mesh, rows))
  replicated = P()
  cache = {}

  def apply(params, x):
    x = np.asarray(x)
    extra = -len(x) % d
    if extra:
      x = np.concatenate([x, np.repeat(x[-1:], extra, 0)])
    if cache.get('id') is not params:   # Placed once per parameter object.
      cache['id'] = params
      cache['placed'] = jax.tree_util.tree_map(
          lambda a: put(mesh, replicated, a), to_host(params))
    xg = feed(mesh, P(AXES), x.shape, lambda index: x[index])
    out = to_host(program(cache['placed'], xg))
    return np.take(out, np.arange(out.shape[batch_axis] - extra),
                   axis=batch_axis)

  return apply


def forward(fn, params, one_device=None):
  """`x -> outputs` for the forward-only fn(params, x) (evaluation, frozen
  students): on the mesh in use (several devices) data-parallel
  (`data_parallel`), else `one_device` (default: fn jitted with params
  closed over), the single-device program."""
  mesh = active()
  if mesh is None:
    return one_device or jax.jit(lambda x: fn(params, x))
  apply = data_parallel(fn, mesh)
  return lambda x: apply(params, x)


def describe(mesh: Mesh | None) -> dict:
  """The mesh for results.json: axis sizes, devices and processes."""
  if mesh is None:
    return {DATA: 1, STUDENTS: 1, 'devices': 1, 'processes': 1}
  return {DATA: mesh.shape[DATA], STUDENTS: mesh.shape[STUDENTS],
          'devices': mesh.size,
          'processes': len({d.process_index for d in mesh.devices.flat})}


class Layout:
  """Where a group's arrays live on a ('data', 'students') mesh.

  Members are split over 'students' (padded with copies of member 0 to a
  multiple of its size) when the group has several and the axis several
  devices; otherwise they are replicated and a batch that divides the whole
  mesh is split over both axes (a single model uses every device). Batches
  are split over 'data' (and then 'students').
  """

  def __init__(self, mesh: Mesh, num_members: int, batch_size: int):
    self.mesh, self.num_members = mesh, num_members
    s = mesh.shape[STUDENTS]
    self.member_axis = (STUDENTS if num_members > 1 and s > 1
                        else None)
    self.padded = (padded_members(num_members, mesh)
                   if self.member_axis else num_members)
    self.batch_axes = (DATA,)
    if self.member_axis is None and batch_size % mesh.size == 0:
      self.batch_axes = AXES
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
      return put(self.mesh, self.state_spec,
                          np.asarray(to_host(a)))
    return jax.tree_util.tree_map(place, state)

  def pad(self, state):
    """`state` with copies of member 0 up to `padded` members, split over
    `member_axis` (the program's input)."""
    if not hasattr(self, '_pad'):
      self._pad = jax.jit(lambda t: jax.tree_util.tree_map(
          lambda a: jnp.concatenate(
              [a, jnp.repeat(a[:1], self.padded - a.shape[0], axis=0)]), t),
                          out_shardings=self.sharding(self.member_axis))
    return self._pad(state)

  def cut(self, state, num_members: int):
    """`state` without its padding, in `state_spec`."""
    if not hasattr(self, '_cut'):
      self._cut = jax.jit(lambda t: jax.tree_util.tree_map(
          lambda a: a[:num_members], t),
                          out_shardings=self.sharding(*self.state_spec))
    return self._cut(state)

  def batches(self, x, order):
    """The epoch's (steps, batch, ...) inputs, this process's rows only."""
    def get(index):
      return x[order[index[0]][:, index[1]]][(slice(None),) * 2 + index[2:]]
    return feed(self.mesh, P(None, self.batch_axes),
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
      return feed(
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
      return feed(self.mesh, P(None, self.member_axis,
                                        self.batch_axes), shape,
                           lambda index: t[local(index, 2)])
    xs = np.asarray(xs)
    return (feed(self.mesh, P(None, self.batch_axes),
                          xs.shape[:1] + (size,) + xs.shape[2:],
                          lambda index: xs[local(index, 1)]),
            jax.tree_util.tree_map(one, ts))
