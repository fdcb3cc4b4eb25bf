"""The bad-input corpus: every case ends with exactly one `error: ...` line on
stderr naming the cause, a non-zero exit code, and every file an earlier run
left in the workdir (results, checkpoints, features) unchanged.

Cases run `main.main` in-process on a copy of a finished tiny run; flag
parsing errors (absl) run the real command line. An error that the config
and the data alone show (found before the workdir is opened) leaves the
workdir byte for byte as it was, with no file added.
"""
import contextlib
import copy
import fcntl
import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from unittest import mock

import numpy as np
import pytest

from helpers import needs_fmnist, ROOT, SMOKE, tiny_config, TINY_FLAGS
from test_data import _synthetic, _write_split
from tcn_jax import assemble
from tcn_jax import checkpoint
from tcn_jax import config as config_lib
from tcn_jax import main
from tcn_jax import pipeline
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError

pytestmark = needs_fmnist


@pytest.fixture(scope='module')
def finished(tiny_run):
  """A finished tiny run (the shared one: cases copy it): the earlier
  output that no bad input may harm."""
  return tiny_run.workdir


def _snapshot(workdir):
  """{path: sha256} of the workdir's files but the lock and event files."""
  out = {}
  for path in glob.glob(os.path.join(workdir, '**'), recursive=True):
    rel = os.path.relpath(path, workdir)
    if os.path.isfile(path) and rel != 'lock' and 'tensorboard' not in rel:
      with open(path, 'rb') as f:
        out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture
def run_main(monkeypatch, capsys):
  """main.main on a config object: (exit code, its `error:` lines)."""
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

  def call(config, workdir):
    monkeypatch.setattr(main, '_CONFIG', types.SimpleNamespace(value=config))
    monkeypatch.setattr(main, '_WORKDIR', types.SimpleNamespace(value=workdir))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
      main.main(['tcn_jax.main'])
    lines = capsys.readouterr().err.splitlines()
    return e.value.code, [l for l in lines if l.startswith('error: ')]

  yield call
  for s, handler in handlers.items():
    signal.signal(s, handler)


def _data_dir(path, shape=(28, 28), label_max=9, images_magic=0x803,
              cut=0, labels=None, splits=('train', 'test'), test_n=200,
              test_shape=None):
  """IDX files of random images; optionally with a defect."""
  os.makedirs(path)
  for split, n in (('train', 500), ('test', test_n)):
    if split not in splits:
      continue
    x, y = _synthetic(n, seed=len(split))
    x = np.resize(x, (n, *(test_shape if split == 'test' and test_shape
                           else shape)))
    y = np.minimum(y, label_max) if labels is None else y[:labels]
    y[:1] = label_max
    _write_split(path, split, x, y, style='raw')
  if images_magic != 0x803 or cut:
    name = os.path.join(path, 'train-images-idx3-ubyte')
    with open(name, 'rb') as f:
      raw = bytearray(f.read())
    raw[:4] = images_magic.to_bytes(4, 'big')
    with open(name, 'wb') as f:
      f.write(raw[:len(raw) - cut])
  return str(path)   # As a user gives it (config.json holds it).


