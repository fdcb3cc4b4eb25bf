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

