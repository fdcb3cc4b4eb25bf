"""Teachers the pipeline is given as they are: an ONNX graph
(`teacher.init_from=model.onnx`), a Keras model file taken whole
(`teacher.init_from=model.keras|.h5`, `teacher.keras_mode`: no
architecture string mirrors it) or precomputed features
(`teacher.features_from=DIR`).

Both are loaded and checked before anything is written (`load`), give the
teacher stage its key (a digest of the ONNX file, or a fingerprint of the
feature files and the head), and stand in for the teacher stage
(`run_stage`). An ONNX teacher's features then go through the features
stage like any teacher's (a streamed split batch by batch into the
memory-mapped cache); precomputed ones are the features stage
(`features_stage`, memory-mapped).

A features directory holds `features.train.npy`, `features.val.npy`,
`features.test.npy` ((rows, D) each, row-aligned with the splits that
`tcn_jax.data.load(config.data)` gives: train without the seeded
validation rows, val, test) and `head.npz` with `kernel` (D, classes) and
`bias` (classes,), the teacher's output layer (its input is the feature
after a ReLU). `precomputed_teacher` is the API's equivalent for arrays.
"""
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from tcn_jax import chunking
from tcn_jax import checkpoint
from tcn_jax import config as config_lib
from tcn_jax.function_teacher import teacher_from_keras
from tcn_jax import input_pipeline
from tcn_jax import keras_convert
from tcn_jax import metrics
from tcn_jax import onnx_teacher
from tcn_jax import record
from tcn_jax import workdir as workdir_lib
from tcn_jax.errors import TCNError

SPLITS = ('train', 'val', 'test')
# Config fields of the teacher section added for given teachers, with the
# value that means "not used" (kept out of stage keys at that value, so
# the keys of earlier runs stay the same).
# keras_mode: how a Keras init_from is used: 'model' (the file as it is,
# through `function_teacher.teacher_from_keras`; teacher.body unused),
# 'body' (its weights mapped onto teacher.body, `keras_convert`), ''
# (auto: 'body' for a weights-only file, which holds no architecture, else
# 'model').
# Validation accuracy under CHANCE_FACTOR / classes stops the run.
CHANCE_FACTOR = 1.5


def keras_mode(config) -> str:
  """'model' or 'body' for a Keras init_from (see config.GIVEN_FIELDS),
  else ''."""
  t = config.teacher
  path = t.get('init_from', '')
  if not keras_convert.is_keras_file(path) or t.get('features_from'):
    return ''
  mode = t.get('keras_mode', '')
  if mode:
    return mode
  return 'body' if keras_convert.is_weights_file(path) else 'model'


def kind(config) -> str:
  """'onnx', 'keras' (a Keras file taken whole), 'features' or '' (a
  teacher of this library, a Keras file mapped onto teacher.body)."""
  t = config.teacher
  if t.get('features_from'):
    return 'features'
  if onnx_teacher.is_onnx_file(t.get('init_from', '')):
    return 'onnx'
  if keras_mode(config) == 'model':
    return 'keras'
  return ''


def key_fields(section: dict) -> dict:
  """The teacher section without the given-teacher fields at their
  defaults (stage keys of runs without them are unchanged) and without
  keras_mode (a loaded teacher's key holds its parameters' digest)."""
  return {k: v for k, v in section.items()
          if k != 'keras_mode' and (k not in config_lib.GIVEN_FIELDS
                                    or v != config_lib.GIVEN_FIELDS[k])}


@dataclasses.dataclass(frozen=True)
class Given:
  """A teacher given from outside: ONNX (model set) or features (model
  None, features {split: (rows, D) array or memory map})."""
  kind: str
  model: Any            # An onnx_teacher.OnnxTeacher, or None.
  variables: dict       # {'model': {}, 'params': {'head': {'out': ...}}}
  fingerprint: str      # The ONNX file's digest, or the features'.
  info: dict            # For results.json.
  features: dict | None = None


