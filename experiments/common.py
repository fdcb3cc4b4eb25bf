"""Helpers shared by the experiments: paths, config files, a workdir's
resolved config, results files, summary statistics and number formatting."""
import functools
import importlib.util
import json
import math
import os
import platform
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'experiments', 'results')
NOT_RUN = '— (not run)'


# ------------------------------------------------------------------ paths

def show(path):
  """A path relative to the repository, or absolute outside it."""
  rel = os.path.relpath(os.path.abspath(path), REPO)
  return os.path.abspath(path) if rel.startswith('..') else rel


def command(argv=None, module=None, quote=True):
  """The command line of this process as typed from the repository root:
  `python -m experiments.<name> ARGS`. module: the module run with -m
  (default: that of __main__); ARGS shell-quoted unless `quote` is False."""
  argv = sys.argv[1:] if argv is None else argv
  if module is None:
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    module = spec.name if spec is not None else None
  prog = f'-m {module}' if module else show(sys.argv[0])
  args = shlex.join(argv) if quote else ' '.join(argv)
  return f'python {prog} {args}'.strip()


# ---------------------------------------------------------------- configs

@functools.cache
def config_module(name='fashion_mnist'):
  """configs/<name>.py as a module, loaded from its file (configs/ is not a
  package and is not put on sys.path)."""
  path = os.path.join(REPO, 'configs', name + '.py')
  spec = importlib.util.spec_from_file_location(f'configs_{name}', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(name='fashion_mnist', preset=''):
  """`configs/<name>.py:<preset>` as a fresh ConfigDict (unresolved)."""
  return config_module(name).get_config(preset)


def resolve(cfg):
  """The resolved config, as plain JSON data, of `cfg` (a ConfigDict or the
  data of a config.json): per-n values chosen for `num_students`, no
  `*_by_n` tables (tcn_jax.config.resolve; idempotent). An older
  config.json is read as today's fields first (`tcn_jax.config.upgrade`:
  an option added since that run takes the value that is its behaviour)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tcn_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(cfg, dict):
    cfg = json.loads(cfg.to_json_best_effort())
  cfg = config_lib.upgrade(cfg)
  out = config_lib.resolve(ml_collections.ConfigDict(cfg))
  return json.loads(out.to_json_best_effort())


@functools.cache
def _read_config(path, mtime):
  del mtime   # Part of the cache key only.
  with open(path) as f:
    return json.dumps(resolve(json.load(f)))


def read_config(path):
  """A workdir's config.json (or the workdir), resolved: see `resolve`."""
  if os.path.isdir(path):
    path = os.path.join(path, 'config.json')
  return json.loads(_read_config(os.path.abspath(path),
                                 os.path.getmtime(path)))


@functools.cache
def _paper_config(name, preset, n):
  cfg = get_config(name, preset)
  cfg.num_students = n
  return json.dumps(resolve(cfg))


def paper_config(n, preset='', name='fashion_mnist'):
  """`configs/<name>.py:<preset>` for n students, resolved (plain data)."""
  return json.loads(_paper_config(name, preset, n))


# ---------------------------------------------------------------- results

def read_results(path):
  """A results.json (or a copy of one) as a dict; None if the file is not
  one (no TCN accuracy in it) or cannot be read."""
  try:
    with open(path) as f:
      r = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(r, dict) or 'tcn_test_acc_after_finetune' not in r:
    return None
  return r


# ------------------------------------------------------------------ stats

def stats(values):
  """{'mean', 'std' (sample; None for one value), 'k', 'values'} of the
  values that are not None; None if there are none."""
  vals = [v for v in values if v is not None]
  if not vals:
    return None
  mean = sum(vals) / len(vals)
  std = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
         if len(vals) > 1 else None)
  return {'mean': mean, 'std': std, 'k': len(vals), 'values': vals}


def fmt(s, digits=2, scale=1.0):
  """'mean ± std (k runs)' of `stats`, scaled; NOT_RUN for None."""
  if s is None:
    return NOT_RUN
  m = f'{scale * s["mean"]:.{digits}f}'
  if s['std'] is not None:
    m += f' ± {scale * s["std"]:.{digits}f}'
  return m + (f' ({s["k"]} runs)' if s['k'] > 1 else '')


def delta(s, ref_value, scale=100.0):
  """Ours (a `stats`, scaled) minus a reference number, '+x.xx'."""
  if s is None or ref_value is None:
    return '—'
  return f'{scale * s["mean"] - ref_value:+.2f}'


def ref(v):
  """A reference number with two decimals, '–' for None."""
  return '–' if v is None else f'{v:.2f}'


def num(v):
  """1234567 -> '1.23M', 1234 -> '1.23k'."""
  if v >= 1e6:
    return f'{v / 1e6:.2f}M'
  if v >= 1e3:
    return f'{v / 1e3:.2f}k'
  return f'{v:.0f}'


def machine() -> dict:
  """The CPU this process runs on, as `lscpu` names it: model, cores and
  the vector extensions XLA:CPU can use (timings compare only on one)."""
  info = {'cpu': platform.processor() or platform.machine(),
          'cores': os.cpu_count()}
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
    info['cpu'] = text.split('model name')[1].split(':', 1)[1].split('\n')[0]
    flags = text.split('\nflags')[1].split(':', 1)[1].split('\n')[0].split()
    info['avx512'] = 'avx512f' in flags
    info['avx2'] = 'avx2' in flags
  except (OSError, IndexError):
    pass
  info['cpu'] = info['cpu'].strip()
  return info
