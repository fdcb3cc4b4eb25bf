"""Launches the paper's Table 3 grid (and the chunking study) on Fashion-MNIST.

  python -m experiments.reproduce_fmnist [--root runs/fmnist_grid]
      [--seeds 0 1] [--only 'ff*,gan4_*'] [--jobs 8] [--dry-run] [--smoke]
      [--device-extra-flags '...']

Per seed, one workdir per run under ROOT/seed<S>/<run>, each an ordinary
`python -m tcn_jax.main` run (config.seed = S):

  ff<n>                         TCN, FF students, n = 1, 2, 4, 8 (ff4 first:
                                it trains the seed's teacher), and the
                                Hinton KD and KDGAN baselines sized for n
                                on the same teacher (--config.kd.enabled,
                                --config.kdgan.enabled: results.json has
                                'kd' and 'kdgan')
  gan<n>_student_output         TCN, GAN students, the paper's loss
  gan<n>_disc_reconstruction    TCN, GAN students, the authors' code's loss
  pca_ordered<n>, pca_balanced<n>  chunking study, n = 4, 8, FF
                                (contiguous chunks = ff<n>)
  improved4                     Table 4: n = 4 FF with non-identical students
                                (':improved' preset)
  logit4                        ablation: FF + logit matching only, n = 4
  tuned<n>                      FF + the levers that are not in the paper
                                (':tuned' preset: logit matching, cosine LR)
  wide<n>                       FF, n = 2, 4, 8, students without the
                                paper's 16-unit bottleneck, same parameters
                                (':wide')
  tuned_bn<n>                   tuned<n> + BatchNorm in the students (':bn')
  tuned_long<n>                 tuned<n> with 30 student epochs
  tuned_wide_bn<n>              tuned<n> + ':wide' + ':bn', n = 2, 4, 8
  tuned_wide_bn_flip<n>         every lever + ':flip' (students also see the
                                mirrored training images), n = 1, 2, 4, 8
  flip_control<n>               tuned_wide_bn<n> with 20 student epochs: the
                                steps of tuned_wide_bn_flip<n>, without flip
  tuned_wide_bn_pca<n>          tuned_wide_bn<n> with PCA-balanced chunks,
                                n = 2, 4, 8
  tuned_wide_bn_pca_flip<n>     tuned_wide_bn_flip<n> with PCA-balanced
                                chunks: every lever, n = 2, 4, 8
  pca_control<n>                tuned_wide_bn_pca<n> with 20 student
                                epochs: the steps of
                                tuned_wide_bn_pca_flip<n>, without flip
  budget8                       n = 8 within the stretch target's 100k
                                parameters: the pca_control<n> recipe with
                                ':slim' students (':tuned,slim,bn')
  <lever>_gan                   GAN students with the lever recipe of
                                flip_control1, pca_control2, pca_control4,
                                budget8 (--config.method=gan: the paper's
                                adversarial term beside the logit-matching
                                MSE; same schedules, default discriminators)

The teacher is trained once per seed, by the seed's first run (ff4): every
other run of the seed gets `--config.teacher.init_from=ROOT/seed<S>/ff4`
(the library loads that workdir's teacher instead of training one; nothing
is copied between workdirs). The source is the first workdir of the seed,
in grid order, whose own teacher has finished (`teacher/` + features.npz),
so a selection without ff4 uses whichever run trained the seed's teacher; a
run started before keeps the source its config.json records. With --jobs K,
K runs are in flight at once (these models leave one GPU mostly idle); a
run starts once its seed's teacher is trained. Everything is resumable: a
run whose workdir has results.json is skipped, an interrupted one resumes
from its last epoch when the same command runs again.

Writes a report of the grid (commands, status, seconds) to OUT.md / OUT.json
(--out, default experiments/results/reproduce_fmnist) and ROOT/grid.json.
Exit code 0 when every selected run has finished, 1 if one failed, 130/143
when stopped by SIGINT/SIGTERM (rerun to resume).
"""
import argparse
import dataclasses
import fnmatch
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from experiments import common

