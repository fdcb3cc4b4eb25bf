"""Chaos check: SIGKILL a smoke-sized run at random moments, resume it each
time, and compare the final results and parameters with an uninterrupted run.

  python -m experiments.chaos --kills 10 --seed 0

One uninterrupted reference run first; then chains of runs in a fresh
workdir: each start is killed after a seeded random delay (up to half the
reference's duration; for some trials, at the first checkpoint write after
the delay) and started again with the same command, until the run finishes;
a new chain starts until `--kills` kills happened. Every chain's
results.json (metrics and parameter digests) and its saved TCN must equal
the reference bitwise. All runs use tcn_jax/ and configs/ as committed
(HEAD) when the check starts. Writes experiments/results/chaos.md and
chaos.json.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import logging
import jax
import numpy as np

from experiments import common
from tcn_jax import assemble
from tcn_jax import checkpoint

ROOT = common.REPO

CONFIG = 'configs/fashion_mnist.py:smoke'
TIMING = ('wall_seconds_this_run', 'train_seconds')


def snapshot(dest):
  """Extracts tcn_jax/ and configs/ of the current commit, so edits made
  while the check runs cannot change the command under test."""
  os.makedirs(dest)
  archive = subprocess.run(['git', '-C', ROOT, 'archive', 'HEAD', 'tcn_jax',
                            'configs'], capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
  return dest


def start(src, workdir, overrides, log):
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config', CONFIG,
         '--workdir', workdir, *overrides]
  return subprocess.Popen(cmd, cwd=src, stdout=log, stderr=subprocess.STDOUT)


def tmp_dirs(workdir):
  """Orbax checkpoints being written (renamed when complete)."""
  return glob.glob(os.path.join(workdir, '**', '*orbax-checkpoint-tmp*'),
                   recursive=True)


def stage_of(workdir, log_path):
  """The stage a killed run was in, from its log and its workdir ('students'
  includes computing the frozen students' outputs before the head)."""
  with open(log_path, errors='replace') as f:
    log = f.read()
  if 'data: ' not in log:
    return 'startup'
  if 'teacher test accuracy' not in log:
    return 'teacher'
  if not os.path.exists(os.path.join(workdir, 'features.npz')):
    return 'features'
  if 'TCN test accuracy' in log:
    return 'save'
  return 'head' if os.path.isdir(os.path.join(workdir, 'head')) else 'students'


def comparable(results):
  return {k: v for k, v in results.items() if k not in TIMING}


def load_results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def same_tcn(a, b):
  """Every array of two saved TCNs is bitwise equal."""
  _, ta = assemble.load_tcn(os.path.join(a, 'tcn'))
  _, tb = assemble.load_tcn(os.path.join(b, 'tcn'))
  trees = [([g.variables for g in t.groups], t.head_variables)
           for t in (ta, tb)]
  leaves = [jax.tree_util.tree_leaves(t) for t in trees]
  return len(leaves[0]) == len(leaves[1]) and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(*leaves))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--write_fraction', type=float, default=0.3,
                      help='share of trials killed during a checkpoint write')
  parser.add_argument('--workdir', default='/tmp/tcn_chaos')
  parser.add_argument('--out', default=os.path.join(ROOT, 'experiments',
                                                    'results'))
  parser.add_argument('overrides', nargs='*',
                      help='extra --config.* flags for every run')
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)   # Orbax's read-only notices.
  command = common.command(module='experiments.chaos', quote=False)
  commit = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'],
                          text=True, capture_output=True).stdout.strip()
  rng = np.random.default_rng(args.seed)
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  src = snapshot(os.path.join(args.workdir, 'src'))

  ref = os.path.join(args.workdir, 'reference')
  t0 = time.time()
  with open(ref + '.log', 'w') as log:
    rc = start(src, ref, args.overrides, log).wait()
  ref_seconds = time.time() - t0
  if rc:
    sys.exit(f'reference run failed (exit {rc}); see {ref}.log')
  expected = comparable(load_results(ref))
  print(f'reference run: {ref_seconds:.0f} s', flush=True)
  scale = ref_seconds   # Delays are fractions of an uninterrupted run.

  trials, chains, chain = [], [], 0
  while len(trials) < args.kills:
    workdir = os.path.join(args.workdir, f'chain{chain}')
    starts, errors = 0, []
    while True:
      log_path = f'{workdir}.{starts}.log'
      with open(log_path, 'w') as log:
        proc = start(src, workdir, args.overrides, log)
        delay = float(rng.uniform(0.05, 0.5) * scale)
        mode = ('write' if rng.random() < args.write_fraction else 'time')
        if len(trials) >= args.kills:
          mode = 'none'   # Enough kills: let this start finish.
        t_start = time.time()
        killed, in_write = False, False
        stale = set(tmp_dirs(workdir))   # Left by a kill; removed on resume.
        while proc.poll() is None and mode != 'none':
          elapsed = time.time() - t_start
          current = set(tmp_dirs(workdir))
          stale &= current                # Once removed, the name is new.
          writing = mode == 'write' and elapsed >= delay and current - stale
          if (mode == 'time' and elapsed >= delay) or writing:
            in_write = bool(current - stale)
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
          time.sleep(0.005 if mode == 'write' and elapsed >= delay else 0.05)
        rc = proc.wait()
      with open(log_path, errors='replace') as f:
        log_text = f.read()
      error_lines = [l for l in log_text.splitlines()
                     if l.startswith('error: ') or 'Traceback' in l]
      last = trials[-1] if trials and trials[-1]['chain'] == chain else {}
      if last and 'resumed' not in last:   # What the start after a kill did.
        last['resumed'] = [f'{s} {e}' for s, e in re.findall(
            r'\[(\S+)\] resuming after epoch (\d+/\d+)', log_text)]
      if killed:
        trials.append({'trial': len(trials) + 1, 'chain': chain,
                       'start': starts, 'mode': mode,
                       'kill_after_s': round(time.time() - t_start, 2),
                       'stage': stage_of(workdir, log_path),
                       'during_checkpoint_write': in_write})
        print(f'trial {len(trials)}: {trials[-1]}', flush=True)
      elif rc == 0:
        if not starts:   # Finished uncut from scratch: the machine sped up.
          scale = time.time() - t_start
        break
      if error_lines or (not killed and rc):
        errors.append(f'start {starts}: exit {rc}: {error_lines[:2]}')
        break
      starts += 1
    ok = not errors and comparable(load_results(workdir)) == expected and (
        same_tcn(ref, workdir))
    chains.append({'chain': chain, 'starts': starts + 1, 'identical': ok,
                   'errors': errors})
    for t in trials:
      if t['chain'] == chain:
        t['survived'] = ok
    print(f'chain {chain}: identical={ok} errors={errors}', flush=True)
    chain += 1

  survived = sum(t['survived'] for t in trials)
  report = {'command': command, 'commit': commit, 'config': CONFIG,
            'overrides': args.overrides, 'seed': args.seed,
            'reference_seconds': round(ref_seconds, 1),
            'reference_results': expected, 'kills': len(trials),
            'survived': survived, 'chains': chains, 'trials': trials}
  os.makedirs(args.out, exist_ok=True)
  checkpoint.write_json(os.path.join(args.out, 'chaos.json'), report)
  lines = [
      '# Chaos: SIGKILL at random moments, resume, compare', '',
      '```bash', command, '```', '',
      f'Commit {commit}, config `{CONFIG}`'
      + (f' with `{" ".join(args.overrides)}`' if args.overrides else '')
      + f'; reference (uninterrupted) run {ref_seconds:.0f} s on '
      f'{report["reference_results"]["backend"]}. Each start of a chain is '
      'killed with SIGKILL after a seeded random delay (mode `time`) or at '
      'the first checkpoint write after it (mode `write`), then started '
      'again with the same command. A trial survives when its chain ends '
      'with results.json (metrics and parameter digests) and the saved TCN '
      'bitwise equal to the reference. Stage: from the killed start\'s log '
      'and workdir (`students` includes computing the frozen students\' '
      'outputs before the head); "next start resumed": the stages the '
      'following start restored, with their saved epochs.', '',
      f'**Trials survived: {survived} / {len(trials)}** '
      f'({len(chains)} chains, all identical: '
      f'{all(c["identical"] for c in chains)})', '',
      '| trial | chain | start | mode | killed after (s) | stage | '
      'checkpoint being written | next start resumed | survived |',
      '|---|---|---|---|---|---|---|---|---|']
  for t in trials:
    lines.append(f'| {t["trial"]} | {t["chain"]} | {t["start"]} | '
                 f'{t["mode"]} | {t["kill_after_s"]} | {t["stage"]} | '
                 f'{"yes" if t["during_checkpoint_write"] else "no"} | '
                 f'{", ".join(t.get("resumed", [])) or "-"} | '
                 f'{"yes" if t["survived"] else "NO"} |')
  lines += ['', 'Reference results (timings left out):', '', '```json',
            json.dumps(expected, indent=2, sort_keys=True), '```', '']
  with open(os.path.join(args.out, 'chaos.md'), 'w') as f:
    f.write('\n'.join(lines))
  print(f'survived {survived}/{len(trials)}')
  sys.exit(0 if survived == len(trials) else 1)


if __name__ == '__main__':
  main()
