"""`HarmonizedModel`: wrap any Keras logits classifier so that `fit` applies the neural harmonizer, on any backend.

Only what needs the input gradient lives in the custom `train_step`/`test_step`, and that is the one part each
backend does its own way (as Keras documents custom steps): the class takes them from
`harmonized_step_tensorflow` (nested gradient tapes, `tf.distribute`), `harmonized_step_jax` (a stateless step,
the input gradient taken inside the differentiated function) or `harmonized_step_torch` (`torch.autograd.grad`
with `create_graph=True`). Everything else (the arguments, the loss terms, saving) is written once, here.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from harmonization import _host_checks, second_order
from harmonization._numbers import check_int, check_number
from harmonization.batch import check_heatmap_size, heatmap_maps, unpack
from harmonization.losses import MAX_PYRAMID_LEVELS, half_squared_norm, harmonization_loss_unchecked
from harmonization.saliency_input import SaliencyInput, check_not_a_bare_torch_module, resolve_saliency_input
from harmonization.saliency_methods import SaliencyMethod, get_saliency_method, training_saliency_method

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

#: PyTorch module classes (by name, so that PyTorch need not be imported) whose parameters get no weight decay
#: inside a `keras.layers.TorchModuleWrapper`: the normalisation and embedding modules of `torch.nn`.
_TORCH_NO_DECAY_MODULES = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "LocalResponseNorm",
                           "Embedding")


def _torch_module_no_decay(layer) -> set:
    """ids of a TorchModuleWrapper's variables that are parameters of its normalisation or embedding modules.

    The wrapper's variables wrap the module's own parameters (`variable.value is parameter`) and carry no names
    (variable, variable_1, ...), so neither the layer types nor the path substrings can tell them apart.
    """
    module = getattr(layer, "module", None)
    if type(layer).__name__ != "TorchModuleWrapper" or module is None:
        return set()
    parameters = {
        id(parameter)
        for child in module.modules()
        if any(kind in type(child).__name__ for kind in _TORCH_NO_DECAY_MODULES)
        for parameter in child.parameters(recurse=False)
    }
    return {id(v) for v in layer.weights if id(getattr(v, "value", None)) in parameters}


def decayed_weights(model: keras.Model, exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE) -> list:
    """The trainable variables of `model` that get the L2 penalty.

    Left out, as in the published training code: variables whose path contains one of `exclude`, and
    (ours, so that a normalisation layer's name does not matter) every weight of a normalisation or
    embedding layer, Keras's or, inside a `keras.layers.TorchModuleWrapper`, PyTorch's.
    """
    excluded = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, _NO_DECAY_LAYER_TYPES):
            excluded.update(id(v) for v in layer.weights)
        excluded.update(_torch_module_no_decay(layer))
    return [
        v for v in model.trainable_variables if id(v) not in excluded and not any(p in v.path for p in exclude)
    ]


def weight_decay(model: keras.Model, exclude: Sequence[str] = DEFAULT_WEIGHT_DECAY_EXCLUDE):
    """sum(0.5 * ||w||^2) over `decayed_weights(model, exclude)` (0 when there are none), in float32 at least."""
    return half_squared_norm(decayed_weights(model, exclude))


def _step_class() -> type:
    """The mixin with `train_step`/`test_step` for the backend Keras runs on."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from harmonization.harmonized_step_tensorflow import TensorFlowStep  # on use: only the running backend's

        return TensorFlowStep
    if backend == "jax":
        from harmonization.harmonized_step_jax import JaxStep  # on use: only the running backend's

        return JaxStep
    if backend == "torch":
        from harmonization.harmonized_step_torch import TorchStep  # on use: only the running backend's

        return TorchStep
    raise NotImplementedError(f"HarmonizedModel trains on the tensorflow, jax and torch backends, not {backend!r}.")


@keras.saving.register_keras_serializable(package="harmonization")
class HarmonizedModel(_step_class(), keras.Model):
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
        check_not_a_bare_torch_module(model)
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
        self._logits_width = None  # the number of classes (`_num_classes` on TF, else `_static_num_classes`)
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
        smoothing (labels are one-hot encoded by the step); top-1 accuracy. On TensorFlow `jit_compile`
        defaults to False, not Keras's "auto" (XLA on a GPU): XLA drops the assertions that refuse bad labels
        and tokens in the step, and on CPU it is slower (bench/train_step.py); pass `jit_compile=True` to trade
        those checks for XLA. On JAX and PyTorch Keras's own default stays: they check each batch on the host.
        """
        if kwargs.get("jit_compile", "auto") == "auto" and keras.backend.backend() == "tensorflow":
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

    # ------------------------------------------------------------------ the loss terms
    def decayed_weights(self) -> list:
        """The trainable variables that get the L2 penalty (not normalisation/embedding/class token)."""
        return decayed_weights(self.model, self.weight_decay_exclude)

    def weight_decay(self):
        """sum(0.5 * ||w||^2) over `decayed_weights()` (0 when there are none)."""
        return weight_decay(self.model, self.weight_decay_exclude)

    # ------------------------------------------------------------------ shared by the JAX and PyTorch steps
    def _static_num_classes(self, images) -> int | None:
        """The logits' width before the step (a functional model's output, else a symbolic call); None if unknown."""
        if self._logits_width_tried or not self.model.built:
            return self._logits_width
        self._logits_width_tried = True
        outputs = getattr(self.model, "outputs", None)
        try:
            if outputs and len(outputs) == 1:
                logits = outputs[0]
            else:
                logits = self.compute_output_spec(keras.KerasTensor((None, *tuple(images.shape)[1:]), "float32"))
        except Exception:  # noqa: BLE001 (only the early check is lost; the step checks the labels' width again)
            return None
        if len(getattr(logits, "shape", ())) == 2 and logits.shape[-1] is not None:
            self._logits_width = int(logits.shape[-1])
        return self._logits_width

    def _checked_batch(self, data):
        """(images, heatmaps (N, H, W), labels, tokens (N,)) of one batch, checked on the host before the step.

        JAX runs the step compiled (where a value cannot raise) and PyTorch eagerly: both refuse a bad batch here,
        with the sentences TensorFlow's in-graph checks give, before anything changes.
        """
        batch = unpack(data)
        images = batch.image
        heatmaps = heatmap_maps(batch.heatmap)
        check_heatmap_size(images, heatmaps)
        num_classes = self._static_num_classes(images)
        _host_checks.check_labels_on_host(batch.label, num_classes, "label")
        tokens = _host_checks.check_tokens_on_host(batch.token, int(images.shape[0]), "token")
        _host_checks.check_finite_on_host(heatmaps, "heatmap")
        return images, heatmaps, batch.label, tokens

    def _symbolic_batch(self, iterator=None, data_batch=None):
        """What Keras should build the model, loss and metrics from: (one image, a zero one-hot row).

        Keras (JAX and PyTorch trainers) builds by calling the model on the raw batch, which is our dict, not the
        model's input; it gets (images[:1], zeros (1, num_classes)) instead, taken as Keras takes its batch.
        """
        if data_batch is None:
            for _, _, batches in iterator:
                data_batch = batches[0] if isinstance(batches, (list, tuple)) else next(batches)
                break
        images = ops.convert_to_tensor(unpack(data_batch).image[:1])
        if "float" not in keras.backend.standardize_dtype(images.dtype):
            images = ops.cast(images, "float32")
        num_classes = self(images, training=False).shape[-1]
        return images, ops.zeros([1, num_classes], "float32")

    def _batch_tensors(self, data):
        """(images float, heatmaps (N, H, W) float32, labels, tokens (N,) float32) of a batch already checked."""
        batch = unpack(data)
        images = ops.convert_to_tensor(batch.image)
        if "float" not in keras.backend.standardize_dtype(images.dtype):
            images = ops.cast(images, "float32")
        heatmaps = ops.cast(heatmap_maps(ops.convert_to_tensor(batch.heatmap)), "float32")
        tokens = ops.ones([images.shape[0]], "float32") if batch.token is None else ops.cast(batch.token, "float32")
        if len(tokens.shape) == 2:
            tokens = tokens[:, 0]
        elif len(tokens.shape) == 0:
            tokens = tokens * ops.ones([images.shape[0]], "float32")
        return images, heatmaps, batch.label, tokens

    def _saliency_term(self, grads, heatmaps, tokens):
        """The harmonization loss between this model's saliency (the method's reduction of `grads`) and the maps."""
        saliency = self.saliency_method.reduce(grads)  # published: channel mean (`tf.reduce_mean(grads, -1)`)
        _host_checks.check_same_map_shape(saliency.shape, heatmaps.shape, "saliency", "human_maps")
        return harmonization_loss_unchecked(
            saliency, ops.cast(heatmaps, saliency.dtype), ops.cast(tokens, saliency.dtype), self.pyramid_levels,
            self.epsilon,
        )