def _truncate(pattern):
  paths = glob.glob(pattern)
  assert paths, pattern
  for p in paths:
    with open(p, 'r+b') as f:
      f.truncate(os.path.getsize(p) // 2)


def _lock(workdir):
  """Setup: the workdir held as a live run holds it (its directory locked)."""
  fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  return fd   # Held (open) for the rest of the test session.


def _claim(workdir, config):
  """Rewrites the workdir's records (config.json, stage_keys.json) as a run
  of `config` would have left them, so that its stages count as that run's
  and a rerun of `config` reads their checkpoints: the checks of the
  checkpoints and of training are reached through the stages, not through
  the reuse rule, which recomputes a stage whose inputs changed when
  allow_config_change is set (tests/test_stages.py). The records are what
  the pipeline itself computes for `config` when it opens the workdir."""
  opened = {}

  class Opened(Exception):
    pass

  def workdir_of(path, config_json, keys, allow_change):
    del path, allow_change
    opened.update(config=config_json, keys=keys)
    raise Opened

  with mock.patch.object(workdir_lib, 'Workdir', workdir_of):
    with pytest.raises(Opened):
      pipeline.run(config, workdir)
  keys_path = os.path.join(workdir, workdir_lib.KEYS_FILE)
  with open(keys_path) as f:
    keys = json.load(f)
  keys.update(opened['keys'])
  checkpoint.write_json(keys_path, keys)
  checkpoint.write_json(os.path.join(workdir, 'config.json'), opened['config'])


def _claimed(tmp, wd):
  """Setup: the finished run's stages claimed for the case's config."""
  del tmp, wd
  return {'claim': True}


def _replace_file(name, text):
  """Setup: the workdir's file `name` replaced by `text`."""
  def setup(tmp, wd):
    del tmp
    with open(os.path.join(wd, name), 'w') as f:
      f.write(text)
  return setup


# (id, config overrides, expected text in the error line, setup(tmp, workdir)
# returning more overrides or an object to keep alive, or None). A setup's
# 'claim': True rewrites the workdir's records for the case's config first
# (`_claim`).
CONFIG_VALUES = [
    # Config values: config.resolve refuses each, before the workdir is
    # opened (test_config_value_refused); one of them runs below through
    # main, for all (the one error line, nothing written).
    ('unknown dataset', {'data__name': 'cifar100'},
     "unknown dataset 'cifar100'", None),
    ('n below 1', {'num_students': 0}, 'num_students must be a positive', None),
    ('views not on device', {'students__views': 'crop_flip',
                             'students__features': 'online'},
     "config.students.views='crop_flip' cannot be drawn on device", None),
    ('head views not on device', {'head__views': 'crop_flip'},
     "config.head.views='crop_flip' cannot be drawn on device", None),
    ('views of unknown name', {'students__views': 'rotate',
                               'students__features': 'online'},
     "unknown augmentation 'rotate'", None),
    ('device-only augmentation for the data',
     {'data__augment': 'pad_crop_flip'},
     "config.data.augment='pad_crop_flip' is drawn on device for the "
     'students only', None),
    ('views with cached features', {'students__views': 'flip'},
     "config.students.views='flip' with config.students.features='cached'",
     None),
    ('n above feature width', {'num_students': 33},
     'num_students=33 is larger than the feature width 32', None),
    ('n without paper values', {'num_students': 3},
     'no optimizer for num_students=3: set --config.head.optimizer', None),
    ('wrong type in config', {'teacher__epochs': '3'},
     "config.teacher.epochs must be an integer >= 0, got '3'", None),
    ('unknown strategy', {'students__strategy': 'magic'},
     "unknown strategy 'magic'", None),
    ('unknown method', {'method': 'diffusion'}, "unknown method 'diffusion'",
     None),
    ('negative logit weight', {'students__logit_weight': -1.0},
     'config.students.logit_weight must be a number >= 0', None),
    ('unknown student LR schedule', {'students__lr_schedule': 'linear'},
     "unknown learning-rate schedule 'linear' (config.students.lr_schedule)",
     None),
    ('bad optimizer', {'head__optimizer': 'rmsprop'},
     "unknown optimizer 'rmsprop' (config.head.optimizer)", None),
    ('negative epochs', {'students__epochs': -2},
     'config.students.epochs must be an integer >= 0, got -2', None),
    ('zero learning rate', {'teacher__learning_rate': 0.0},
     'config.teacher.learning_rate must be a number > 0', None),
    ('dropout out of range', {'head__dropout': 1.5},
     'config.head.dropout must be a number >= 0 and < 1', None),
    ('no validation split', {'data__val_fraction': 0.0},
     'config.data.val_fraction must be a number > 0', None),
    ('zero eval batch', {'eval_batch_size': 0}, 'config.eval_batch_size', None),
    ('unknown augmentation', {'data__augment': 'crop'},
     "unknown augmentation 'crop' (config.data.augment)", None),
    ('per-epoch augmentation in memory', {'data__augment': 'flip'},
     "config.data.augment='flip' changes images per epoch", None),
    ('unknown initializer', {'students__init': 'zeros'},
     "unknown initializer 'zeros'", None),
    ('unknown layers impl', {'layers_impl': 'tpu'},
     "unknown layers_impl 'tpu' (config.layers_impl)", None),
    ('unknown layer in teacher', {'teacher__body': 'C8 X3 F D32r'},
     "config.teacher.body: unknown layer 'X3'", None),
    ('unknown layer in students', {'students__arch': 'C4 Q F'},
     "config.students.arch: unknown layer 'Q'", None),
    ('teacher without feature layer', {'teacher__body': 'C8 MP F'},
     'must end in a Dense feature layer', None),
    ('negative seed', {'seed': -1}, 'config.seed must be an integer >= 0',
     None),
    ('negative split seed', {'data__split_seed': -3},
     'config.data.split_seed must be an integer >= 0', None),
    ('dropout rate 1 in an architecture', {'students__arch': 'C4 MP F Do1.0'},
     "dropout rate of 'Do1.0' in architecture 'C4 MP F Do1.0' must be in "
     '[0, 1)', None),
]
CASES = [
    *(c for c in CONFIG_VALUES if c[0] == 'n below 1'),
    # Workdir.
    ('config.json not JSON', {}, 'config.json cannot be read (JSONDecodeError)',
     _replace_file('config.json', '{"seed": 0,')),
    ('config.json empty', {}, 'config.json cannot be read',
     _replace_file('config.json', '')),
    ('config.json not an object', {}, 'config.json is not a JSON object',
     _replace_file('config.json', '[1, 2]')),
    ('stage_keys.json damaged', {}, 'stage_keys.json cannot be read',
     _replace_file('stage_keys.json', 'nul')),
    ('changed config on resume',
     {'students__learning_rate': 0.5, 'allow_config_change': False},
     'students.learning_rate: 0.001 -> 0.5', None),
    ('workdir under a file', {}, 'results.json is a file, not a directory',
     lambda tmp, wd: {'workdir': os.path.join(wd, 'results.json', 'sub')}),
    ('workdir is a file', {}, 'config.json is a file, not a directory',
     lambda tmp, wd: {'workdir': os.path.join(wd, 'config.json')}),
    ('concurrent run', {}, 'is in use by another run',
     lambda tmp, wd: _lock(wd)),
    # Data.
    ('missing data dir', {'data__dir': '/nonexistent/idx'},
     "'/nonexistent/idx' is not a directory", None),
    ('data dir is a file', {}, 'is not a directory',
     lambda tmp, wd: {'data__dir': os.path.join(wd, 'results.json')}),
    ('IDX wrong magic', {}, 'is not an IDX file of the expected kind',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, images_magic=0x801)}),
    ('IDX truncated', {}, 'truncated',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, cut=100)}),
    ('labels out of range', {}, 'outside [0, 10)',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, label_max=10)}),
    ('labels fewer than images', {}, 'holds 500 images but',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, labels=499)}),
    ('missing IDX file', {}, 'no IDX file t10k-images',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, splits=('train',))}),
    ('empty test split', {}, 'the test split of fashion_mnist is empty',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, test_n=0)}),
    ('test images of another size than train', {},
     'test inputs of fashion_mnist have shape (32, 32, 1), train inputs '
     '(28, 28, 1)',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, test_shape=(32, 32))}),
    # Shapes.
    ('more pooling than the image allows',
     {'teacher__body': 'C8 MP MP MP MP MP F D32r'},
     "layer 6 ('MP') cannot apply to its input of shape (1, 1, 8)", None),
    ('kernel larger than the image', {'students__arch': 'C30-4 F'},
     "layer 1 ('C30-4') cannot apply", None),
    ('no flatten before the feature', {'teacher__body': 'C8 MP D32r'},
     'add F (Flatten)', None),
    ('data of another image size than the checkpoint', {},
     'teacher/2 was saved for another architecture or input size',
     lambda tmp, wd: {'data__dir': _data_dir(tmp, shape=(32, 32)),
                      'claim': True}),
    ('teacher checkpoint of another architecture',
     {'teacher__body': 'C16 MP F D64r D32r'},
     'teacher/2 was saved for another architecture or input size '
     '(params/trunk/Conv_0/bias: stored (1, 8), this config needs (1, 16))',
     _claimed),
    ('students checkpoint of another architecture',
     {'students__arch': 'C6 MP F D8r'},
     'students/group0/2 was saved for another architecture', _claimed),
    # The data against the config: found before the workdir is opened.
    ('batch size larger than the data',
     {'teacher__epochs': 3, 'teacher__batch_size': 1000},
     'batch size 1000 (config.teacher.batch_size) is larger than the 300 '
     'training examples', None),
    # Damaged checkpoints: refused, naming the step, never trained over.
    ('truncated checkpoint data', {},
     'teacher/2 is damaged or truncated', lambda tmp, wd: _truncate(
         os.path.join(wd, 'teacher/2/state/ocdbt.process_0/d/*'))),
    ('truncated checkpoint record', {},
     'head/2 is damaged or truncated', lambda tmp, wd: _truncate(
         os.path.join(wd, 'head/2/record/metadata'))),
    ('empty checkpoint directory', {},
     'teacher/3 is damaged or truncated (KeyError', lambda tmp, wd: os.mkdir(
         os.path.join(wd, 'teacher/3'))),
    # Numbers: epoch 3 of a run of this config that finished epoch 2.
    ('non-finite loss', {'teacher__epochs': 3, 'teacher__learning_rate': 1e30},
     'non-finite loss in stage teacher, member 0, epoch 3', _claimed),
]
# Cases whose error comes from the stages, after the workdir is opened: the
# run rewrites config.json (allow_config_change is set), nothing else.
AFTER_OPENING = {
    'data of another image size than the checkpoint',
    'teacher checkpoint of another architecture',
    'students checkpoint of another architecture',
    'truncated checkpoint data', 'truncated checkpoint record',
    'empty checkpoint directory', 'non-finite loss'}


