"""Students across processes (paper Sec. 4.5: students on separate machines).

P processes (one per host, or several on one host) form one run. The
students are split deterministically between them (`share`: contiguous
blocks of member ids, sizes differing by at most one, the first processes
taking the larger blocks); each process trains only its members, in its own
compiled program(s), and the trained variables are then gathered to every
process (`gather_groups`). Member i's randomness is `fold_in(key, i)` and
all members see the same batches, so a member trained in any process equals
the same member trained in a single-process run.

Inference keeps the same layout (`make_predict`): each process runs its
students on the batch, the chunk outputs are gathered and concatenated in
chunk order, and the teacher's head runs on them.

Transport. The processes join `jax.distributed` and move bytes with
`jax.experimental.multihost_utils` (`process_allgather`,
`broadcast_one_to_all`; Gloo on CPU); pytrees are serialized with Flax's
msgpack, so no process needs the others' shapes and no shared filesystem is
needed. By default (`initialize(..., courier=True)`) the `jax.distributed`
member is a small CPU-only child process (the courier, `python -m
tcn_jax.courier`) that the training process talks to over two pipes:
the training process itself stays a single-process JAX runtime with its own
devices. That is needed for checkpoints: once `jax.distributed` is
initialized, Orbax (0.12.8) treats every save as a multi-host one and
refuses process-local state (host-local `jax.Array`s are rejected, numpy
arrays are written only by process 0, and the processes' save signals share
keys), while every stage of the pipeline checkpoints per process.
`courier=False` joins in this process instead (no Orbax use then).
"""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from tcn_jax import assemble
from tcn_jax import courier as courier_lib
from tcn_jax.errors import TCNError


_COURIER = None   # The courier of this process, once joined with one.


def validate(section, num_students=None):
  """Checks config.distributed (num_processes, process_id, coordinator),
  failing with one line that names the field."""
  if section is None:
    return
  p, k, coord = (section.get(f) for f in
                 ('num_processes', 'process_id', 'coordinator'))
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)
  if not is_int(p) or p < 1:
    raise TCNError('config.distributed.num_processes must be an integer '
                   f'>= 1, got {p!r}')
  if not is_int(k) or not 0 <= k < p:
    raise TCNError('config.distributed.process_id must be an integer in '
                   f'[0, num_processes={p}), got {k!r}')
  if num_students is not None and p > num_students:
    raise TCNError(f'config.distributed.num_processes={p} is more than '
                   f'num_students={num_students}: a process would train '
                   'no student')
  if p > 1 and not (isinstance(coord, str)
                    and re.fullmatch(r'[^\s:]+:\d{1,5}', coord)
                    and 0 < int(coord.rsplit(':', 1)[1]) < 65536):
    raise TCNError('config.distributed.coordinator must be host:port (the '
                   f'address of process 0) when num_processes > 1, got '
                   f'{coord!r}')


def initialize(num_processes: int = 1, process_id: int = 0,
               coordinator: str = '', timeout: int = courier_lib.JOIN_TIMEOUT,
               courier: bool = True) -> bool:
  """Joins the run as `process_id` of `num_processes`; `coordinator` is
  'host:port' of process 0, which serves it. One process: nothing to do.

  courier=True (default): a CPU-only child process joins `jax.distributed`
  and carries this process's collectives; this process's JAX stays
  single-process (Orbax checkpoints keep working) and may be called at any
  time. courier=False: `jax.distributed.initialize` here, before any JAX
  computation. Returns whether it joined.
  """
  global _COURIER
  validate({'num_processes': num_processes, 'process_id': process_id,
            'coordinator': coordinator})
  if num_processes == 1:
    return False
  if _COURIER is not None or _jax_joined():
    if (process_count(), process_index()) != (num_processes, process_id):
      raise TCNError(f'this Python process already joined as process '
                     f'{process_index()} of {process_count()}; '
                     'config.distributed asks for another')
    return True
  if courier:
    _COURIER = courier_lib.Courier(num_processes, process_id, coordinator, timeout)
    return True
  try:
    courier_lib.join(num_processes, process_id, coordinator, timeout)
  except Exception as e:  # pylint: disable=broad-except  (XLA raises several)
    raise TCNError(courier_lib.join_error(coordinator, process_id, num_processes,
                               e)) from None
  return True


