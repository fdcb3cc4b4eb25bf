"""The whole run: config resolved, data checked, then the stages in order.

teacher -> features (cached) -> students (chunks of the features) -> head
(assembled TCN, fine-tuned) -> baselines (optional) -> `tcn/` + results.json.
Nothing is written before the config and the data are known to work; each
stage is reused only when its key matches (`tcn_jax.workdir`).
"""
import contextlib
import dataclasses
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from tcn_jax import assemble
from tcn_jax import augment
from tcn_jax import baselines
from tcn_jax import checkpoint
from tcn_jax import chunking
from tcn_jax import config as config_lib
from tcn_jax import data as data_lib
from tcn_jax import distributed
from tcn_jax.export import export_all
from tcn_jax import features as features_lib
from tcn_jax import given_teacher
from tcn_jax.formats import parse_formats
from tcn_jax import head as head_lib
from tcn_jax import input_pipeline
from tcn_jax import mesh as mesh_lib
from tcn_jax import metrics
from tcn_jax import models
from tcn_jax import paper
from tcn_jax import record
from tcn_jax import students as students_lib
from tcn_jax import teacher as teacher_lib
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError

BASELINES = ('kd', 'kdgan')


def check_fits(field, spec, input_shape, impl, dtype=np.float32):
  """Fails, naming `field`, unless `spec` maps one input of `input_shape` to
  a flat feature vector; returns its width."""
  try:
    out = models.output_shape(spec, input_shape, impl, dtype)
  except ValueError as e:
    raise TCNError(f'config.{field} {spec!r} does not fit inputs of shape '
                   f'{tuple(input_shape)}: {e}') from None
  if len(out) != 1:
    raise TCNError(f'config.{field} {spec!r} gives outputs of shape {out} '
                   f'for inputs of shape {tuple(input_shape)}; add F '
                   '(Flatten) before its Dense layers')
  return out[0]


def check_trunk(field, spec, input_shape, impl, dtype=np.float32):
  """Fails, naming `field` and the image size, when `spec`'s convolutional
  trunk (the layers before its first F, Flatten) shrinks an image input
  (H, W, C) with more than one pixel to 1x1 (a global average pool, GAP,
  may end at 1x1, as ResNets on small images do)."""
  tokens = spec.split()
  cut = next((i for i, t in enumerate(tokens) if t == 'F'), None)
  if cut is None or len(input_shape) != 3 or input_shape[0] * input_shape[1] \
      <= 1:
    return
  try:
    out = models.output_shape(' '.join(tokens[:cut]), input_shape, impl,
                              dtype)
  except ValueError:
    return   # check_fits names the layer.
  if len(out) == 3 and out[0] * out[1] <= 1:
    h, w = input_shape[:2]
    raise TCNError(f'config.{field} {spec!r} shrinks the {h}x{w} input '
                   f'(data.image_size) to {out[0]}x{out[1]} before its '
                   f'{tokens[cut]}: use fewer pooling stages (or '
                   f"{field}='auto' with configs/image_folder.py, sized to "
                   'the image)')


