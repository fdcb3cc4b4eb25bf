"""Two local `jax.distributed` CPU processes (Gloo) running one program over
a global ('data', 'students') mesh equal one process, in memory and
streamed (each process reading its own rows); a process killed inside a
streamed students epoch resumes from the multi-host Orbax step checkpoint."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import needs_fmnist
from helpers import ROOT
from helpers import SMOKE
from helpers import TINY_FLAGS
from tcn_jax import assemble
from tcn_jax import distributed
from tcn_jax.errors import TCNError

# The students axis spans the two processes: student i trains in process i,
# the teacher and the head data-parallel over both.
FLAGS = [f'--config={SMOKE}', *TINY_FLAGS, '--config.mesh.data=1',
         '--config.mesh.students=2']

# The streamed runs: an image folder read through Grain, the 'data' axis
# over the two processes (each decodes only its half of every batch), a step
# checkpoint every 3 steps.
STREAMED = ['--config.data.streaming=always', '--config.data.val_fraction=0.1',
            '--config.data.checkpoint_every_steps=3',
            '--config.num_students=2', '--config.teacher.body=C4 MP F D16r',
            '--config.students.arch=C4 MP F D8r', '--config.teacher.epochs=1',
            '--config.students.epochs=1', '--config.head.epochs=1',
            *(f'--config.{s}.batch_size=4'
              for s in ('teacher', 'students', 'head'))]
DATA2 = ['--config.mesh.data=2', '--config.mesh.students=1']

# Process 1 of the killed run: SIGKILLs itself once the students' first step
# checkpoint (inside epoch 1) is written.
_DIE_IN_STUDENTS_EPOCH_1 = '''
import os, runpy, signal, sys
from tcn_jax import checkpoint
save = checkpoint.StageCheckpoint.save
def save_then_die(self, epoch, state, record):
  save(self, epoch, state, record)
  if '/students/' in self.directory and self.directory.endswith('steps'):
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.StageCheckpoint.save = save_then_die
sys.argv = ['tcn_jax.main'] + sys.argv[1:]
runpy.run_module('tcn_jax.main', run_name='__main__')
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(workdir, die=False, timeout=300, flags=None):
  """Runs the two processes; returns [(returncode, log)]. With `die`,
  process 1 kills itself in the students stage and process 0, left waiting
  in a collective, is killed too."""
  port = _free_port()
  procs = []
  for k in range(2):
    head = ([sys.executable, '-c', _DIE_IN_STUDENTS_EPOCH_1]
            if die and k == 1 else [sys.executable, '-m', 'tcn_jax.main'])
    procs.append(subprocess.Popen(
        head + (flags or FLAGS) + [f'--workdir={workdir}',
                        '--config.distributed.num_processes=2',
                        f'--config.distributed.process_id={k}',
                        f'--config.distributed.coordinator=localhost:{port}'],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_PLATFORMS='cpu')))
  outs = []
  try:
    if die:
      procs[1].wait(timeout=timeout)
      time.sleep(1)
      procs[0].kill()
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      outs.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return outs


def _variables(workdir):
  _, tcn = assemble.load_tcn(os.path.join(workdir, 'tcn'))
  return jax.tree_util.tree_leaves([g.variables for g in tcn.groups]
                                   + [tcn.head_variables])


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('two') / 'run')
  for rc, log in _launch(workdir):
    assert rc == 0, log[-3000:]
  return workdir


@pytest.mark.slow
@needs_fmnist
def test_two_processes_equal_one(two_processes, tiny_run):
  two = _results(two_processes)
  assert two['mesh'] == {'data': 1, 'students': 2, 'devices': 2,
                         'processes': 2}
  assert two['distributed'] == {'num_processes': 2}
  # Every process wrote its own shards of the students' state.
  state = os.path.join(two_processes, 'students', 'group0', '2', 'state')
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(os.listdir(state))
  assert not os.path.exists(os.path.join(two_processes, 'process1'))

  one = tiny_run.results   # pipeline.run(tiny_config()) in this process.
  assert one['mesh']['devices'] == 1
  # The teacher and head sum their gradients over the two processes in
  # another order than one process does: equal to float32 rounding (the
  # digests differ), and the metrics equal.
  for a, b in zip(_variables(two_processes), _variables(tiny_run.workdir)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for key in ('teacher_test_acc', 'tcn_test_acc_after_finetune'):
    assert two[key] == one[key], key
  np.testing.assert_allclose(two['student_val_mse'], one['student_val_mse'],
                             rtol=1e-5)


@pytest.fixture(scope='module')
def streamed(tmp_path_factory):
  """(flags, one-process workdir, two-process workdir) of a streamed run."""
  from test_resume import _image_folder   # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('streamed')
  _image_folder(str(root / 'images'))
  flags = [f'--config={os.path.join(ROOT, "configs/image_folder.py:smoke")}',
           f'--config.data.dir={root / "images"}', *STREAMED]
  one, two = str(root / 'one'), str(root / 'two')
  run = subprocess.run([sys.executable, '-m', 'tcn_jax.main',
                        f'--workdir={one}', *flags], cwd=ROOT, text=True,
                       capture_output=True, env=dict(os.environ,
                                                     JAX_PLATFORMS='cpu'))
  assert run.returncode == 0, run.stderr[-3000:]
  for rc, log in _launch(two, flags=flags + DATA2):
    assert rc == 0, log[-3000:]
  return flags, one, two


@pytest.mark.slow
def test_two_processes_stream_their_own_rows(streamed):
  """A streamed image folder on a mesh whose 'data' axis spans the two
  processes (each decodes and feeds only its half of every batch) trains
  what one process trains."""
  _, one, two = streamed
  assert _results(two)['mesh']['data'] == 2
  # Gradients summed over two processes: equal to float32 rounding.
  for a, b in zip(_variables(two), _variables(one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  for key in ('teacher_test_acc', 'tcn_test_acc_after_finetune'):
    assert _results(two)[key] == _results(one)[key], key


@pytest.mark.slow
def test_killed_process_resumes_from_multihost_checkpoint(streamed, tmp_path):
  """SIGKILL of one process inside the students' streamed epoch: the rerun
  of both resumes at the multi-host step checkpoint (state and iterator
  position) and ends bitwise where the uninterrupted run did."""
  flags, _, two = streamed
  workdir = str(tmp_path / 'run')
  (rc0, _), (rc1, log1) = _launch(workdir, die=True, flags=flags + DATA2)
  # Process 0 is killed, or has already left with its one line (lost peer).
  assert rc0 in (-9, 2) and rc1 == -9, log1[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  outs = _launch(workdir, flags=flags + DATA2)
  for rc, log in outs:
    assert rc == 0, log[-3000:]
    assert '[teacher] resuming after epoch 1/1' in log   # Finished.
    assert '[students[0,1]] resuming epoch 1 at step 3' in log, log[-3000:]
  assert _results(workdir)['digests'] == _results(two)['digests']


@pytest.mark.parametrize('section,field', [
    ({'num_processes': -1, 'process_id': 0, 'coordinator': ''},
     'num_processes'),
    ({'num_processes': 0, 'process_id': 1, 'coordinator': ''},
     'num_processes'),
    ({'num_processes': 2, 'process_id': 0, 'coordinator': 'h:1',
      'timeout_s': 0}, 'timeout_s'),
    ({'num_processes': 2, 'process_id': 2, 'coordinator': 'h:1'},
     'process_id'),
    ({'num_processes': 2, 'process_id': -1, 'coordinator': 'h:1'},
     'process_id'),
    ({'num_processes': 2, 'process_id': 0, 'coordinator': ''},
     'coordinator'),
    ({'num_processes': 2, 'process_id': 0, 'coordinator': 'localhost'},
     'coordinator'),
    ({'num_processes': 2, 'process_id': 0, 'coordinator': 'h:99999'},
     'coordinator'),
])
def test_bad_distributed_fields_name_the_field(section, field):
  with pytest.raises(TCNError, match=f'config.distributed.{field}') as e:
    distributed.validate(section, num_students=4)
  assert '\n' not in str(e.value)