def _jax_joined():
  return jax._src.distributed.global_state.client is not None  # pylint: disable=protected-access


def shutdown():
  """Leaves the run (a barrier: waits for every process to leave)."""
  global _COURIER
  if _COURIER is not None:
    _COURIER.close()
    _COURIER = None
  elif _jax_joined():
    jax.distributed.shutdown()


def process_index() -> int:
  return _COURIER.process_id if _COURIER else jax.process_index()


def process_count() -> int:
  return _COURIER.num_processes if _COURIER else jax.process_count()


# Fields that may differ between processes: the id, where each host keeps
# its copy of the data, and the workdir policy.
PER_PROCESS_FIELDS = ('distributed.process_id', 'data.dir',
                      'allow_config_change')


def check_same_config(config: dict):
  """Fails, on every process, unless all processes run the same config
  (a JSON dict) apart from PER_PROCESS_FIELDS; names the fields."""
  def flat(d, prefix=''):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flat(v, f'{prefix}{k}.'))
      elif f'{prefix}{k}' not in PER_PROCESS_FIELDS:
        out[f'{prefix}{k}'] = v
    return out
  mine = json.dumps(flat(config), sort_keys=True, default=str)
  everyone = [json.loads(b) for b in allgather_bytes(mine.encode())]
  for k, other in enumerate(everyone):
    fields = sorted(f for f in set(other) | set(everyone[0])
                    if other.get(f) != everyone[0].get(f))
    if fields:
      raise TCNError(f'process {k} runs another config than process 0 '
                     f'({", ".join(fields[:5])}); every process needs the '
                     'same config and flags but config.distributed.'
                     'process_id and config.data.dir')


def share(num_students: int, process_id: int, num_processes: int):
  """Member ids trained by `process_id`: a contiguous block, the first
  num_students % num_processes processes taking one more."""
  base, extra = divmod(num_students, num_processes)
  start = process_id * base + min(process_id, extra)
  return list(range(start, start + base + (process_id < extra)))


# ---------------------------------------------------------------- transport


def allgather_bytes(blob: bytes, fast: bool = False) -> list[bytes]:
  """Every process's `blob`, in process order (a collective).

  fast=True: for processes known to be in step with blobs of one size
  (inference): one allgather, no barrier, no exchange of sizes first.
  """
  if _COURIER is not None:
    return _COURIER.call(b'F' if fast else b'A', blob)
  if jax.process_count() == 1:
    return [blob]
  return courier_lib.allgather_here(blob, fast)


def broadcast_bytes(blob: bytes) -> bytes:
  """Process 0's `blob` on every process (the others' is ignored)."""
  if _COURIER is not None:
    return _COURIER.call(b'B', blob if process_index() == 0 else b'')[0]
  if jax.process_count() == 1:
    return blob
  return courier_lib.broadcast_here(blob)


def to_bytes(tree) -> bytes:
  """A pytree of dicts / lists / arrays / JSON values as msgpack bytes."""
  return serialization.msgpack_serialize(jax.tree_util.tree_map(
      lambda a: np.asarray(a) if isinstance(a, (jax.Array, np.ndarray)) else a,
      jax.device_get(tree)))


def from_bytes(blob: bytes):
  return serialization.msgpack_restore(blob)


def broadcast_tree(tree):
  """Process 0's pytree (dicts of arrays / JSON values) on every process."""
  if process_count() == 1:
    return tree
  return from_bytes(broadcast_bytes(to_bytes(tree) if process_index() == 0
                                    else b''))