@pytest.mark.parametrize('name, overrides, message, setup', CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(finished, tmp_path, run_main, name, overrides, message,
                   setup):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  extra = setup(tmp_path / 'setup', workdir) if setup else None
  overrides = dict(overrides, **(extra if isinstance(extra, dict) else {}))
  claim = overrides.pop('claim', False)
  target = overrides.pop('workdir', workdir)
  overrides.setdefault('allow_config_change', True)   # Reach later checks.
  config = tiny_config(**overrides)
  if claim:
    _claim(workdir, config)
  before = _snapshot(workdir)
  code, errors = run_main(config, target)
  assert code != 0
  assert len(errors) == 1 and message in errors[0], errors
  after = _snapshot(workdir)
  if name in AFTER_OPENING:
    before.pop('config.json')
    assert {k: after.get(k) for k in before} == before
  else:   # Nothing written: no file changed, none added.
    assert after == before


@pytest.mark.parametrize('name, overrides, message, setup', CONFIG_VALUES,
                         ids=[c[0] for c in CONFIG_VALUES])
def test_config_value_refused(name, overrides, message, setup):
  """config.resolve refuses the value with one line naming it (main prints
  it as the one `error:` line before the workdir is opened: the 'n below 1'
  case of test_bad_input)."""
  del name, setup
  with pytest.raises(TCNError) as e:
    config_lib.resolve(tiny_config(allow_config_change=True, **overrides))
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_disk_full(finished, tmp_path, run_main):
  """A checkpoint write that fails (file size limit: EFBIG, as a full disk
  gives ENOSPC) is one error line naming it; earlier epochs stay."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  config = tiny_config(teacher__epochs=3, allow_config_change=True)
  _claim(workdir, config)   # A run of 3 teacher epochs that finished 2.
  before = _snapshot(workdir)
  before.pop('config.json')
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  try:
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    code, errors = run_main(config, workdir)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old)
  assert code != 0
  assert len(errors) == 1 and 'cannot write checkpoint' in errors[0], errors
  assert 'teacher/3' in errors[0] and 'File too large' in errors[0], errors
  after = _snapshot(workdir)
  assert {k: after.get(k) for k in before} == before


@contextlib.contextmanager
def _read_only_dir(path):
  """`path` as a directory that refuses writes: a read-only tmpfs mounted
  on it for root (whom file modes do not stop), mode 0o555 for others."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid():
    os.chmod(path, 0o555)
    try:
      yield path
    finally:
      os.chmod(path, 0o755)
    return
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'ro', 'tmpfs', path],
                    capture_output=True).returncode:
    pytest.skip('root without mount rights: no directory refuses writes')
  try:
    yield path
  finally:
    subprocess.run(['umount', path], check=True)


