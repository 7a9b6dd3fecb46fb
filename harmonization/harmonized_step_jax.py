"""The harmonized step on JAX: a stateless `train_step(state, data)`, as Keras documents custom steps on JAX.

The loss is a pure function of the trainable variables. Inside it, the class-logit gradient w.r.t. the
preprocessed images is taken with `jax.grad` (`harmonization.autodiff`), so that `jax.value_and_grad` of the loss
differentiates through it: the exact second derivative of the published method, with no tape and no patch (Keras's
JAX normalisation layers compute their moments with `jnp.var`, exact to every order). The step compiles with XLA
(Keras's `jit_compile` default); each batch is checked on the host before it runs
(`HarmonizedModel._checked_batch`), so a bad batch is refused and changes nothing.

Under `keras.distribution.DataParallel` the same step runs on the global batch, sharded: XLA inserts the
gradient all-reduce, so no replica scaling is needed (unlike `tf.distribute`). On several hosts
(`keras.distribution.initialize`) no host can read the global batch, so each checks the rows it fed
(`_process_local`).
"""

from __future__ import annotations

import jax
import keras
import numpy as np
from keras import ops

from harmonization._host_checks import host_array
from harmonization.autodiff import input_gradient
from harmonization.losses import half_squared_norm
from harmonization.metrics import spearman
from harmonization.saliency import channel_max_abs, logits_at, one_hot_labels


def _process_local(value):
    """The rows of a batch array that this process holds, as NumPy; any other value unchanged.

    Under a multi-host `keras.distribution` (`keras.distribution.initialize`), Keras hands the step global
    `jax.Array`s assembled from every host's shard, and NumPy cannot read the rows held by the other hosts. Each host
    checks the rows it fed: its addressable shards, each counted once (a shard replicated on several local devices
    appears once per device) and put back in batch order. On one host (one device or several) nothing changes.
    """
    if not isinstance(value, jax.Array) or value.is_fully_addressable:
        return value
    shards = {}
    for shard in value.addressable_shards:
        key = tuple((s.start or 0, s.stop) for s in shard.index)
        shards.setdefault(key, shard)
    return np.concatenate([np.asarray(shards[key].data) for key in sorted(shards)], axis=0)


def _spearman_on_host(a, b) -> np.ndarray:
    """`harmonization.metrics.spearman` of two map batches, as float32 NumPy (for `jax.pure_callback`)."""
    return np.asarray(host_array(spearman(np.asarray(a), np.asarray(b))), np.float32)


