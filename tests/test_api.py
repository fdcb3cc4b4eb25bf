"""The functional API used from notebooks, on a small real subset."""
import numpy as np
import pytest

import tcn_jax as tcn
from helpers import needs_fmnist


@pytest.mark.slow
@needs_fmnist
def test_functional_api_end_to_end(tmp_path):
  ds = tcn.load_dataset('fashion_mnist', train_size=1500, test_size=500)
  teacher = tcn.Teacher('C16 MP F D64r D32r', num_classes=10)
  t_vars, info = tcn.train_teacher(teacher, ds, epochs=3, batch_size=100)
  assert len(info['history']) == 3
  feats = tcn.teacher_features(teacher, t_vars, ds.train.x)
  assert feats.shape == (1500, 32)
  groups, s_info = tcn.train_students(
      'C8 MP F D16r', ds.train.x, feats, num_students=3, epochs=3,
      batch_size=100, val=(ds.val.x, tcn.teacher_features(
          teacher, t_vars, ds.val.x)))
  assert [len(h) for h in s_info['val_mse']] == [3, 3, 3]
  # 32 = 11 + 11 + 10: two groups (widths 11 and 10), chunks in order.
  assert sorted(len(g.member_ids) for g in groups) == [1, 2]
  net = tcn.TCN(groups, 10, head_dropout=0.5,
                head_variables=tcn.teacher_head(t_vars))
  net, h_info = tcn.finetune_head(net, ds, epochs=3, batch_size=100)
  predict = tcn.make_predict(net)
  acc = tcn.evaluate(predict, ds.test.x, ds.test.y)
  assert acc == h_info['test_acc_after'] and acc > 0.3
  tcn.save_tcn(str(tmp_path / 'tcn'), net)
  loaded, _ = tcn.load_tcn(str(tmp_path / 'tcn'))
  np.testing.assert_allclose(loaded(ds.test.x[:8]), predict(ds.test.x[:8]),
                             atol=1e-5)