def test_failed_checkpoint_write_leaves_no_thread(tmp_path):
  """A checkpoint that cannot be written is one TCNError, and no thread
  outlives it (Orbax's asynchronous writes once left threads waiting five
  minutes for a signal, holding the process's exit)."""
  before = set(threading.enumerate())
  with _read_only_dir(str(tmp_path / 'stage')) as stage:
    with pytest.raises(TCNError, match=f'cannot write checkpoint {stage}/1'):
      with checkpoint.StageCheckpoint(stage) as ckpt:
        ckpt.save(1, {'w': np.zeros(8, np.float32)}, {'epoch': 1})
  assert [t.name for t in set(threading.enumerate()) - before
          if t.is_alive() and not t.daemon] == []


@pytest.mark.slow
def test_unwritable_stage_directory_exits_promptly(finished, tmp_path):
  """The command line on a workdir whose teacher/ refuses writes (an empty
  read-only directory mounted over it): one error line, exit 2, no
  warnings, and an exit soon after the error line (it once hung five
  minutes there, on threads left by the failed write); every file is
  unchanged. The time is measured from the error line, not from the start,
  so that a loaded machine's slow start and training do not count."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  before = _snapshot(workdir)
  lines, reported = [], []

  def read(stream):
    for line in stream:
      lines.append(line)
      if line.startswith('error: ') and not reported:
        reported.append(time.monotonic())

  with _read_only_dir(os.path.join(workdir, 'teacher')):
    proc = subprocess.Popen(
        [sys.executable, '-m', 'tcn_jax.main', '--config', SMOKE,
         '--workdir', workdir, *TINY_FLAGS], cwd=ROOT, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reader = threading.Thread(target=read, args=(proc.stderr,), daemon=True)
    reader.start()
    try:
      deadline = time.monotonic() + 1800   # A guard, not the measure.
      while not reported and proc.poll() is None:
        assert time.monotonic() < deadline, 'no error line came'
        time.sleep(0.05)
      try:
        proc.wait(timeout=120)   # After the error line: exit, not a hang.
      except subprocess.TimeoutExpired:
        pytest.fail('no exit within 120 s of the error line')
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    reader.join(timeout=60)
  stderr = ''.join(lines)
  errors = [l for l in stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2, stderr[-2000:]
  assert (len(errors) == 1 and 'cannot write checkpoint' in errors[0]
          and 'teacher/1' in errors[0]), stderr[-2000:]
  for noise in ('Traceback', 'never awaited', 'Exception ignored'):
    assert noise not in stderr, stderr[-2000:]
  assert _snapshot(workdir) == before


LINGERING_THREAD_SCRIPT = """
import runpy, sys, threading, time
threading.Thread(target=time.sleep, args=(600,), name='lingering').start()
sys.argv = ['tcn_jax.main'] + sys.argv[1:]
runpy.run_module('tcn_jax.main', run_name='__main__', alter_sys=True)
"""


@pytest.mark.slow
def test_failed_run_exits_despite_a_lingering_thread(tmp_path):
  """A failed command line run ends at once even when a library left a
  non-daemon thread running (a normal exit would wait for it): one error
  line, exit 2, no traceback."""
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-c', LINGERING_THREAD_SCRIPT, '--config', SMOKE,
       '--workdir', workdir, *TINY_FLAGS, '--config.num_students=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert (len(errors) == 1 and 'num_students must be a positive'
          in errors[0]), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(workdir)


def test_tensorstore_write_error_names_the_os_cause():
  """Orbax may fail a write inside TensorStore, whose one-line message puts
  the cause mid-line before a spec of a thousand characters; the error line
  must still say it (the spec goes)."""
  spec = '{"context":{"cache_pool":{}},"metadata":{"chunks":[1,32]}}' * 30
  for code, cause in [(27, 'File too large'),
                      (28, 'No space left on device')]:
    raw = ValueError(
        'OUT_OF_RANGE: Error opening "zarr" driver: Error writing '
        '"params.trunk.Dense_1.bias/.zarray" in OCDBT database at local '
        f'file "/tmp/{"x" * 120}/ocdbt.process_0/": Failed to write 119350 '
        f'bytes to file 23: {cause} [tensorstore_spec=\'{spec}\'] '
        f"[os_error_code='{code}']")
    line = checkpoint._first_line(raw)
    assert line.startswith('ValueError: OUT_OF_RANGE: Error opening'), line
    assert cause in line and 'tensorstore_spec' not in line, line
    assert len(line) < 260, line
  # The cause is named even when the cut drops the words around it.
  raw = ValueError(f'OUT_OF_RANGE: {"y" * 150} write failed {"z" * 150} '
                   f"[tensorstore_spec='{spec}'] [os_error_code='28']")
  assert checkpoint._first_line(raw).endswith('[No space left on device]')


@pytest.mark.slow
def test_damaged_checkpoint_command_line(finished, tmp_path):
  """The real command on a truncated checkpoint: exit code 2 and one error
  line naming the array, without the TensorStore spec, and none of the
  errors of Orbax's abandoned reads ('Exception ignored', tracebacks, once
  hundreds of lines in some runs: checkpoint._orbax_leftovers_quieted)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  _truncate(os.path.join(workdir, 'teacher/2/state/ocdbt.process_0/d/*'))
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config', SMOKE,
         '--workdir', workdir, *TINY_FLAGS, '--config.allow_config_change=True']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2
  assert (len(errors) == 1 and 'teacher/2 is damaged or truncated'
          in errors[0]), proc.stderr[-2000:]
  assert '(array ' in errors[0] and 'TensorStore' not in errors[0], errors
  for noise in ('Traceback', 'Exception ignored', 'Event loop is closed'):
    assert noise not in proc.stderr, proc.stderr[-2000:]


