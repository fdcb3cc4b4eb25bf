"""Check: Orbax checkpoints on per-host local (non-shared) storage.

  python -m experiments.orbax_local_storage

Two jax.distributed CPU processes on localhost (Gloo), one device each, save
a state (an array sharded over both devices and a replicated one) with a
plain `CheckpointManager` and `MultiprocessingOptions(primary_host=None)`
(every process primary), each into its OWN directory (standing for a disk
that no other host can read), then restore it on the same mesh. A third,
single process then restores process 0's directory alone (another mesh:
one device). Writes experiments/results/orbax_local_storage.{md,json}.
See docs/distributed.md, "Storage".
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

OUT = os.path.join(os.path.dirname(__file__), 'results', 'orbax_local_storage')
VALUE = [[0., 1., 2.], [3., 4., 5.], [6., 7., 8.], [9., 10., 11.]]


def _state_template():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {'x': jax.ShapeDtypeStruct((4, 3), np.float32),
          'w': jax.ShapeDtypeStruct((3,), np.float32)}


def _files(directory):
  return sorted(os.path.relpath(os.path.join(r, f), directory)
                for r, _, fs in os.walk(directory) for f in fs)


def worker(pid, port, root):
  """One of the two processes: save into root/host<pid>, restore, compare."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(f'localhost:{port}', 2, pid)
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import
  mesh = Mesh(np.array(jax.devices()), ('d',))
  value = np.array(VALUE, np.float32)
  state = {'x': jax.make_array_from_callback(
      (4, 3), NamedSharding(mesh, P('d')), lambda i: value[i]),
           'w': jax.make_array_from_callback(
               (3,), NamedSharding(mesh, P()), lambda i: np.ones(3, np.float32)[i])}
  local = ocp.options.MultiprocessingOptions(primary_host=None)
  # Every process writes its own shards and its own metadata.
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(
          primary_host=None, replica_id=None, use_replica_parallel=False)))
  directory = os.path.join(root, f'host{pid}')
  out = {'process': pid}
  try:
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            multiprocessing_options=local,
            enable_per_process_directory_creation=True,
            enable_async_checkpointing=False, create=True),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(
            multiprocessing_options=local, type_handler_registry=registry)})
    manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
    out['files'] = _files(directory)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    got = manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils
            .construct_restore_args(abstract)))).state
    out['restored_equal'] = all(
        np.array_equal(np.asarray(a.addressable_data(0)),
                       np.asarray(b.addressable_data(0)))
        for a, b in zip(jax.tree_util.tree_leaves(got),
                        jax.tree_util.tree_leaves(state)))
    manager.close()
  except Exception as e:  # pylint: disable=broad-except
    out['error'] = f'{type(e).__name__}: {str(e)[:300]}'
  print('RESULT ' + json.dumps(out), flush=True)


def restore_alone(root):
  """Process 0's local directory restored by one process on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = _state_template()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      abstract)
  out = {}
  try:
    manager = ocp.CheckpointManager(
        os.path.join(root, 'host0'),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={'state': ocp.PyTreeCheckpointHandler()})
    got = manager.restore(1, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils
            .construct_restore_args(abstract)))).state
    out['restored_equal'] = bool(np.array_equal(np.asarray(got['x']), VALUE))
  except Exception as e:  # pylint: disable=broad-except
    text = f'{e} {e.__cause__}'
    missing = re.search(r'NOT_FOUND: chunk [^\n]*? is missing', text)
    out['error'] = (missing.group(0) if missing
                    else f'{type(e).__name__}: {text[:300]}')
  print('RESULT ' + json.dumps(out), flush=True)


def _result(text):
  lines = [l for l in text.splitlines() if l.startswith('RESULT ')]
  return json.loads(lines[-1][7:]) if lines else {'error': text[-500:]}


def main():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(prefix='orbax_local_')
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = lambda code: subprocess.Popen(  # pylint: disable=unnecessary-lambda-assignment
      [sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [run(f'from experiments import orbax_local_storage as m; '
               f'm.worker({k}, {port}, {root!r})') for k in (0, 1)]
  hosts = [_result(p.communicate(timeout=300)[0]) for p in procs]
  alone = run(f'from experiments import orbax_local_storage as m; '
              f'm.restore_alone({root!r})')
  result = {'command': 'python -m experiments.orbax_local_storage',
            'orbax': ocp.__version__, 'jax': jax.__version__,
            'two_processes_own_directories': hosts,
            'one_process_restores_host0': _result(
                alone.communicate(timeout=300)[0])}
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  ok = lambda r: 'yes' if r.get('restored_equal') else f"no: {r.get('error')}"  # pylint: disable=unnecessary-lambda-assignment
  with open(OUT + '.md', 'w') as f:
    f.write(f"""# Orbax on per-host local storage

`{result['command']}` (orbax-checkpoint {result['orbax']}, jax {result['jax']},
2 CPU processes on localhost, one device each).

| check | restored equal |
|---|---|
| process 0 saves into its own directory (primary_host=None), restores on the same mesh | {ok(hosts[0])} |
| process 1 likewise | {ok(hosts[1])} |
| one process restores process 0's directory alone (another mesh) | {ok(result['one_process_restores_host0'])} |

Files in process 0's directory: {', '.join(hosts[0].get('files', [])[:6])}, ...
(its own shards only, `ocdbt.process_0`, and its own metadata).
""")
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
