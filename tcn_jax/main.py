"""Command line: `python -m tcn_jax.main --config configs/X.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.num_students=8`.
Errors in the flags, config, data or workdir print one line
(`error: ...`) and exit with code 2. SIGTERM/SIGINT finish the epoch in
progress and its checkpoint (outside an epoch: stop at once), print one line
and exit with 128 + the signal number; the same command resumes.
"""
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tcn_jax import distributed
from tcn_jax import input_pipeline
from tcn_jax import pipeline
from tcn_jax.errors import Interrupted
from tcn_jax.errors import TCNError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (resumable).')
flags.mark_flags_as_required(['config', 'workdir'])


def _message(e) -> str:
  """`e` as one line (first and last line of a long message, e.g. a config
  file's traceback)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [repr(e)]
  return lines[0] if len(lines) == 1 else f'{lines[0]} ... {lines[-1]}'


def _fail(e, code: int = 2):
  """Prints `e` (an exception or its message) as one `error:` line and
  exits."""
  print(f'error: {_message(e)}', file=sys.stderr)
  sys.exit(code)


def _config_path(argv):
  """The --config file named in argv (without its presets), or ''."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    return os.path.abspath(value.split(':', 1)[0])
  return ''


def _raised_in(e: BaseException, path: str) -> bool:
  """Whether `e` was raised while running the file `path`."""
  tb = e.__traceback__
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == path:
      return True
    tb = tb.tb_next
  return False


def parse_flags(argv):
  """absl's flag parsing, with a bad flag, override or config file as one
  `error:` line."""
  path = _config_path(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (a config file)
    if (isinstance(e, SyntaxError) or _raised_in(e, path)
        or "attribute 'get_config'" in str(e)
        or not isinstance(e, (AttributeError, KeyError, flags.Error, OSError,
                              ValueError, TypeError))):
      first = (str(e).strip().splitlines() or [''])[0]
      _fail(TCNError(f'--config {path} cannot be loaded: '
                     f'{type(e).__name__}: {first}'))
    _parse_error(e)


def _parse_error(e):
  """A bad flag or --config.* override as one `error:` line."""
  if isinstance(e, (AttributeError, KeyError)):   # A field that is not there.
    while e.args and isinstance(e.args[0], Exception):
      e = e.args[0]
    field, *hint = str(e.args[0] if e.args else e).splitlines()
    _fail(TCNError('; '.join([f'no config field {field} in the --config.* '
                              'overrides', *hint])))
  _fail(e)


def _stop(signum, _):
  for s in (signal.SIGTERM, signal.SIGINT):   # A second one: still one line.
    signal.signal(s, signal.SIG_IGN)
  raise Interrupted(signum)


def main(argv):
  # Orbax logs every checkpoint write at INFO; keep the console to progress.
  logging.get_absl_handler().addFilter(
      lambda record: 'orbax' not in record.pathname)
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _stop)
  failure = None   # (message, exit code): not the exception, whose
  try:             # frames would keep the last batches alive.
    if len(argv) > 1:
      raise TCNError(f'unexpected arguments: {argv[1:]}')
    pipeline.run(_CONFIG.value, _WORKDIR.value)   # Its last line sums up.
  except TCNError as e:
    failure = (_message(e), e.exit_code)
  except OSError as e:   # A config file that does not load, a full disk, ...
    failure = (_message(e), 2)
  except Exception as e:  # pylint: disable=broad-except
    if distributed.process_count() == 1:
      raise   # A bug: its traceback.
    failure = (distributed.lost_peer(e), 2)   # A collective failed.
  finally:   # Grain's worker processes: stopped on every exit path.
    input_pipeline.close_iterators()
  if failure is not None:   # The exception and its frames are gone here.
    _fail(failure[0], failure[1])


def exit_promptly(code: int):
  """Ends a failed run now: its error line is printed and its checkpoints
  are closed, so no thread a library left behind (e.g. one waiting on a write
  that failed) may hold the exit, and a stop signal while exiting is silent."""
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, signal.SIG_DFL)
  input_pipeline.release_workers()   # What Python's exit would release.
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == '__main__':
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit as e:
    if e.code:   # An `error:` line or a stop: nothing more to wait for.
      exit_promptly(e.code if isinstance(e.code, int) else 2)
    raise