LEFTOVER_FILTERS_SCRIPT = """
import glob, logging, os, sys
import numpy as np
from tcn_jax import checkpoint
def installed():
  return (checkpoint._not_orbax_leftover in logging.getLogger('asyncio').filters,
          getattr(sys.unraisablehook, 'drops_orbax_leftovers', False))
hook = sys.unraisablehook
state = {'w': np.arange(4096, dtype=np.float32)}
with checkpoint.StageCheckpoint(sys.argv[1]) as ckpt:
  ckpt.save(1, state, {'epoch': 1})
  ckpt.restore(state)
print('after success', *installed(), sys.unraisablehook is hook)
for p in glob.glob(os.path.join(sys.argv[1], '1/state/ocdbt.process_0/d/*')):
  with open(p, 'r+b') as f:
    f.truncate(os.path.getsize(p) // 2)
with checkpoint.StageCheckpoint(sys.argv[1]) as ckpt:
  try:
    ckpt.restore(state)
  except checkpoint.TCNError:
    print('after failure', *installed())
"""


@pytest.mark.slow
def test_leftover_filters_stay_only_after_a_failure(tmp_path):
  """The filters for Orbax's leftovers are gone after checkpoints that work
  (a user's own asyncio and unraisable reports still show) and stay after
  one that fails (its abandoned reads surface later). A fresh process: the
  suite's own failed reads have installed them here already."""
  proc = subprocess.run(
      [sys.executable, '-c', LEFTOVER_FILTERS_SCRIPT, str(tmp_path / 'c')],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = proc.stdout.splitlines()
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert lines == ['after success False False True',
                   'after failure True True'], (lines, proc.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize('flag, message', [
    ('--config.num_students=abc', "--config.num_students=abc: invalid literal"),
    ('--config.teacher.epoch=3', "no config field 'epoch'"),
    (f'--config={SMOKE[:-len("smoke")]}bogus', "unknown preset 'bogus'"),
    ('--config=configs/missing.py', 'No such file'),
    ('stray_argument', "unexpected arguments: ['stray_argument']"),
])
def test_bad_command_line(tmp_path, flag, message):
  """absl flag errors (types, unknown fields, config files) are one line."""
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config', SMOKE,
         '--workdir', workdir, *TINY_FLAGS, flag]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(workdir)


# Config files that do not load: (file text, expected text in the error).
BAD_CONFIG_FILES = [
    ('def get_config(:\n', 'SyntaxError: invalid syntax'),
    ('import no_such_module_here\ndef get_config():\n  pass\n',
     "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ('def get_config():\n  raise RuntimeError("no config today")\n',
     'RuntimeError: no config today'),
    ('def get_config():\n  return {"seed": 0}\n',
     'the config must be an ml_collections.ConfigDict'),
    ('hello\n', "NameError: name 'hello' is not defined"),
    ('x = 1\n', 'get_config'),
]


@pytest.mark.slow
@pytest.mark.parametrize('text, message', BAD_CONFIG_FILES,
                         ids=['syntax', 'import', 'raises', 'dict',
                              'not python', 'no get_config'])
def test_config_file_that_does_not_load(tmp_path, text, message):
  """One `error:` line naming the cause, exit 2, no workdir, no traceback."""
  path = tmp_path / 'bad_config.py'
  path.write_text(text)
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'tcn_jax.main', '--config', str(path),
       '--workdir', workdir], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(workdir)


