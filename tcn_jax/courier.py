"""The bytes transport between the processes of a distributed run.

`jax.distributed` joins the processes; `jax.experimental.multihost_utils`
(`process_allgather`, `broadcast_one_to_all`; Gloo on CPU) moves bytes. By
default a small CPU-only child process, the courier (`python -m
tcn_jax.courier`), is this process's `jax.distributed` member and carries its
collectives over two pipes, so the training process stays a single-process
JAX runtime whose Orbax checkpoints work per process (see
`tcn_jax.distributed`).
"""
import itertools
import os
import struct
import subprocess
import sys
import tempfile

import jax
import numpy as np

from tcn_jax.errors import TCNError

# How long (s) to wait for all processes to join, and for the others at
# shutdown (process 0 fine-tunes the head while the others wait there).
JOIN_TIMEOUT = 300
SHUTDOWN_TIMEOUT = 7 * 24 * 3600
BARRIER_TIMEOUT = 7 * 24 * 3600   # Before each training-time collective.


def join(num_processes, process_id, coordinator, timeout):
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes,
      process_id=process_id, initialization_timeout=timeout,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)


def join_error(coordinator, process_id, num_processes, e):
  line = (str(e).strip().splitlines() or [repr(e)])[0][:200]
  return (f'cannot join {coordinator} as process {process_id} of '
          f'{num_processes} (config.distributed): {line}')


def allgather_here(blob, same_size=False):
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


def broadcast_here(blob):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.array([len(blob) if first else 0], np.int64)))[0])
  buf = np.zeros(max(size, 1), np.uint8)
  if first:
    buf[:size] = np.frombuffer(blob, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes()


class Courier:
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
        [sys.executable, '-m', 'tcn_jax.courier', str(to_r), str(from_w),
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
  """`python -m tcn_jax.courier IN OUT P K COORDINATOR TIMEOUT`."""
  in_fd, out_fd, p, k, coordinator, timeout = argv
  recv, send = os.fdopen(int(in_fd), 'rb'), os.fdopen(int(out_fd), 'wb')

  def reply(op, payload=b''):
    send.write(op + struct.pack('<Q', len(payload)) + payload)
    send.flush()

  try:
    join(int(p), int(k), coordinator, int(timeout))
  except Exception as e:  # pylint: disable=broad-except
    reply(b'E', join_error(coordinator, k, p, e).split(': ', 1)[1].encode())
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
        for part in allgather_here(payload, same_size=op == b'F'):
          reply(b'D', part)
      elif op == b'B':
        reply(b'D', broadcast_here(payload))
      elif op == b'Q':
        jax.distributed.shutdown()
        reply(b'D')
        return 0
    except Exception as e:  # pylint: disable=broad-except
      reply(b'E', (str(e).strip().splitlines() or [repr(e)])[0][:300]
            .encode())
      return 1


if __name__ == '__main__':
  sys.exit(_courier_main(sys.argv[1:]))
