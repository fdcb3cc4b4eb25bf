"""Command line: `python -m tcn_jax.export_cli --workdir DIR [--formats
stablehlo,onnx] [--batch_size N] [--input_shape 28,28,1]`.

Exports a trained workdir's TCN and each of its students into
`DIR/export/` (`tcn_jax.export.export_workdir`). A tool beside the
pipeline, with its own flags; a run can do the same at its end with
`--config.export.formats=...`. Bad input: one `error:` line, exit 2.
"""
import argparse
import os
import sys

from tcn_jax.errors import TCNError
from tcn_jax.export import export_workdir
from tcn_jax.formats import FORMATS
from tcn_jax.formats import parse_formats
from tcn_jax.workdir import check_path


def _fail(text):
  print(f'error: {text}', file=sys.stderr)
  sys.exit(2)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m tcn_jax.export_cli',
      description="Exports a trained workdir's TCN and each student.")
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--formats', default='stablehlo,onnx',
                      help=f'comma-separated: {", ".join(FORMATS.names())}')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='a fixed batch size; 0: any')
  parser.add_argument('--input_shape', default='',
                      help="e.g. 28,28,1; default: the workdir's data")
  args = parser.parse_args(argv)
  try:
    shape = None
    if args.input_shape:
      try:
        shape = tuple(int(d) for d in args.input_shape.split(','))
      except ValueError:
        raise TCNError('--input_shape must be integers like 28,28,1, got '
                       f'{args.input_shape!r}') from None
    if args.batch_size < 0:
      raise TCNError(f'--batch_size must be >= 0, got {args.batch_size}')
    formats = parse_formats(args.formats, '--formats')
    if not formats:
      raise TCNError('--formats names no format; choose from '
                     f'{", ".join(FORMATS.names())}')
    if not os.path.isdir(args.workdir):
      raise TCNError(f'--workdir {args.workdir!r} is not a directory')
    # Where it writes, checked before the TCN is loaded and traced.
    check_path(os.path.join(args.workdir, 'export'), 'export directory')
    paths = export_workdir(args.workdir, formats, args.batch_size or None,
                           shape)
  except TCNError as e:
    _fail(str(e))
  except OSError as e:   # A write refused mid-way: the path and the cause.
    _fail(f'export to {args.workdir} failed: {e.strerror or e}'
          f'{f" ({e.filename})" if e.filename else ""}')
  for p in paths:
    print(p)


if __name__ == '__main__':
  main()
