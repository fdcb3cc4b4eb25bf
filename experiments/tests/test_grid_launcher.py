"""experiments.reproduce_fmnist schedules its runs: the seed's teacher
first, every other run of the seed loading it (--config.teacher.init_from,
nothing copied between workdirs), the KD and KDGAN baselines inside the
ff<n> runs, and with --jobs several runs at once. The pipeline is replaced
by a stand-in that writes what a run leaves in its workdir, so no model is
trained here."""
import contextlib
import importlib
import importlib.util
import json
import os
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
INIT = '--config.teacher.init_from='


def _import_launcher():
  """experiments.reproduce_fmnist: the package is the checkout's (not
  installed), so the repository root goes on the path when needed."""
  with contextlib.ExitStack() as stack:
    if importlib.util.find_spec('experiments') is None:
      stack.enter_context(pytest.MonkeyPatch.context()).syspath_prepend(ROOT)
    return importlib.import_module('experiments.reproduce_fmnist')


def init_from(cmd):
  """The teacher.init_from flag's value in a command ('' if none)."""
  flags = [a[len(INIT):] for a in cmd if a.startswith(INIT)]
  assert len(flags) <= 1
  return flags[0] if flags else ''


@pytest.fixture
def launcher(monkeypatch):
  mod = _import_launcher()
  events, lock = [], threading.Lock()
  flight = {'now': 0, 'max': 0, 'wait_for': 0, 'reached': threading.Event()}

  def fake_launch(run, root, smoke, extra, log, env=None):
    cmd = mod.command(run, root, smoke, extra, run.teacher or '')
    w = run.workdir(root)
    # A fresh start finds nothing put into its workdir (no copied teacher,
    # features, students or head).
    before = set(os.listdir(w)) if os.path.isdir(w) else set()
    if 'config.json' not in before:
      assert before <= {'log.txt'}, before
    teacher = init_from(cmd)
    with lock:
      events.append(('start', run.name, env or {}, cmd))
      flight['now'] += 1
      flight['max'] = max(flight['max'], flight['now'])
      if flight['now'] >= flight['wait_for']:
        flight['reached'].set()
    os.makedirs(w, exist_ok=True)
    with open(os.path.join(w, 'config.json'), 'w') as f:   # Resolved config.
      json.dump({'teacher': {'init_from': teacher}}, f)
    if teacher:   # Loaded, not trained: it must be a finished teacher.
      assert mod.own_teacher(teacher), teacher
    elif not os.path.isfile(os.path.join(w, 'features.npz')):
      time.sleep(0.3)   # Teacher stage.
      os.makedirs(os.path.join(w, 'teacher'), exist_ok=True)
      with lock:
        events.append(('teacher', run.name, None, None))
    open(os.path.join(w, 'features.npz'), 'w').close()
    time.sleep(0.3)   # Students and head.
    # Finish only once `wait_for` runs were in flight together (or after
    # 10 s), so that the concurrency check does not depend on timing.
    flight['reached'].wait(10)
    for d in ('students', 'head'):
      os.makedirs(os.path.join(w, d), exist_ok=True)
    with open(os.path.join(w, 'results.json'), 'w') as f:
      json.dump({}, f)
    with lock:
      events.append(('end', run.name, None, None))
      flight['now'] -= 1
    run.seconds, run.rc = 0.3, 0
    return 0

  monkeypatch.setattr(mod, 'launch', fake_launch)
  return mod, events, flight


def _order(events):
  return [(kind, name) for kind, name, _, _ in events]


def _commands(events):
  return {(e[3][e[3].index('--workdir') + 1]): e[3] for e in events
          if e[0] == 'start'}


def test_one_job_runs_in_grid_order(launcher, tmp_path):
  mod, events, _ = launcher
  root = tmp_path / 'g'
  args = ['--root', str(root), '--seeds', '0', '--only',
          'ff4,ff1,gan4_student_output', '--out', str(tmp_path / 'report')]
  assert mod.main(args) == 0
  assert _order(events) == [('start', 'ff4'), ('teacher', 'ff4'),
                            ('end', 'ff4'),
                            ('start', 'ff1'), ('end', 'ff1'),
                            ('start', 'gan4_student_output'),
                            ('end', 'gan4_student_output')]
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in events[0][2]
  cmds = _commands(events)
  ff4 = str(root / 'seed0' / 'ff4')
  assert init_from(cmds[ff4]) == ''
  for name in ('ff1', 'gan4_student_output'):
    assert init_from(cmds[str(root / 'seed0' / name)]) == ff4
    assert not os.path.exists(root / 'seed0' / name / 'teacher')
  # The FF cells carry the baselines; the GAN cell does not.
  assert {'--config.kd.enabled=True', '--config.kdgan.enabled=True'} <= set(
      cmds[ff4])
  assert not any(a.startswith(('--config.kd.', '--config.kdgan.'))
                 for a in cmds[str(root / 'seed0' / 'gan4_student_output')])
  report = json.load(open(tmp_path / 'report.json'))
  assert [r['status'] for r in report['runs']] == ['finished'] * 3
  assert [INIT in r['command'] for r in report['runs']] == [False, True, True]
  assert not any('cp ' in r['command'] for r in report['runs'])
  # A second invocation finds every run done and launches nothing.
  events.clear()
  assert mod.main(args) == 0
  assert not events