def check_config(config):
  """One line naming the field when a given teacher cannot be used with the
  rest of the config."""
  k = kind(config)
  if not k:
    return
  t, s = config.teacher, config.students
  if k == 'features' and t.init_from:
    raise TCNError('config.teacher.features_from and config.teacher.'
                   'init_from are both set: give the teacher one way')
  what = {'onnx': 'an ONNX teacher',
          'keras': 'a Keras file taken whole (teacher.keras_mode=model)',
          'features': 'precomputed features (teacher.features_from)'}[k]
  if k == 'keras' and s.get('features') == 'online':
    raise TCNError(
        f'config.students.features=online does not work with {what}: its '
        'features are cached before the students train; use '
        'students.features=cached, or teacher.keras_mode=body with a '
        'teacher.body that mirrors the model layer for layer')
  if s.get('features') == 'online':
    raise TCNError(
        f'config.students.features=online does not work with {what}: online '
        "features are computed inside the students' compiled step, and "
        + ('onnxruntime runs on the host outside it' if k == 'onnx' else
           'there is no teacher to run') + '; use students.features=cached '
        '(streamed splits are cached batch by batch in a memory map)')
  if k == 'features':
    if config.data.augment:
      raise TCNError(f'config.data.augment={config.data.augment!r} needs the '
                     "teacher's features of the augmented images, which "
                     'precomputed features (teacher.features_from) do not have')
    for b in ('kd', 'kdgan'):
      if config[b].enabled:
        raise TCNError(f'config.{b}.enabled needs the teacher\'s logits on '
                       'the training images; with precomputed features '
                       '(teacher.features_from) there is no teacher to run')


def load(run: record.Run) -> Given | None:
  """The given teacher of `run.config`, loaded and checked (before any
  work), or None when the teacher is of another kind."""
  c = run.config
  k = kind(c)
  if not k:
    return None
  check_config(c)
  if k == 'onnx':
    t = c.teacher
    model, variables = onnx_teacher.teacher_from_onnx(
        t.init_from, x_example=np.asarray(run.ds.train.x[:8]),
        feature_tensor=t.get('feature_tensor', ''),
        input_layout=t.get('input_layout', '') or 'auto',
        input_mean=t.get('input_mean', ''), input_std=t.get('input_std', ''),
        what=f'config.teacher.init_from {t.init_from!r}')
    given = Given('onnx', model, variables, model.info['digest'],
                  {'source': 'onnx', **model.info})
  elif k == 'keras':
    given = from_keras_file(run)
  else:
    given = from_directory(c.teacher.features_from,
                           {s: len(getattr(run.ds, s)) for s in SPLITS})
  width, classes = given.variables['params']['head']['out']['kernel'].shape
  if classes != run.ds.num_classes:
    raise TCNError(f'the teacher ({given.info["source"]}) has {classes} '
                   f'classes, the data ({c.data.name}) {run.ds.num_classes}: '
                   'a teacher of these classes is needed')
  chunking.chunk_sizes(int(width), c.num_students)
  return given


def from_keras_file(run: record.Run) -> Given:
  """`teacher.init_from=model.keras|.h5` taken whole: any architecture,
  through `function_teacher.teacher_from_keras` (checked to reproduce the
  model's output)."""
  path = run.config.teacher.init_from
  what = f'config.teacher.init_from {path!r}'
  model = keras_convert.load_keras_model(path, 0, None, what)
  x = np.asarray(run.ds.train.x[:8])
  shape = model.inputs[0].shape if model.inputs else None
  problem = config_lib.input_mismatch(run.config, shape and tuple(shape[1:]),
                           x.shape[1:], path)
  if problem:
    raise TCNError(problem)
  teacher, variables = teacher_from_keras(model, x_example=x)
  digest = onnx_teacher.file_digest(path)
  info = {'source': 'keras', 'path': path, 'digest': digest,
          'input_shape': [d for d in (shape[1:] if shape else [])],
          'params': int(model.count_params()),
          'width': int(variables['params']['head']['out']['kernel'].shape[0])}
  return Given('keras', teacher, variables, digest, info)


def _problems_error(where: str, problems: list[str]):
  if len(problems) == 1:
    raise TCNError(f'{where}: {problems[0]}')
  if problems:
    raise TCNError(f'{where}: {len(problems)} problems:\n  '
                   + '\n  '.join(problems))


