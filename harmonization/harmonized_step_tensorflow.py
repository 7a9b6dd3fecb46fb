"""The harmonized step on TensorFlow: nested `tf.GradientTape`s, `tf.distribute` and in-graph batch checks.

`HarmonizedModel` takes its `train_step`/`test_step` from here when Keras runs on TensorFlow (JAX:
`harmonized_step_jax`, PyTorch: `harmonized_step_torch`). The saliency map is computed inside the weight tape (so
its dependence on the weights is differentiated, exactly, also through normalisation layers:
`harmonization.second_order`), the cross-entropy goes through `compute_loss` as in any Keras model, and the
harmonization and weight-decay terms are added with the per-replica scaling that `tf.distribute` needs (Keras
already divides `compute_loss` by the replica count; our terms too).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from harmonization import second_order
from harmonization._validation import as_maps, as_tokens, check_class_labels, check_finite, check_same_shape
from harmonization.batch import check_heatmap_size, heatmap_maps, unpack
from harmonization.losses import harmonization_loss_unchecked
from harmonization.metrics import spearman
from harmonization.saliency import channel_max_abs, class_logit_gradient, one_hot_labels


def _multi_worker(strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy that spans several workers (Keras's own test)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    if in_multi_worker_mode is None:
        raise RuntimeError(
            f"TensorFlow {tf.__version__} changed MultiWorkerMirroredStrategy internals that HarmonizedModel "
            "relies on; pin tensorflow to 2.21."
        )
    return bool(in_multi_worker_mode())


def _logs_for_reduction(logs: dict) -> dict:
    """Give scalar logs a length-1 axis across several workers.

    Keras 3.12-3.15 reduces step outputs across workers with `strategy.reduce("MEAN", v, axis=0)`,
    which fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions"). The
    values are synchronised metric results, so the mean over the added axis returns them unchanged.
    """
    if not _multi_worker(tf.distribute.get_strategy()):
        return logs
    return {key: tf.reshape(value, [1]) if value.shape.rank == 0 else value for key, value in logs.items()}


def _replica_scale(value: tf.Tensor) -> tf.Tensor:
    """Divide by the replica count, as Keras does for `compute_loss` under tf.distribute."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value / tf.cast(replicas, value.dtype) if replicas > 1 else value


