"""Reliability, third round (issue 35): each class of bad input is owned by
one mechanism, and each case asserts one `error:` line (or one TCNError),
the exit code, no hang (a subprocess timeout) and the workdir unchanged
(hashed before and after).

Classes: 1 exclusive workdirs (`workdir.lock_directory`), 2 teacher
provenance (`teacher.check_source`), 3 cluster joins
(`distributed.initialize`), 4 image folders (`input_pipeline` folder
source, `data.check_folder`), 5 the API contract (`inputs`), 6 config
combinations (`config.check_combinations`), 7 messages naming the path
(`workdir.check_path`, `export_cli`), 8 Grain workers closed, 10 progress.
"""
import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import needs_fmnist, ROOT, SMOKE, TINY_FLAGS
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError


def snapshot(path):
  """{relative path: sha256} of every file under `path` (directories too, so
  an added empty directory shows)."""
  out = {}
  for p in sorted(glob.glob(os.path.join(path, '**'), recursive=True)):
    rel = os.path.relpath(p, path)
    if os.path.isfile(p):
      with open(p, 'rb') as f:
        out[rel] = hashlib.sha256(f.read()).hexdigest()
    elif os.path.isdir(p):
      out[rel + '/'] = 'dir'
  return out


def errors_of(stderr):
  return [l for l in stderr.splitlines() if l.startswith('error: ')]


def cli(args, timeout=180, module='tcn_jax.main', env=None):
  """The real command line: (exit code, error lines, stderr)."""
  proc = subprocess.run(
      ['nice', '-n', '10', sys.executable, '-m', module, *args], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, **(env or {})))
  return proc.returncode, errors_of(proc.stderr), proc.stderr


# 1. Exclusive workdirs.


def test_lock_is_on_the_directory_not_a_file(tmp_path):
  """Deleting (or replacing) any file does not free a locked workdir."""
  path = str(tmp_path / 'run')
  fd = workdir_lib.lock_directory(path)
  try:
    for name in os.listdir(path):
      os.remove(os.path.join(path, name))
    with open(os.path.join(path, 'lock'), 'w') as f:   # A fresh lock file.
      f.write('')
    with pytest.raises(TCNError, match='is in use by another run') as e:
      workdir_lib.lock_directory(path)
    assert '\n' not in str(e.value)
  finally:
    os.close(fd)
  os.close(workdir_lib.lock_directory(path))   # Free again once closed.


