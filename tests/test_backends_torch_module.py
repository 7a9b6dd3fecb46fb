"""Harmonize a PyTorch model (issue 19, §4): a `torch.nn.Module` in `keras.layers.TorchModuleWrapper`, trained by
`HarmonizedModel.fit` under the PyTorch backend, takes the step a hand-written `torch.autograd` double backprop of
the published loss takes.

The reference below is written from the paper's loss and the published code's formulas (serre-lab/Harmonization
`training/loss.py`: class-logit input gradient averaged over channels, `standardize_cut`, the human map rescaled to
the saliency's peak under a stop-gradient, a 5x5 binomial pyramid with TensorFlow's SAME padding, the token-weighted
MSE of its first five levels; cross-entropy with label smoothing 0.1; 1e-5 x L2 on the weights that are not
normalisation), in plain PyTorch, sharing nothing with the package.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from backend_helpers import run_on_backend

pytestmark = pytest.mark.backends

CHILD = r"""
import copy, json
import numpy as np
import torch
import torch.nn.functional as F
import keras
import harmonization

torch.manual_seed(0)


class SmallResNet(torch.nn.Module):
    # A torchvision-style residual classifier on preprocessed NHWC images (what Keras passes).
    def __init__(self, classes=5):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x.permute(0, 3, 1, 2))))
        x = torch.relu(x + self.bn2(self.conv(x)))
        return self.fc(x.mean((2, 3)))


rng = np.random.default_rng(0)
images = (rng.random((4, 16, 16, 3)) * 255).astype("float32")
heatmaps = rng.random((4, 16, 16)).astype("float32")
labels = np.array([0, 3, 1, 4])
tokens = np.array([1.0, 1.0, 0.0, 1.0], "float32")
net = SmallResNet()
reference_net = copy.deepcopy(net)
rate = 0.5

# --- the library: TorchModuleWrapper inside a Keras model, preprocessing as a layer, HarmonizedModel.fit
inputs = keras.Input((16, 16, 3))
x = keras.layers.Rescaling(1 / 255.0)(inputs)
logits = keras.layers.TorchModuleWrapper(net, output_shape=(5,))(x)
hmodel = harmonization.HarmonizedModel(keras.Model(inputs, logits))
hmodel.compile(optimizer=keras.optimizers.SGD(rate))
hmodel.fit({"image": images, "heatmap": heatmaps, "label": labels, "token": tokens}, batch_size=4, epochs=1,
           verbose=0)


# --- the reference: the published loss in plain torch.autograd
def standardize_cut(maps, eps=1e-5):
    centred = maps - maps.mean((1, 2), keepdim=True)
    std = centred.pow(2).mean((1, 2), keepdim=True).sqrt()
    return torch.relu(centred / (std + eps))


def same_pad_conv(maps, kernel):
    # TensorFlow's SAME padding for a 5x5 kernel, stride 2: total max(5 - 2, 0) if even else max(5 - 1, 0), the
    # extra pixel at the bottom/right.
    pads = []
    for size in maps.shape[2:][::-1]:
        total = max(5 - (2 if size % 2 == 0 else 1), 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(maps, pads), kernel, stride=2)


def pyramid_mse(a, b, weights, levels=5):
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (torch.outer(taps, taps) / 256.0)[None, None]
    a, b = a[:, None], b[:, None]
    errors = []
    for level in range(levels):
        errors.append(((a - b) ** 2 * weights[:, None, None, None]).mean())
        if level + 1 < levels:
            a, b = same_pad_conv(a, kernel), same_pad_conv(b, kernel)
    return torch.stack(errors).mean()


x = (torch.tensor(images) / 255.0).requires_grad_(True)
out = reference_net.train()(x)
onehot = F.one_hot(torch.tensor(labels), 5).float()
gradient, = torch.autograd.grad((out * onehot).sum(), x, create_graph=True)
saliency = standardize_cut(gradient.mean(-1))
human = standardize_cut(torch.tensor(heatmaps))
human = human / (human.amax((1, 2), keepdim=True) + 1e-6) * (saliency.detach().amax((1, 2), keepdim=True) + 1e-6)
harmonization_term = pyramid_mse(saliency, human, torch.tensor(tokens))
smoothed = onehot * 0.9 + 0.1 / 5
cross_entropy = -(smoothed * F.log_softmax(out, -1)).sum(-1).mean()
decayed = [p for m in reference_net.modules() if not isinstance(m, torch.nn.BatchNorm2d)
           for p in m.parameters(recurse=False)]
loss = cross_entropy + harmonization_term + 1e-5 * sum(0.5 * p.pow(2).sum() for p in decayed)
loss.backward()
with torch.no_grad():
    for p in reference_net.parameters():
        p -= rate * p.grad

worst = 0.0
for (name, got), want in zip(net.state_dict().items(), reference_net.state_dict().values()):
    if got.dtype.is_floating_point:
        scale = max(float(want.abs().max()), 1e-12)
        worst = max(worst, float((got - want).abs().max()) / scale)
print(json.dumps({"worst": worst, "harmonization": float(harmonization_term), "loss": float(loss)}))
"""


def _torch_or_skip():
    if importlib.util.find_spec("torch") is None and os.environ.get("HARMONIZATION_NO_TENSORFLOW") == "1":
        pytest.skip("this environment is the JAX one (no PyTorch)")


def test_a_wrapped_torch_module_takes_the_published_double_backprop_step():
    _torch_or_skip()
    result = run_on_backend("torch", CHILD)
    assert result["harmonization"] > 0
    assert result["worst"] < 1e-5, result


def test_a_bare_torch_module_is_refused_with_the_way_to_wrap_it():
    _torch_or_skip()
    code = r"""
import json, torch, harmonization
try:
    harmonization.HarmonizedModel(torch.nn.Linear(3, 2))
except TypeError as error:
    print(json.dumps(str(error)))
"""
    message = run_on_backend("torch", code)
    assert "torch.nn.Module" in message and "TorchModuleWrapper" in message
