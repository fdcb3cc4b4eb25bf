"""Orbax checkpoints for each stage, and workdir bookkeeping.

Each stage (teacher, students, head) owns `workdir/<stage>/` managed by an
Orbax `CheckpointManager`, saved after every epoch: parameters, optimizer
state and a JSON record (epoch, history). Running the same command again
resumes from the latest epoch, and a stage whose last epoch is saved is
skipped. The assembled TCN is one more checkpoint (see `assemble`).

A checkpoint is written to a temporary directory and renamed when complete,
so a kill mid-write leaves the previous epochs intact (the leftover is
removed on the next start). A latest epoch that cannot be read is reported,
never trained over.
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp

from tcn_jax.errors import TCNError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_deferred():
  """Holds SIGTERM/SIGINT until the block ends, then re-raises the first one,
  so that an epoch and its checkpoint are finished before a stop."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []
  old = {s: signal.signal(s, lambda signum, _: caught.append(signum))
         for s in STOP_SIGNALS}
  try:
    yield
  finally:
    for s, handler in old.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    if caught:
      signal.raise_signal(caught[0])


def _first_line(e: Exception) -> str:
  """`Type: first line`, long ones cut in the middle (their ends matter).

  TensorStore ends its errors with a long `[tensorstore_spec=...]` and the
  errno as `[os_error_code='27']`: the spec is dropped and the errno's name
  ("File too large", "No space left on device") kept in plain words. Orbax
  read errors end with "See full TensorStore details: <spec>": the spec goes
  and the array it names ('path': ...) stays.
  """
  text, _, details = str(e).strip().partition(
      ' See full TensorStore details:')
  array = re.findall(r"'path': '([^']+?)/?'", details)[-1:]
  line = (text.splitlines() or [''])[0]
  errno = re.search(r"\[os_error_code='?(\d+)'?\]", line)
  line = line.split(' [tensorstore_spec=')[0]
  if array:
    line = f"{line.rstrip('.')} (array {array[0]})"
  if len(line) > 200:
    line = f'{line[:90]} ... {line[-100:]}'
  if errno and os.strerror(int(errno.group(1))) not in line:
    line += f' [{os.strerror(int(errno.group(1)))}]'
  return f'{type(e).__name__}: {line}'


def access_error(e: BaseException, where: str) -> str:
  """For an error of permissions ('Permission denied', a read-only file
  system) the cause with the full path of the file it names (Orbax gives a
  bare name like '_CHECKPOINT_METADATA'); '' for any other error."""
  import errno  # pylint: disable=g-import-not-at-top
  if not (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM,
                                                 errno.EROFS)):
    return ''
  name = e.filename or ''
  if name and not os.path.isabs(str(name)):
    name = os.path.join(where, str(name))
  return f'{e.strerror}: {name or where}'


def _refuse_access(e, where):
  """A checkpoint that cannot be read for its permissions is not damaged:
  one line naming the file."""
  cause = access_error(e, where)
  if cause:
    raise TCNError(f'cannot read checkpoint {where} ({cause}); give this '
                   'user read access to it') from None


def _orbax_leftover(exc) -> bool:
  """True for an error that Orbax's abandoned asyncio work raises after a
  failed read or write has already been reported."""
  text = str(exc)
  return ('Event loop is closed' in text or
          'Encountered error while reading array index' in text)


def _not_orbax_leftover(record: logging.LogRecord) -> bool:
  """asyncio logger filter: keeps every record but Orbax's leftovers. Any
  "exception was never retrieved" report counts: after a failed read, those
  futures carry TensorStore's raw errors (e.g. OUT_OF_RANGE on a truncated
  file), too varied to match by text."""
  exc = record.exc_info[1] if record.exc_info else None
  message = record.getMessage()
  return not ('exception was never retrieved' in message or
              _orbax_leftover(message) or
              (exc is not None and _orbax_leftover(exc)))