@needs_fmnist
def test_second_run_refused_after_lock_file_deleted(tmp_path):
  """The issue's scenario with real processes: a run is training; its lock
  file (if any) is deleted; the same command started again is refused with
  one line, exit 2, and writes nothing; the first run is unharmed."""
  workdir = str(tmp_path / 'run')
  args = ['--config', SMOKE, '--workdir', workdir, *TINY_FLAGS,
          '--config.teacher.epochs=400']
  first = subprocess.Popen(
      ['nice', '-n', '10', sys.executable, '-m', 'tcn_jax.main', *args],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not glob.glob(os.path.join(workdir, 'teacher', '[0-9]*')):
      assert first.poll() is None, first.stderr.read()[-2000:]
      assert time.time() < deadline, 'the first run never saved an epoch'
      time.sleep(0.5)
    for name in ('lock',):
      if os.path.exists(os.path.join(workdir, name)):
        os.remove(os.path.join(workdir, name))
    keys_before = snapshot(workdir).get('stage_keys.json')
    code, errors, stderr = cli(args, timeout=240)
    assert code == 2, stderr[-2000:]
    assert len(errors) == 1 and 'is in use by another run' in errors[0], (
        stderr[-2000:])
    assert workdir in errors[0]
    assert 'Traceback' not in stderr
    assert snapshot(workdir).get('stage_keys.json') == keys_before
    assert not os.path.exists(os.path.join(workdir, 'results.json'))
    assert first.poll() is None   # Still training.
  finally:
    first.send_signal(signal.SIGINT)
    try:
      first.wait(timeout=120)
    except subprocess.TimeoutExpired:
      first.kill()
      first.wait()
  assert first.returncode == 128 + signal.SIGINT, first.stderr.read()[-2000:]


# 2. Teacher provenance and 7. paths, run through `main.main` in-process on
# a copy of a finished tiny run (test_bad_inputs' fixtures).

from test_bad_inputs import _read_only_dir  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_bad_inputs import finished  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position
from test_bad_inputs import run_main  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position
from helpers import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _unfinished_source(tmp, wd):
  """A finished run copied and its config.json raised to 6 teacher epochs:
  a teacher that stopped after 2 of 6."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  source = str(tmp / 'source')
  shutil.copytree(wd, source)
  with open(os.path.join(source, 'config.json')) as f:
    config = json.load(f)
  config['teacher']['epochs'] = 6
  with open(os.path.join(source, 'config.json'), 'w') as f:
    json.dump(config, f)
  return {'teacher__init_from': source}


def _empty_file(name):
  def setup(tmp, wd):
    del wd
    os.makedirs(tmp, exist_ok=True)
    path = str(tmp / name)
    open(path, 'w').close()
    return {'teacher__init_from': path}
  return setup


# (id, overrides, expected text, setup(tmp, workdir) -> more overrides).
PATH_CASES = [
    ('init_from its own workdir', {}, 'is inside the workdir',
     lambda tmp, wd: {'teacher__init_from': wd}),
    ('init_from its own teacher/', {}, 'is inside the workdir',
     lambda tmp, wd: {'teacher__init_from': os.path.join(wd, 'teacher')}),
    ('init_from its own workdir by another spelling', {},
     'is inside the workdir',
     lambda tmp, wd: {'teacher__init_from': wd + '/./teacher/../'}),
    ('init_from an unfinished teacher', {},
     'holds an unfinished teacher (2 of its 6 epochs', _unfinished_source),
    ('init_from missing', {}, 'no such file or directory',
     lambda tmp, wd: {'teacher__init_from': str(tmp / 'nowhere')}),
    ('init_from an empty .keras', {}, 'the file is empty (0 bytes)',
     _empty_file('model.keras')),
    ('init_from an empty .h5', {}, 'the file is empty (0 bytes)',
     _empty_file('model.h5')),
    ('workdir empty string', {}, "workdir '' is empty",
     lambda tmp, wd: {'workdir': ''}),
    ('workdir blank', {}, "workdir '  ' is empty",
     lambda tmp, wd: {'workdir': '  '}),
    ('workdir is a file', {}, 'results.json is a file, not a directory',
     lambda tmp, wd: {'workdir': os.path.join(wd, 'results.json')}),
    ('workdir under a file', {}, 'cannot be created:',
     lambda tmp, wd: {'workdir': os.path.join(wd, 'config.json', 'a', 'b')}),
]


@needs_fmnist
@pytest.mark.parametrize('name, overrides, message, setup', PATH_CASES,
                         ids=[c[0] for c in PATH_CASES])
def test_bad_path(finished, tmp_path, run_main, name, overrides, message,
                  setup):
  del name
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  overrides = dict(overrides, **setup(tmp_path / 'setup', workdir))
  target = overrides.pop('workdir', workdir)
  overrides.setdefault('allow_config_change', True)
  before = snapshot(workdir)
  t = time.time()
  code, errors = run_main(tiny_config(**overrides), target)
  assert code == 2
  assert len(errors) == 1 and message in errors[0], errors
  assert time.time() - t < 60
  assert snapshot(workdir) == before


@needs_fmnist
def test_workdir_not_writable(tmp_path, run_main):
  """A workdir on a read-only directory: one line naming the directory and
  the cause (not 'No such file', not a Python traceback)."""
  with _read_only_dir(str(tmp_path / 'ro')) as ro:
    before = snapshot(ro)
    code, errors = run_main(tiny_config(), os.path.join(ro, 'run'))
    assert code == 2
    assert len(errors) == 1 and 'is not writable' in errors[0], errors
    assert ro in errors[0]
    assert snapshot(ro) == before


@needs_fmnist
def test_export_cli_unwritable_workdir(finished, tmp_path):
  """export_cli on a workdir whose export/ cannot be written: one line."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  os.makedirs(os.path.join(workdir, 'export'))
  before = snapshot(workdir)
  with _read_only_dir(os.path.join(workdir, 'export')):
    code, errors, stderr = cli(['--workdir', workdir, '--formats',
                                'stablehlo'], module='tcn_jax.export_cli')
  assert code == 2, stderr[-2000:]
  assert len(errors) == 1 and 'is not writable' in errors[0], stderr[-2000:]
  assert 'Traceback' not in stderr
  assert snapshot(workdir) == before


def test_export_cli_missing_workdir(tmp_path):
  code, errors, stderr = cli(['--workdir', str(tmp_path / 'none')],
                             module='tcn_jax.export_cli', timeout=120)
  assert code == 2 and len(errors) == 1, stderr[-2000:]
  assert 'is not a directory' in errors[0]
  assert not os.path.exists(tmp_path / 'none')


# 3. Joining a cluster.


def _free_port(low=20000, high=30000):
  import socket  # pylint: disable=g-import-not-at-top
  for port in range(low + os.getpid() % 997, high):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
      return port
  raise RuntimeError('no free port')


@needs_fmnist
@pytest.mark.parametrize('process_id', [1, 0])
def test_join_without_coordinator_is_one_line(tmp_path, process_id):
  """Nobody at the coordinator (process > 0: nothing listens; process 0:
  no peer comes): one line naming it within config.distributed.timeout_s,
  exit 2, nothing written, no XLA abort (exit 134, a C++ stack)."""
  port = _free_port()
  workdir = str(tmp_path / 'run')
  t = time.time()
  code, errors, stderr = cli(
      ['--config', SMOKE, '--workdir', workdir, *TINY_FLAGS,
       '--config.distributed.num_processes=2',
       f'--config.distributed.process_id={process_id}',
       f'--config.distributed.coordinator=127.0.0.1:{port}',
       '--config.distributed.timeout_s=4'], timeout=120)
  assert code == 2, stderr[-2000:]
  assert len(errors) == 1 and f'cannot join 127.0.0.1:{port}' in errors[0], (
      stderr[-2000:])
  assert 'config.distributed.timeout_s' in errors[0]
  assert 'Check failure' not in stderr and 'Traceback' not in stderr
  assert time.time() - t < 90
  assert not os.path.exists(workdir)


@needs_fmnist
def test_auto_join_without_cluster_is_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(
      ('SLURM_', 'OMPI_', 'PMI_', 'TPU_', 'MEGASCALE'))}
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'tcn_jax.main', '--config', SMOKE, '--workdir',
       workdir, *TINY_FLAGS, '--config.distributed.num_processes=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  errors = errors_of(proc.stderr)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(errors) == 1 and 'none was found' in errors[0], errors
  assert not os.path.exists(workdir)


