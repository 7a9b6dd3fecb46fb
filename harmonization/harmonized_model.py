"""`HarmonizedModel`: wrap any Keras logits classifier so that `fit` applies the neural harmonizer.

Only what needs the input gradient lives in the custom `train_step`/`test_step`: the saliency map is
computed inside the weight tape (so its dependence on the weights is differentiated, exactly, also
through normalisation layers), the cross-entropy goes through `compute_loss` as in any Keras model,
and the harmonization and weight-decay terms are added with the per-replica scaling that
`tf.distribute` needs (Keras already divides `compute_loss` by the replica count; our terms too).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import keras
import tensorflow as tf

from harmonization import second_order
from harmonization._validation import (
    as_maps,
    as_tokens,
    check_class_labels,
    check_finite,
    check_int,
    check_number,
    check_same_shape,
)
from harmonization.batch import check_heatmap_size, heatmap_maps, unpack
from harmonization.losses import MAX_PYRAMID_LEVELS, harmonization_loss_unchecked
from harmonization.metrics import spearman
from harmonization.saliency import channel_max_abs, class_logit_gradient, one_hot_labels
from harmonization.saliency_methods import SaliencyMethod, get_saliency_method, training_saliency_method
from harmonization.saliency_input import SaliencyInput, resolve_saliency_input

#: Substrings of variable paths left out of the weight decay, as in the published training code
#: (normalisation parameters, embeddings, the class token).
DEFAULT_WEIGHT_DECAY_EXCLUDE = ("bn/", "normalization", "norm", "Norm", "embed", "class_token", "cls_token")

_NO_DECAY_LAYER_TYPES = (
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
    keras.layers.Embedding,
)

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


def decayed_weights(model: keras.Model, exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE) -> list:
    """The trainable variables of `model` that get the L2 penalty.

    Left out, as in the published training code: variables whose path contains one of `exclude`, and
    (ours, so that a normalisation layer's name does not matter) every weight of a normalisation or
    embedding layer.
    """
    excluded = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, _NO_DECAY_LAYER_TYPES):
            excluded.update(id(v) for v in layer.weights)
    return [
        v for v in model.trainable_variables if id(v) not in excluded and not any(p in v.path for p in exclude)
    ]


def weight_decay(model: keras.Model, exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE) -> tf.Tensor:
    """sum(0.5 * ||w||^2) over `decayed_weights(model, exclude)` (0 when there are none), in float32 at least."""
    weights = decayed_weights(model, exclude)
    if not weights:
        return tf.constant(0.0)
    return tf.add_n(
        [tf.nn.l2_loss(tf.cast(v, "float32") if v.dtype in ("float16", "bfloat16") else v) for v in weights]
    )


def _replica_scale(value: tf.Tensor) -> tf.Tensor:
    """Divide by the replica count, as Keras does for `compute_loss` under tf.distribute."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value / tf.cast(replicas, value.dtype) if replicas > 1 else value


@keras.saving.register_keras_serializable(package="harmonization")
class HarmonizedModel(keras.Model):
    """Trains a wrapped classifier with the neural harmonizer (Fel et al., NeurIPS 2022).

    The loss is cross-entropy (from logits, label smoothing) + `lambda_harmonization` x the
    harmonization loss between the model's input-gradient saliency and the human maps +
    `lambda_weights` x sum(0.5 ||w||^2) over the weights that are not normalisation, embedding or
    class-token variables. Defaults are the published ones (arXiv 2211.04533).

    Batches are dicts `{"image", "heatmap", "label"[, "token"]}` or tuples
    `(image, heatmap, label[, token])`; labels are class ids in [0, num_classes) (integers, or floats
    that are whole numbers) or one-hot/soft rows (N, num_classes); `token` (1 = the example has a human
    map, 0 = none, so only cross-entropy applies; in [0, 1], one per example) defaults to 1. Other
    labels and tokens are refused before the step changes anything: a ValueError eagerly, an
    InvalidArgumentError inside `fit`/`evaluate`'s tf.function. XLA drops these value checks (shapes
    are still checked), so `compile` does not turn it on unless asked (`jit_compile=True`).

    Args:
        model: keras.Model. A classifier that maps images to logits (no softmax).
        lambda_harmonization: float. Weight of the harmonization term. Defaults to 1.0.
        lambda_weights: float. Weight of the L2 penalty. Defaults to 1e-5.
        label_smoothing: float. Cross-entropy label smoothing. Defaults to 0.1.
        pyramid_levels: int. Gaussian-pyramid levels compared. Defaults to 5.
        epsilon: float > 0. Added to the std when standardising maps. Defaults to 1e-5.
        weight_decay_exclude: sequence of str. Variables whose path contains one of these substrings
            (or that belong to a normalisation or embedding layer) get no weight decay.
        exact_second_order: bool. Make Keras normalisation layers differentiate exactly twice during
            the training step (see `harmonization.second_order`). Defaults to True; turn it off only
            for models without LayerNormalization/BatchNormalization/GroupNormalization.
        saliency_input: str. Where the saliency is taken. "auto" (default): after the preprocessing
            layers at the model's front (`ImageNetNormalization` in every zoo model, `Rescaling`,
            `Normalization`), i.e. w.r.t. the preprocessed input, as the published method; the model's
            input when it has none. "input": the model's own input. A layer name: that layer's output.
            `hmodel.saliency_input` shows what was chosen.
        preprocessing: callable or None. For a bare network that expects preprocessed inputs: applied to
            the batch's images before the model (e.g. `harmonization.models.preprocess_input`); its output
            is differentiated. Defaults to None.
        output: int, str or None. Which output holds the logits, for a model with several outputs.
        allow_softmax: bool. Accept a model that ends in a softmax (its probabilities' gradients
            saturate, so this is refused by default). Defaults to False.
        saliency: str or `harmonization.saliency_methods.SaliencyMethod`. The map the harmonization loss
            compares with the human maps. Defaults to "gradient_mean", the published training map (channel
            mean of the signed input gradient); "gradient_max_abs" (the evaluation map) or a registered
            `GradientSaliency` of your own also train. Methods that are not a reduction of the input
            gradient differentiable twice ("smoothgrad", "integrated_gradients", plain functions) are
            refused with a ValueError: the loss is differentiated through the map. Saved by name (register
            a custom method before loading). The reported validation `spearman` stays the paper's
            (evaluation map vs human map) whatever the method.

    Example:

    ```python
    hmodel = harmonization.HarmonizedModel(classifier)
    hmodel.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    hmodel.fit(clickme_batches, epochs=3)
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        lambda_harmonization: float = 1.0,
        lambda_weights: float = 1e-5,
        label_smoothing: float = 0.1,
        pyramid_levels: int = 5,
        epsilon: float = 1e-5,
        weight_decay_exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE,
        exact_second_order: bool = True,
        saliency_input: str | None = "auto",
        preprocessing=None,
        output: int | str | None = None,
        allow_softmax: bool = False,
        saliency: str | SaliencyMethod = "gradient_mean",
        **kwargs,
    ):
        if not callable(model):
            raise ValueError(f"`model` must be a Keras model mapping images to logits; got {type(model).__name__}.")
        # Weights of penalties: a negative or NaN one would reward what it should penalise, silently.
        lambda_harmonization = check_number(lambda_harmonization, "lambda_harmonization", minimum=0, strict=False)
        lambda_weights = check_number(lambda_weights, "lambda_weights", minimum=0, strict=False)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"`label_smoothing` must be in [0, 1); got {label_smoothing!r}.")
        pyramid_levels = check_int(pyramid_levels, "pyramid_levels", minimum=1, maximum=MAX_PYRAMID_LEVELS)
        # ClickMe's examples without a human map have an all-zero map: with epsilon 0 its
        # standardisation is 0/0, and one step turns every weight into NaN.
        epsilon = check_number(
            epsilon, "epsilon", minimum=0, strict=True,
            why=" (added to each map's std; with 0 a blank map, e.g. a token-0 example's, gives NaN)",
        )
        saliency_method = training_saliency_method(saliency)
        kwargs.setdefault("name", f"harmonized_{getattr(model, 'name', 'model')}")
        super().__init__(**kwargs)
        # === Config ===
        self.model = model
        self.lambda_harmonization = float(lambda_harmonization)
        self.lambda_weights = float(lambda_weights)
        self.label_smoothing = float(label_smoothing)
        self.pyramid_levels = int(pyramid_levels)
        self.epsilon = float(epsilon)
        self.weight_decay_exclude = tuple(weight_decay_exclude)
        self.exact_second_order = bool(exact_second_order)
        self.saliency_input_option = saliency_input
        self.preprocessing = preprocessing
        self.logits_output = output  # `output` is a Keras Layer property
        self.allow_softmax = bool(allow_softmax)
        self.saliency_method = saliency_method  # a GradientSaliency: `reduce`s the step's input gradient
        self._logits_width = None  # the number of classes, once known (see `_num_classes`)
        self._logits_width_tried = False  # looked for once the model was built (found or not: not again)
        # === Trackers ===
        self.cross_entropy_tracker = keras.metrics.Mean(name="cross_entropy")
        self.harmonization_tracker = keras.metrics.Mean(name="harmonization")
        self.spearman_tracker = keras.metrics.Mean(name="spearman")
        # A wrapper of a built model is built: its weights are the wrapped model's (saving needs it).
        self.built = bool(getattr(model, "built", False))
        if self.built:
            self.saliency_input  # noqa: B018  (resolve now: a softmax or an ambiguous output fails here)

    @property
    def saliency_input(self) -> SaliencyInput:
        """What the saliency differentiates (e.g. the output of the zoo model's 'preprocessing' layer)."""
        return resolve_saliency_input(self.model, **self._saliency_options())

    def _saliency_options(self) -> dict:
        """The constructor's saliency arguments, as `class_logit_gradient` takes them."""
        return {
            "saliency_input": self.saliency_input_option,
            "preprocessing": self.preprocessing,
            "output": self.logits_output,
            "allow_softmax": self.allow_softmax,
        }

    # ------------------------------------------------------------------ Keras plumbing
    def call(self, inputs, training=None):
        view = self.saliency_input
        return view.network(view.split(inputs, training=training), training=training)

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True
        self.saliency_input  # noqa: B018

    def compile(self, optimizer="auto", loss="auto", metrics="auto", **kwargs):
        """Like `keras.Model.compile`, with "auto" defaults.

        "auto" means: Adam(1e-3); categorical cross-entropy from logits with this model's label
        smoothing (labels are one-hot encoded by the step); top-1 accuracy. `jit_compile` defaults to
        False, not Keras's "auto" (XLA on a GPU): XLA drops the assertions that refuse bad labels and
        tokens in the step, and on CPU it is slower (bench/train_step.py). Pass `jit_compile=True`
        to trade those checks for XLA.
        """
        if kwargs.get("jit_compile", "auto") == "auto":
            kwargs["jit_compile"] = False
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-3)
        if loss == "auto":
            loss = keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=self.label_smoothing, name="cross_entropy"
            )
        if metrics == "auto":
            metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
        if self.exact_second_order:
            second_order.verify_exact_second_order()
        if self.model.built:
            self.saliency_input  # noqa: B018
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        # Keras skips models whose compile() is overridden; ours only fills in "auto" defaults.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "lambda_harmonization": self.lambda_harmonization,
                "lambda_weights": self.lambda_weights,
                "label_smoothing": self.label_smoothing,
                "pyramid_levels": self.pyramid_levels,
                "epsilon": self.epsilon,
                "weight_decay_exclude": list(self.weight_decay_exclude),
                "exact_second_order": self.exact_second_order,
                "saliency_input": self.saliency_input_option,
                "preprocessing": None
                if self.preprocessing is None
                else keras.saving.serialize_keras_object(self.preprocessing),
                "output": self.logits_output,
                "allow_softmax": self.allow_softmax,
                "saliency": self._saliency_name(),
            }
        )
        return config

    def _saliency_name(self) -> str:
        """The saliency method's registered name, as saved; an error if the name would load another method."""
        name = self.saliency_method.name
        try:
            registered = get_saliency_method(name)
        except ValueError:
            registered = None
        if registered != self.saliency_method:
            problem = "no method is" if registered is None else "another method is"
            raise ValueError(
                f"The saliency method {name!r} of this HarmonizedModel is saved by name, but {problem} registered "
                "under it: call harmonization.saliency_methods.register_saliency_method(method) first (and before "
                "loading the model)."
            )
        return name

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"], custom_objects=custom_objects)
        if config.get("preprocessing") is not None:
            config["preprocessing"] = keras.saving.deserialize_keras_object(
                config["preprocessing"], custom_objects=custom_objects
            )
        return cls(**config)

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

    # ------------------------------------------------------------------ the loss terms
    def decayed_weights(self) -> list:
        """The trainable variables that get the L2 penalty (not normalisation/embedding/class token)."""
        return decayed_weights(self.model, self.weight_decay_exclude)

    def weight_decay(self) -> tf.Tensor:
        """sum(0.5 * ||w||^2) over `decayed_weights()` (0 when there are none)."""
        return weight_decay(self.model, self.weight_decay_exclude)

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
