"""Several processes, one program: `jax.distributed` and a global mesh.

P processes (one per host, or several on one host) join `jax.distributed`
(`initialize`; on CPU the collectives go over Gloo) and then run the same
program: `jax.devices()` lists every process's devices, the run's
`tcn_jax.mesh` spans them all, each process feeds only its own devices'
rows of every batch, and Orbax checkpoints the global arrays from every
process, each writing its own shards (`tcn_jax.checkpoint`). Process 0 alone
writes the workdir's JSON files, features cache, TensorBoard events and
results; everything else is collective.

This module holds what is not an array program: joining, the config check
across processes, and moving small host values (the config, the shared
student inputs) with `jax.experimental.multihost_utils`.
"""
import json
import os
import re
import socket
import sys
import threading
import time

import jax
import numpy as np
from flax import serialization

from tcn_jax.errors import TCNError

# How long (s) to wait for every process to join.
JOIN_TIMEOUT = 300
# How long (s) process 0 waits at shutdown for the others to finish.
SHUTDOWN_TIMEOUT = 3600


def validate(section, num_students=None):
  """Checks config.distributed (num_processes, process_id, coordinator,
  timeout_s), failing with one line that names the field. num_processes=0
  (auto): the cluster (SLURM, Cloud TPU, Kubernetes, ...) says, as
  `jax.distributed.initialize()` detects it."""
  del num_students   # Processes no longer need a student each.
  if section is None:
    return
  p, k, coord = (section.get(f) for f in
                 ('num_processes', 'process_id', 'coordinator'))
  timeout = section.get('timeout_s', JOIN_TIMEOUT)
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)
  if not is_int(p) or p < 0:
    raise TCNError('config.distributed.num_processes must be an integer '
                   f'>= 1, or 0 to detect the cluster (SLURM, Cloud TPU, '
                   f'Kubernetes), got {p!r}')
  if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
          and 0 < timeout <= 86400):
    raise TCNError('config.distributed.timeout_s must be a number of seconds '
                   f'in (0, 86400], got {timeout!r}')
  if p == 0:
    if k != 0 or coord:
      raise TCNError('config.distributed.num_processes=0 detects the '
                     'cluster: leave config.distributed.process_id (0) and '
                     'coordinator (\'\') unset')
    return
  if not is_int(k) or not 0 <= k < p:
    raise TCNError('config.distributed.process_id must be an integer in '
                   f'[0, num_processes={p}), got {k!r}')
  if p > 1 and not (isinstance(coord, str)
                    and re.fullmatch(r'[^\s:]+:\d{1,5}', coord)
                    and 0 < int(coord.rsplit(':', 1)[1]) < 65536):
    raise TCNError('config.distributed.coordinator must be host:port (the '
                   f'address of process 0) when num_processes > 1, got '
                   f'{coord!r}')


def _reachable(coordinator: str, deadline: float) -> bool:
  """Whether something listens at `coordinator` ('host:port') before
  `deadline` (time.time()); tries again every half second (process 0 may
  start later than this one)."""
  host, port = coordinator.rsplit(':', 1)
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(
          5.0, max(0.1, deadline - time.time()))):
        return True
    except OSError:
      if time.time() + 0.5 >= deadline:
        return False
      time.sleep(0.5)