SLURM_JOIN = '''
import sys
import numpy as np
from tcn_jax import distributed
assert distributed.initialize(0, 0, '', 60)
rows = distributed.allgather_bytes(str(distributed.process_index()).encode())
print('joined', distributed.process_index(), distributed.process_count(),
      b','.join(rows).decode(), flush=True)
distributed.shutdown()
'''


def test_auto_join_under_slurm_on_localhost():
  """num_processes=0 under SLURM: two local processes with the variables
  JAX's SlurmCluster reads join as processes 0 and 1 of 2 (the coordinator
  is the node list's first host, its port from the job id)."""
  port = _free_port(61440, 65535)
  base = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  base.update(SLURM_JOB_ID=str(port - 61440), SLURM_NTASKS='2',
              SLURM_STEP_NODELIST='localhost', SLURM_JOB_NUM_NODES='1',
              SLURM_STEP_NUM_NODES='1', SLURM_NODELIST='localhost',
              JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      ['nice', '-n', '10', sys.executable, '-c', SLURM_JOIN], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(base, SLURM_PROCID=str(k), SLURM_LOCALID=str(k)))
           for k in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for k, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-2000:]
    assert f'joined {k} 2 0,1' in out, (out, err[-2000:])


def test_auto_join_detects_a_cluster_without_a_name(monkeypatch):
  """JAX's Kubernetes cluster has no name (''): num_processes=0 detects it
  (by its class name), rather than saying no cluster was found."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  from tcn_jax import distributed  # pylint: disable=g-import-not-at-top
  # A subclass registers itself in _cluster_types: in a list of its own.
  monkeypatch.setattr(clusters.ClusterEnv, '_cluster_types', [])

  class K8sLike(clusters.ClusterEnv):
    name = ''

    @classmethod
    def is_env_present(cls):
      return True
  assert clusters.ClusterEnv._cluster_types == [K8sLike]  # pylint: disable=protected-access
  assert distributed._detected() == ('K8sLike', '', -1)  # pylint: disable=protected-access


# 4. Image folders and 6. config combinations.


def _png(path, seed, size=8):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3))
  Image.fromarray(pixels.astype('uint8')).save(path)


def image_folder(root, classes=('a', 'b'), per_class=6, test=2):
  """A tiny folder of PNGs: train/<class>/ and test/<class>/."""
  seed = 0
  for split, n in (('train', per_class), ('test', test)):
    for c in classes:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(n):
        seed += 1
        _png(os.path.join(root, split, c, f'{i}.png'), seed)
  return str(root)


def folder_config(root, **data):
  import image_folder as image_folder_config  # pylint: disable=g-import-not-at-top
  c = image_folder_config.get_config('smoke')
  c.data.dir = root
  c.data.image_size = 8
  c.data.val_fraction = 0.25
  c.num_students = 2
  c.teacher.body = 'C4 MP F D8r'
  c.students.arch = 'C2 MP F D4r'
  for s in ('teacher', 'students', 'head', 'kd'):
    c[s].batch_size = 2
  with c.data.ignore_type():
    c.data.update(data)
  return c


def _text_as_jpg(root):
  path = os.path.join(root, 'train', 'a', 'notes.jpg')
  with open(path, 'w') as f:
    f.write('not an image')
  return path


def _truncated_png(root):
  path = os.path.join(root, 'train', 'b', '0.png')
  with open(path, 'r+b') as f:
    f.truncate(60)
  return path


def _empty_class(root):
  os.makedirs(os.path.join(root, 'train', 'c'))
  return os.path.join(root, 'train', 'c')


def _one_class(root):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(root, 'train', 'b'))
  shutil.rmtree(os.path.join(root, 'test', 'b'))
  return os.path.join(root, 'train')


def _broken_link(root):
  path = os.path.join(root, 'train', 'c')
  os.symlink(os.path.join(root, 'nowhere'), path)
  return path


def _two_names_one_folder(root):
  os.symlink(os.path.join(root, 'train', 'a'), os.path.join(root, 'train', 'c'))
  return os.path.realpath(os.path.join(root, 'train', 'a'))


def _link_to_its_parent(root):
  path = os.path.join(root, 'train', 'c')
  os.symlink(root, path)
  return path


# (id, data overrides, other overrides, setup(root) -> a path the message
# names or None, expected text).
FOLDER_CASES = [
    ('text file named .jpg', {}, {}, _text_as_jpg, 'cannot decode image'),
    ('truncated png', {}, {}, _truncated_png, 'cannot decode image'),
    ('empty class folder', {}, {}, _empty_class, 'holds no JPEG or PNG'),
    ('one class', {}, {}, _one_class, 'a classifier needs at least 2'),
    ('broken symlinked class', {}, {}, _broken_link, 'broken symbolic link'),
    ('symlink to another class', {}, {}, _two_names_one_folder,
     'images would be in two classes'),
    ('symlink to the folder above', {}, {}, _link_to_its_parent,
     'holds the class folders themselves'),
    ('image_size 100000', {'image_size': 100000}, {}, None,
     'config.data.image_size=100000 needs'),
    ('image_size over the memory limit', {'image_size': 2048,
                                          'memory_limit_mb': 64}, {}, None,
     'too much for config.data.memory_limit_mb=64'),
    ('bad_images unknown', {'bad_images': 'ignore'}, {}, None,
     'config.data.bad_images must be one of'),
    ('cached features with crop_flip',
     {'augment': 'crop_flip'}, {'students__features': 'cached'}, None,
     "config.students.features='cached' with config.data.augment='crop_flip'"),
    ('default features with flip', {'augment': 'flip'},
     {'students__features': ''}, None,
     "config.students.features='cached' with config.data.augment='flip'"),
    ('kdgan with crop_flip', {'augment': 'crop_flip'},
     {'kdgan__enabled': True, 'kd__arch': 'C2 MP F D4r'}, None,
     'config.kdgan.enabled needs cached teacher features'),
]


@pytest.mark.parametrize('name, data, other, setup, message', FOLDER_CASES,
                         ids=[c[0] for c in FOLDER_CASES])
def test_bad_image_folder(tmp_path, run_main, name, data, other, setup,
                          message):
  del name
  root = image_folder(tmp_path / 'images')
  named = setup(root) if setup else None
  config = folder_config(root, **data)
  for path, value in other.items():
    section, field = path.split('__')
    with config[section].ignore_type():
      config[section][field] = value
  workdir = str(tmp_path / 'run')
  before = snapshot(root)
  t = time.time()
  code, errors = run_main(config, workdir)
  assert code == 2
  assert len(errors) == 1 and message in errors[0], errors
  if named:
    assert named in errors[0], errors
  assert time.time() - t < 60
  assert not os.path.exists(workdir)
  assert snapshot(root) == before


def test_hidden_entries_are_not_classes(tmp_path):
  from tcn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  root = image_folder(tmp_path / 'images')
  for split in ('train', 'test'):
    hidden = os.path.join(root, split, '.ipynb_checkpoints')
    os.makedirs(hidden)
    _png(os.path.join(hidden, 'x.png'), 99)
    _png(os.path.join(root, split, 'a', '.hidden.png'), 98)
  ds = input_pipeline.load(folder_config(root).data)
  assert ds.classes == ['a', 'b'] and ds.num_classes == 2
  assert len(ds.train) + len(ds.val) == 12 and len(ds.test) == 4


def test_symlinked_class_folder_is_followed(tmp_path):
  """A class folder that is a link to a directory elsewhere is a class like
  any other (its images read through the link)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from tcn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  root = image_folder(tmp_path / 'images', classes=('a', 'b', 'c'))
  for split in ('train', 'test'):
    elsewhere = str(tmp_path / f'elsewhere_{split}')
    shutil.move(os.path.join(root, split, 'b'), elsewhere)
    os.symlink(elsewhere, os.path.join(root, split, 'b'))
  ds = input_pipeline.load(folder_config(root).data)
  assert ds.classes == ['a', 'b', 'c']
  assert len(ds.train) + len(ds.val) == 18 and len(ds.test) == 6
  assert sorted(set(ds.test.y.tolist())) == [0, 1, 2]


