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
tcn_jax.distributed`) that the training process talks to over two pipes:
the training process itself stays a single-process JAX runtime with its own
devices. That is needed for checkpoints: once `jax.distributed` is
initialized, Orbax (0.12.8) treats every save as a multi-host one and
refuses process-local state (host-local `jax.Array`s are rejected, numpy
arrays are written only by process 0, and the processes' save signals share
keys), while every stage of the pipeline checkpoints per process.
`courier=False` joins in this process instead (no Orbax use then).
"""
import dataclasses
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from tcn_jax import assemble
from tcn_jax.errors import TCNError

# How long (s) to wait for all processes to join, and for the others at
# shutdown (process 0 fine-tunes the head while the others wait there).
JOIN_TIMEOUT = 300
SHUTDOWN_TIMEOUT = 7 * 24 * 3600
BARRIER_TIMEOUT = 7 * 24 * 3600   # Before each training-time collective.

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
               coordinator: str = '', timeout: int = JOIN_TIMEOUT,
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
    _COURIER = _Courier(num_processes, process_id, coordinator, timeout)
    return True
  try:
    _join(num_processes, process_id, coordinator, timeout)
  except Exception as e:  # pylint: disable=broad-except  (XLA raises several)
    raise TCNError(_join_error(coordinator, process_id, num_processes,
                               e)) from None
  return True


def _join(num_processes, process_id, coordinator, timeout):
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes,
      process_id=process_id, initialization_timeout=timeout,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)


def _join_error(coordinator, process_id, num_processes, e):
  line = (str(e).strip().splitlines() or [repr(e)])[0][:200]
  return (f'cannot join {coordinator} as process {process_id} of '
          f'{num_processes} (config.distributed): {line}')


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
  return _allgather_here(blob, fast)


def broadcast_bytes(blob: bytes) -> bytes:
  """Process 0's `blob` on every process (the others' is ignored)."""
  if _COURIER is not None:
    return _COURIER.call(b'B', blob if process_index() == 0 else b'')[0]
  if jax.process_count() == 1:
    return blob
  return _broadcast_here(blob)


def _allgather_here(blob, same_size=False):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if same_size:
    rows = np.asarray(multihost_utils.process_allgather(
        np.frombuffer(blob, np.uint8)))
    return [row.tobytes() for row in rows]
  sizes = np.asarray(multihost_utils.process_allgather(
      np.array([len(blob)], np.int64))).reshape(-1)
  buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buf[:len(blob)] = np.frombuffer(blob, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [rows[p, :int(s)].tobytes() for p, s in enumerate(sizes)]


def _broadcast_here(blob):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.array([len(blob) if first else 0], np.int64)))[0])
  buf = np.zeros(max(size, 1), np.uint8)
  if first:
    buf[:size] = np.frombuffer(blob, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes()


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


class _Courier:
  """A child process that is this process's member of `jax.distributed`.

  Frames on two pipes: op (1 byte) + length (8 bytes) + payload. Requests:
  A (allgather: P frames back), B (broadcast: 1 frame back), both after a
  barrier of all processes; F (allgather of equal-size blobs without the
  barrier, for inference, where the processes run in step); Q (leave).
  The courier answers E + message on failure; it leaves the run when its
  pipe closes (this process exited or was killed).
  """

  def __init__(self, num_processes, process_id, coordinator, timeout):
    self.num_processes, self.process_id = num_processes, process_id
    self.coordinator = coordinator
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    self.log = tempfile.NamedTemporaryFile(prefix='tcn_courier_',
                                           suffix='.log', delete=False)
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)   # No forced host devices: one is enough.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = os.pathsep.join(
        [root] + [p for p in [env.get('PYTHONPATH')] if p])
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'tcn_jax.distributed', str(to_r), str(from_w),
         str(num_processes), str(process_id), coordinator, str(timeout)],
        pass_fds=(to_r, from_w), env=env, stdin=subprocess.DEVNULL,
        stdout=self.log, stderr=self.log)
    os.close(to_r)
    os.close(from_w)
    self.send = os.fdopen(to_w, 'wb')
    self.recv = os.fdopen(from_r, 'rb')
    op, payload = self._read()   # R once joined, E + why not.
    if op != b'R':
      self._fail(payload.decode(errors='replace'))

  def _read(self):
    head = self.recv.read(9)
    if len(head) < 9:
      return b'E', self._last_log_line().encode()
    op, size = head[:1], struct.unpack('<Q', head[1:])[0]
    payload = self.recv.read(size)
    if len(payload) < size:
      return b'E', self._last_log_line().encode()
    return op, payload

  def _last_log_line(self):
    self.proc.wait(timeout=60)
    with open(self.log.name, errors='replace') as f:
      lines = [l.strip() for l in f if l.strip() and not l.startswith('@')]
    # XLA's coordination client aborts its process on a fatal error (a peer
    # died, the coordinator is unreachable), logging an absl::Status.
    why = [l.split('absl::Status: ', 1)[1] for l in lines
           if 'absl::Status: ' in l]
    why += [l for l in lines if l.startswith('RPC: ')][-1:]
    if not why:
      why = ([l for l in lines if 'Error' in l] or lines or ['no output'])[-1:]
    return (f'the courier process (its jax.distributed member) exited with '
            f'code {self.proc.returncode}: {"; ".join(why)[:300]}')

  def _fail(self, why):
    try:   # The courier is gone or going; its log has been read.
      self.proc.wait(timeout=60)
      os.unlink(self.log.name)
    except (OSError, subprocess.TimeoutExpired):
      pass
    raise TCNError(f'process {self.process_id} of {self.num_processes} '
                   f'(coordinator {self.coordinator}, config.distributed): '
                   f'{why}')

  def call(self, op, payload=b''):
    try:
      self.send.write(op + struct.pack('<Q', len(payload)) + payload)
      self.send.flush()
    except BrokenPipeError:
      self._fail(self._last_log_line())
    frames = []
    for _ in range(self.num_processes if op in (b'A', b'F') else 1):
      got, data = self._read()
      if got == b'E':
        self._fail(data.decode(errors='replace'))
      frames.append(data)
    return frames

  def close(self):
    try:
      self.call(b'Q')
    finally:
      self.send.close()
      self.recv.close()
      self.proc.wait()
      os.unlink(self.log.name)


def _courier_main(argv):
  """`python -m tcn_jax.distributed IN OUT P K COORDINATOR TIMEOUT`."""
  in_fd, out_fd, p, k, coordinator, timeout = argv
  recv, send = os.fdopen(int(in_fd), 'rb'), os.fdopen(int(out_fd), 'wb')

  def reply(op, payload=b''):
    send.write(op + struct.pack('<Q', len(payload)) + payload)
    send.flush()

  try:
    _join(int(p), int(k), coordinator, int(timeout))
  except Exception as e:  # pylint: disable=broad-except
    reply(b'E', _join_error(coordinator, k, p, e).split(': ', 1)[1].encode())
    return 1
  reply(b'R')
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  for seq in itertools.count():
    head = recv.read(9)
    if len(head) < 9:
      # The training process is gone (an error, a kill): leave at once; the
      # coordination service then fails the other processes' couriers.
      os._exit(1)  # pylint: disable=protected-access
    op, size = head[:1], struct.unpack('<Q', head[1:])[0]
    payload = recv.read(size)
    try:
      if op in (b'A', b'B'):
        # Everyone arrives first: a collective may wait for hours here (a
        # teacher training on process 0), longer than Gloo's own timeout.
        client.wait_at_barrier(f'tcn_jax_{seq}', BARRIER_TIMEOUT * 1000)
      if op in (b'A', b'F'):
        for part in _allgather_here(payload, same_size=op == b'F'):
          reply(b'D', part)
      elif op == b'B':
        reply(b'D', _broadcast_here(payload))
      elif op == b'Q':
        jax.distributed.shutdown()
        reply(b'D')
        return 0
    except Exception as e:  # pylint: disable=broad-except
      reply(b'E', (str(e).strip().splitlines() or [repr(e)])[0][:300]
            .encode())
      return 1


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


if __name__ == '__main__':
  sys.exit(_courier_main(sys.argv[1:]))
