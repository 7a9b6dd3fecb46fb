"""The harmonized step on PyTorch: `torch.autograd.grad(..., create_graph=True)`, as Keras documents custom steps.

The class-logit gradient w.r.t. the preprocessed images is taken with `create_graph=True`
(`harmonization.autodiff`), so that `backward()` of the loss differentiates through it: the exact second
derivative of the published method (Keras's PyTorch LayerNormalization is `torch.nn.functional.layer_norm`, and its
moments are `E[x^2] - E[x]^2` without a stop-gradient: exact to every order). The step runs eagerly; the batch is
checked on the host first (`HarmonizedModel._checked_batch`), so a bad batch is refused and changes nothing.

A `torch.nn.Module` wrapped in `keras.layers.TorchModuleWrapper` trains the same way: its parameters are Keras
variables, and autograd sees through it.
"""

from __future__ import annotations

import warnings

import keras
import torch
from keras import ops

from harmonization.autodiff import input_gradient
from harmonization.metrics import spearman
from harmonization.saliency import channel_max_abs, logits_at, one_hot_labels


class TorchStep:
    """The train and test steps of `HarmonizedModel` on the PyTorch backend (a mixin: `self` is the model)."""

    def _symbolic_build(self, iterator=None, data_batch=None):
        return super()._symbolic_build(data_batch=self._symbolic_batch(iterator, data_batch))

    def _forward_and_loss(self, data, training: bool):
        """(total, cross-entropy, harmonization, logits, input gradients, one-hot labels, images, heatmaps, tokens)."""
        self._checked_batch(data)
        images, heatmaps, labels, tokens = self._batch_tensors(data)
        view = self.saliency_input
        x = view.split(images, training=training)

        def class_score(point):
            logits = logits_at(view, point, training=training)
            return ops.sum(logits * one_hot_labels(labels, logits.shape[-1], logits.dtype)), logits

        grads, logits = input_gradient(class_score, x, differentiable=training)
        if grads is None:
            raise ValueError("The model's output does not depend on `images` (no gradient).")
        if keras.backend.standardize_dtype(grads.dtype) in ("float16", "bfloat16"):
            grads = ops.cast(grads, "float32")
        onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
        cross_entropy = self.compute_loss(x=images, y=onehot, y_pred=logits, training=training)
        harmonization = self._saliency_term(grads, heatmaps, tokens)
        total = cross_entropy + ops.cast(self.lambda_harmonization * harmonization, cross_entropy.dtype)
        if self.lambda_weights:
            total = total + ops.cast(self.lambda_weights * self.weight_decay(), cross_entropy.dtype)
        return total, cross_entropy, harmonization, logits, grads, onehot, images, heatmaps, tokens

    def _update_trackers(self, total, cross_entropy, harmonization, batch_size):
        self._loss_tracker.update_state(total, sample_weight=batch_size)
        self.cross_entropy_tracker.update_state(cross_entropy, sample_weight=batch_size)
        self.harmonization_tracker.update_state(harmonization, sample_weight=batch_size)

    def train_step(self, data):
        self.zero_grad()
        total, cross_entropy, harmonization, logits, _, onehot, images, _, _ = self._forward_and_loss(data, True)
        scaled = self.optimizer.scale_loss(total) if self.optimizer is not None else total
        if self.trainable_weights:
            scaled.backward()
            variables = self.trainable_weights[:]
            gradients = [v.value.grad for v in variables]
            with torch.no_grad():
                self.optimizer.apply(gradients, variables)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        with torch.no_grad():
            self._update_trackers(total.detach(), cross_entropy.detach(), harmonization.detach(), images.shape[0])
            logs = self.compute_metrics(images, onehot, logits.detach())
        logs.pop("spearman", None)
        return logs

    def test_step(self, data):
        total, cross_entropy, harmonization, logits, grads, onehot, images, heatmaps, tokens = (
            self._forward_and_loss(data, False)
        )
        self._update_trackers(total, cross_entropy, harmonization, images.shape[0])
        # Alignment as reported in the paper: |gradient| max over channels vs the human map (ranked on the host).
        rho = ops.convert_to_tensor(spearman(channel_max_abs(grads).detach().cpu().numpy(), heatmaps.cpu().numpy()))
        self.spearman_tracker.update_state(rho, sample_weight=ops.cast(tokens > 0, "float32"))
        return self.compute_metrics(images, onehot, logits)
