"""ImageNet (ILSVRC2012), paper Table 7: ResNet-50 teacher, one ResNet-18
student (n=1) or two ResNet-9 students (n=2).

The feature is the ResNet-50's 2048-d pooled output (there is no 256-d dense
layer in a ResNet); students regress 2048/n-wide chunks. Images are resized
(shorter side) and centre-cropped to data.image_size. The data pipeline holds
whole TFDS splits in memory, so full ImageNet does not fit there: use
data.train_size subsets. TFDS needs the manual download (see the error
message). With --config.data.layout=folder and --config.data.dir=DIR an
ILSVRC-layout folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) is read
instead, streamed through Grain when it is larger than data.memory_limit_mb
(or always, with data.streaming='always'). Presets: ':smoke', ':gan'.

The teacher is keras.applications.ResNet50 layer for layer (its stem, the
stride in each block's first 1x1 convolution, BatchNorm epsilon 1.001e-5), so
pretrained weights load: save `ResNet50(weights='imagenet')` as a `.keras`
or `.weights.h5` file on a machine with internet and pass it as
`--config.teacher.init_from`. The students keep the smaller stem.
"""
from tcn_jax import config as config_lib
from tcn_jax import presets

_STEM = 'C7-64s2samelin BN R MPsame'
# keras.applications.ResNet50's input preprocessing (caffe: 0-255 BGR, mean
# subtracted) and stem: zero padding 3, 7x7/2 'valid', BN, ReLU, zero padding
# 1, 3x3/2 max pooling.
_KERAS_STEM = 'CAFFE ZP3 C7-64s2lin BN1.001e-5 R ZP1 MP3s2'


def resnet(blocks, widths, kind, keras=False):
  """A ResNet body: stem, `blocks[i]` blocks of `widths[i]` filters (the
  first of each stage after the first with stride 2), global average pool.
  keras: keras.applications' layout (stem, strides, BatchNorm epsilon), so
  its weights convert layer for layer (`teacher.init_from=model.keras`)."""
  out = [_KERAS_STEM if keras else _STEM]
  for stage, (count, width) in enumerate(zip(blocks, widths)):
    for b in range(count):
      out.append(f'{kind}{width}' + ('s2' if stage and not b else '')
                 + ('k' if keras else ''))
  return ' '.join(out + ['GAP'])


WIDTHS = (64, 128, 256, 512)
# keras.applications.ResNet50, layer for layer.
RESNET50 = resnet((3, 4, 6, 3), WIDTHS, 'BB', keras=True)
RESNET18 = resnet((2, 2, 2, 2), WIDTHS, 'RB')
RESNET9 = resnet((1, 1, 1, 1), WIDTHS, 'RB')   # ResNet-18, one block/stage.


def get_config(preset: str = ''):
  c = config_lib.base_config()
  c.num_students = 2
  c.data.name = 'imagenet'
  c.data.image_size, c.data.val_fraction = 224, 0.01
  # --config.data.layout=folder: data.dir is an ILSVRC-layout folder
  # (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) read through
  # tcn_jax.input_pipeline, streamed when it does not fit (data.streaming,
  # data.memory_limit_mb, data.workers: configs/image_folder.py says how).
  t = c.teacher
  t.body, t.head_dropout = RESNET50, 0.0
  # A Keras init_from (keras.applications.ResNet50) is mapped onto this
  # body, whose CAFFE token gives it Keras' preprocess_input.
  t.keras_mode = 'body'
  t.optimizer, t.learning_rate, t.weight_decay = 'sgd', 0.1, 1e-4
  t.batch_size, t.epochs, t.lr_step_epochs, t.lr_step_factor = 256, 90, 30, .1
  s = c.students
  s.arch_by_n = {'1': RESNET18, '2': RESNET9}
  s.init, s.batch_size, s.epochs, s.weight_decay = 'he_uniform', 256, 30, 1e-4
  h = c.head
  h.dropout_by_n = {'1': 0.0, '2': 0.0}
  h.optimizer_by_n = {'1': 'adam', '2': 'adam'}
  h.epochs_by_n = {'1': 5, '2': 5}
  c.gan.disc_by_n = {'1': '512 512 1024', '2': '512 512 1024'}
  c.kd.arch_by_n = {'1': RESNET18, '2': RESNET18}
  c.eval_batch_size = 250
  return presets.apply(c, preset, extra={'smoke': _smoke})


def _smoke(c):
  """Small images, a narrow ResNet: a pipeline check."""
  t, s, h = c.teacher, c.students, c.head
  c.data.image_size = 32
  t.body = resnet((1,), (8,), 'BB', keras=True)
  s.arch_by_n = {'1': resnet((1,), (8,), 'RB'), '2': resnet((1,), (4,), 'RB')}
  c.kd.arch_by_n = dict(s.arch_by_n)
  c.gan.disc_by_n = {k: '16 16 32' for k in ('1', '2')}
  t.batch_size = s.batch_size = h.batch_size = c.kd.batch_size = 50