def check_data(config, ds: data_lib.Dataset):
  """Every check of the data against the config that needs no training:
  non-empty splits of one input shape that the architectures fit."""
  for name in ('train', 'val', 'test'):
    split = getattr(ds, name)
    if not len(split):
      raise TCNError(f'the {name} split of {config.data.name} is empty '
                     f'(config.data: {ds.source})')
  shape, dtype = ds.train.x.shape[1:], ds.train.x.dtype
  for name in ('val', 'test'):
    other = getattr(ds, name).x.shape[1:]
    if other != shape:
      raise TCNError(f'{name} inputs of {config.data.name} have shape '
                     f'{other}, train inputs {shape} ({ds.source})')
  if not given_teacher.kind(config):   # A given one is checked on loading.
    chunking.chunk_sizes(check_fits('teacher.body', config.teacher.body,
                                    shape, config.layers_impl, dtype),
                         config.num_students)
  for spec in dict.fromkeys(config_lib.student_specs(config)):
    check_fits('students.arch', spec + ' D1', shape, config.layers_impl,
               dtype)
    check_trunk('students.arch', spec, shape, config.layers_impl, dtype)
  if config.kd.enabled or config.kdgan.enabled:
    check_fits('kd.arch', config.kd.arch + ' D1', shape, config.layers_impl,
               dtype)
  mirrored = augment.get(config.data.augment).mirrored_copies
  if mirrored:
    augment.hflip(ds.train.x[:1] if isinstance(ds.train.x, np.ndarray)
                  else ds.train.x)   # Fails now, not after stage 1.
  sections = ['teacher', 'students', 'head'] + (
      ['kd'] if config.kd.enabled or config.kdgan.enabled else [])
  for section in sections:
    size = config[section].batch_size
    examples = len(ds.train) * (2 if section == 'students' and mirrored
                                else 1)
    if size > examples:
      raise TCNError(f'batch size {size} (config.{section}.batch_size) is '
                     f'larger than the {examples} training examples')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole pipeline; returns and writes results.json.

  Args:
    config: a config as `configs/*.py` give it (resolved here).
    workdir: the run's directory; created only once the config and the data
      are checked.

  Returns:
    The results (what `workdir/results.json` holds): accuracies of the
    teacher and the TCN before and after head fine-tuning beside the
    paper's, per-student validation MSE, parameters, seconds, digests.
  """
  config = config_lib.resolve(config)
  # Paths first: one line before any data is read or anything written.
  workdir_lib.check_path(workdir)
  workdir_lib.check_config(workdir, config_lib.to_json(config),
                           config.allow_config_change)
  if config.teacher.init_from:
    teacher_lib.check_source(config.teacher.init_from, workdir)
  dist = config.distributed
  joined = distributed.initialize(dist.num_processes, dist.process_id,
                                  dist.coordinator,
                                  dist.get('timeout_s',
                                           distributed.JOIN_TIMEOUT))
  if joined:
    distributed.check_same_config(config_lib.to_json(config))
  mesh = mesh_lib.from_config(config)
  mesh_lib.check_batch_sizes(config, mesh)
  t = time.time()
  metrics.stage_start('data', f'loading {config.data.name}'
                      + (f' from {config.data.dir}' if config.data.dir
                         else ''))
  ds = input_pipeline.load(config.data)
  check_data(config, ds)
  wall = {'data': time.time() - t}
  logging.info('data: %s from %s: train %d, val %d, test %d',
               config.data.name, ds.source, len(ds.train), len(ds.val),
               len(ds.test))
  data_key = checkpoint.digest(ds.train.x, ds.train.y, ds.val.x, ds.val.y,
                               ds.test.x, ds.test.y)
  this = record.Run(config, workdir, ds, data_key)
  # An ONNX teacher or precomputed features (given_teacher.Given), else
  # the variables of a teacher of this library / Keras (init_from).
  loaded = given_teacher.load(this)
  if loaded is None and config.teacher.init_from:
    metrics.stage_start('teacher', f'loading {config.teacher.init_from} and '
                        'checking it against config.teacher.body')
    loaded = teacher_lib.load_teacher(config.teacher.init_from,
                                      teacher_lib.model(this),
                                      ds.train.x[:1])
  keys = stage_keys(this, loaded)
  with contextlib.ExitStack() as stack:
    wd = stack.enter_context(_open_workdir(
        workdir, config, keys, data_lib.class_names(ds, config.data.name)))
    writer = None
    if wd is not None:   # Process 0: TensorBoard.
      writer = stack.enter_context(contextlib.closing(
          metrics.Writer(wd.stage_dir('tensorboard'))))
    stack.enter_context(mesh_lib.use(mesh))
    results = _stages(dataclasses.replace(this, writer=writer), keys, loaded,
                      wall)
  if joined:
    distributed.shutdown()   # Waits for every process to finish.
  return results


@contextlib.contextmanager
def _open_workdir(path, config, keys, classes=None):
  """Process 0's `workdir.Workdir` (lock, config.json with the data's
  class names, stage keys; None on the other processes, which share its
  directory and wait until it is open, or fail with its error)."""
  recorded = config_lib.to_json(config)
  if classes:
    recorded['classes'] = classes
  args = (path, recorded, keys, config.allow_config_change)
  if distributed.process_count() == 1:
    with workdir_lib.Workdir(*args) as wd:
      yield wd
    return
  wd, error = None, ''
  if distributed.process_index() == 0:
    try:
      wd = workdir_lib.Workdir(*args)
    except TCNError as e:
      error = str(e)
  error = distributed.broadcast_bytes(error.encode()).decode()
  if error:
    raise TCNError(error)
  try:
    yield wd
  finally:
    if wd is not None:
      wd.close()


def stage_keys(run: record.Run, loaded=None) -> dict[str, str]:
  """{stage: key} of every stage the run uses (see `tcn_jax.workdir`)."""
  c = run.config
  if isinstance(loaded, given_teacher.Given):
    keys = {'teacher': given_teacher.key(run, loaded)}
  else:
    keys = {'teacher': teacher_lib.key(
        run, checkpoint.digest(loaded) if loaded is not None else '')}
  keys['features'] = features_lib.key(run, keys['teacher'])
  keys['students'] = students_lib.key(run, keys['features'])
  keys['head'] = head_lib.key(run, keys['students'])
  for stage in BASELINES:
    if c[stage].enabled:
      keys[stage] = baselines.key(run, stage, keys['teacher'],
                                  keys['features'])
  return keys


def _timed(wall, name, fn, *args):
  t = time.time()
  out = fn(*args)
  wall[name] = time.time() - t
  return out


def _stages(run, keys, loaded, wall):
  """The stages, under the workdir lock (every process runs them)."""
  c = run.config
  given = loaded if isinstance(loaded, given_teacher.Given) else None
  if given:
    teacher = _timed(wall, 'teacher', given_teacher.run_stage, run, given,
                     keys['teacher'])
  else:
    teacher = _timed(wall, 'teacher', teacher_lib.run_stage, run,
                     keys['teacher'], loaded)
  logging.info('teacher test accuracy %.4f', teacher.test_acc)
  metrics.stage_start('features', "the teacher's features of the training "
                      'data (cached, or online in the students\' step)')
  if given and given.kind == 'features':
    feats = given_teacher.features_stage(run, given, keys['features'])
  else:
    feats = _timed(wall, 'features', features_lib.run_stage, run, teacher,
                   keys['features'])
  # Every process trains from process 0's chunked targets.
  shared = distributed.broadcast_tree(
      students_lib.shared_inputs(run, teacher, feats, keys['students']))
  metrics.stage_start('students', f'{c.num_students} students ({c.method})')
  students = _timed(wall, 'students', students_lib.run_stage, run, shared,
                    config_lib.student_specs(c))
  head = _timed(wall, 'head', head_lib.run_stage, run, teacher, students,
                keys['head'])
  logging.info('TCN test accuracy: %.4f before, %.4f after fine-tuning',
               head.info['test_acc_before'], head.info['test_acc_after'])
  results_of = {}
  for stage in BASELINES:
    if c[stage].enabled:
      results_of[stage] = _timed(wall, stage, baselines.run_stage, run, stage,
                                 teacher, feats)
      logging.info('%s student test accuracy %.4f', stage,
                   results_of[stage]['test_acc'])
  assemble.save_tcn(os.path.join(run.workdir, 'tcn'), head.tcn,
                    data_lib.class_names(run.ds, c.data.name))
  exported = (_timed(wall, 'export', _export, run, head.tcn)
              if c.export.formats else [])
  results = _results(run, teacher, students, head, results_of, wall)
  if given:
    results.update(given_teacher.results_entry(given, results))
  if exported:
    results['export'] = exported
  if distributed.process_index() == 0:
    checkpoint.write_json(os.path.join(run.workdir, 'results.json'), results)
  logging.info('%s', summary_line(results))
  return results


def _export(run, tcn):
  """The artifacts of `config.export` in workdir/export/ (paths relative
  to the workdir; [] when no format is asked for)."""
  c, x = run.config.export, run.ds.train.x
  formats = parse_formats(c.formats)
  if not formats:
    return []
  paths = export_all(
      tcn, os.path.join(run.workdir, 'export'), formats,
      input_shape=x.shape[1:], batch_size=c.batch_size or None,
      input_dtype=x.dtype)
  logging.info('exported %d artifacts to %s', len(paths),
               os.path.join(run.workdir, 'export'))
  return [os.path.relpath(p, run.workdir) for p in paths]


def summary_line(results: dict) -> str:
  """The run's last log line: the TCN beside its teacher and the paper."""
  def pct(value, scale=100.0):
    return 'n/a' if value is None else f'{scale * value:.2f}%'
  p = results['paper']
  return (f"TCN ({results['method']}, n = {results['num_students']}, "
          f"{results['params']['students_total']:,} student parameters): "
          f"{pct(results['tcn_test_acc_after_finetune'])} test accuracy; "
          f"its teacher {pct(results['teacher_test_acc'])}; the paper: TCN "
          f"{pct(p['tcn'], 1)}, teacher {pct(p['teacher'], 1)}")


