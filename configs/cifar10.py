"""CIFAR-10, paper setup (reference notebooks): n=4 FF students by default.

The teacher is the VGG-style net with BatchNorm and L2 weight decay; its
feature is the pre-activation Dense-256 (can be negative), so the students'
output layers are linear (the authors' ReLU outputs died). The TCN head drops
the teacher head's BatchNorm as the authors' code does, unless
`--config.head.keep_teacher_bn=True`. Presets: ':smoke', ':gan'.
"""
from tcn_jax import config as config_lib
from tcn_jax import presets


def _vgg_block(width, dropouts):
  """Conv -> ReLU -> BN per conv ('same', 3x3), dropout after marked ones."""
  return ' '.join(f'C{width}same BN' + (f' Do{d}' if d else '')
                  for d in dropouts) + ' MPsame'


TEACHER = ' '.join([_vgg_block(64, ['.3', '']), _vgg_block(128, ['.4', '']),
                    _vgg_block(256, ['.4', '.4', '']),
                    _vgg_block(512, ['.4', '.4', '']),
                    _vgg_block(512, ['.4', '.4', '']), 'Do.5 F D256'])

_TRUNK_1 = ('C32same C32same MPsame Do.2 C128same C128same MPsame Do.3 '
            'C256same C256same MPsame Do.4 F')
_TRUNK = ('C32same C32same MPsame Do.2 C64same C64same MPsame Do.3 '
          'C128same C128same MPsame Do.4 F')
STUDENTS = {'1': _TRUNK_1 + ' D64r Do.2', '2': _TRUNK + ' D16r Do.2',
            '4': _TRUNK + ' D16r Do.2', '8': _TRUNK + ' D16r Do.2'}
# The authors' n=1 GAN student (Conv -> ELU -> BN blocks).
GAN_STUDENT_1 = ('C256samelin ELU BN C256samelin ELU BN MPsame Do.2 '
                 'C128samelin ELU BN C128samelin ELU BN MPsame Do.3 F D32r')


def get_config(preset: str = ''):
  c = config_lib.base_config()
  c.data.name = 'cifar10'
  t = c.teacher
  t.body, t.head_dropout, t.head_bn = TEACHER, 0.5, True
  t.optimizer, t.learning_rate, t.weight_decay = 'sgd', 0.1, 5e-4
  t.batch_size, t.epochs, t.lr_step_epochs, t.lr_step_factor = 128, 150, 20, .5
  s = c.students
  s.arch_by_n, s.init, s.out_relu = STUDENTS, 'he_uniform', False
  s.learning_rate, s.batch_size, s.epochs = 2e-4, 256, 80
  h = c.head
  h.dropout_by_n = {k: 0.5 for k in ('1', '2', '4', '8')}
  h.optimizer_by_n = {k: 'adam' for k in ('1', '2', '4', '8')}
  h.learning_rate, h.batch_size = 2e-4, 256
  h.epochs_by_n = {'1': 50, '2': 50, '4': 50, '8': 20}
  # Discriminators (reference Sec. 4, simplified to LeakyReLU/BN blocks).
  c.gan.disc_by_n = {'1': '128 128 128 256 256 512 512 1024',
                     '2': '128 128 128 256 256 512 512 1024',
                     '4': '128 128 128 256 256', '8': '128 128 128 256 256'}
  c.gan.disc_first_bias = True
  c.gan.g_steps_per_d_step = -1
  c.gan.g_steps_per_d_step_by_n = {'1': 1, '2': 4, '4': 4, '8': 4}
  c.kd.arch_by_n = {   # About the total parameters of the n FF students.
      '1': _TRUNK_1 + ' D70r Do.2',    # 1,367,468 (students 1,358,816)
      '2': _TRUNK + ' D173r Do.2',     # 643,225 (643,936)
      '4': _TRUNK_1 + ' D52r Do.2',    # 1,293,542 (1,283,520)
      '8': _TRUNK_1 + ' D363r Do.2'}   # 2,570,819 (2,562,688)
  c.kd.learning_rate, c.kd.batch_size, c.kd.epochs = 2e-4, 256, 80
  return presets.apply(c, preset, extra={'gan': _gan, 'smoke': _smoke})


def _gan(c):
  """The authors' CIFAR-10 GAN schedules."""
  c.students.arch_by_n = dict(STUDENTS, **{'1': GAN_STUDENT_1})
  c.students.epochs, c.students.learning_rate = 90, 2e-4
  c.head.epochs_by_n = {'1': 10, '2': 60, '4': 40, '8': 5}


def _smoke(c):
  """Small nets with the same kinds of layers."""
  t, s, h = c.teacher, c.students, c.head
  t.body = 'C8same BN Do.3 MPsame C16same BN MPsame Do.5 F D32'
  small = 'C4same C4same MPsame Do.2 C8same MPsame F D8r Do.2'
  s.arch_by_n = {k: small for k in STUDENTS}
  if c.method == 'gan':   # Like GAN_STUDENT_1: BatchNorm generators.
    s.arch_by_n = {k: 'C4samelin ELU BN MPsame Do.2 F D8r' for k in STUDENTS}
  c.gan.disc_by_n = {k: '16 16 32' for k in STUDENTS}
  c.kd.arch_by_n = {k: small for k in STUDENTS}
  t.batch_size = s.batch_size = h.batch_size = c.kd.batch_size = 50