def _finite(a, block: int = 65536) -> bool:
  return all(np.isfinite(np.asarray(a[s:s + block])).all()
             for s in range(0, len(a), block))


def check_features(features: dict, kernel, bias, rows: dict | None = None,
                   where: str = 'precomputed_teacher', names=None):
  """One line per problem (all of them, one TCNError): splits present,
  (rows, D) with the data's rows, one width D, finite, head (D, classes)
  and (classes,), finite."""
  names = names or {s: s for s in SPLITS}
  problems, widths = [], {}
  kernel = None if kernel is None else np.asarray(kernel)
  bias = None if bias is None else np.asarray(bias)
  for s in SPLITS:
    f = features.get(s)
    if f is None:
      problems.append(f'{names[s]}: missing (the {s} split\'s features)')
      continue
    if f.ndim != 2:
      problems.append(f'{names[s]}: shape {tuple(f.shape)}, not (rows, D)')
      continue
    widths[s] = f.shape[1]
    if rows and f.shape[0] != rows[s]:
      problems.append(f'{names[s]}: {f.shape[0]} rows, the data\'s {s} split '
                      f'has {rows[s]} (rows must be aligned with it)')
    if not np.issubdtype(f.dtype, np.floating):
      problems.append(f'{names[s]}: dtype {f.dtype}, not floating point')
    elif not _finite(f):
      problems.append(f'{names[s]}: holds NaN or infinite values')
  if len(set(widths.values())) > 1:
    problems.append('the splits\' features differ in width: ' + ', '.join(
        f'{s} {w}' for s, w in widths.items()))
  head = names.get('head', 'head')
  if kernel is None or bias is None:
    problems.append(f'{head}: needs kernel (D, classes) and bias (classes,)')
  else:
    d = next(iter(widths.values()), None)
    if kernel.ndim != 2 or (d is not None and kernel.shape[0] != d):
      problems.append(f'{head}: kernel of shape {kernel.shape}, the features '
                      f'need ({d}, classes)')
    elif bias.shape != kernel.shape[1:]:
      problems.append(f'{head}: bias of shape {bias.shape}, the kernel '
                      f'{kernel.shape} needs ({kernel.shape[1]},)')
    if not (np.isfinite(kernel).all() and np.isfinite(bias).all()):
      problems.append(f'{head}: holds NaN or infinite values')
  _problems_error(where, problems)


def precomputed_teacher(features: dict, kernel, bias, *,
                        rows: dict | None = None):
  """A teacher given as its features and output layer (the API's
  `teacher.features_from`).

  Args:
    features: {'train', 'val', 'test'}: (rows, D) arrays (or memory maps)
      of the teacher's feature (the output layer's input, after a ReLU).
    kernel: (D, classes) output layer weights; bias: (classes,).
    rows: optional {split: rows} the features must have.

  Returns:
    (features, variables): the features as float32 (memory maps kept) and
    {'params': {'head': {'out': {'kernel', 'bias'}}}} for `teacher_head` and
    `TCN`.

  Raises:
    TCNError with one line per problem (missing split, rows, widths,
    NaN, head shape) before any work.
  """
  check_features(features, kernel, bias, rows)
  feats = {s: f if f.dtype == np.float32 else np.asarray(f, np.float32)
           for s, f in features.items() if s in SPLITS}
  variables = {'params': {'head': {'out': {
      'kernel': np.asarray(kernel, np.float32),
      'bias': np.asarray(bias, np.float32)}}}}
  return feats, variables