def test_jobs_wait_for_the_teacher(launcher, tmp_path):
  mod, events, flight = launcher
  flight['wait_for'] = 3
  root = tmp_path / 'g'
  rc = mod.main(['--root', str(root), '--seeds', '0', '1',
                 '--only', 'ff4,ff1,ff2,gan4_student_output', '--jobs', '3',
                 '--out', str(tmp_path / 'report')])
  assert rc == 0
  order = _order(events)
  # Seed 0's and seed 1's teacher runs start together; the others once a
  # teacher is trained (the first 'teacher' event), each loading its own
  # seed's.
  assert order[:2] == [('start', 'ff4')] * 2
  assert order.count(('teacher', 'ff4')) == 2   # No other run trains one.
  assert {n for k, n in order if k == 'teacher'} == {'ff4'}
  first_teacher = order.index(('teacher', 'ff4'))
  for name in ('ff1', 'ff2', 'gan4_student_output'):
    assert order.index(('start', name)) > first_teacher
  for workdir, cmd in _commands(events).items():
    seed_dir, name = os.path.split(workdir)
    assert init_from(cmd) == ('' if name == 'ff4'
                              else os.path.join(seed_dir, 'ff4'))
  # 3 runs were in flight together, never more (--jobs 3).
  assert flight['reached'].is_set() and flight['max'] == 3
  assert all(e[2]['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.300'
             for e in events if e[0] == 'start')
  report = json.load(open(tmp_path / 'report.json'))
  assert len(report['runs']) == 8
  assert {r['status'] for r in report['runs']} == {'finished'}


def test_bad_jobs_value_is_refused(launcher, tmp_path, capsys):
  mod, _, _ = launcher
  with pytest.raises(SystemExit):
    mod.main(['--root', str(tmp_path), '--jobs', '0'])
  assert '--jobs must be at least 1' in capsys.readouterr().err


def test_baselines_are_part_of_the_ff_cells(launcher, tmp_path, capsys):
  mod, _, _ = launcher
  runs = mod.grid([0])
  names = [r.name for r in runs]
  assert not [n for n in names if n.startswith(('kd', 'kdgan'))]
  for n in mod.NS:
    ff = runs[names.index(f'ff{n}')]
    assert ff.overrides[:3] == [f'--config.num_students={n}',
                                '--config.kd.enabled=True',
                                '--config.kdgan.enabled=True']
  with pytest.raises(SystemExit):
    mod.main(['--root', str(tmp_path), '--only', 'kd4'])
  assert 'selects no run' in capsys.readouterr().err


def test_teacher_from_whichever_run_trained_it(launcher, tmp_path):
  """Without ff4, the first run of a selection trains the seed's teacher;
  later selections load that one, ff4 included."""
  mod, events, _ = launcher
  root = tmp_path / 'g'
  args = ['--root', str(root), '--seeds', '0', '--out', str(tmp_path / 'r')]
  assert mod.main(args + ['--only', 'ff1']) == 0
  assert ('teacher', 'ff1') in _order(events)
  assert mod.main(args + ['--only', 'ff2,ff4']) == 0
  cmds = _commands(events)
  ff1 = str(root / 'seed0' / 'ff1')
  assert init_from(cmds[ff1]) == ''
  for name in ('ff2', 'ff4'):
    assert init_from(cmds[str(root / 'seed0' / name)]) == ff1
  assert [e[1] for e in events if e[0] == 'teacher'] == ['ff1']


def test_resumed_run_keeps_its_teacher(launcher, tmp_path):
  """A run started before resumes with the teacher its config.json
  records (another one would be a change of config), even where a finished
  teacher comes first in grid order; '' = its own (a workdir of the older
  layout, whose teacher was copied in)."""
  mod, events, _ = launcher
  root = tmp_path / 'g'
  args = ['--root', str(root), '--seeds', '0', '--out', str(tmp_path / 'r')]
  assert mod.main(args + ['--only', 'ff4']) == 0
  other = tmp_path / 'other'   # A finished teacher elsewhere.
  os.makedirs(other / 'teacher')
  open(other / 'features.npz', 'w').close()
  started = {'ff1': str(other), 'ff2': ''}
  for name, teacher in started.items():
    os.makedirs(root / 'seed0' / name)
    with open(root / 'seed0' / name / 'config.json', 'w') as f:
      json.dump({'teacher': {'init_from': teacher}}, f)
  os.makedirs(root / 'seed0' / 'ff2' / 'teacher')   # Older layout: copied.
  open(root / 'seed0' / 'ff2' / 'features.npz', 'w').close()
  events.clear()
  assert mod.main(args + ['--only', 'ff1,ff2']) == 0
  cmds = _commands(events)
  for name, teacher in started.items():
    assert init_from(cmds[str(root / 'seed0' / name)]) == teacher


def test_partial_dry_run_keeps_the_committed_plan(launcher, tmp_path,
                                                  monkeypatch, capsys):
  """`--dry-run` alone writes the plan to experiments/results/; a dry run of
  another selection prints its commands but replaces that file only when
  --out is given."""
  mod, events, _ = launcher
  monkeypatch.setattr(mod, 'REPO', str(tmp_path))
  monkeypatch.chdir(tmp_path)
  plan = tmp_path / 'experiments' / 'results' / 'reproduce_fmnist.md'
  plan.parent.mkdir(parents=True)
  assert mod.main(['--dry-run']) == 0
  full = plan.read_text()
  assert 'ff4' in full and 'gan8_student_output' in full
  assert f'{INIT}runs/fmnist_grid/seed1/ff4 ' in full and 'cp ' not in full
  capsys.readouterr()
  assert mod.main(['--dry-run', '--only', 'ff4']) == 0
  out = capsys.readouterr().out
  assert '--workdir' in out and 'report not written' in out
  assert plan.read_text() == full
  assert mod.main(['--dry-run', '--only', 'ff4',
                   '--out', str(tmp_path / 'mine')]) == 0
  assert 'gan8' not in (tmp_path / 'mine.md').read_text()
  assert plan.read_text() == full and not events   # Nothing launched.