def _install_leftover_filters():
  """Drops Orbax's leftovers from `sys.unraisablehook` (by text; other
  unraisables pass on) and from the asyncio logger (with every "exception
  was never retrieved" report). Returns a function that removes what this
  call installed (nothing when they were installed already)."""
  logger = logging.getLogger('asyncio')
  undo = []
  if _not_orbax_leftover not in logger.filters:
    logger.addFilter(_not_orbax_leftover)
    undo.append(lambda: logger.removeFilter(_not_orbax_leftover))
  if not getattr(sys.unraisablehook, 'drops_orbax_leftovers', False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _orbax_leftover(unraisable.exc_value):
        previous(unraisable)
    hook.drops_orbax_leftovers = True
    sys.unraisablehook = hook

    def restore_hook():
      if sys.unraisablehook is hook:   # Unless someone replaced it since.
        sys.unraisablehook = previous
    undo.append(restore_hook)
  return lambda: [u() for u in undo]


@contextlib.contextmanager
def _orbax_leftovers_quieted():
  """Orbax reads and writes arrays in asyncio tasks. When one fails, the
  others are abandoned and surface later (garbage collection, interpreter
  exit) as hundreds of "Exception ignored" and "exception was never
  retrieved" lines that repeat the error already raised, so a bad checkpoint
  would not be one error line. The filters hold while the block runs; if it
  fails they stay for the rest of the process (the leftovers come later),
  and if it succeeds they are removed, so a process whose checkpoints all
  work keeps every report."""
  remove = _install_leftover_filters()
  yield   # An exception skips the removal below.
  remove()


# What Orbax logs (absl WARNING) on opening any directory read-only.
_READ_ONLY_NOTICE = ('Given directory is read only',)


@contextlib.contextmanager
def _absl_quiet(prefixes):
  """Drops absl log records whose message starts with one of `prefixes`
  while the block runs; every other record passes."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  def keep(record):
    return not str(record.msg).startswith(tuple(prefixes))
  logger = absl_logging.get_absl_logger()
  if prefixes:
    logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def shapes(tree) -> dict:
  """{'a/b/c': shape} of a pytree of arrays or of Orbax array metadata."""
  def name(k):
    return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in leaves}


class StageCheckpoint:
  """Per-epoch checkpoints of one training stage (`read_only` for loading)."""

  def __init__(self, directory: str, max_to_keep: int = 2,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    # Written synchronously (save waits for the write anyway): no Orbax
    # thread outlives a failed write, waiting minutes for a signal that
    # never comes and holding the process's exit.
    # Read-only: the options Orbax would otherwise reset with a warning
    # each, and its "Given directory is read only" warning dropped, so that
    # loading (load_tcn, a finished stage) prints nothing.
    try:
      with _absl_quiet(_READ_ONLY_NOTICE if read_only else ()):
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else max_to_keep,
                save_interval_steps=0 if read_only else 1,
                create=not read_only,
                enable_async_checkpointing=False, read_only=read_only,
                cleanup_tmp_directories=not read_only),
            item_handlers={'state': ocp.StandardCheckpointHandler(),
                           'record': ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise TCNError(f'cannot open checkpoint directory {self.directory} '
                     f'({access_error(e, self.directory) or _first_line(e)})'
                     ) from None

  def latest_epoch(self) -> int:
    """Number of finished epochs saved (0 = nothing saved)."""
    return self.manager.latest_step() or 0

  def save(self, epoch: int, state, record: dict):
    """Writes epoch `epoch` completely (a stop signal waits for it)."""
    with _orbax_leftovers_quieted(), signals_deferred():
      try:
        saved = self.manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            record=ocp.args.JsonSave(record)))
        self.manager.wait_until_finished()
      except Exception as e:  # Disk full, unwritable, ...: Orbax varies.
        where = f'{self.directory}/{epoch}'
        raise TCNError(f'cannot write checkpoint {where} '
                       f'({access_error(e, where) or _first_line(e)}); '
                       'earlier epochs are kept') from None
    if not saved:   # Orbax skips, silently, a step that is already there.
      raise TCNError(f'checkpoint {self.directory}/{epoch} already exists')

  def restore(self, state_template=None):
    """(state, record) of the latest epoch, shaped like `state_template`.

    Refuses, naming the checkpoint, one that holds other shapes (another
    architecture or input size) or cannot be read (damaged or truncated).
    """
    epoch = self.latest_epoch()
    where = f'{self.directory}/{epoch}'
    older = [s for s in self.manager.all_steps() if s < epoch]
    damaged = (f'checkpoint {where} is damaged or truncated ({{}}); move it '
               'away to resume from ' +
               (f'epoch {max(older)}' if older else 'scratch'))
    with _orbax_leftovers_quieted(), signals_deferred():
      try:
        stored = shapes(self.manager.item_metadata(epoch)['state'].tree)
      except Exception as e:  # Orbax raises several types for bad files.
        _refuse_access(e, where)
        raise TCNError(damaged.format(_first_line(e))) from None
      abstract = None
      if state_template is not None:
        wanted = shapes(state_template)
        if stored != wanted:
          key = min((k for k in set(stored) | set(wanted)
                     if stored.get(k) != wanted.get(k)),
                    key=lambda k: (not k.startswith('params'), k))
          raise TCNError(
              f'checkpoint {where} was saved for another architecture or '
              f'input size ({key}: stored {stored.get(key, "nothing")}, this '
              f'config needs {wanted.get(key, "nothing")}); use a new workdir')
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          state_template)
      try:
        out = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            record=ocp.args.JsonRestore()))
      except Exception as e:  # Orbax raises several types for bad files.
        _refuse_access(e, where)
        raise TCNError(damaged.format(_first_line(e))) from None
    return out.state, out.record

  def stored_keys(self) -> set:
    """The top-level keys of the latest epoch's stored state (none where
    it cannot be read: `restore` then says what is wrong)."""
    try:
      return set(self.manager.item_metadata(self.latest_epoch())['state'].tree)
    except Exception:  # pylint: disable=broad-except
      return set()

  def record(self) -> dict:
    """The JSON record of the latest epoch (no arrays are read)."""
    return self.manager.restore(self.latest_epoch(), args=ocp.args.Composite(
        record=ocp.args.JsonRestore())).record

  def close(self):
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):   # Closed on errors too: no orbax reads linger.
    self.close()


def finished_epochs(directory) -> int:
  """Epochs saved in a stage directory (0 if absent), read without creating
  it: lets a stage skip work it would need only to train."""
  if not directory or not os.path.isdir(directory):
    return 0
  with StageCheckpoint(directory, read_only=True) as ckpt:
    return ckpt.latest_epoch()


def digest(*trees) -> str:
  """SHA-256 over every array in `trees` (shapes, dtypes and bytes): equal
  digests mean bitwise-equal parameters or data (a streamed split counts
  by its `fingerprint`: files, rows, transform)."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(trees):
    if hasattr(leaf, 'fingerprint'):   # A streamed split: its files.
      h.update(leaf.fingerprint().encode())
      continue
    a = np.ascontiguousarray(leaf)
    h.update(f'{a.shape}{a.dtype}'.encode())
    h.update(a.data)
  return h.hexdigest()


def atomic_write(path: str, write):
  """Calls write(file) on a temporary file, then renames it to `path`, so a
  crash or a full disk never leaves a truncated file or loses the old one."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj):
  """Writes JSON atomically."""
  atomic_write(path, lambda f: f.write(
      json.dumps(obj, indent=2, sort_keys=True).encode()))
