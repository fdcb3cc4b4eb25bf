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

  python -m experiments.chaos --stages teacher,features,kd,kdgan,pca --kills 3

`--stages` sweeps the stages one by one on a seconds-long run (tiny nets,
300 examples; each stage's extra flags in STAGES): per stage, a reference
run, then chains whose kill comes after the stage has started (its log
line), after a seeded random delay or at its next checkpoint (or
features.npz) write. Writes experiments/results/chaos_stages.md and .json.

  python -m experiments.chaos --stages streamed_teacher,streamed_students \
      --kills 3 --append

The `streamed_*` stages read a generated image folder through Grain
(configs/image_folder.py:smoke, data.streaming='always') with a step
checkpoint every 3 steps; their kills come after the stage's first step
checkpoint, so most land inside an epoch between two step checkpoints; the
next start's log says which step it resumed at.
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
from experiments import imagenet_folder
from tcn_jax import assemble
from tcn_jax import checkpoint

ROOT = common.REPO

CONFIG = 'configs/fashion_mnist.py:smoke'
TIMING = ('wall_seconds_this_run', 'train_seconds')
# --stages: a seconds-long run (tests/helpers.py's TINY), and per stage its
# extra flags, the log line after which it runs, and where it writes.
TINY = ['--config.num_students=2', '--config.data.train_size=300',
        '--config.data.test_size=200', '--config.teacher.epochs=2',
        '--config.teacher.body=C8 MP F D64r D32r', '--config.students.epochs=2',
        '--config.students.arch=C4 MP F D8r', '--config.head.epochs=2']
STREAMED = ['--config.data.dir={folder}', '--config.data.streaming=always',
            '--config.data.checkpoint_every_steps=3']
# (extra flags, log text when the stage starts, when it ends, its output)
STAGES = {
    'teacher': (['--config.teacher.epochs=6'], 'data: ',
                'teacher test accuracy', 'teacher'),
    'features': (['--config.data.train_size=6000'], 'teacher test accuracy',
                 'features.npz', 'features.npz'),
    'kd': (['--config.kd.enabled=True', '--config.kd.epochs=4',
            '--config.kd.arch=C4 MP F D16r'], 'TCN test accuracy',
           'kd student test accuracy', 'kd'),
    'kdgan': (['--config.kdgan.enabled=True', '--config.kd.epochs=4',
               '--config.kdgan.epochs=4', '--config.kd.arch=C4 MP F D16r'],
              'TCN test accuracy', 'kdgan student test accuracy', 'kdgan'),
    'pca': (['--config.chunking=pca', '--config.students.epochs=4',
             '--config.head.epochs=4'], 'teacher test accuracy',
            'TCN test accuracy', 'students'),
    # Streamed epochs (an image folder read through Grain) with a step
    # checkpoint every 3 steps: a kill mid-epoch resumes at the last one.
    # Their window starts at the first step checkpoint ('path:' a glob).
    'streamed_teacher': (STREAMED + ['--config.teacher.epochs=3',
                                     '--config.teacher.batch_size=8'],
                         'path:teacher/steps/[0-9]*', 'teacher test accuracy',
                         'teacher'),
    'streamed_students': (STREAMED + ['--config.students.epochs=3',
                                      '--config.students.batch_size=8'],
                          'path:students/*/steps/[0-9]*', 'TCN test accuracy',
                          'students'),
}
# Stages run with another config than CONFIG; '{folder}' in their flags is
# a generated image folder (experiments/imagenet_folder.make_folder).
STAGE_CONFIGS = {'streamed_teacher': 'configs/image_folder.py:smoke',
                 'streamed_students': 'configs/image_folder.py:smoke'}
FOLDER = dict(classes=4, train_per_class=60, val_per_class=10, size=20)


def snapshot(dest):
  """Extracts tcn_jax/ and configs/ of the current commit, so edits made
  while the check runs cannot change the command under test."""
  os.makedirs(dest)
  archive = subprocess.run(['git', '-C', ROOT, 'archive', 'HEAD', 'tcn_jax',
                            'configs'], capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
  return dest


def start(src, workdir, overrides, log, config=CONFIG):
  cmd = [sys.executable, '-m', 'tcn_jax.main', '--config', config,
         '--workdir', workdir, *overrides]
  return subprocess.Popen(cmd, cwd=src, stdout=log, stderr=subprocess.STDOUT)


def tmp_dirs(workdir):
  """Orbax checkpoints being written (renamed when complete)."""
  return glob.glob(os.path.join(workdir, '**', '*orbax-checkpoint-tmp*'),
                   recursive=True)


def stage_of(workdir, log_path, baselines=()):
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
  if 'TCN test accuracy' in log:   # Then the enabled baselines, in order.
    for stage in baselines:
      if f'{stage} student test accuracy' not in log:
        return stage
    return 'save'
  return 'head' if os.path.isdir(os.path.join(workdir, 'head')) else 'students'


def writes(workdir, output):
  """Files or checkpoints of `output` (a stage's directory or file) being
  written: Orbax temporary directories, or `features.npz.tmp`."""
  path = os.path.join(workdir, output)
  if not output.endswith('.npz'):
    path = os.path.join(path, '**', '*orbax-checkpoint-tmp*')
  else:
    path += '.tmp'
  return set(glob.glob(path, recursive=True))


def _read(path):
  with open(path, errors='replace') as f:
    return f.read()


def _reached(workdir, log_path, marker):
  """Whether a run's log holds `marker` (or, for a file, it exists; for
  'path:GLOB', a finished checkpoint matches GLOB in the workdir)."""
  if marker.startswith('path:'):
    return any('orbax-checkpoint-tmp' not in p for p in glob.glob(
        os.path.join(workdir, marker[len('path:'):])))
  if marker.endswith('.npz'):
    return os.path.exists(os.path.join(workdir, marker))
  return marker in _read(log_path)


def stage_chain(src, workdir, flags, stage, kills, rng, window,
                write_fraction, config=CONFIG):
  """Starts the run of `flags` until it finishes; each of its first `kills`
  starts is killed after the stage's start line, after a seeded random
  share of `window` (the stage's seconds in the reference run) or at the
  first write of its output after that. Returns (trials, errors)."""
  _, begin, _, output = STAGES[stage]
  trials, errors, starts = [], [], 0
  while True:
    log_path = f'{workdir}.{starts}.log'
    mode = 'none'
    if len(trials) < kills:
      mode = 'write' if rng.random() < write_fraction else 'time'
    delay = float(rng.uniform(0.1, 0.9) * window)
    killed = in_write = False
    with open(log_path, 'w') as log:
      proc = start(src, workdir, flags, log, config)
      stale, t_begin = writes(workdir, output), None
      while proc.poll() is None and mode != 'none':
        if t_begin is None:
          if _reached(workdir, log_path, begin):
            t_begin = time.time()
          time.sleep(0.01)
          continue
        current = writes(workdir, output)
        stale &= current
        due = time.time() - t_begin >= delay
        if (mode == 'time' and due) or (mode == 'write' and (current - stale)
                                        and time.time() - t_begin >= delay / 3):
          in_write = bool(current - stale)
          proc.send_signal(signal.SIGKILL)
          killed = True
          break
        time.sleep(0.002)
      rc = proc.wait()
    log_text = _read(log_path)
    if trials and 'resumed' not in trials[-1]:
      trials[-1]['resumed'] = [f'{s} {e}' for s, e in re.findall(
          r'\[(\S+)\] resuming after epoch (\d+/\d+)', log_text)] + (
              ['features (cache)'] if 'features: reusing' in log_text else []
          ) + [f'{s} epoch {e} at step {k}' for s, e, k in re.findall(
              r'\[(\S+)\] resuming epoch (\d+) at step (\d+)', log_text)]
    if killed:
      trials.append({'stage_swept': stage, 'start': starts, 'mode': mode,
                     'kill_after_stage_start_s': round(time.time() - t_begin,
                                                       3),
                     'stage': stage_of(workdir, log_path, [
                         b for b in ('kd', 'kdgan')
                         if f'--config.{b}.enabled=True' in flags]),
                     'during_write': in_write})
      print(f'  {stage} trial: {trials[-1]}', flush=True)
    error_lines = [l for l in log_text.splitlines()
                   if l.startswith('error: ') or 'Traceback' in l]
    if error_lines or (not killed and rc):
      errors.append(f'start {starts}: exit {rc}: {error_lines[:2]}')
      return trials, errors
    if not killed:
      return trials, errors
    starts += 1


def write_stage_report(args, report, command, commit):
  """Writes chaos_stages.json / .md for the stages swept so far."""
  all_trials = [t for s in report['stages'].values() for t in s['trials']]
  report['kills'] = len(all_trials)
  report['survived'] = sum(t['survived'] for t in all_trials)
  report['all_identical'] = all(c['identical'] for s in report['stages']
                                .values() for c in s['chains'])
  os.makedirs(args.out, exist_ok=True)
  checkpoint.write_json(os.path.join(args.out, 'chaos_stages.json'), report)
  lines = [
      '# Chaos by stage: SIGKILL inside each stage, resume, compare', '',
      '```bash', command, '```', '',
      f'Commit {commit}, config `{CONFIG}` with the seconds-long flags '
      f'`{" ".join(TINY)}` and per stage the flags below. Per stage: one '
      'uninterrupted reference run, then chains whose first start is killed '
      'with SIGKILL after the stage\'s start line appeared in its log, after '
      'a seeded random share of the stage\'s reference duration (mode '
      '`time`) or at the first write of its output (checkpoint or '
      '`features.npz`) after a third of that delay (mode `write`); the same '
      'command then runs to the end. A trial survives when its chain\'s '
      'results.json (metrics and parameter digests, timings left out) and '
      'saved TCN are bitwise equal to the reference. "stage": where the kill '
      'landed, from the log and the workdir. The students stage (smoke '
      'config) is in [chaos.md](chaos.md). The `streamed_*` stages read a '
      'generated image folder through Grain with a step checkpoint every 3 '
      'steps (their config below); their delays count from the stage\'s '
      'first step checkpoint (its window: from there to the stage\'s end); '
      '"epoch E at step S" in "next start '
      'resumed": the start after the kill restored the step checkpoint '
      'inside epoch E.', '',
      f'**Trials survived: {report["survived"]} / {report["kills"]}** '
      f'(all chains identical: {report["all_identical"]})', '']
  for stage, r in report['stages'].items():
    lines += [f'## {stage}', '',
              f'Commit {r.get("commit", commit)}, seed {r.get("seed")}; '
              + (f'config `{r["config"]}` on a generated image folder '
                 f'(experiments/imagenet_folder.py, {r["folder"]}); '
                 if 'config' in r else '') + 'flags '
              f'`{" ".join(r["flags"])}`; reference stage '
              f'{r["reference_stage_seconds"]} s; teacher digest '
              f'`{r["reference_results"]["digests"]["teacher"][:16]}…`, TCN '
              f'`{r["reference_results"]["digests"]["tcn"][:16]}…`.', '',
              '| chain | mode | killed after stage start (s) | stage | '
              'output being written | next start resumed | survived |',
              '|---|---|---|---|---|---|---|']
    for t in r['trials']:
      lines.append(f'| {t["chain"]} | {t["mode"]} | '
                   f'{t["kill_after_stage_start_s"]} | {t["stage"]} | '
                   f'{"yes" if t["during_write"] else "no"} | '
                   f'{", ".join(t.get("resumed", [])) or "-"} | '
                   f'{"yes" if t["survived"] else "NO"} |')
    lines.append('')
  with open(os.path.join(args.out, 'chaos_stages.md'), 'w') as f:
    f.write('\n'.join(lines))


def sweep_stages(args, src, rng, command, commit):
  """--stages: per stage a reference run and `--kills` kills (one chain per
  kill, a chain's later starts left to finish); writes chaos_stages.*."""
  report = {'command': command, 'commit': commit, 'config': CONFIG,
            'flags': TINY + args.overrides, 'seed': args.seed, 'stages': {}}
  path = os.path.join(args.out, 'chaos_stages.json')
  if args.append and os.path.exists(path):   # Stages swept before.
    with open(path) as f:
      earlier = json.load(f)
    for entry in earlier['stages'].values():
      entry.setdefault('commit', earlier['commit'])
      entry.setdefault('seed', earlier['seed'])
    report['stages'] = earlier['stages']
    report['command'] = f"{earlier['command']}; {command}"
  for stage in args.stages.split(','):
    config = STAGE_CONFIGS.get(stage, CONFIG)
    folder = os.path.join(args.workdir, 'folder')
    if any('{folder}' in f for f in STAGES[stage][0]) and not os.path.isdir(
        folder):
      imagenet_folder.make_folder(folder, **FOLDER)
    stage_flags = [f.replace('{folder}', folder) for f in STAGES[stage][0]]
    flags = TINY + stage_flags + args.overrides
    _, begin, end, _ = STAGES[stage]
    ref = os.path.join(args.workdir, f'{stage}_reference')
    with open(ref + '.log', 'w') as log:
      proc = start(src, ref, flags, log, config)
      t_begin = t_end = None
      while proc.poll() is None or t_end is None:
        if t_begin is None and _reached(ref, ref + '.log', begin):
          t_begin = time.time()
        if t_begin is not None and t_end is None and _reached(
            ref, ref + '.log', end):
          t_end = time.time()
        if proc.poll() is not None:
          t_begin, t_end = t_begin or time.time(), t_end or time.time()
        time.sleep(0.002)
    if proc.returncode:
      sys.exit(f'{stage}: reference run failed; see {ref}.log')
    window = t_end - t_begin
    expected = comparable(load_results(ref))
    print(f'{stage}: reference stage {window:.2f} s', flush=True)
    trials, chains = [], []
    for chain in range(args.kills):
      workdir = os.path.join(args.workdir, f'{stage}_chain{chain}')
      got, errors = stage_chain(src, workdir, flags, stage, 1, rng, window,
                                args.write_fraction, config)
      ok = (not errors and os.path.exists(os.path.join(workdir, 'results.json'))
            and comparable(load_results(workdir)) == expected
            and same_tcn(ref, workdir))
      for t in got:
        t.update(chain=chain, survived=ok)
      trials += got
      chains.append({'chain': chain, 'identical': ok, 'errors': errors,
                     'kills': len(got)})
      print(f'{stage} chain {chain}: identical={ok} errors={errors}',
            flush=True)
    report['stages'][stage] = {
        'flags': stage_flags, 'commit': commit, 'seed': args.seed,
        'reference_stage_seconds': round(window, 2),
        'reference_results': expected, 'chains': chains, 'trials': trials,
        **({'config': config, 'folder': FOLDER} if config != CONFIG else {})}
    write_stage_report(args, report, command, commit)   # Partial, so far.
  write_stage_report(args, report, command, commit)
  print(f'survived {report["survived"]}/{report["kills"]}')
  sys.exit(0 if report['survived'] == report['kills']
           and report['all_identical'] else 1)


def comparable(results):
  """results.json without timings (the baselines' own included)."""
  out = {k: v for k, v in results.items() if k not in TIMING}
  for k in ('kd', 'kdgan'):
    if isinstance(out.get(k), dict):
      out[k] = {f: v for f, v in out[k].items() if f not in TIMING}
  return out


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
  parser.add_argument('--stages', default='',
                      help='comma-separated STAGES to sweep (tiny runs)')
  parser.add_argument('--append', action='store_true',
                      help='--stages: keep the stages of the last report')
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
  if args.stages:
    sweep_stages(args, src, rng, command, commit)

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