def allgather_tree(tree) -> list:
  """Every process's pytree, in process order."""
  if process_count() == 1:
    return [tree]
  return [from_bytes(b) for b in allgather_bytes(to_bytes(tree))]


# ----------------------------------------------------------------- training


def gather_groups(groups, extra=None):
  """Every process's trained (partial) `StudentGroup`s merged into the full
  groups, on every process (a collective).

  Groups are matched by (spec, out_dim), which `assemble.group_students`
  makes unique; members are stacked in increasing id order, as one process
  grouping all students would. `extra`: a dict {str: JSON value} from each
  process (e.g. per-member validation MSE), merged into one. Returns
  (groups, merged extra).
  """
  def key(g):
    return f'{g.spec}|{g.out_dim}'
  mine = {'groups': {key(g): {
      'describe': g.describe(),
      'members': {str(m): jax.tree_util.tree_map(
          lambda a, i=i: np.asarray(a[i]), g.variables)
                  for i, m in enumerate(g.member_ids)}} for g in groups},
          'extra': dict(extra or {})}
  merged, extras = {}, {}
  for part in allgather_tree(mine):
    for k, g in part['groups'].items():
      entry = merged.setdefault(k, {'describe': g['describe'], 'members': {}})
      entry['members'].update(g['members'])
    extras.update(part['extra'])
  out = []
  for entry in merged.values():
    ids = sorted(int(m) for m in entry['members'])
    group = assemble.StudentGroup(**dict(entry['describe'], member_ids=ids))
    group.variables = jax.tree_util.tree_map(
        lambda *xs: np.stack(xs), *[entry['members'][str(m)] for m in ids])
    out.append(group)
  out.sort(key=lambda g: g.member_ids[0])
  return out, extras


# ---------------------------------------------------------------- inference


def local_part(tcn, process_id=None, num_processes=None):
  """The TCN restricted to this process's students (no PCA basis)."""
  k = process_index() if process_id is None else process_id
  p = process_count() if num_processes is None else num_processes
  mine = set(share(tcn.num_students, k, p))
  groups = []
  for g in tcn.groups:
    idx = [i for i, m in enumerate(g.member_ids) if m in mine]
    if idx:
      part = dataclasses.replace(g, member_ids=[g.member_ids[i] for i in idx])
      part.variables = jax.tree_util.tree_map(
          lambda a, idx=np.array(idx): np.asarray(a)[idx], g.variables)
      groups.append(part)
  return dataclasses.replace(tcn, groups=groups, basis=None)


def make_predict(tcn, strategy='auto'):
  """`predict(images) -> logits` (numpy) with the students split over the
  processes: each runs its own on `images`, the (batch, chunk) outputs are
  gathered and concatenated in chunk order, and the head runs on them in
  every process. A collective: every process calls it with the same images.
  """
  k, p = process_index(), process_count()
  if p == 1:
    whole = assemble.make_predict(tcn, strategy)
    return lambda x: np.asarray(whole(x))
  widths = {m: g.out_dim for g in tcn.groups for m in g.member_ids}
  per_process = [sum(widths[m] for m in share(tcn.num_students, q, p))
                 for q in range(p)]
  local = local_part(tcn, k, p)
  outputs = assemble.student_outputs_fn(local, strategy)
  students = [g.variables for g in local.groups]
  head = assemble.tcn_head(tcn)
  head_variables, chunker = tcn.head_variables, tcn.chunker

  @jax.jit
  def finish(parts):
    return head.apply(head_variables,
                      chunker.decode(jnp.concatenate(parts, axis=-1)))

  def predict(x):
    out = np.asarray(outputs(students, x), np.float32)
    out = np.pad(out, ((0, 0), (0, max(per_process) - out.shape[1])))
    parts = [np.frombuffer(b, np.float32).reshape(len(x), -1)[:, :w]
             for b, w in zip(allgather_bytes(out.tobytes(), fast=True),
                             per_process)]
    return np.asarray(finish(parts))

  return predict

