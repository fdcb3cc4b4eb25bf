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

from conftest import needs_fmnist, ROOT, SMOKE, TINY_FLAGS
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
