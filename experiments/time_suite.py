"""How long the test suite takes: the fast tier (`-m "not slow"`) and the
full suite (the README's test command), one after the other, on this machine.

Run it from a fresh clone on a quiet machine (the figures in the docs and in
issue notes come from there); nothing else should share the CPU.

  python -m experiments.time_suite [--tiers fast,full] [--slowest 25]

Writes experiments/results/test_suite_timing_cpu.{md,json}: per tier the
command, passed/failed counts, the wall time, and the slowest tests (pytest's
--durations) with the phase each was spent in.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib

from experiments import common

TIERS = {'fast': 'python -m pytest tests -m "not slow"',
         'full': 'python -m pytest tests'}   # The README's test command.


def run_tier(name: str, slowest: int) -> dict:
  cmd = [sys.executable, *shlex.split(TIERS[name])[1:],
         '-p', 'no:cacheprovider', f'--durations={slowest}']
  t = time.time()
  proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True)
  wall = time.time() - t
  out = proc.stdout
  counts = {k: int(n) for n, k in re.findall(
      r'(\d+) (passed|failed|skipped|deselected|errors?)',
      out.splitlines()[-1])}
  durations = [[float(s), phase, test] for s, phase, test in re.findall(
      r'^([\d.]+)s (setup|call|teardown)\s+(\S+)$', out, re.M)]
  return {'command': TIERS[name], 'returncode': proc.returncode,
          'counts': counts, 'seconds': round(wall, 1), 'slowest': durations,
          'tail': out.splitlines()[-3:] if proc.returncode else []}


def write(results: dict, path: str) -> None:
  m = results['machine']
  lines = ['# How long the test suite takes', '',
           f"Machine: {m['cpu']}, {m['cores']} cores, AVX-512: "
           f"{m.get('avx512')}. Command: `python -m experiments.time_suite`, "
           'from a fresh clone, nothing else running. pytest options from '
           f"pyproject.toml: `{results.get('addopts', '')}`; a test's "
           'seconds are measured beside the other workers, if any.', '',
           '| tier | command | result | wall |', '|---|---|---|---|']
  for name, r in results['tiers'].items():
    counts = ', '.join(f'{n} {k}' for k, n in r['counts'].items())
    lines.append(f"| {name} | `{r['command']}` | {counts} | "
                 f"{r['seconds']:.0f} s ({r['seconds'] / 60:.1f} min) |")
  for name, r in results['tiers'].items():
    lines += ['', f'Slowest tests, {name} tier:', '', '| s | phase | test |',
              '|---|---|---|']
    lines += [f'| {s:.1f} | {phase} | `{test}` |'
              for s, phase, test in r['slowest']]
  with open(path + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(path + '.json', 'w') as f:
    json.dump(results, f, indent=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiers', default='fast,full')
  parser.add_argument('--slowest', type=int, default=25)
  args = parser.parse_args()
  tiers = args.tiers.split(',')
  unknown = sorted(set(tiers) - set(TIERS))
  if unknown:
    sys.exit(f'error: --tiers: unknown tier(s) {unknown}; known: '
             f'{sorted(TIERS)}')
  with open(os.path.join(common.REPO, 'pyproject.toml'), 'rb') as f:
    addopts = tomllib.load(f)['tool']['pytest']['ini_options']['addopts']
  results = {'machine': common.machine(), 'addopts': addopts,
             'tiers': {name: run_tier(name, args.slowest) for name in tiers}}
  write(results, os.path.join(common.RESULTS, 'test_suite_timing_cpu'))
  print(json.dumps({k: (v['counts'], v['seconds'])
                    for k, v in results['tiers'].items()}))


if __name__ == '__main__':
  main()