def test_bad_images_skip_leaves_out_non_images(tmp_path):
  from tcn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  root = image_folder(tmp_path / 'images')
  _text_as_jpg(root)
  _truncated_png(root)
  ds = input_pipeline.load(folder_config(root, bad_images='skip').data)
  assert len(ds.train) + len(ds.val) == 12   # The text file left out.
  assert ds.train.x.shape[1:] == (8, 8, 3)


# 5. The API contract: dtypes, label ranges, counts.

from test_api_inputs import _images  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_api_inputs import _one_error  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_api_inputs import net  # pylint: disable=unused-import,g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float64'])
def test_predict_takes_other_float_widths(net, dtype):
  """float16 / bfloat16 / float64 images in [0, 1] give the logits of the
  same values in float32 (they once crashed predict with a dtype error)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  predict = tcn.make_predict(net[0])
  x = _images(3).astype(jnp.dtype(dtype))
  want = predict(np.asarray(x, np.float32))
  np.testing.assert_array_equal(np.asarray(predict(x)), np.asarray(want))
  _one_error(predict, np.full((2, 8, 8, 1), 3, jnp.dtype(dtype)),
             match='images must be floats in')


def test_evaluate_refuses_labels_out_of_range(net):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  predict = tcn.make_predict(net[0])   # 3 classes.
  _one_error(tcn.evaluate, predict, _images(4), np.array([0, 1, 2, 3]),
             match=r'evaluate: y holds labels 0..3, outside \[0, 3\)')
  _one_error(tcn.evaluate, predict, _images(4), np.array([0, -1, 2, 1]),
             match=r'evaluate: y holds labels -1..2, outside \[0, 3\)')
  # A predict JAX cannot trace is checked on its outputs.
  untraceable = lambda x: np.asarray(predict(np.asarray(x)))
  _one_error(tcn.evaluate, untraceable, _images(4), np.array([0, 1, 2, 7]),
             match=r'outside \[0, 3\)')
  assert 0 <= tcn.evaluate(predict, _images(4), np.array([0, 1, 2, 1])) <= 1


@pytest.mark.parametrize('n', [0, -1, 1.0, True, '2'])
def test_train_students_refuses_bad_counts(n, tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  _one_error(tcn.train_students, 'C2 MP F', _images(16),
             np.zeros((16, 4), np.float32), n, epochs=1, batch_size=4,
             workdir=str(tmp_path / 'run'),
             match='train_students: num_students must be an integer >= 1')


# 10. Progress a user sees.

PLAIN_SCRIPT = '''
import numpy as np
import tcn_jax as tcn
tcn.set_progress('log')
ds = tcn.load_dataset('fashion_mnist', train_size=200, test_size=100)
tcn.train_teacher(tcn.Teacher('F D16r', num_classes=10), ds, epochs=3,
                  batch_size=100)
'''


@needs_fmnist
def test_progress_is_visible_in_a_plain_script():
  """A plain Python script (absl never initialised, INFO hidden) shows the
  stage's start and each epoch, the metric named, the first epoch's time
  marked as including compilation and later ETAs without it."""
  proc = subprocess.run(['nice', '-n', '10', sys.executable, '-c',
                         PLAIN_SCRIPT], cwd=ROOT, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('[teacher]')]
  assert lines[0].startswith('[teacher] training epochs 1..3'), lines
  assert 'val_acc=' in lines[1] and 'with compilation' in lines[1], lines
  assert lines[-1].startswith('[teacher] epoch 3/3'), lines
  assert 's/epoch, ETA 0 s' in lines[-1], lines


@needs_fmnist
def test_cli_logs_each_stage_before_its_work(tmp_path):
  """The command line is never silent while a stage works: a line before
  the data are read, before the features are computed, before the
  students' group compiles, each before that stage's first result."""
  code, errors, stderr = cli(['--config', SMOKE, *TINY_FLAGS,
                              f'--workdir={tmp_path / "run"}'], timeout=400)
  assert code == 0 and not errors, stderr[-3000:]
  order = ['[data] loading', '[teacher] training epochs 1..2',
           '[teacher] epoch 1/2', '[features] ', 'features: ',
           '[students] 2 students', '[students[0,1]] training epochs 1..2',
           '[students[0,1]] epoch 1/2', '[head] training epochs 1..2',
           '[head] epoch 1/2']
  at = [stderr.find(text) for text in order]
  assert -1 not in at and at == sorted(at), list(zip(order, at))


def test_progress_labels_and_eta(capsys):
  from tcn_jax import metrics  # pylint: disable=g-import-not-at-top
  before = metrics.set_progress('log')
  try:
    progress = metrics.Progress('head', 3, 0)
    progress.epoch_times = []
    progress.t0 = time.time() - 100   # A first epoch of 100 s (compiling).
    progress.epoch(1, {'loss': 1.0, 'val_mse': 0.5})
    progress.t0 -= 10                 # Then 10 s.
    progress.epoch(2, {'loss': 1.0, 'val_mse': 0.5})
  finally:
    metrics.set_progress(before)
  err = capsys.readouterr().err.splitlines()
  assert 'with compilation' in err[1] and 'val_mse=0.5000' in err[1], err
  assert '10.0 s/epoch, ETA 10 s' in err[2], err


def test_student_stage_is_named_by_its_members(net, tmp_path, capsys):
  """A group of n students is named by its members (students[0,1]), not by
  its group index (students[0], which read as one student)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  from tcn_jax import metrics  # pylint: disable=g-import-not-at-top
  from tcn_jax.students import stage_name  # pylint: disable=g-import-not-at-top
  assert stage_name([0]) == 'students[0]'
  assert stage_name([0, 1]) == 'students[0,1]'
  assert stage_name([4, 5, 6, 7]) == 'students[4-7]'
  assert stage_name([0, 2, 3]) == 'students[0,2,3]'
  before = metrics.set_progress('log')
  try:
    tcn.train_students('C2 MP F', _images(8), np.zeros((8, 4), np.float32),
                       2, epochs=1, batch_size=4)
  finally:
    metrics.set_progress(before)
  err = capsys.readouterr().err
  assert '[students[0,1]] epoch 1/1' in err and 'students[0]]' not in err, err