REPO = common.REPO
CONFIG = 'configs/fashion_mnist.py'
NS = (1, 2, 4, 8)
GAN_TARGETS = ('student_output', 'disc_reconstruction')
SMOKE_CELLS = 'ff2'   # Teacher, FF n = 2, KD and KDGAN for n = 2.
BASELINES = ('--config.kd.enabled=True', '--config.kdgan.enabled=True')
LONG_EPOCHS = 30   # tuned_long<n>: student epochs (the paper: 10).
LEVER_CELLS = ('flip_control1', 'pca_control2', 'pca_control4', 'budget8')
CONTROL_EPOCHS = 20   # flip_control<n>, pca_control<n>, budget8: the steps
                      # of 10 epochs with flip.


@dataclasses.dataclass
class Run:
  seed: int
  name: str
  preset: str                    # Config presets, e.g. '', 'gan', 'tuned,bn'.
  overrides: list
  teacher: str = None            # teacher.init_from it was launched with.
  status: str = 'planned'
  seconds: float = 0.0
  rc: int = None

  def workdir(self, root, name=None):
    """This run's workdir, or that of the run `name` of the same seed."""
    return os.path.join(root, f'seed{self.seed}', name or self.name)


def grid(seeds, gan_targets_all_n=True):
  """The runs, in launch order, for each seed."""
  runs = []
  for s in seeds:
    seed = [f'--config.seed={s}']
    for n in (4, 1, 2, 8):   # ff4 first: it trains the seed's teacher.
      runs.append(Run(s, f'ff{n}', '', [f'--config.num_students={n}',
                                        *BASELINES, *seed]))
    for n in NS:
      for target in GAN_TARGETS:
        if target == 'student_output' or gan_targets_all_n or n == 4:
          runs.append(Run(s, f'gan{n}_{target}', 'gan', [
              f'--config.num_students={n}',
              f'--config.gan.mse_target={target}', *seed]))
    for n in (4, 8):
      for assignment in ('ordered', 'balanced'):
        runs.append(Run(s, f'pca_{assignment}{n}', '', [
            f'--config.num_students={n}', '--config.chunking=pca',
            f'--config.pca_assignment={assignment}', *seed]))
    runs.append(Run(s, 'improved4', 'improved', [*seed]))
    runs.append(Run(s, 'logit4', '', ['--config.num_students=4',
                                      '--config.students.logit_weight=1.0',
                                      *seed]))
    for n in (4, 1, 2, 8):
      runs.append(Run(s, f'tuned{n}', 'tuned',
                      [f'--config.num_students={n}', *seed]))
    for n in (4, 2, 8):
      runs.append(Run(s, f'wide{n}', 'wide',
                      [f'--config.num_students={n}', *seed]))
    for n in (1, 4, 2, 8):
      runs.append(Run(s, f'tuned_bn{n}', 'tuned,bn',
                      [f'--config.num_students={n}', *seed]))
      runs.append(Run(s, f'tuned_long{n}', 'tuned', [
          f'--config.num_students={n}',
          f'--config.students.epochs={LONG_EPOCHS}', *seed]))
    for n in (4, 2, 8):
      runs.append(Run(s, f'tuned_wide_bn{n}', 'tuned,wide,bn',
                      [f'--config.num_students={n}', *seed]))
    for n in (1, 2, 4, 8):
      runs.append(Run(s, f'tuned_wide_bn_flip{n}', 'tuned,wide,bn,flip',
                      [f'--config.num_students={n}', *seed]))
      runs.append(Run(s, f'flip_control{n}', 'tuned,wide,bn', [
          f'--config.num_students={n}',
          f'--config.students.epochs={CONTROL_EPOCHS}',
          *seed]))
    pca = ['--config.chunking=pca', '--config.pca_assignment=balanced']
    for n in (4, 2, 8):
      runs.append(Run(s, f'tuned_wide_bn_pca{n}', 'tuned,wide,bn',
                      [f'--config.num_students={n}', *pca, *seed]))
      runs.append(Run(s, f'tuned_wide_bn_pca_flip{n}', 'tuned,wide,bn,flip',
                      [f'--config.num_students={n}', *pca, *seed]))
      runs.append(Run(s, f'pca_control{n}', 'tuned,wide,bn', [
          f'--config.num_students={n}', *pca,
          f'--config.students.epochs={CONTROL_EPOCHS}', *seed]))
    runs.append(Run(s, 'budget8', 'tuned,slim,bn', [
        '--config.num_students=8', *pca,
        f'--config.students.epochs={CONTROL_EPOCHS}', *seed]))
    levers = {r.name: r for r in runs if r.seed == s}
    for name in LEVER_CELLS:
      runs.append(Run(s, f'{name}_gan', levers[name].preset,
                      [*levers[name].overrides, '--config.method=gan']))
    # The n = 8 GAN lever cell with a tenth of the paper's adversarial weight.
    runs.append(Run(s, 'budget8_gan_adv01', levers['budget8'].preset,
                    [*levers['budget8'].overrides, '--config.method=gan',
                     '--config.gan.adv_weight=0.1']))
  return runs


