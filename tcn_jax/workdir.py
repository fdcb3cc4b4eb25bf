"""The run directory: its lock, its config, and which stages may be reused.

Each stage's saved output records a key: a digest of the stage's resolved
config section, the keys of the stages it consumes, the data and the seed
(`stage_key`). A rerun reuses (resumes or skips) a stage only when its key
matches. Otherwise the stage, and through the keys everything downstream of
it, is recomputed when `config.allow_config_change` is set, or the run is
refused. The workdir is opened only after the config and data are checked,
so a run that cannot work writes nothing.
"""
import fcntl
import hashlib
import json
import os
import shutil

from absl import logging

from tcn_jax import checkpoint
from tcn_jax import config as config_lib
from tcn_jax.errors import TCNError

# Where each stage keeps its output, relative to the workdir.
OUTPUTS = {'teacher': 'teacher', 'features': 'features.npz',
           'students': 'students', 'head': 'head', 'kd': 'kd',
           'kdgan': 'kdgan'}
KEYS_FILE = 'stage_keys.json'
# Outputs of the whole run, recomputed from the stages at its end.
RUN_OUTPUTS = ('results.json', 'tcn', 'export')
# Fields that may change between reruns without being a change of config.
IGNORED = ('allow_config_change', 'classes', 'distributed', 'export', 'mesh')


def stage_key(**inputs) -> str:
  """The key of a stage computed from `inputs` (JSON data: config sections,
  upstream keys, the data's digest, the seed)."""
  text = json.dumps(inputs, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def dtype_key(config) -> dict:
  """A stage key's compute dtype entry: none for float32 (the keys of
  runs made before the field stay the same)."""
  return {} if config.dtype == 'float32' else {'dtype': config.dtype}


def section_key(section: dict, added: tuple[str, ...] = ()) -> dict:
  """A config section as a stage key's entry: the fields in `added` (added
  since runs were made) left out while unset, so those runs' keys stay the
  same."""
  return {k: v for k, v in section.items() if v or k not in added}


def forward_key(config) -> dict:
  """A stage key's `forward_impl` entry: none when unset (as above)."""
  return {'forward_impl': config.forward_impl} if config.forward_impl else {}


def _read_json(path):
  """A workdir JSON file, or TCNError naming it when damaged."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise TCNError(f'{path} cannot be read ({type(e).__name__}); move it '
                   'away or use a new workdir') from None
  if not isinstance(value, dict):
    raise TCNError(f'{path} is not a JSON object; move it away or use a new '
                   'workdir')
  return value


def diff(old: dict, new: dict, prefix: str = '') -> list[str]:
  """The changed fields, as 'path: old -> new' (IGNORED fields skipped);
  `old` is read through `config.upgrade` (fields added since that run take
  the value that is its behaviour)."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '<unset>'), new.get(k, '<unset>')
    if k in IGNORED:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


def check_path(path: str, what: str = 'workdir') -> str:
  """Fails with one line saying why `path` cannot be a run directory (empty,
  a file, under a file, not writable); returns it made absolute."""
  if not isinstance(path, str) or not path.strip():
    raise TCNError(f'{what} {path!r} is empty: give a directory')
  parent = path
  while not os.path.lexists(parent):   # The nearest existing ancestor.
    parent = os.path.dirname(parent.rstrip(os.sep)) or '.'
  if parent != path and not os.path.isdir(parent):
    raise TCNError(f'{what} {path} cannot be created: {parent} is a file, '
                   'not a directory')
  if parent == path and not os.path.isdir(path):
    raise TCNError(f'{what} {path} is a file, not a directory')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise TCNError(f'{what} {path} is not writable: no write permission on '
                   f'{parent}')
  return os.path.abspath(path)


def lock_directory(path: str) -> int:
  """Creates `path` if missing and takes an exclusive lock on the directory
  itself (flock on its descriptor): unlike a lock file, it cannot be deleted
  or replaced under a live run. Returns the descriptor (closing it
  releases the lock).

  Raises:
    TCNError: the directory cannot be made, or another run holds it.
  """
  check_path(path)
  try:
    os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  except OSError as e:
    raise TCNError(f'workdir {path} cannot be opened: {e.strerror}'
                   f'{f" ({e.filename})" if e.filename else ""}') from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise TCNError(f'workdir {path} is in use by another run (a process '
                   'holds its lock); wait for it or use a new workdir'
                   ) from None
  return fd


def recorded_changes(path: str, config: dict) -> list[str]:
  """The fields in which `config` differs from the run recorded in `path`
  (its config.json read through `config.upgrade`: fields added since that
  run are not changes); [] when none is recorded."""
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    return []
  return diff(config_lib.upgrade(_read_json(config_path)), config)


def refuse_changes(path: str, changes: list[str]):
  """The one line refusing a rerun with another config."""
  if changes:
    raise TCNError(f'workdir {path} holds a run with another config '
                   f'({"; ".join(changes)}); use a new workdir or '
                   '--config.allow_config_change=True')


def check_config(path: str, config: dict, allow_change: bool):
  """Refuses, before any data is read, a rerun in `path` with another config
  (unless `allow_change`): the same rule and line as `Workdir` applies when
  it opens the directory (this only reads config.json)."""
  if not allow_change:
    refuse_changes(path, recorded_changes(path, config))


class Workdir:
  """An open, locked run directory.

  Args:
    path: the directory (created if missing).
    config: the resolved config as JSON data.
    keys: {stage: key} of the stages this run will use.
    allow_change: recompute stages whose key changed instead of refusing.
  """

  def __init__(self, path: str, config: dict, keys: dict[str, str],
               allow_change: bool):
    self.path, self.allow_change = path, allow_change
    self._fd = lock_directory(path)
    try:
      self._open(config, keys)
    except BaseException:
      self.close()
      raise

  def _open(self, config, keys):
    changes = recorded_changes(self.path, config)
    if not self.allow_change:
      refuse_changes(self.path, changes)
    keys_path = os.path.join(self.path, KEYS_FILE)
    self.keys = (_read_json(keys_path) if os.path.exists(keys_path) else {})
    stale = [s for s, k in keys.items() if self._exists(s)
             and self.keys.get(s) != k]
    if stale and not self.allow_change:
      raise TCNError(
          f'workdir {self.path}: stage {stale[0]} was computed from other '
          'inputs (another data set, seed or version); use a new workdir or '
          '--config.allow_config_change=True to recompute it')
    for stage in stale:
      self._remove(OUTPUTS[stage], f'stage {stage} (its inputs changed)')
    if stale or changes:
      for name in RUN_OUTPUTS:
        self._remove(name, 'the last results')
    self.keys.update(keys)
    checkpoint.write_json(keys_path, self.keys)
    checkpoint.write_json(os.path.join(self.path, 'config.json'), config)

  def _exists(self, stage):
    return os.path.exists(os.path.join(self.path, OUTPUTS[stage]))

  def _remove(self, name, what):
    path = os.path.join(self.path, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    else:
      return
    logging.info('config changed: removed %s, %s', path, what)

  def stage_dir(self, *parts) -> str:
    return os.path.join(self.path, *parts)

  def close(self):
    if self._fd is not None:
      os.close(self._fd)   # Closing the descriptor releases the lock.
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