def test_load_tcn_logs_nothing(net, tmp_path):
  """load_tcn (a read-only Orbax checkpoint) logs nothing at WARNING or
  above: Orbax's three read-only notices are not printed."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  import tcn_jax as tcn  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'tcn')
  tcn.save_tcn(path, net[0])
  records = []

  class Collect(logging.Handler):
    def emit(self, record):
      records.append(record)
  handler = Collect(logging.WARNING)
  loggers = [logging.getLogger(), absl_logging.get_absl_logger()]
  for logger in loggers:
    logger.addHandler(handler)
  try:
    for _ in range(2):
      tcn.load_tcn(path)
  finally:
    for logger in loggers:
      logger.removeHandler(handler)
  assert not records, [r.getMessage() for r in records]


def test_stop_message_says_the_epoch_was_saved():
  from tcn_jax.errors import Interrupted  # pylint: disable=g-import-not-at-top
  text = str(Interrupted(signal.SIGTERM))
  assert 'was finished and saved' in text and 'finished epochs' not in text


# 8. Grain's worker processes on every exit path.


@pytest.mark.slow
def test_sigint_with_workers_leaves_nothing_behind(tmp_path):
  """Ctrl-C (SIGINT to the whole process group, workers included) during a
  streamed run with data.workers=2: one `error:` line, exit 130, and no
  resource-tracker warnings about leaked semaphores or shared memory."""
  root = image_folder(tmp_path / 'images', per_class=24)
  workdir = str(tmp_path / 'run')
  cmd = ['nice', '-n', '10', sys.executable, '-m', 'tcn_jax.main',
         '--config', os.path.join(ROOT, 'configs/image_folder.py:smoke'),
         '--workdir', workdir, f'--config.data.dir={root}',
         '--config.data.image_size=8', '--config.data.workers=2',
         '--config.data.streaming=always', '--config.teacher.epochs=500',
         '--config.teacher.body=C4 MP F D8r', '--config.num_students=2',
         '--config.students.arch=C2 MP F D4r',
         *(f'--config.{s}.batch_size=4' for s in ('teacher', 'students',
                                                  'head', 'kd'))]
  log = open(tmp_path / 'log', 'w+')
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log,
                          start_new_session=True)
  try:
    deadline = time.time() + 300
    while '[teacher] epoch 2/' not in open(tmp_path / 'log').read():
      assert proc.poll() is None, open(tmp_path / 'log').read()[-3000:]
      assert time.time() < deadline, 'no second epoch'
      time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  time.sleep(3)   # The resource tracker reports after its parent exits.
  text = open(tmp_path / 'log').read()
  errors = errors_of(text)
  assert proc.returncode == 128 + signal.SIGINT, text[-3000:]
  assert len(errors) == 1 and 'stopped by SIGINT' in errors[0], text[-3000:]
  for noise in ('resource_tracker', 'leaked', 'Traceback'):
    assert noise not in text, text[-3000:]


# 9. One process of several dies.

_DIE_IN_STUDENTS = '''
import os, runpy, signal, sys
from tcn_jax import checkpoint
save = checkpoint.StageCheckpoint.save
def save_then_die(self, epoch, state, record):
  save(self, epoch, state, record)
  if '/students/' in self.directory:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.StageCheckpoint.save = save_then_die
sys.argv = ['tcn_jax.main'] + sys.argv[1:]
runpy.run_module('tcn_jax.main', run_name='__main__')
'''


@pytest.mark.slow
@needs_fmnist
def test_survivor_of_a_lost_peer_exits_with_one_line(tmp_path):
  """Process 1 of 2 is killed in the students stage: process 0 exits
  promptly with one line naming process 1, exit 2 (not a Gloo traceback,
  a hang and SIGABRT)."""
  port = _free_port()
  workdir = str(tmp_path / 'run')
  flags = ['--config', SMOKE, *TINY_FLAGS, '--config.mesh.data=1',
           '--config.mesh.students=2', f'--workdir={workdir}',
           '--config.distributed.num_processes=2',
           '--config.distributed.coordinator=localhost:%d' % port,
           '--config.students.epochs=20']
  procs = []
  for k in range(2):
    head = (['-c', _DIE_IN_STUDENTS] if k == 1 else ['-m', 'tcn_jax.main'])
    procs.append(subprocess.Popen(
        ['nice', '-n', '10', sys.executable, *head, *flags,
         f'--config.distributed.process_id={k}'], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_PLATFORMS='cpu')))
  try:
    procs[1].wait(timeout=400)
    t = time.time()
    out, _ = procs[0].communicate(timeout=90)
    waited = time.time() - t
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert procs[1].returncode == -signal.SIGKILL
  errors = errors_of(out)
  assert procs[0].returncode == 2, out[-3000:]
  assert len(errors) == 1 and 'lost process 1' in errors[0], out[-3000:]
  assert 'Traceback' not in out and 'Check failure' not in out
  assert waited < 60, waited


# 7. Permission errors name the file with its path.


def test_permission_error_names_the_checkpoint_file(tmp_path):
  """Orbax names a file it may not read by its bare name
  ('_CHECKPOINT_METADATA'); the error line gives its full path and does not
  call the checkpoint damaged (a mocked EACCES: root reads any file)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from tcn_jax import checkpoint  # pylint: disable=g-import-not-at-top
  stage = str(tmp_path / 'teacher')
  with checkpoint.StageCheckpoint(stage) as ckpt:
    ckpt.save(1, {'w': np.zeros(4, np.float32)}, {'epoch': 1})
  denied = PermissionError(13, 'Permission denied', '_CHECKPOINT_METADATA')
  before = snapshot(stage)
  with checkpoint.StageCheckpoint(stage, read_only=True) as ckpt:
    with mock.patch.object(ckpt.manager, 'item_metadata',
                           side_effect=denied):
      with pytest.raises(TCNError) as e:
        ckpt.restore()
  text = str(e.value)
  assert f'{stage}/1/_CHECKPOINT_METADATA' in text, text
  assert 'Permission denied' in text and 'damaged' not in text, text
  assert snapshot(stage) == before
  assert checkpoint.access_error(OSError(30, 'Read-only file system', 'x'),
                                 '/d') == 'Read-only file system: /d/x'
  assert checkpoint.access_error(ValueError('no'), '/d') == ''


@needs_fmnist
def test_changed_config_refused_before_data_is_read(finished, tmp_path,
                                                    run_main):
  """A rerun with another config (no allow_config_change) is refused before
  the data is loaded: a data directory that does not exist is not reached."""
  import shutil  # pylint: disable=g-import-not-at-top
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from tcn_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  before = snapshot(workdir)
  with mock.patch.object(data_lib, 'load',
                         side_effect=AssertionError('data read')):
    code, errors = run_main(tiny_config(students__learning_rate=0.5),
                            workdir)
  assert code == 2
  assert len(errors) == 1 and 'students.learning_rate: 0.001 -> 0.5' in (
      errors[0]), errors
  assert snapshot(workdir) == before