def test_load_tcn_on_other_directories(finished, tmp_path):
  cases = [(str(tmp_path / 'missing'), 'is not a directory'),
           (str(tmp_path), 'holds no TCN checkpoint'),
           (os.path.join(finished, 'teacher'), 'is a checkpoint but not of a'),
           (finished, 'holds no TCN checkpoint')]
  damaged = str(tmp_path / 'tcn')
  shutil.copytree(os.path.join(finished, 'tcn'), damaged)
  _truncate(os.path.join(damaged, '*/state/ocdbt.process_0/d/*'))
  cases.append((damaged, 'is damaged or truncated'))
  for path, message in cases:
    with pytest.raises(TCNError, match=message) as e:
      assert assemble.load_tcn(path)
    assert '\n' not in str(e.value) and path in str(e.value)


def test_damaged_features_cache_is_recomputed(finished, tmp_path):
  """features.npz is derived data: a damaged one is computed again, giving
  the same results."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  _truncate(os.path.join(workdir, 'features.npz'))
  with open(os.path.join(workdir, 'features.npz.tmp'), 'w') as f:
    f.write('left over by a kill')
  results = pipeline.run(tiny_config(), workdir)
  with open(os.path.join(finished, 'results.json')) as f:
    expected = json.load(f)
  assert results['digests'] == expected['digests']
  assert results['student_val_mse'] == expected['student_val_mse']


def test_config_diff_ignores_options_added_since_the_run():
  """A field missing from an old run's config.json takes the value that is
  that run's behaviour (`config.upgrade`), so it is not a change (runs of
  older versions resume); any other difference is."""
  new = config_lib.to_json(config_lib.resolve(config_lib.base_config()))
  old = copy.deepcopy(new)
  del old['students']['features'], old['dtype'], old['data']['augment']
  assert workdir_lib.diff(config_lib.upgrade(old), new) == []
  new['data']['augment'] = 'mirror'
  assert workdir_lib.diff(config_lib.upgrade(old), new) == [
      "data.augment: '' -> 'mirror'"]
  old = {'students': {'epochs': 10}}
  assert workdir_lib.diff({'students': {'epochs': 10, 'gone': 0}}, old) == [
      "students.gone: 0 -> '<unset>'"]


def test_rerun_check_reads_an_old_config_json_as_todays(tmp_path):
  """The check before any data is read (`workdir.check_config`) upgrades
  the recorded config as the workdir does: a field added since the run
  (head.views) is not a change; another value is, named."""
  new = config_lib.to_json(config_lib.resolve(config_lib.base_config()))
  old = copy.deepcopy(new)
  del old['head']['views'], old['students']['views']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  workdir_lib.check_config(str(tmp_path), new, False)
  new['head']['views'] = 'mixup'
  with pytest.raises(TCNError, match="head.views: '' -> 'mixup'"):
    workdir_lib.check_config(str(tmp_path), new, False)