class TensorFlowStep:
    """The train and test steps of `HarmonizedModel` on the TensorFlow backend (a mixin: `self` is the model)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Build loss, metrics and optimizer state before a distributed fit, from one local batch.

        Keras (3.12-3.15) builds them by calling the model on the raw batch, which is our dict (not
        the model's input), after averaging it across *all* workers with `strategy.reduce`, which
        fails under MultiWorkerMirroredStrategy (keras#20585). We feed it (images, one-hot labels)
        from this worker's first replica instead, inside the strategy scope (keras#23085).
        """
        strategy = getattr(self, "_distribute_strategy", "missing")
        if strategy == "missing" or not hasattr(self, "_symbolic_build"):
            raise RuntimeError(
                f"Keras {keras.__version__} changed its trainer internals (_distribute_strategy, "
                "_symbolic_build) that HarmonizedModel relies on under tf.distribute; pin keras to 3.12-3.15."
            )
        if strategy is None:  # Keras builds lazily when tracing the step; nothing to do.
            return
        if data_batch is None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        data_batch = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues) else v,
            data_batch,
        )
        images = unpack(data_batch).image[:1]
        with strategy.scope():
            num_classes = self(images, training=False).shape[-1]
            self._symbolic_build(data_batch=(images, tf.zeros([1, num_classes], tf.float32)))


    def _num_classes(self, images: tf.Tensor) -> int | None:
        """The logits' width, known before the forward pass, so that bad labels fail before it runs.

        Read once: from a functional model's single output, else from a trace of `call` in a scratch
        graph (nothing runs). None when the model is not built or cannot be traced alone; the labels'
        upper bound is then checked after the forward pass (still before the weights change, but after
        normalisation statistics may have moved).
        """
        if self._logits_width_tried or not self.model.built:
            return self._logits_width
        self._logits_width_tried = True  # a model that cannot be traced alone is not traced again at every step
        outputs = getattr(self.model, "outputs", None)
        if outputs and len(outputs) == 1 and len(outputs[0].shape) == 2:  # a functional model: no trace needed
            logits = outputs[0]
        else:
            forward = tf.function(lambda x: self.call(x, training=False), autograph=False)
            try:
                logits = forward.get_concrete_function(tf.TensorSpec(images.shape, images.dtype)).structured_outputs
            except Exception:  # noqa: BLE001 (only an earlier check is lost; the forward pass raises its own error)
                return None
        if getattr(logits, "shape", None) is not None and len(logits.shape) == 2 and logits.shape[-1] is not None:
            self._logits_width = int(logits.shape[-1])
        return self._logits_width

    def _forward(self, data, training: bool):
        """Logits, one-hot labels, raw input gradients, heatmaps and tokens of one batch.

        The batch is checked here, once per step (`_loss_terms` does not check it again): labels, tokens
        and the heatmaps' values first; in a graph the model's input waits for those checks, so a bad
        batch changes nothing (not even BatchNormalization's moving statistics).
        """
        batch = unpack(data)
        images = tf.convert_to_tensor(batch.image)
        if not images.dtype.is_floating:
            images = tf.cast(images, tf.float32)
        heatmaps = heatmap_maps(tf.convert_to_tensor(batch.heatmap))
        check_heatmap_size(images, heatmaps)
        num_classes = self._num_classes(images)
        labels = check_class_labels(batch.label, num_classes, "label")
        tokens = as_tokens(batch.token, tf.shape(images)[0], tf.float32, name="token", check_values=True)
        heatmaps = check_finite(tf.cast(heatmaps, tf.float32), "heatmap")
        if not tf.executing_eagerly():
            with tf.control_dependencies([labels, tokens, heatmaps]):
                images = tf.identity(images)
        exact = second_order.exact_moments() if self.exact_second_order else contextlib.nullcontext()
        with exact:
            logits, grads = class_logit_gradient(
                self.model, images, labels, training=training, **self._saliency_options()
            )
        if num_classes is None:
            labels = check_class_labels(labels, logits.shape[-1], "label")
        onehot = one_hot_labels(labels, logits.shape[-1], logits.dtype)
        return images, logits, onehot, grads, heatmaps, tokens

    def _loss_terms(self, images, logits, onehot, grads, heatmaps, tokens, training: bool,
                    decay_on_tape: bool = True):
        """(total loss scaled for the replica count, cross-entropy, harmonization term).

        With `decay_on_tape` False the weight-decay term is in the total's value but not differentiated
        through it: `train_step` adds its gradient itself (`_add_weight_decay_gradients`), later and cheaper.
        """
        cross_entropy = self.compute_loss(x=images, y=onehot, y_pred=logits, training=training)
        saliency = self.saliency_method.reduce(grads)  # published: channel mean (`tf.reduce_mean(grads, -1)`)
        # `_forward` checked the heatmaps and tokens; only the saliency is new here: a registered method's
        # map must be (N, H, W), and a preprocessing that resizes would make it differ from the images'.
        saliency = as_maps(saliency, "saliency")
        check_same_shape(saliency, heatmaps, "saliency", "human_maps")
        harmonization = harmonization_loss_unchecked(
            saliency, tf.cast(heatmaps, saliency.dtype), tf.cast(tokens, saliency.dtype), self.pyramid_levels,
            self.epsilon,
        )
        extra = self.lambda_harmonization * harmonization
        if self.lambda_weights:
            decay = tf.cast(self.weight_decay(), harmonization.dtype)
            extra += self.lambda_weights * (decay if decay_on_tape else tf.stop_gradient(decay))
        total = cross_entropy + _replica_scale(tf.cast(extra, cross_entropy.dtype))
        return total, cross_entropy, harmonization

    def _add_weight_decay_gradients(self, gradients: list, variables: list) -> list:
        """Each decayed weight's gradient plus that of `lambda_weights` x 0.5 ||w||^2, scaled as the loss is.

        The gradient of differentiating the term on the tape (lambda_weights x w / replicas, times the
        optimizer's loss scale; computed in float32, as `weight_decay` is, then cast to the gradient's dtype),
        with less memory: on the tape, TensorFlow computes every weight's decay gradient as soon as the step
        starts (it depends on the weights only) and keeps them all alive through the whole double backward
        pass. Here each is made once its weight's gradient exists, and used at once (bench/train_memory.py:
        the harmonized step's share fell by ~320 MiB for ResNet50V2 and ~640 MiB for ViT-B/16 at batch 8).
        A decayed weight that the loss does not reach gets the decay term alone, as on the tape.
        """
        if not self.lambda_weights:
            return gradients
        decayed = {id(v) for v in self.decayed_weights()}
        factor = self.lambda_weights / tf.distribute.get_strategy().num_replicas_in_sync

        def decay_of(variable, dtype):
            term = self.optimizer.scale_loss(tf.cast(variable, tf.float32) * factor)
            return tf.cast(term, dtype)

        result = []
        for gradient, variable in zip(gradients, variables):
            if id(variable) not in decayed:
                result.append(gradient)
            elif gradient is None:
                result.append(decay_of(variable, variable.dtype))
            else:
                gradient = tf.convert_to_tensor(gradient)  # a sparse gradient (an embedding lookup) made dense
                with tf.control_dependencies([gradient]):  # not before: it would live through the backward pass
                    result.append(gradient + decay_of(variable, gradient.dtype))
        return result

    def _update_trackers(self, total, cross_entropy, harmonization, batch_size):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(total * replicas, sample_weight=batch_size)
        self.cross_entropy_tracker.update_state(cross_entropy * replicas, sample_weight=batch_size)
        self.harmonization_tracker.update_state(harmonization, sample_weight=batch_size)

    # ------------------------------------------------------------------ steps
    def train_step(self, data):
        with tf.GradientTape() as tape:
            images, logits, onehot, grads, heatmaps, tokens = self._forward(data, training=True)
            total, cross_entropy, harmonization = self._loss_terms(
                images, logits, onehot, grads, heatmaps, tokens, training=True, decay_on_tape=False
            )
            scaled = self.optimizer.scale_loss(total)
        variables = self.trainable_variables
        gradients = self._add_weight_decay_gradients(tape.gradient(scaled, variables), variables)
        # The optimizer's own state (its step count) waits for the checks of labels, tokens and heatmaps too.
        with tf.control_dependencies([onehot, tokens, heatmaps]):
            self.optimizer.apply_gradients(zip(gradients, variables))
        self._update_trackers(total, cross_entropy, harmonization, tf.shape(images)[0])
        logs = self.compute_metrics(images, onehot, logits)
        logs.pop("spearman", None)
        return _logs_for_reduction(logs)

    def test_step(self, data):
        images, logits, onehot, grads, heatmaps, tokens = self._forward(data, training=False)
        total, cross_entropy, harmonization = self._loss_terms(
            images, logits, onehot, grads, heatmaps, tokens, training=False
        )
        self._update_trackers(total, cross_entropy, harmonization, tf.shape(images)[0])
        # Alignment as reported in the paper: |gradient| max over channels vs the human map.
        rho = spearman(channel_max_abs(grads), heatmaps)
        self.spearman_tracker.update_state(tf.cast(rho, tf.float32), sample_weight=tf.cast(tokens > 0, tf.float32))
        return _logs_for_reduction(self.compute_metrics(images, onehot, logits))
