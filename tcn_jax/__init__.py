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

A teacher trained elsewhere: `tcn.from_keras(path_or_model, teacher, x)` (a
Keras model that follows an architecture string), or `tcn.teacher_from_flax`
/ `tcn.teacher_from_keras` / `tcn.function_teacher` (any model), which return
(teacher, t_vars) for the same calls; `tcn.teacher_from_onnx(path,
x_example=x[:8])` for an ONNX graph (PyTorch, TensorFlow) run by onnxruntime,
and `tcn.precomputed_teacher(features, kernel, bias)` for features computed
elsewhere.
"""
from tcn_jax.assemble import load_tcn
from tcn_jax.assemble import make_predict
from tcn_jax.assemble import save_tcn
from tcn_jax.assemble import StudentGroup
from tcn_jax.assemble import teacher_head
from tcn_jax.assemble import TCN
from tcn_jax.data import Dataset
from tcn_jax.data import Split
from tcn_jax.errors import TCNError
from tcn_jax.export import export
from tcn_jax.chunking import chunk
from tcn_jax.chunking import chunk_sizes
from tcn_jax.chunking import Chunker
from tcn_jax.chunking import unchunk
from tcn_jax.config import resolve as resolve_config
from tcn_jax.features import teacher_features
from tcn_jax.function_teacher import function_teacher
from tcn_jax.function_teacher import FunctionTeacher
from tcn_jax.function_teacher import teacher_from_flax
from tcn_jax.function_teacher import teacher_from_keras
from tcn_jax.given_teacher import precomputed_teacher
from tcn_jax.head import finetune_head
from tcn_jax.keras_convert import from_keras
from tcn_jax.models import Head
from tcn_jax.models import Net
from tcn_jax.models import student
from tcn_jax.models import Teacher
from tcn_jax.onnx_teacher import teacher_from_onnx
from tcn_jax.metrics import evaluate
from tcn_jax.metrics import set_progress
from tcn_jax.pipeline import run
from tcn_jax.students import Nets
from tcn_jax.students import Objective
from tcn_jax.students import Optimizer
from tcn_jax.students import train_students
from tcn_jax.teacher import load_teacher
from tcn_jax.teacher import train_teacher


def load_dataset(name: str = 'fashion_mnist', data_dir: str = '',
                 split_seed: int = 0, val_fraction: float = 0.2,
                 train_size: int = 0, test_size: int = 0) -> Dataset:
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
  import ml_collections  # pylint: disable=g-import-not-at-top
  from tcn_jax import data  # pylint: disable=g-import-not-at-top
  return data.load(ml_collections.ConfigDict(dict(
      name=name, dir=data_dir, split_seed=split_seed,
      val_fraction=val_fraction, train_size=train_size, test_size=test_size)))