def _detected():
  """(cluster name, coordinator or '', process id or -1) of the cluster JAX
  detects from the environment; ('', '', -1) when none. Only SLURM's are
  read here (the others may query a metadata server)."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    try:
      if env.is_env_present():
        coordinator, process = '', -1
        if env.name == 'slurm':
          coordinator = env.get_coordinator_address(None, None)
          process = env.get_process_id()
        # JAX's Kubernetes cluster has no name (''): its class name then.
        return env.name or env.__name__, coordinator, process
    except Exception:  # pylint: disable=broad-except  (a foreign cluster's)
      continue
  return '', '', -1


def _watchdog(seconds: float, line: str) -> threading.Timer:
  """After `seconds`, prints `error: <line>` and ends the process with exit
  code 2: XLA aborts a join that times out (SIGABRT, a C++ stack) from
  inside the call, where no exception can be caught."""
  def fire():
    print(f'error: {line}', file=sys.stderr, flush=True)
    os._exit(2)   # pylint: disable=protected-access
  timer = threading.Timer(seconds, fire)
  timer.daemon = True
  timer.start()
  return timer


def _joined() -> bool:
  return jax._src.distributed.global_state.client is not None  # pylint: disable=protected-access


def initialize(num_processes: int = 1, process_id: int = 0,
               coordinator: str = '', timeout: float = JOIN_TIMEOUT) -> bool:
  """Joins the run as `process_id` of `num_processes` (before any other JAX
  call of this process); `coordinator` is 'host:port' of process 0, which
  serves it. num_processes=0: `jax.distributed.initialize()` with no
  addresses, the cluster (SLURM, Cloud TPU, Kubernetes) detected from the
  environment. CPU collectives use Gloo. One process: nothing to do.

  The join is bounded by `timeout` seconds (config.distributed.timeout_s):
  a process > 0 first waits that long for the coordinator to listen, then
  every process for the others; past it, one `error:` line naming the
  coordinator and exit code 2.

  Returns:
    Whether it joined.
  """
  validate({'num_processes': num_processes, 'process_id': process_id,
            'coordinator': coordinator, 'timeout_s': timeout})
  if num_processes == 1:
    return False
  auto = num_processes == 0
  if _joined():
    if not auto and (jax.process_count(), jax.process_index()) != (
        num_processes, process_id):
      raise TCNError(f'this Python process already joined as process '
                     f'{jax.process_index()} of {jax.process_count()}; '
                     'config.distributed asks for another')
    return True
  kwargs = {}
  if auto:
    cluster, coordinator, process_id = _detected()
    if not cluster:
      raise TCNError('config.distributed.num_processes=0 detects the cluster '
                     'from its environment, but none was found (SLURM, Cloud '
                     'TPU, Kubernetes, MPI); give num_processes, process_id '
                     'and coordinator')
    who = f'the {cluster} cluster\'s coordinator {coordinator or "(detected)"}'
  else:
    kwargs = dict(coordinator_address=coordinator,
                  num_processes=num_processes, process_id=process_id)
    who = f'{coordinator} as process {process_id} of {num_processes}'
  deadline = time.time() + timeout
  if coordinator and process_id > 0 and not _reachable(
      coordinator, deadline):
    raise TCNError(f'cannot join {who} (config.distributed): nothing '
                   f'listens at {coordinator} after {timeout:g} s '
                   '(config.distributed.timeout_s); is process 0 running, '
                   'and is the address right?')
  left = max(1.0, deadline - time.time())
  dog = _watchdog(left, f'cannot join {who} (config.distributed): not every '
                  f'process joined within {timeout:g} s '
                  '(config.distributed.timeout_s)')
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        **kwargs, initialization_timeout=int(left) + 30,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
  except Exception as e:  # pylint: disable=broad-except  (XLA raises several)
    line = (str(e).strip().splitlines() or [repr(e)])[0][:200]
    raise TCNError(f'cannot join {who} (config.distributed): {line}'
                   ) from None
  finally:
    dog.cancel()
  return True


def lost_peer(error: BaseException) -> str:
  """One line for a collective that failed because another process is gone
  (killed, crashed): names the processes the coordinator no longer sees
  (asked with a bound of a few seconds; with 2 processes, the other), else
  says a peer was lost."""
  n = jax.process_count()
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  dead = []
  def ask():
    try:
      live = client.get_live_nodes(list(range(n)))
      dead.extend(sorted(set(range(n)) - set(live)))
    except Exception:  # pylint: disable=broad-except  (the coordinator gone)
      dead.append(0 if jax.process_index() else -1)
  if client is not None:
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(5)
  dead = [k for k in dead if k >= 0 and k != jax.process_index()]
  if not dead and n == 2:   # Not yet missed by the coordinator: the other.
    dead = [1 - jax.process_index()]
  who = (f'process{"es" if len(dead) > 1 else ""} '
         f'{", ".join(map(str, dead))}' if dead else 'another process')
  cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return (f'process {jax.process_index()} of {n} lost {who} (it stopped or '
          f'crashed): {cause[:160]}; rerun every process with the same '
          'command to resume')


def shutdown():
  """Leaves the run (waits for every process to leave)."""
  if _joined():
    jax.distributed.shutdown()


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


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


def allgather_bytes(blob: bytes) -> list[bytes]:
  """Every process's `blob`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [blob]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = np.asarray(multihost_utils.process_allgather(
      np.array([len(blob)], np.int64))).reshape(-1)
  buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
  buf[:len(blob)] = np.frombuffer(blob, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [rows[p, :int(s)].tobytes() for p, s in enumerate(sizes)]


def broadcast_bytes(blob: bytes) -> bytes:
  """Process 0's `blob` on every process (the others' is ignored)."""
  if jax.process_count() == 1:
    return blob
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  size = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.array([len(blob) if first else 0], np.int64)))[0])
  buf = np.zeros(max(size, 1), np.uint8)
  if first:
    buf[:size] = np.frombuffer(blob, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf))[:size].tobytes()


def broadcast_tree(tree):
  """Process 0's pytree (dicts of arrays / JSON values) on every process."""
  if jax.process_count() == 1:
    return tree
  blob = b''
  if jax.process_index() == 0:
    blob = serialization.msgpack_serialize(jax.tree_util.tree_map(
        lambda a: np.asarray(a) if isinstance(a, (jax.Array, np.ndarray))
        else a, jax.device_get(tree)))
  return serialization.msgpack_restore(broadcast_bytes(blob))