def config_arg(run, smoke):
  presets = [p for p in (run.preset, 'smoke' if smoke else '') if p]
  return CONFIG + (':' + ','.join(presets) if presets else '')


def command(run, root, smoke, extra, teacher=''):
  """The pipeline's command line; teacher: a finished teacher's workdir to
  load (teacher.init_from), '' to train one."""
  init = [f'--config.teacher.init_from={teacher}'] if teacher else []
  return [sys.executable, '-m', 'tcn_jax.main', '--config',
          config_arg(run, smoke), '--workdir', run.workdir(root), *init,
          *run.overrides, *extra]


def _show(path):
  """A path as the user should type it from the repository root."""
  rel = os.path.relpath(path, REPO)
  return path if rel.startswith('..') else rel


def shell_line(run, root, smoke, extra, teacher=''):
  """The run as a shell command (paths as typed from the repository)."""
  cmd = command(run, root, smoke, extra, _show(teacher) if teacher else '')
  cmd[0] = 'python'
  cmd[cmd.index('--workdir') + 1] = _show(run.workdir(root))
  return shlex.join(cmd)


def finished(workdir):
  """Whether the pipeline in workdir has finished (results.json comes last)."""
  return os.path.isfile(os.path.join(workdir, 'results.json'))


def own_teacher(workdir):
  """Whether workdir holds a finished teacher it trained: its checkpoint
  (`teacher/`) and the features, which are computed only after it, and no
  teacher.init_from in its config.json (a loaded teacher is not saved)."""
  return (os.path.isdir(os.path.join(workdir, 'teacher'))
          and os.path.isfile(os.path.join(workdir, 'features.npz'))
          and not recorded_teacher(workdir))


def finished_teacher(root, run, runs):
  """A workdir of run's seed (not run's own) holding a finished teacher of
  its own, in grid order, then other workdirs by name; None if none."""
  seed_dir = os.path.join(root, f'seed{run.seed}')
  names = [r.name for r in grid([run.seed])]
  names += [r.name for r in runs if r.seed == run.seed]
  if os.path.isdir(seed_dir):
    names += sorted(os.listdir(seed_dir))
  for name in dict.fromkeys(names):
    d = os.path.join(seed_dir, name)
    if name != run.name and own_teacher(d):
      return d
  return None


