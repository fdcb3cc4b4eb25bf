"""tcn_jax: Teacher-Class Networks (BMVC 2021) in JAX/Flax.

Functional API, one call per stage of the paper's pipeline:

  import tcn_jax as tcn
  ds = tcn.load_dataset('fashion_mnist')
  teacher = tcn.Teacher('C32 C64 MP Do.25 F D256r D256r', num_classes=10)
  t_vars, _ = tcn.train_teacher(teacher, ds, epochs=12)
  feats = tcn.teacher_features(teacher, t_vars, ds.train.x)
  groups, _ = tcn.train_students('C32 C32 MP C16 C16 MP Do.25 F D16r Do.3',
                                 ds.train.x, feats, num_students=4, epochs=10)
  net = tcn.TCN(groups, 10, head_dropout=0.5,
                head_variables=tcn.teacher_head(t_vars))
  net, info = tcn.finetune_head(net, ds, epochs=20)
  predict = tcn.make_predict(net)          # images -> logits, no teacher
  tcn.export(net, 'tcn.stablehlo', 'stablehlo', input_shape=(28, 28, 1))

A teacher trained elsewhere: `tcn.teacher_variables_from_keras(path_or_model,
teacher, x)` (the variables of a `Teacher` from a Keras model that follows
its architecture string), or `tcn.teacher_from_flax` / `tcn.teacher_from_keras`
/ `tcn.function_teacher` (any model), which return (teacher, t_vars) for the
same calls; `tcn.teacher_from_onnx(path, x_example=x[:8])` for an ONNX graph
(PyTorch, TensorFlow) run by onnxruntime, and `tcn.precomputed_teacher(
features, kernel, bias)` for features computed elsewhere.

Names are imported on first use (PEP 562), so `import tcn_jax.config` (what
`configs/*.py` do) stays light.
"""
import importlib
import sys
import types

# The public API by stage: name -> the module that defines it.
_API = {
    # Data.
    'load_dataset': __name__, 'Dataset': 'tcn_jax.data',
    'Split': 'tcn_jax.data',
    # Teacher.
    'Teacher': 'tcn_jax.models', 'train_teacher': 'tcn_jax.teacher',
    'load_teacher': 'tcn_jax.teacher',
    'teacher_variables_from_keras': 'tcn_jax.keras_convert',
    'teacher_from_keras': 'tcn_jax.function_teacher',
    'teacher_from_flax': 'tcn_jax.function_teacher',
    'function_teacher': 'tcn_jax.function_teacher',
    'teacher_from_onnx': 'tcn_jax.onnx_teacher',
    'precomputed_teacher': 'tcn_jax.given_teacher',
    # Features.
    'teacher_features': 'tcn_jax.features', 'chunk': 'tcn_jax.chunking',
    'Chunker': 'tcn_jax.chunking',
    # Students.
    'train_students': 'tcn_jax.students', 'Optimizer': 'tcn_jax.students',
    'Nets': 'tcn_jax.students', 'Objective': 'tcn_jax.students',
    # Head and assembly.
    'TCN': 'tcn_jax.assemble', 'StudentGroup': 'tcn_jax.assemble',
    'Head': 'tcn_jax.models',
    'teacher_head': 'tcn_jax.assemble', 'finetune_head': 'tcn_jax.head',
    'make_predict': 'tcn_jax.assemble', 'evaluate': 'tcn_jax.metrics',
    'save_tcn': 'tcn_jax.assemble', 'load_tcn': 'tcn_jax.assemble',
    # Export.
    'export': 'tcn_jax.export',
    # A whole run, as `python -m tcn_jax.main` does it.
    'run': 'tcn_jax.pipeline', 'resolve_config': 'tcn_jax.config',
    'set_progress': 'tcn_jax.metrics', 'TCNError': 'tcn_jax.errors',
}
_RENAMED = {'resolve_config': 'resolve'}
__all__ = list(_API)


def load_dataset(name: str = 'fashion_mnist', data_dir: str = '',
                 split_seed: int = 0, val_fraction: float = 0.2,
                 train_size: int = 0, test_size: int = 0):
  """Loads a dataset into memory, with a seeded validation split.

  Fashion-MNIST and MNIST come from `data_dir` (IDX files), else the system
  copy (/usr/share/datasets/fashion-mnist), else TFDS; the other datasets
  from TFDS, built with `--file_format=array_record` (see
  `tcn_jax.data.load`).

  Args:
    name: 'fashion_mnist', 'mnist', 'cifar10', 'imdb' or 'imagenet'.
    data_dir: a directory of IDX files, or the TFDS data_dir ('' = default).
    split_seed: the seed of the validation split and of the subsets.
    val_fraction: the part of train held out for validation.
    train_size: a seeded subset of train (0 = all); val keeps a quarter of
      its size.
    test_size: a seeded subset of test (0 = all).

  Returns:
    A `Dataset` (train, val, test, num_classes, source). Raises TCNError
    saying how to get a dataset that is not there.
  """
  from tcn_jax import config  # pylint: disable=g-import-not-at-top
  from tcn_jax import data  # pylint: disable=g-import-not-at-top
  return data.load(config.data_config(
      name=name, dir=data_dir, split_seed=split_seed,
      val_fraction=val_fraction, train_size=train_size, test_size=test_size))


def __getattr__(name):
  if name not in _API:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(_API[name]),
                  _RENAMED.get(name, name))
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
  """API names that are also submodules' names (`export`,
  `function_teacher`) stay the API's functions: importing the submodule
  (which binds it on the package) leaves them so."""

  def __setattr__(self, name, value):
    if name in _API and isinstance(value, types.ModuleType):
      return
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
