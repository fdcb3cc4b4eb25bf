"""The paper's numbers and the authors' notebooks' numbers, in one place.

Paper: Teacher-Class Networks (BMVC 2021), /work/shared/reference/paper.txt
(tables as extracted, some labels lost). Notebooks: what the authors'
released code printed (reference notes Sec. 7). Accuracies in %, None where
the source has no number. Every script in experiments/ reads them from here
(Table 3 through the library, tcn_jax/paper.py).
"""

# Table 3: test accuracy (%) of the teacher, one Hinton KD student, KDGAN
# and the TCN (FF and GAN students) for n = 1, 2, 4, 8, per dataset
# ({dataset: {'teacher', 'kd', 'kdgan', 'ff': {n: acc}, 'gan': {n: acc}}}).
# The library keeps it: every run's results put it beside its own numbers.
from tcn_jax.paper import TABLE3  # pylint: disable=unused-import

NS = (1, 2, 4, 8)
KD_PARAMS = 94650   # The paper's (F-)MNIST KD student (Table 6).

# The authors' notebooks (reference notes Sec. 7a): no baselines; MNIST GAN
# n = 8 was not run.
NOTEBOOKS = {
    'mnist': {'teacher': 98.99, 'kd': None, 'kdgan': None,
              'ff': {1: 98.90, 2: 98.48, 4: 98.42, 8: 98.99},
              'gan': {1: 98.52, 2: 98.96, 4: 98.37, 8: None}},
    'fashion_mnist': {'teacher': 92.39, 'kd': None, 'kdgan': None,
                      'ff': {1: 86.29, 2: 80.12, 4: 85.27, 8: 86.15},
                      'gan': {1: 85.88, 2: 82.17, 4: 86.26, 8: 85.75}},
}

# Table 1, F-MNIST, n = 4: per-student validation MSE (FF, and MSE + GAN).
TABLE1 = {'ff': [.157, .176, .173, .174], 'gan': [.546, .704, .58, .546]}
# The notebooks' FF per-student MSE for each n (notes Sec. 7b).
NOTEBOOK_MSE = {1: [.1668], 2: [.2457, .2736], 4: [.2079, .2580, .2426, .2607],
                8: [.2147, .2370, .2443, .2651, .2495, .2533, .2450, .2467]}

# Table 2, F-MNIST, n = 4 FF: test accuracy before and after head fine-tuning.
TABLE2 = (85.70, 86.54)

# Table 4, F-MNIST: identical students (22.17k each) and improved ones (†):
# (per-student MSE, per-student parameters, MSE sum, parameter sum). The
# printed sums (88.68k, 278.39k) are kept as printed; 22.17k + 3 x 85.74k is
# 279.39k.
TABLE4 = {'identical': ([.1571, .1759, .1728, .1743], [22170] * 4,
                        .6801, 88680),
          'improved': ([.1571, .1293, .1112, .1131],
                       [22170, 85740, 85740, 85740], .5107, 278390)}

# Table 5, F-MNIST: inference seconds of the teacher and the TCN n = 4
# (students on separate machines).
TABLE5 = {'teacher': 0.171, 'tcn_n4': 0.082}

# Table 6, MNIST & F-MNIST columns (#Para, FLOPs), in extraction order
# (reference notes Sec. 7d); the row labels were lost in the extraction.
# The third entry is the reference notes' / the paper text's attribution.
TABLE6 = [
    ('2.38M', '26.46M', 'teacher'),
    ('94.65k', '11.67M', 'KD student (Sec. 6 of the notes: "a KD student of '
     '94.65k params")'),
    ('95.32k', '12.53M', 'probably the n=1 student (label lost)'),
    ('46.36k', '6.26M', 'n=2, each student (paper text: 46.36k)'),
    ('91.24k', '12.54M', 'label lost (2 x 46.36k = 92.72k: n=2 total?)'),
    ('22.17k', '3.14M', 'n=4, each student (paper text and Table 4: 22.17k)'),
    ('67.84k', '9.46M', 'label lost'),
    ('10.9k', '1.57M', 'probably n=8, each student (paper text)'),
    ('41.37k', '1.19M', 'label lost'),
    ('5.00k', '149.12k', 'label lost'),
]
# Our reading of which TABLE6 row belongs to which of table6.py's rows.
TABLE6_FOR = {'teacher': 0, 'kd1': 1, 'kd2': 1, 'kd4': 1, 'kd8': 1,
              'student1': 2, 'student2': 3, 'student4': 5, 'student8': 7}

# Table 8, F-MNIST rows (probably n = 1, 4, 8; labels lost): epochs,
# s/epoch, total s, per student (notes Sec. 7c).
TABLE8 = {'ff': {1: (10, 4, 40), 4: (10, 3.5, 35), 8: (10, 3, 30)},
          'gan': {1: (55, 13, 715), 4: (55, 13, 715), 8: (50, 13, 650)}}
