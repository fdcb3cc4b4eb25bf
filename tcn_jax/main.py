"""Command line: `python -m tcn_jax.main --config configs/X.py --workdir DIR`.

Any config field can be overridden, e.g. `--config.num_students=8`.
Errors in the config, data or workdir print one line and exit with code 2.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tcn_jax import train
from tcn_jax.errors import TCNError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (resumable).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Orbax logs every checkpoint write at INFO; keep the console to progress.
  logging.get_absl_handler().addFilter(
      lambda record: 'orbax' not in record.pathname)
  try:
    results = train.run(_CONFIG.value, _WORKDIR.value)
  except TCNError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  logging.info('results: %s', results)


if __name__ == '__main__':
  app.run(main)
