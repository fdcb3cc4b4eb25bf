"""Students split over 2 local JAX processes (tcn_jax.distributed).

Each test launches two `jax.distributed` CPU processes on localhost (a free
port) and compares what they produce with one process doing all the work.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import needs_fmnist
from conftest import ROOT
from conftest import SMOKE
from conftest import TINY_FLAGS
from tcn_jax import assemble
from tcn_jax import distributed
from tcn_jax import models
from tcn_jax import students
from tcn_jax.errors import TCNError

# 16-d features in 3 chunks (6, 5, 5): groups (A, 6) = [0] and (A, 5) = [1, 2];
# with 2 processes process 0 trains [0, 1] and process 1 trains [2], so the
# group (A, 5) is split between the processes.
N, D, CLASSES = 3, 16, 10
SPEC = 'C4 MP F D8r'
TRAIN_KW = dict(epochs=2, batch_size=50, seed=5, learning_rate=1e-2)


def _data():
  rng = np.random.default_rng(0)
  x = rng.random((200, 12, 12, 1), np.float32)
  feats = np.maximum(rng.standard_normal((200, D)), 0).astype(np.float32)
  x_val, f_val = np.minimum(x[:40] + 0.1, 1), feats[:40]   # In [0, 1].
  x_test = rng.random((24, 12, 12, 1), np.float32)
  return x, feats, (x_val, f_val), x_test


def _head_variables():
  head = models.Head(CLASSES, 0.5)
  return head.init(jax.random.key(1), np.zeros((1, D), np.float32))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(args_for, timeout=240):
  """Runs two processes (argv from args_for(k, port)); returns their outputs
  (returncode, stdout, stderr), killing both if one hangs."""
  port = _free_port()
  procs = [subprocess.Popen(args_for(k, port), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'))
           for k in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  return outs


def _worker(k, port, out):
  """One of the two processes: trains its share, gathers, saves the TCN
  (process 0) and runs distributed inference on the test batch."""
  jax.config.update('jax_default_matmul_precision', 'highest')
  distributed.initialize(2, k, f'localhost:{port}')
  x, feats, val, x_test = _data()
  groups, info = students.train_share(
      SPEC, x, feats, N, val=val, workdir=os.path.join(out, 'run'),
      **TRAIN_KW)
  tcn = assemble.TCN(groups=groups, num_classes=CLASSES, head_dropout=0.5,
                     head_variables=_head_variables())
  if k == 0:
    assemble.save_tcn(os.path.join(out, 'tcn'), tcn)
  logits = distributed.make_predict(tcn)(x_test)
  np.save(os.path.join(out, f'logits{k}.npy'), logits)
  with open(os.path.join(out, f'info{k}.json'), 'w') as f:
    json.dump({'members': info['members'], 'val_mse': info['val_mse'],
               'devices': [str(d) for d in jax.local_devices()],
               'process_count': distributed.process_count(),
               'jax_process_count': jax.process_count()}, f)
  distributed.shutdown()


def test_two_processes_equal_one(tmp_path):
  out = str(tmp_path)
  results = _launch(lambda k, port: [
      sys.executable, '-c',
      'import sys; sys.path[:0] = ["tests", "."]; import test_multiprocess '
      f'as t; t._worker({k}, {port}, {out!r})'])
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  infos = []
  for k in range(2):
    with open(os.path.join(out, f'info{k}.json')) as f:
      infos.append(json.load(f))
  assert [i['members'] for i in infos] == [[0, 1], [2]]
  assert all(i['process_count'] == 2 for i in infos)
  # The training processes stay single-process JAX runtimes (the courier
  # child is the jax.distributed member), so Orbax checkpoints keep working.
  assert all(i['jax_process_count'] == 1 for i in infos)
  # Each process trained only its own students, in its own directory.
  stages = sorted(os.listdir(os.path.join(out, 'run', 'students')))
  assert stages == ['group0.p0of2', 'group1.p0of2', 'group1.p1of2']

  # One process training all students, with the same seeds.
  x, feats, val, x_test = _data()
  ref_groups, ref_info = students.train_students(SPEC, x, feats, N,
                                                 val=val, **TRAIN_KW)
  predict, tcn = assemble.load_tcn(os.path.join(out, 'tcn'))
  assert [g.member_ids for g in tcn.groups] == [[0], [1, 2]]
  for got, want in zip(tcn.groups, ref_groups):
    assert (got.spec, got.out_dim) == (want.spec, want.out_dim)
    for a, b in zip(jax.tree_util.tree_leaves(got.variables),
                    jax.tree_util.tree_leaves(want.variables)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=1e-7)
  for info in infos:
    np.testing.assert_allclose(info['val_mse'], ref_info['val_mse'],
                               rtol=1e-5)

  # Distributed inference (students in their processes, outputs gathered
  # to the head) equals single-process inference of the saved TCN.
  ref_tcn = assemble.TCN(groups=ref_groups, num_classes=CLASSES,
                         head_dropout=0.5, head_variables=_head_variables())
  want = np.asarray(assemble.make_predict(ref_tcn)(x_test))
  np.testing.assert_allclose(np.asarray(predict(x_test)), want, rtol=1e-5,
                             atol=1e-5)
  for k in range(2):
    got = np.load(os.path.join(out, f'logits{k}.npy'))
    assert got.shape == (len(x_test), CLASSES)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_share_splits_members_contiguously():
  assert [distributed.share(3, k, 2) for k in range(2)] == [[0, 1], [2]]
  assert [distributed.share(8, k, 3) for k in range(3)] == [
      [0, 1, 2], [3, 4, 5], [6, 7]]
  for n in range(1, 10):
    for p in range(1, n + 1):
      parts = [distributed.share(n, k, p) for k in range(p)]
      assert sum(parts, []) == list(range(n))
      assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize('section,field', [
    ({'num_processes': 0, 'process_id': 0, 'coordinator': ''},
     'num_processes'),
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
    ({'num_processes': 5, 'process_id': 0, 'coordinator': 'h:1'},
     'num_processes'),
])
def test_bad_distributed_fields_name_the_field(section, field):
  with pytest.raises(TCNError, match=f'config.distributed.{field}') as e:
    distributed.validate(section, num_students=4)
  assert '\n' not in str(e.value)


@needs_fmnist
def test_cli_two_processes_then_one_process_resumes(tmp_path):
  """`main` with config.distributed: process 0 trains the teacher, both
  train their students, process 0 writes the TCN; rerun as one process in a
  copy of the workdir (teacher and features reused, students retrained all
  in one process) gives the same students and TCN."""
  workdir = str(tmp_path / 'run')
  flags = [f'--config={SMOKE}', *TINY_FLAGS, '--config.num_students=3',
           '--config.head.optimizer=adam', '--config.head.dropout=0.5']
  results = _launch(lambda k, port: [
      sys.executable, '-m', 'tcn_jax.main', *flags, f'--workdir={workdir}',
      '--config.distributed.num_processes=2',
      f'--config.distributed.process_id={k}',
      f'--config.distributed.coordinator=localhost:{port}'])
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  with open(os.path.join(workdir, 'results.json')) as f:
    two = json.load(f)
  assert two['distributed']['members'] == [[0, 1], [2]]
  with open(os.path.join(workdir, 'process1', 'results.json')) as f:
    assert list(json.load(f)['student_val_mse']) == ['2']
  assert not os.path.exists(os.path.join(workdir, 'process1', 'teacher'))
  assert os.path.isdir(os.path.join(workdir, 'process1', 'students',
                                    'group1.p1of2'))

  single = str(tmp_path / 'single')
  shutil.copytree(workdir, single, ignore=shutil.ignore_patterns('process1'))
  proc = subprocess.run(
      [sys.executable, '-m', 'tcn_jax.main', *flags, f'--workdir={single}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'features: reusing' in proc.stderr
  with open(os.path.join(single, 'results.json')) as f:
    one = json.load(f)
  assert 'distributed' not in one
  assert one['digests']['teacher'] == two['digests']['teacher']
  np.testing.assert_allclose(one['student_val_mse'], two['student_val_mse'],
                             rtol=1e-5)
  _, tcn_two = assemble.load_tcn(os.path.join(workdir, 'tcn'))
  _, tcn_one = assemble.load_tcn(os.path.join(single, 'tcn'))
  for a, b in zip(jax.tree_util.tree_leaves([g.variables for g in tcn_two.groups]
                                            + [tcn_two.head_variables]),
                  jax.tree_util.tree_leaves([g.variables for g in tcn_one.groups]
                                            + [tcn_one.head_variables])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)