def _results(run, teacher, students, head, baselines_out, wall):
  c, tcn = run.config, head.tcn
  n = c.num_students
  student_params = [models.num_params(g.variables['params'])
                    // len(g.member_ids)
                    for g in tcn.groups for _ in g.member_ids]
  info = students.info
  results = {
      'dataset': c.data.name, 'data_source': run.ds.source,
      'classes': data_lib.class_names(run.ds, c.data.name),
      'num_students': n, 'method': c.method, 'seed': c.seed,
      'gan': students_lib.gan_settings(c), 'kd': baselines_out.get('kd'),
      'kdgan': baselines_out.get('kdgan'),
      'chunking': c.chunking + (f' ({c.pca_assignment})'
                                if tcn.basis is not None else ''),
      'backend': jax.default_backend(),
      'mesh': mesh_lib.describe(mesh_lib.active()),
      'teacher_test_acc': teacher.test_acc,
      'student_val_mse': [h[-1] if h else None for h in info['val_mse']],
      'tcn_test_acc_before_finetune': head.info['test_acc_before'],
      'tcn_test_acc_after_finetune': head.info['test_acc_after'],
      # The validation split's, for choosing a recipe (e.g. whether to
      # fine-tune the head).
      'tcn_val_acc_before_finetune': head.info['val_acc_before'],
      'tcn_val_acc_after_finetune': head.info['val_acc_after'],
      # The paper's Table 3 for this dataset, method and n (%).
      'paper': {'tcn': paper.tcn_accuracy(c.data.name, c.method, n),
                'teacher': paper.teacher_accuracy(c.data.name)},
      'params': {'teacher': models.num_params(teacher.variables['params']),
                 'students_each': student_params,
                 'students_total': int(sum(student_params)),
                 'head': models.num_params(tcn.head_variables['params'])},
      # Bitwise fingerprints: equal digests mean equal parameters.
      'digests': {'teacher': checkpoint.digest(teacher.variables),
                  'tcn': checkpoint.digest([g.variables for g in tcn.groups],
                                           tcn.head_variables)},
      'stage_keys': {'teacher': teacher.key, 'students': students.key,
                     'head': head.key},
      'wall_seconds_this_run': wall,
      'train_seconds': {'teacher': teacher.seconds,
                        'students': info['seconds'],
                        'head': head.info['seconds']},
  }
  curve = [{k: v for k, v in r.items() if k in ('epoch', 'seconds')
            or k.startswith('tcn_')} for r in info['history'][0]
           if any(k.startswith('tcn_') for k in r)] if info['history'] else []
  if curve:   # config.students.eval_tcn: the TCN after each student epoch.
    results['students_curve'] = curve
  if distributed.process_count() > 1:
    results['distributed'] = {'num_processes': distributed.process_count()}
  return results
