"""Makes the ONNX teacher fixtures from real PyTorch models.

  python -m venv /work/torchenv --system-site-packages
  /work/torchenv/bin/pip install torch==2.13.0        # the CPU wheel
  /work/torchenv/bin/python -m experiments.make_onnx_fixtures

Writes tests/fixtures/onnx/:
  fmnist_cnn.onnx   a small CNN trained a few epochs on Fashion-MNIST (the
                    library's train split of data.load: seeded val held out)
  resnet18_w8.onnx  a ResNet-18 (torchvision's layout, written here in plain
                    torch: torchvision is not installed) with random weights,
                    base width 8 instead of 64 so the file stays small
  torch_outputs.npz PyTorch's own logits and features on a few inputs
  fixtures.json     PyTorch's F-MNIST test accuracy (whole test set and the
                    first TEST_SUBSET images), the onnxruntime-vs-PyTorch
                    differences, versions

Both graphs are exported with `torch.onnx.export(..., dynamo=False)`, a
dynamic batch axis and NCHW inputs; the library transposes its NHWC batches.
The tests need no torch: they load these files.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
OUT = os.path.join(REPO, 'tests', 'fixtures', 'onnx')
TEST_SUBSET = 2000   # The tests check the library's accuracy on these.


class FmnistCnn(nn.Module):
  """Conv16-pool-Conv32-pool-FC64-FC10; the head's input is after a ReLU."""

  def __init__(self):
    super().__init__()
    self.body = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU())
    self.fc = nn.Linear(64, 10)

  def features(self, x):
    return self.body(x)

  def forward(self, x):
    return self.fc(self.body(x))


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
  """torchvision.models.resnet18's layers ([2, 2, 2, 2] basic blocks, 7x7
  stem, max pool, global average pool, fc) with base width `width`."""

  def __init__(self, width=64, num_classes=10):
    super().__init__()
    w = width
    self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False),
                              nn.BatchNorm2d(w), nn.ReLU(),
                              nn.MaxPool2d(3, 2, 1))
    layers, cin = [], w
    for i, cout in enumerate([w, 2 * w, 4 * w, 8 * w]):
      stride = 1 if i == 0 else 2
      layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
      cin = cout
    self.layers = nn.Sequential(*layers)
    self.pool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(8 * w, num_classes)

  def features(self, x):
    return torch.flatten(self.pool(self.layers(self.stem(x))), 1)

  def forward(self, x):
    return self.fc(self.features(x))


def export(model, x, path):
  model.eval()
  torch.onnx.export(model, (x,), path, dynamo=False, input_names=['images'],
                    output_names=['logits'],
                    dynamic_axes={'images': {0: 'batch'},
                                  'logits': {0: 'batch'}})


def ort_outputs(path, x):
  """(logits, feature) from onnxruntime: the feature is the final Gemm's
  input, added as an output (as the library does)."""
  from tcn_jax import onnx_teacher  # pylint: disable=g-import-not-at-top
  teacher, _ = onnx_teacher.teacher_from_onnx(
      path, x_example=x.transpose(0, 2, 3, 1)[:2])
  return teacher.run_host(x.transpose(0, 2, 3, 1))


def torch_outputs(model, x):
  with torch.no_grad():
    t = torch.from_numpy(x)
    return model(t).numpy(), model.features(t).numpy()


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--epochs', type=int, default=3)
  p.add_argument('--threads', type=int, default=2)
  args = p.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  os.makedirs(OUT, exist_ok=True)
  import tcn_jax  # pylint: disable=g-import-not-at-top
  ds = tcn_jax.load_dataset('fashion_mnist')
  nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2), np.float32)
  x_train, y_train = nchw(ds.train.x), ds.train.y.astype(np.int64)
  x_test, y_test = nchw(ds.test.x), ds.test.y
  record = {'torch': torch.__version__, 'epochs': args.epochs,
            'data': 'fashion_mnist: data.load train split (48000 of 60000; '
                    'val held out with split_seed 0), pixels in [0, 1]',
            'test_subset': TEST_SUBSET}

  # --- A small CNN trained on Fashion-MNIST.
  cnn = FmnistCnn()
  opt = torch.optim.Adam(cnn.parameters(), 1e-3)
  t = time.time()
  rng = np.random.default_rng(0)
  for epoch in range(args.epochs):
    cnn.train()
    order = rng.permutation(len(x_train))
    for s in range(0, len(order), 128):
      idx = order[s:s + 128]
      loss = nn.functional.cross_entropy(
          cnn(torch.from_numpy(x_train[idx])), torch.from_numpy(y_train[idx]))
      opt.zero_grad()
      loss.backward()
      opt.step()
    print(f'epoch {epoch + 1}: loss {loss.item():.4f}', flush=True)
  record['train_seconds'] = round(time.time() - t, 1)
  cnn.eval()
  logits, feats = torch_outputs(cnn, x_test)
  record['torch_test_acc'] = float((logits.argmax(1) == y_test).mean())
  record['torch_test_acc_subset'] = float(
      (logits[:TEST_SUBSET].argmax(1) == y_test[:TEST_SUBSET]).mean())
  path = os.path.join(OUT, 'fmnist_cnn.onnx')
  export(cnn, torch.from_numpy(x_test[:2]), path)
  o_logits, o_feats = ort_outputs(path, x_test)
  record['fmnist_cnn'] = {
      'max_abs_diff_logits': float(np.abs(o_logits - logits).max()),
      'max_abs_diff_features': float(np.abs(o_feats - feats).max()),
      'ort_test_acc': float((o_logits.argmax(1) == y_test).mean()),
      'bytes': os.path.getsize(path)}

  # --- A ResNet-18 with random weights (BatchNorm statistics made
  # non-trivial by a few training-mode passes), 64x64 RGB inputs.
  net = ResNet18(width=8)
  x_rgb = np.random.default_rng(1).uniform(0, 1, (16, 3, 64, 64)).astype(
      np.float32)
  net.train()
  with torch.no_grad():
    for _ in range(3):
      net(torch.from_numpy(np.random.default_rng(2).uniform(
          0, 1, (32, 3, 64, 64)).astype(np.float32)))
  net.eval()
  r_logits, r_feats = torch_outputs(net, x_rgb)
  rpath = os.path.join(OUT, 'resnet18_w8.onnx')
  export(net, torch.from_numpy(x_rgb[:2]), rpath)
  o_logits, o_feats = ort_outputs(rpath, x_rgb)
  record['resnet18_w8'] = {
      'width': 8, 'input': '(N, 3, 64, 64)',
      'params': int(sum(p.numel() for p in net.parameters())),
      'max_abs_diff_logits': float(np.abs(o_logits - r_logits).max()),
      'max_abs_diff_features': float(np.abs(o_feats - r_feats).max()),
      'bytes': os.path.getsize(rpath)}
  np.savez(os.path.join(OUT, 'torch_outputs.npz'),
           fmnist_logits=logits[:64], fmnist_features=feats[:64],
           resnet_x=x_rgb, resnet_logits=r_logits, resnet_features=r_feats)
  for name in ('fmnist_cnn', 'resnet18_w8'):
    r = record[name]
    assert r['max_abs_diff_logits'] <= 1e-5, r
    assert r['max_abs_diff_features'] <= 1e-5, r
  with open(os.path.join(OUT, 'fixtures.json'), 'w') as f:
    json.dump(record, f, indent=1)
  print(json.dumps(record, indent=1))


if __name__ == '__main__':
  main()