def recorded_teacher(workdir):
  """The teacher.init_from a run already started in workdir records in its
  config.json ('' = its own teacher); None if it has not started."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return None
  return str((cfg.get('teacher') or {}).get('init_from') or '')


def teacher_for(run, root, runs):
  """The teacher.init_from to launch run with: what it recorded when it
  started, else a finished teacher of its seed, else '' (it trains one)."""
  recorded = recorded_teacher(run.workdir(root))
  if recorded is not None:
    return recorded
  return finished_teacher(root, run, runs) or ''


def planned_teacher(run, root, runs):
  """teacher_for, or for a run whose seed's teacher is not trained yet the
  workdir of the run that will train it (what a dry run prints)."""
  teacher = teacher_for(run, root, runs)
  first = teacher_runs(runs)[run.seed]
  if teacher or recorded_teacher(run.workdir(root)) is not None:
    return teacher
  return '' if run.name == first else run.workdir(root, first)


RUNNING = []   # The pipelines in flight (for SIGTERM forwarding).


def launch(run, root, smoke, extra, log, env=None):
  """Runs the pipeline (loading run.teacher, if any); its output goes to
  <workdir>/log.txt."""
  w = run.workdir(root)
  os.makedirs(w, exist_ok=True)
  cmd = command(run, root, smoke, extra, run.teacher or '')
  env = dict(env or os.environ, PYTHONUNBUFFERED='1')
  t0 = time.time()
  with open(os.path.join(w, 'log.txt'), 'a', buffering=1) as out:
    out.write(f'\n$ {shlex.join(cmd)}\n')
    out.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    RUNNING.append(proc)
    for line in proc.stdout:
      out.write(line)
      if ('accuracy' in line or line.startswith('error')
          or 'Traceback' in line):
        log(f'  seed{run.seed}/{run.name}: ' + line.rstrip()[-160:])
    rc = proc.wait()
    RUNNING.remove(proc)
  run.seconds, run.rc = time.time() - t0, rc
  return rc


def ready(run, runs, root):
  """Whether `run` can start now: it trains its seed's teacher, or started
  before (its config.json records its teacher), or a teacher of its seed
  has finished, or no other selected run is still to train one."""
  first = teacher_runs(runs)[run.seed]
  by_name = {(r.seed, r.name): r for r in runs}
  return (run.name == first
          or by_name[run.seed, first].status not in ('planned', 'running')
          or recorded_teacher(run.workdir(root)) is not None
          or finished_teacher(root, run, runs) is not None)


def teacher_runs(runs):
  """{seed: name of the first selected run}: the one that trains it."""
  first = {}
  for r in runs:
    first.setdefault(r.seed, r.name)
  return first


def write_report(path, cmdline, args, runs, root, smoke, extra, elapsed):
  rows = []
  for r in runs:
    teacher = (r.teacher if r.teacher is not None
               else planned_teacher(r, root, runs))
    rows.append(dict(seed=r.seed, name=r.name, status=r.status,
                     rc=r.rc, seconds=round(r.seconds, 1),
                     workdir=_show(r.workdir(root)),
                     command=shell_line(r, root, smoke, extra, teacher)))
  summary = {s: sum(r.status == s for r in runs)
             for s in dict.fromkeys(r.status for r in runs)}
  data = dict(command=cmdline, root=_show(root), seeds=args.seeds,
              smoke=smoke, dry_run=args.dry_run, extra_flags=extra,
              elapsed_seconds=round(elapsed, 1), summary=summary, runs=rows)
  lines = [
      '# Fashion-MNIST Table 3 grid' + (' (smoke)' if smoke else ''), '',
      f'Command: `{cmdline}`', '',
      f'Root `{_show(root)}`, seeds {", ".join(map(str, args.seeds))}; '
      + ', '.join(f'{v} {k}' for k, v in summary.items())
      + f'; {elapsed:.0f} s in this invocation.'
      + (' Dry run: nothing was launched; the commands below are what a '
         'real run executes, in order (every run of a seed loads the '
         'teacher trained by its ff4, `--config.teacher.init_from`).'
         if args.dry_run else ''), '',
      'Tables from these runs: `python -m experiments.tables '
      f'{_show(root)} --out experiments/results/tables_<name>`.', '',
      '| seed | run | workdir | status | seconds |', '|---|---|---|---|---|']
  for row in rows:
    rc = '' if row['rc'] in (None, 0) else f' (rc {row["rc"]})'
    lines.append(f'| {row["seed"]} | {row["name"]} | `{row["workdir"]}` | '
                 f'{row["status"]}{rc} | {row["seconds"]:.0f} |')
  lines += ['', 'Shell equivalent, in launch order (the launcher loads a '
            'finished teacher of any run of the seed, and trains one where '
            'none has finished yet):', '', '```bash',
            *[row['command'] for row in rows], '```']
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(path + '.json', 'w') as f:
    json.dump(data, f, indent=1)
  if not args.dry_run:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'grid.json'), 'w') as f:
      json.dump(data, f, indent=1)


def select(runs, only):
  if not only:
    return runs
  pats = [p.strip() for p in only.split(',') if p.strip()]
  return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) or
                                 fnmatch.fnmatchcase(f'seed{r.seed}/{r.name}',
                                                     p) for p in pats)]


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n\n', 2)[2])
  ap.add_argument('--root', default=None,
                  help='directory of the workdirs, ROOT/seed<S>/<run> '
                       '(default runs/fmnist_grid; with --smoke '
                       'runs/fmnist_grid_smoke)')
  ap.add_argument('--seeds', type=int, nargs='+', default=None,
                  help='config.seed values (default 0 1; with --smoke: 0)')
  ap.add_argument('--only', default='',
                  help="comma-separated names or globs, e.g. 'ff*,gan4_*' or "
                       "'seed1/gan4_*' (default: the whole grid)")
  ap.add_argument('--dry-run', action='store_true',
                  help='print the commands, launch nothing')
  ap.add_argument('--smoke', action='store_true',
                  help="append ':smoke' to every config (small subset, short "
                       f'schedules) and run only {SMOKE_CELLS} unless --only '
                       'is given')
  ap.add_argument('--gan-both-targets-only-n4', action='store_true',
                  help='run the disc_reconstruction GAN loss for n=4 only '
                       '(default: for every n)')
  ap.add_argument('--device-extra-flags', default='',
                  help="extra flags for every run, one quoted string, e.g. "
                       "'--config.data.dir=/usr/share/datasets/fashion-mnist "
                       "--config.students.strategy=vmap'")
  ap.add_argument('--jobs', type=int, default=1,
                  help='runs in flight at once (default 1). On one GPU '
                       'several small runs share it: each gets '
                       '0.9/jobs of its memory (XLA_PYTHON_CLIENT_MEM_'
                       'FRACTION). A run waits for its seed\'s teacher')
  ap.add_argument('--out', default=None,
                  help='report path without extension (.md, .json); default '
                       'experiments/results/reproduce_fmnist[_smoke]')
  argv = list(sys.argv[1:] if argv is None else argv)
  for i, tok in enumerate(argv[:-1]):   # Its value starts with '--'.
    if tok == '--device-extra-flags':
      argv[i:i + 2] = [f'{tok}={argv[i + 1]}']
      break
  args = ap.parse_args(argv)
  cmdline = common.command(argv, 'experiments.reproduce_fmnist')
  if args.seeds is None:
    args.seeds = [0] if args.smoke else [0, 1]
  only = args.only or (SMOKE_CELLS if args.smoke else '')
  suffix = '_smoke' if args.smoke else ''
  root = os.path.abspath(args.root or 'runs/fmnist_grid' + suffix)
  # The committed plan is what the documented `--dry-run` alone prints; a
  # dry run of another selection does not replace it without an --out.
  keep_plan = (args.dry_run and args.out is None and not args.smoke
               and argv != ['--dry-run'])
  args.out = args.out or os.path.join(REPO, 'experiments', 'results',
                                      'reproduce_fmnist' + suffix)
  extra = shlex.split(args.device_extra_flags)
  runs = select(grid(args.seeds, not args.gan_both_targets_only_n4), only)
  if not runs:
    ap.error(f'--only {args.only!r} selects no run')
  if args.jobs < 1:
    ap.error(f'--jobs must be at least 1, got {args.jobs}')
  t_start = time.time()

  def log(msg):
    print(msg, flush=True)

  if args.dry_run:
    for r in runs:
      if finished(r.workdir(root)):
        r.status = 'done'
      print(shell_line(r, root, args.smoke, extra,
                       planned_teacher(r, root, runs)))
    if keep_plan:
      log(f'report not written: {_show(args.out)}.md holds the plan of '
          '`--dry-run` alone; give --out to write this one')
      return 0
    write_report(args.out, cmdline, args, runs, root, args.smoke, extra,
                 time.time() - t_start)
    return 0

  # SIGTERM: forwarded to the running pipelines (they save their epoch),
  # then the loop stops.
  stop = []

  def on_term(signum, _):
    stop.append(signum)
    for proc in RUNNING:
      proc.send_signal(signum)

  signal.signal(signal.SIGTERM, on_term)
  # SIGINT (Ctrl-C) reaches the pipelines directly (same process group);
  # the launcher only stops starting runs and waits for them to save.
  signal.signal(signal.SIGINT, lambda signum, _: stop.append(signum))
  env = dict(os.environ)
  if args.jobs > 1:   # Several processes share one accelerator's memory.
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / args.jobs:.3f}')
  index = {id(r): i + 1 for i, r in enumerate(runs)}
  pending, active = [], []
  for r in runs:
    if finished(r.workdir(root)):
      r.status = 'done'
      log(f'[{index[id(r)]}/{len(runs)}] seed{r.seed}/{r.name}: done already')
    else:
      pending.append(r)

  def work(r):
    rc = launch(r, root, args.smoke, extra, log, env)
    if rc == 0:
      r.status = 'finished'
    elif rc in (130, 143) or rc < 0:
      r.status = 'stopped'
      stop.append(rc)
    else:
      r.status = 'failed'
      log(f'  seed{r.seed}/{r.name} failed (rc {rc}); log: '
          f'{_show(os.path.join(r.workdir(root), "log.txt"))}')
    log(f'  seed{r.seed}/{r.name}: {r.status} in {r.seconds:.0f} s')

  while pending or active:
    for r, t in list(active):   # Collect finished runs.
      if not t.is_alive():
        t.join()
        active.remove((r, t))
        write_report(args.out, cmdline, args, runs, root, args.smoke, extra,
                     time.time() - t_start)
    if stop:
      for r in pending:
        r.status = 'not started'
      pending.clear()
    while pending and len(active) < args.jobs:
      # In grid order; with nothing in flight the first pending run starts
      # even if not ready (it then trains what it lacks).
      r = next((r for r in pending if ready(r, runs, root)),
               None if active else pending[0])
      if r is None:
        break
      pending.remove(r)
      r.teacher = teacher_for(r, root, runs)
      log(f'[{index[id(r)]}/{len(runs)}] seed{r.seed}/{r.name}: '
          f'{shlex.join(command(r, root, args.smoke, extra, r.teacher)[1:])}')
      if not r.teacher:
        log('  no finished teacher of this seed to load: this run trains '
            'one' if recorded_teacher(r.workdir(root)) is None else
            '  resumes with its own teacher')
      r.status = 'running'
      t = threading.Thread(target=work, args=(r,), daemon=True)
      t.start()
      active.append((r, t))
    if active:
      time.sleep(0.5 if args.jobs > 1 else 0.05)
  write_report(args.out, cmdline, args, runs, root, args.smoke, extra,
               time.time() - t_start)
  done = sum(r.status in ('done', 'finished') for r in runs)
  log(f'{done}/{len(runs)} runs finished; report: {_show(args.out)}.md')
  if stop:
    log('stopped: run the same command again to resume')
    return 130 if 130 in stop or signal.SIGINT in stop else 143
  return 0 if done == len(runs) else 1


if __name__ == '__main__':
  sys.exit(main())