class JaxStep:
    """The train and test steps of `HarmonizedModel` on the JAX backend (a mixin: `self` is the model)."""

    def _symbolic_build(self, iterator=None, data_batch=None):
        return super()._symbolic_build(data_batch=self._symbolic_batch(iterator, data_batch))

    # ------------------------------------------------------------------ host checks around the compiled step
    def _checking(self, function):
        """`function(state, iterator)` with each batch checked on the host before the compiled step sees it."""

        def checked(state, iterator):
            def batches():
                for data in iterator:
                    self._checked_batch(keras.tree.map_structure(_process_local, data))
                    yield data

            return function(state, batches())

        checked._harmonization_checked = True
        return checked

    def make_train_function(self, force=False):
        super().make_train_function(force)
        if not getattr(self.train_function, "_harmonization_checked", False):
            self.train_function = self._checking(self.train_function)
        return self.train_function

    def make_test_function(self, force=False):
        super().make_test_function(force)
        if not getattr(self.test_function, "_harmonization_checked", False):
            self.test_function = self._checking(self.test_function)
        return self.test_function

    # ------------------------------------------------------------------ the pure parts
    def _stateless_forward(self, trainable, non_trainable, images, labels, training: bool):
        """(logits, input gradients, new non-trainable values) from the given variable values, purely.

        The model runs inside `keras.StatelessScope`s that map its variables to the given values. The input
        gradient is `jax.grad` of the class score at the split point; BatchNormalization's moving statistics,
        updated in that inner call, come out as its auxiliary result (they must not escape as tracers).
        """
        variables = self.trainable_variables + self.non_trainable_variables
        mapping = list(zip(variables, list(trainable) + list(non_trainable)))
        view = self.saliency_input
        with keras.StatelessScope(state_mapping=mapping):
            x = view.split(images, training=training)

        def class_score(point):
            with keras.StatelessScope(state_mapping=mapping) as scope:
                logits = logits_at(view, point, training=training)
                onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
                updated = [scope.get_current_value(v) for v in self.non_trainable_variables]
            updated = [value if new is None else new for value, new in zip(non_trainable, updated)]
            return ops.sum(logits * onehot), (logits, updated)

        grads, (logits, updated) = input_gradient(class_score, x)
        if grads is None:
            raise ValueError("The model's output does not depend on `images` (no gradient).")
        dtype = keras.backend.standardize_dtype(grads.dtype)
        grads = ops.cast(grads, "float32") if dtype in ("float16", "bfloat16") else grads
        return logits, grads, updated

    def _decay_of(self, trainable):
        """sum(0.5 ||w||^2) over the decayed weights, read from `trainable` (the values being differentiated)."""
        decayed = {id(v) for v in self.decayed_weights()}
        return half_squared_norm([value for v, value in zip(self.trainable_variables, trainable) if id(v) in decayed])

    def _loss(self, trainable, non_trainable, metrics_variables, optimizer_variables, images, heatmaps, labels,
              tokens, training: bool):
        """(scaled total, aux) of one batch, a pure function of the variable values (what `jax.grad` takes)."""
        logits, grads, non_trainable = self._stateless_forward(trainable, non_trainable, images, labels, training)
        onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
        cross_entropy, (_, non_trainable, metrics_variables) = self.stateless_compute_loss(
            trainable, non_trainable, metrics_variables, x=images, y=onehot, y_pred=logits, training=training
        )
        harmonization = self._saliency_term(grads, heatmaps, tokens)
        total = cross_entropy + ops.cast(self.lambda_harmonization * harmonization, cross_entropy.dtype)
        if self.lambda_weights:
            total = total + ops.cast(self.lambda_weights * self._decay_of(trainable), cross_entropy.dtype)
        scaled = total
        if training and self.optimizer is not None:
            mapping = list(zip(self.optimizer.variables, optimizer_variables))
            with keras.StatelessScope(state_mapping=mapping):
                scaled = self.optimizer.scale_loss(total)
        return scaled, (total, cross_entropy, harmonization, logits, grads, onehot, non_trainable, metrics_variables)

    def _update_metrics(self, metrics_variables, total, cross_entropy, harmonization, images, onehot, logits,
                        spearman_values=None, tokens=None):
        """(logs, new metrics variables): the trackers and compiled metrics updated statelessly."""
        batch_size = images.shape[0]
        mapping = list(zip(self.metrics_variables, metrics_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._loss_tracker.update_state(total, sample_weight=batch_size)
            self.cross_entropy_tracker.update_state(cross_entropy, sample_weight=batch_size)
            self.harmonization_tracker.update_state(harmonization, sample_weight=batch_size)
            if spearman_values is not None:
                self.spearman_tracker.update_state(
                    spearman_values, sample_weight=ops.cast(ops.convert_to_tensor(tokens) > 0, "float32")
                )
            logs = self.compute_metrics(images, onehot, logits)
        new = [scope.get_current_value(v) for v in self.metrics_variables]
        return logs, [old if value is None else value for old, value in zip(metrics_variables, new)]

    # ------------------------------------------------------------------ steps
    def train_step(self, state, data):
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        images, heatmaps, labels, tokens = self._batch_tensors(data)
        gradient_of = jax.value_and_grad(self._loss, has_aux=True)
        (_, aux), gradients = gradient_of(
            trainable, non_trainable, metrics_variables, optimizer_variables, images, heatmaps, labels, tokens, True
        )
        total, cross_entropy, harmonization, logits, _, onehot, non_trainable, metrics_variables = aux
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        logs, metrics_variables = self._update_metrics(
            metrics_variables, total, cross_entropy, harmonization, images, onehot, logits
        )
        logs.pop("spearman", None)
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    def test_step(self, state, data):
        trainable, non_trainable, metrics_variables = state
        images, heatmaps, labels, tokens = self._batch_tensors(data)
        _, aux = self._loss(trainable, non_trainable, metrics_variables, None, images, heatmaps, labels, tokens, False)
        total, cross_entropy, harmonization, logits, grads, onehot, non_trainable, metrics_variables = aux
        # Alignment as reported in the paper: |gradient| max over channels vs the human map, ranked on the host.
        maps = channel_max_abs(grads)
        rho = jax.pure_callback(
            _spearman_on_host, jax.ShapeDtypeStruct((maps.shape[0],), np.float32), maps, heatmaps,
            vmap_method="sequential",
        )
        logs, metrics_variables = self._update_metrics(
            metrics_variables, total, cross_entropy, harmonization, images, onehot, logits, rho, tokens
        )
        return logs, (trainable, non_trainable, metrics_variables)
