"""The paper's Table 3 (test accuracy, %), which every run's results and
final log line put beside its own numbers; experiments/ reads it from here.

Paper: Teacher-Class Networks (BMVC 2021), Table 3; None where it has no
number.
"""

# Table 3: test accuracy (%) of the teacher, one Hinton KD student, KDGAN
# and the TCN (FF and GAN students) for n = 1, 2, 4, 8. The paper reports
# one KD student for all n (94.65k parameters for (F-)MNIST, Table 6).
TABLE3 = {
    'mnist': {'teacher': 98.11, 'kd': 93.34, 'kdgan': 99.25,
              'ff': {1: 98.65, 2: 96.79, 4: 97.81, 8: 93.97},
              'gan': {1: 99.16, 2: 99.30, 4: 99.21, 8: 98.10}},
    'fashion_mnist': {'teacher': 91.98, 'kd': 82.87, 'kdgan': None,
                      'ff': {1: 89.97, 2: 89.43, 4: 86.54, 8: 82.33},
                      'gan': {1: 89.35, 2: 90.74, 4: 89.49, 8: 90.67}},
    'cifar10': {'teacher': 89.85, 'kd': 79.99, 'kdgan': 86.50,
                'ff': {1: 82.17, 2: 82.32, 4: 81.57, 8: 81.91},
                'gan': {1: 81.74, 2: 84.70, 4: 86.04, 8: 86.96}},
    'imdb': {'teacher': 86.01, 'kd': 67.78, 'kdgan': None,
             'ff': {1: 84.58, 2: 83.01, 4: 83.29, 8: 83.58},
             'gan': {1: 84.48, 2: 83.28, 4: 83.28, 8: 83.67}},
}


def tcn_accuracy(dataset: str, method: str, n: int):
  """The paper's TCN test accuracy (%) for (dataset, 'ff'|'gan', n), or
  None where the paper has none."""
  return TABLE3.get(dataset, {}).get(method, {}).get(n)


def teacher_accuracy(dataset: str):
  return TABLE3.get(dataset, {}).get('teacher')