def from_directory(path: str, rows: dict) -> Given:
  """`teacher.features_from`: checked (`check_features`), memory-mapped."""
  where = f'config.teacher.features_from {path!r}'
  if not os.path.isdir(path):
    raise TCNError(f'{where}: no such directory')
  feats, files, problems = {}, {}, []
  for s in SPLITS:
    name = f'features.{s}.npy'
    files[s] = os.path.join(path, name)
    if not os.path.exists(files[s]):
      continue
    try:
      feats[s] = np.load(files[s], mmap_mode='r')
    except (OSError, ValueError) as e:
      problems.append(f'{name}: unreadable ({str(e)[:80]})')
  kernel = bias = None
  head = os.path.join(path, 'head.npz')
  if os.path.exists(head):
    try:
      with np.load(head) as h:
        kernel = h['kernel'] if 'kernel' in h else None
        bias = h['bias'] if 'bias' in h else None
    except (OSError, ValueError) as e:
      problems.append(f'head.npz: unreadable ({str(e)[:80]})')
  names = {s: f'features.{s}.npy' for s in SPLITS}
  names['head'] = 'head.npz'
  if problems:
    _problems_error(where, problems)
  check_features(feats, kernel, bias, rows, where, names)
  _, variables = precomputed_teacher(feats, kernel, bias)
  stats = [(os.path.basename(f), os.path.getsize(f),
            os.stat(f).st_mtime_ns) for f in files.values()]
  fingerprint = checkpoint.digest(np.asarray(str(stats)), variables)
  info = {'source': 'features', 'path': path, 'fingerprint': fingerprint,
          'width': int(kernel.shape[0])}
  return Given('features', None, variables, fingerprint, info, feats)


def key(run: record.Run, given: Given) -> str:
  """The teacher stage's key for a given teacher: its file's digest (or
  its features' fingerprint) and how it is read."""
  c = run.config
  t = c.teacher
  how = {k: t.get(k, config_lib.GIVEN_FIELDS[k]) for k in
         ('feature_tensor', 'input_layout', 'input_mean', 'input_std')}
  return workdir_lib.stage_key(
      stage='teacher', given=given.kind, fingerprint=given.fingerprint,
      read=how if given.kind == 'onnx' else None, data=run.data_key,
      num_classes=run.ds.num_classes)


def _logits_fn(given: Given):
  if given.kind == 'onnx':
    return lambda x: given.model.run_host(x)[0]
  if given.kind == 'keras':
    return jax.jit(lambda x: given.model.apply(given.variables, x))
  out = given.variables['params']['head']['out']
  return lambda f: np.maximum(np.asarray(f, np.float32), 0) @ out['kernel'] \
      + out['bias']


def accuracy(given: Given, split, batch_size: int, name: str) -> float:
  """The teacher's accuracy on a data split: the ONNX session's own
  output, or the head on the precomputed features."""
  x = split.x if given.model is not None else given.features[name]
  logits = input_pipeline.batched(_logits_fn(given), x, batch_size)
  return metrics.accuracy(logits, np.asarray(split.y))


def check_chance(config, val_acc: float, classes: int):
  """Stops the run (one line) when a given teacher's validation accuracy
  is near chance, unless config.teacher.allow_chance."""
  if (classes > 1 and val_acc < CHANCE_FACTOR / classes
      and not config.teacher.get('allow_chance')):
    raise TCNError(
        f'the given teacher\'s validation accuracy is {val_acc:.4f}, near '
        f'chance (1/{classes}): its class order probably differs from the '
        'data\'s (sorted folder names, or the dataset\'s label ids); set '
        'config.teacher.allow_chance=True to distill it anyway')


def run_stage(run: record.Run, given: Given, key: str) -> record.Teacher:
  """The teacher stage of a given teacher: nothing trained; its test
  accuracy (and validation accuracy, checked against chance)."""
  c = run.config
  bs = c.eval_batch_size
  val = accuracy(given, run.ds.val, bs, 'val')
  logging.info('given teacher (%s): validation accuracy %.4f',
               given.kind, val)
  check_chance(c, val, run.ds.num_classes)
  given.info['val_acc'] = val
  test = accuracy(given, run.ds.test, bs, 'test')
  model = given.model
  return record.Teacher(model, given.variables, test, 0.0, key)


def features_stage(run: record.Run, given: Given,
                   key: str) -> record.Features:
  """The features stage of precomputed features: the memory maps."""
  f = given.features
  return record.Features(f['train'], np.asarray(f['val'], np.float32), None,
                         key, 'cached')


def results_entry(given: Given, results: dict) -> dict:
  """results.json's teacher entries for a given teacher: its source
  (`teacher_source`) and, for an ONNX graph, its parameter count."""
  out = {'teacher_source': given.info}
  if given.info.get('params'):
    out['params'] = dict(results['params'], teacher=given.info['params'])
  return out
