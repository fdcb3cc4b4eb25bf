"""experiments/reproduce_fmnist.py schedules its runs: the seed's teacher
first, baselines after the run whose students they copy, and with --jobs
several runs at once. The pipeline is replaced by a stand-in that writes
the files a finished run leaves, so no model is trained here."""
import importlib.util
import json
import os
import shutil
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def launcher(monkeypatch):
  spec = importlib.util.spec_from_file_location(
      'reproduce_fmnist', os.path.join(ROOT, 'experiments',
                                       'reproduce_fmnist.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  events, lock = [], threading.Lock()
  flight = {'now': 0, 'max': 0, 'wait_for': 0, 'reached': threading.Event()}

  def fake_launch(run, root, smoke, extra, log, env=None):
    with lock:
      events.append(('start', run.name, env or {}))
      flight['now'] += 1
      flight['max'] = max(flight['max'], flight['now'])
      if flight['now'] >= flight['wait_for']:
        flight['reached'].set()
    w = run.workdir(root)
    if not os.path.exists(os.path.join(w, 'teacher')):   # Teacher stage.
      time.sleep(0.3)
      os.makedirs(os.path.join(w, 'teacher'))
      open(os.path.join(w, 'features.npz'), 'w').close()
      with lock:
        events.append(('teacher', run.name, None))
    time.sleep(0.3)   # Students and head.
    # Finish only once `wait_for` runs were in flight together (or after
    # 10 s), so that the concurrency check does not depend on timing.
    flight['reached'].wait(10)
    for d in ('students', 'head'):
      os.makedirs(os.path.join(w, d), exist_ok=True)
    with open(os.path.join(w, 'results.json'), 'w') as f:
      json.dump({}, f)
    with lock:
      events.append(('end', run.name, None))
      flight['now'] -= 1
    run.seconds, run.rc = 0.3, 0
    return 0

  monkeypatch.setattr(mod, 'launch', fake_launch)
  return mod, events, flight


def _order(events):
  return [(kind, name) for kind, name, _ in events]


def test_one_job_runs_in_grid_order(launcher, tmp_path):
  mod, events, _ = launcher
  rc = mod.main(['--root', str(tmp_path / 'g'), '--seeds', '0', '--only',
                 'ff4,ff1,kd4', '--out', str(tmp_path / 'report')])
  assert rc == 0
  assert _order(events) == [('start', 'ff4'), ('teacher', 'ff4'),
                            ('end', 'ff4'),
                            ('start', 'ff1'), ('end', 'ff1'),
                            ('start', 'kd4'), ('end', 'kd4')]
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in events[0][2]
  report = json.load(open(tmp_path / 'report.json'))
  assert [r['status'] for r in report['runs']] == ['finished'] * 3
  # A second invocation finds every run done and launches nothing.
  events.clear()
  assert mod.main(['--root', str(tmp_path / 'g'), '--seeds', '0', '--only',
                   'ff4,ff1,kd4', '--out', str(tmp_path / 'report')]) == 0
  assert not events


def test_jobs_wait_for_teacher_and_students(launcher, tmp_path):
  mod, events, flight = launcher
  flight['wait_for'] = 3
  rc = mod.main(['--root', str(tmp_path / 'g'), '--seeds', '0', '1',
                 '--only', 'ff4,ff1,ff2,kd4', '--jobs', '3',
                 '--out', str(tmp_path / 'report')])
  assert rc == 0
  order = _order(events)
  # Seed 0's and seed 1's teacher runs start together; the others once a
  # teacher is trained (the first 'teacher' event), kd4 once an ff4 ended.
  assert order[:2] == [('start', 'ff4')] * 2
  assert order.count(('teacher', 'ff4')) == 2   # No other run trains one.
  assert {n for k, n in order if k == 'teacher'} == {'ff4'}
  first_teacher = order.index(('teacher', 'ff4'))
  for name in ('ff1', 'ff2'):
    assert order.index(('start', name)) > first_teacher
  assert order.index(('start', 'kd4')) > order.index(('end', 'ff4'))
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


def test_baseline_copies_students_from_a_finished_sibling(launcher, tmp_path):
  """kdgan<n> takes ff<n>'s students and head, else those of kd<n>, which
  trained (or copied) the same ones."""
  mod, _, _ = launcher
  seed_dir = tmp_path / 'g' / 'seed0'
  args = ['--root', str(tmp_path / 'g'), '--seeds', '0',
          '--out', str(tmp_path / 'r')]
  assert mod.main(args + ['--only', 'kd2']) == 0      # No ff2: own students.
  open(seed_dir / 'kd2' / 'students' / 'from_kd2', 'w').close()
  assert mod.main(args + ['--only', 'kdgan2']) == 0
  assert os.listdir(seed_dir / 'kdgan2' / 'students') == ['from_kd2']
  # ff<n> comes first once it has finished.
  assert mod.main(args + ['--only', 'ff2']) == 0
  open(seed_dir / 'ff2' / 'students' / 'from_ff2', 'w').close()
  shutil.rmtree(seed_dir / 'kdgan2')
  assert mod.main(args + ['--only', 'kdgan2']) == 0
  assert os.listdir(seed_dir / 'kdgan2' / 'students') == ['from_ff2']


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
  capsys.readouterr()
  assert mod.main(['--dry-run', '--only', 'ff4']) == 0
  out = capsys.readouterr().out
  assert '--workdir' in out and 'report not written' in out
  assert plan.read_text() == full
  assert mod.main(['--dry-run', '--only', 'ff4',
                   '--out', str(tmp_path / 'mine')]) == 0
  assert 'gan8' not in (tmp_path / 'mine.md').read_text()
  assert plan.read_text() == full and not events   # Nothing launched.
