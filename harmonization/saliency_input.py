"""Where a classifier's saliency is taken: the preprocessed input, as in the published method.

The published harmonizer (serre-lab/Harmonization, `training/loss.py` and `evaluation/clickme.py`) feeds
its networks `preprocess_input(images)` and differentiates with respect to *that* tensor. Our zoo models,
and many users' classifiers, normalise inside the model (`ImageNetNormalization`, `keras.layers.Rescaling`,
`keras.layers.Normalization`) and take raw [0, 255] pixels. The gradient with respect to raw pixels is the
published one times 1/(255 std) per channel: the training map's channel mean, the standardisation's epsilon
and the evaluation map's max over channels all change, and with a plain 1/255 rescaling the harmonization
term all but vanishes. So we split such a model in two at its last leading preprocessing layer:

    images --preprocess--> x (differentiated) --network--> logits

`resolve_saliency_input(model, ...)` finds the split (or takes it from the user) and returns a
`SaliencyInput`; `harmonization.saliency` differentiates `network` at `x`. The split models share the
original's layers, so training either trains the original. The same object picks the output that holds
the logits and refuses classifiers that end in a softmax (their input gradients saturate).
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Callable

import keras

from harmonization._numbers import is_int
from harmonization.architectures.base import ImageNetNormalization

__all__ = [
    "PREPROCESSING_LAYER_TYPES",
    "SaliencyInput",
    "SoftmaxOutputError",
    "resolve_saliency_input",
]

AUTO = "auto"
RAW_INPUT = "input"


#: Layers recognised as the preprocessing at the front of a classifier (per-pixel value maps that users
#: put before a network, like the published `preprocess_input`).
PREPROCESSING_LAYER_TYPES = (ImageNetNormalization, keras.layers.Rescaling, keras.layers.Normalization)


class SoftmaxOutputError(ValueError):
    """The classifier returns probabilities; the harmonizer and its saliency need logits."""


@dataclasses.dataclass(frozen=True)
class SaliencyInput:
    """A classifier seen as `logits = network(preprocess(images))`, differentiated at `preprocess(images)`.

    Attributes:
        network: callable `(x, training=...) -> logits`; one tensor of logits (N, num_classes).
        preprocess: callable `(images, training=...) -> x`, or None when the saliency is taken at the
            model's own input.
        description: what is differentiated, in words (shown by `HarmonizedModel.saliency_input`).
        layers: names of the preprocessing layers applied before the differentiated tensor.
    """

    network: Callable[..., Any]
    preprocess: Callable[..., Any] | None
    description: str
    layers: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"SaliencyInput({self.description})"

    def split(self, images, training: bool = False):
        """The tensor that is differentiated: `preprocess(images)`, or `images` itself."""
        if self.preprocess is None:
            return images
        return self.preprocess(images, training=training)


# --------------------------------------------------------------------------------------------
# The model's graph: leading layers, cuts.
# --------------------------------------------------------------------------------------------


def _graph(model):
    """The functional graph of `model` (Functional, built Sequential), or None for subclassed models."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_nodes_by_depth") and getattr(model, "inputs", None):
        return model
    return None


def _consumers(graph, tensor) -> list:
    """The nodes of `graph` that take `tensor` as an input."""
    nodes = [node for depth in graph._nodes_by_depth.values() for node in depth]
    return [
        node
        for node in nodes
        if not isinstance(node.operation, keras.layers.InputLayer)
        and any(candidate is tensor for candidate in node.input_tensors)
    ]


def _single_input(graph, what: str):
    inputs = graph.inputs
    if len(inputs) != 1:
        raise ValueError(
            f"{what}: the model has {len(inputs)} inputs; the saliency needs a classifier with one image input."
        )
    return inputs[0]


def _leading_preprocessing(graph) -> tuple[Any, list]:
    """(tensor after the chain of preprocessing layers at the graph's front, those layers)."""
    tensor, layers = _single_input(graph, "saliency_input"), []
    while True:
        consumers = _consumers(graph, tensor)
        if len(consumers) != 1 or not isinstance(consumers[0].operation, PREPROCESSING_LAYER_TYPES):
            return tensor, layers
        node = consumers[0]
        if len(node.output_tensors) != 1 or len(node.input_tensors) != 1:
            return tensor, layers
        layers.append(node.operation)
        tensor = node.output_tensors[0]


def _cut(inputs, outputs, what: str) -> keras.Model:
    try:
        return keras.Model(inputs, outputs)
    except Exception as error:  # Keras raises ValueError/KeyError on a graph that does not pass the cut
        raise ValueError(
            f"{what}: cannot split the model there ({error}). The whole model must depend on the input only "
            "through the chosen tensor."
        ) from error


def _layer_node(graph, name: str):
    """The node of `graph` whose operation is the top-level layer `name`."""
    nodes = [node for depth in graph._nodes_by_depth.values() for node in depth if node.operation.name == name]
    if not nodes:
        names = [layer.name for layer in graph.layers]
        raise ValueError(
            f"`saliency_input`={name!r} is not a top-level layer of the model; its layers are {names}. "
            f"Use {AUTO!r}, {RAW_INPUT!r} or one of those names."
        )
    if len(nodes) > 1 or len(nodes[0].output_tensors) != 1:
        raise ValueError(
            f"`saliency_input`={name!r}: that layer is called {len(nodes)} time(s) with "
            f"{len(nodes[0].output_tensors)} output(s); the saliency needs one output tensor."
        )
    return nodes[0]


# --------------------------------------------------------------------------------------------
# The output: which one holds the logits, and is it a softmax?
# --------------------------------------------------------------------------------------------


def _output_index(model, output) -> int | None:
    """Index of the logits among the model's outputs (None: a single output)."""
    graph = _graph(model)
    outputs = graph.outputs if graph is not None else None
    names = getattr(model, "output_names", None) or []
    if outputs is None or len(outputs) == 1:
        if output not in (None, 0) and output not in names:
            raise ValueError(f"`output`={output!r}: the model has a single output; leave `output` as None.")
        return None
    if output is None:
        raise ValueError(
            f"The model has {len(outputs)} outputs ({names}); say which one holds the logits with "
            "`output=` (an index or an output name)."
        )
    if isinstance(output, str):
        if output not in names:
            raise ValueError(f"`output`={output!r} is not an output of the model; its outputs are {names}.")
        return names.index(output)
    if not is_int(output) or not -len(outputs) <= output < len(outputs):
        raise ValueError(f"`output` must be an index in [0, {len(outputs)}) or an output name; got {output!r}.")
    return int(output) % len(outputs)


def _is_softmax(function) -> bool:
    return getattr(function, "__name__", None) == "softmax"


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def ends_in_softmax(model, output_index: int | None = None) -> bool:
    """Whether the model's (chosen) output is produced by a softmax: a `Softmax` layer, an `Activation`
    ("softmax") or a layer whose `activation` is softmax, looking through nested models."""
    graph = _graph(model)
    if graph is None:
        last = getattr(model, "layers", None)
        operation = last[-1] if last else None
    else:
        operation = _producer(graph.outputs[output_index or 0])
    while operation is not None:
        if isinstance(operation, keras.layers.Softmax) or _is_softmax(getattr(operation, "activation", None)):
            return True
        inner = _graph(operation) if isinstance(operation, keras.Model) else None
        if inner is None or len(inner.outputs) != 1:
            return False
        operation = _producer(inner.outputs[0])
    return False


def _check_logits(model, output_index, allow_softmax: bool) -> None:
    if allow_softmax or not ends_in_softmax(model, output_index):
        return
    raise SoftmaxOutputError(
        f"Model {getattr(model, 'name', '')!r} ends in a softmax: it returns probabilities, whose input gradients "
        "saturate, while the harmonizer and its saliency are defined on logits. Give it the model without its "
        "softmax: `keras.Model(model.input, model.layers[-1].input)` when the softmax is its own layer, or rebuild "
        "the last Dense layer with activation=None (harmonization.load_model's zoo models return logits). "
        "Pass `allow_softmax=True` if you really mean to differentiate the probabilities."
    )


# --------------------------------------------------------------------------------------------
# Resolution.
# --------------------------------------------------------------------------------------------


def _whole_model(model, index, description: str) -> SaliencyInput:
    # A weak reference: views are cached per model, and a value must not keep its key alive.
    reference = weakref.ref(model) if isinstance(model, keras.layers.Layer) else (lambda: model)

    def network(x, training=False):
        logits = reference()(x, training=training)
        if isinstance(logits, (list, tuple)):
            if index is None and len(logits) != 1:
                raise ValueError(
                    f"The model returned {len(logits)} outputs; say which one holds the logits with `output=`."
                )
            logits = logits[index or 0]
        elif isinstance(logits, dict):
            raise ValueError("The model returns a dict; pass `output=` with the key of the logits.")
        return logits

    return SaliencyInput(network=network, preprocess=None, description=description)


def _describe(layers) -> str:
    chain = " -> ".join(f"{layer.name!r} ({type(layer).__name__})" for layer in layers)
    return f"the output of the preprocessing {chain}, as published"


def _resolve(model, saliency_input, preprocessing, output, allow_softmax) -> SaliencyInput:
    if preprocessing is not None and saliency_input not in (AUTO, RAW_INPUT, None):
        raise ValueError(
            "Pass either `preprocessing` (a function applied before the model) or `saliency_input` (a layer "
            f"inside the model), not both; got saliency_input={saliency_input!r}."
        )
    if preprocessing is not None and not callable(preprocessing):
        raise TypeError(f"`preprocessing` must be a callable images -> inputs; got {type(preprocessing).__name__}.")
    index = _output_index(model, output)
    _check_logits(model, index, allow_softmax)
    graph = _graph(model)

    if preprocessing is not None:
        name = getattr(preprocessing, "name", None) or getattr(preprocessing, "__name__", type(preprocessing).__name__)
        view = _whole_model(model, index, f"the model's input, after `preprocessing` ({name}) outside the model")

        def preprocess(images, training=False):
            if isinstance(preprocessing, keras.layers.Layer):
                return preprocessing(images, training=training)
            return preprocessing(images)

        return dataclasses.replace(view, preprocess=preprocess)

    if saliency_input in (RAW_INPUT, None) or (saliency_input == AUTO and graph is None):
        why = (
            "as requested"
            if saliency_input != AUTO
            else "(a subclassed model: preprocessing inside it cannot be seen; pass `preprocessing=` or "
            "`saliency_input=` if it normalises its inputs)"
        )
        return _whole_model(model, index, f"the model's own input {why}")

    if not isinstance(saliency_input, str):
        raise TypeError(
            f"`saliency_input` must be {AUTO!r}, {RAW_INPUT!r} or a layer name; got {type(saliency_input).__name__}."
        )
    if graph is None:
        raise ValueError(
            f"`saliency_input`={saliency_input!r} names a layer, but {type(model).__name__} is a subclassed model "
            "without a functional graph; pass `preprocessing=` (a function applied before the model) instead."
        )
    images = _single_input(graph, "saliency_input")
    logits = graph.outputs[index or 0]  # index is None for a single output
    if saliency_input == AUTO:
        tensor, layers = _leading_preprocessing(graph)
        if not layers:
            nested = _nested_front(graph, images, logits)
            if nested is not None:
                return nested
            return _whole_model(model, index, "the model's own input (no preprocessing layer at its front)")
        description = _describe(layers)
        names = tuple(layer.name for layer in layers)
    else:
        node = _layer_node(graph, saliency_input)
        tensor = node.output_tensors[0]
        description = f"the output of layer {saliency_input!r} ({type(node.operation).__name__}), as requested"
        names = (saliency_input,)
    front = _cut(images, tensor, "saliency_input")
    back = _cut(tensor, logits, "saliency_input")
    return SaliencyInput(
        network=lambda x, training=False: back(x, training=training),
        preprocess=lambda images, training=False: front(images, training=training),
        description=description,
        layers=names,
    )


def _nested_front(graph, images, logits) -> SaliencyInput | None:
    """A model whose input goes straight into a nested model that starts with preprocessing, e.g.
    `keras.Sequential([harmonization.load_model(name, include_top=False), keras.layers.Dense(10)])`;
    `logits` is the graph's output that holds the logits."""
    consumers = _consumers(graph, images)
    if len(consumers) != 1 or not isinstance(consumers[0].operation, keras.Model):
        return None
    node = consumers[0]
    inner = _graph(node.operation)
    if inner is None or len(node.output_tensors) != 1 or len(inner.outputs) != 1:
        return None
    view = resolve_saliency_input(node.operation)
    if view.preprocess is None:
        return None
    rest = _cut(node.output_tensors[0], logits, "saliency_input")
    inner_network = view.network

    def network(x, training=False):
        return rest(inner_network(x, training=training), training=training)

    description = f"inside the nested model {node.operation.name!r}, {view.description}"
    return SaliencyInput(network=network, preprocess=view.preprocess, description=description, layers=view.layers)


_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.RLock()  # re-entered for nested models


def check_not_a_bare_torch_module(model, name: str = "model") -> None:
    """Refuse a `torch.nn.Module` given where a Keras model belongs, with the way to wrap it.

    Called plainly it would run, but outside Keras: no preprocessing layer to find, no Keras variables to train,
    and (on another backend) tensors of the wrong kind; the errors that follow name none of this.
    """
    if isinstance(model, keras.layers.Layer):  # on the PyTorch backend every Keras layer is a torch.nn.Module too
        return
    if any(cls.__module__ == "torch.nn.modules.module" and cls.__name__ == "Module" for cls in type(model).__mro__):
        raise TypeError(
            f"`{name}` is a torch.nn.Module ({type(model).__name__}); harmonization takes Keras models. Wrap it "
            "(KERAS_BACKEND=torch): inputs = keras.Input((H, W, 3)); x = keras.layers.Rescaling(1 / 255)(inputs); "
            "logits = keras.layers.TorchModuleWrapper(module, output_shape=(num_classes,))(x); "
            "model = keras.Model(inputs, logits) (README: \"Harmonize a PyTorch model\")."
        )


def resolve_saliency_input(
    model,
    saliency_input: str | None = AUTO,
    preprocessing: Callable | None = None,
    output: int | str | None = None,
    allow_softmax: bool = True,
) -> SaliencyInput:
    """Where to differentiate `model` for its saliency, and which output holds its logits.

    Args:
        model: a Keras classifier (or any callable images -> logits).
        saliency_input: "auto" (default): after the preprocessing layers at the model's front
            (`ImageNetNormalization`, `Rescaling`, `Normalization`, also at the front of a nested first
            model), else the model's input. "input": the model's own input. A layer name: that top-level
            layer's output.
        preprocessing: a function applied to the images *before* the model (the model is then the bare
            network, as the published code's `preprocess_input` + network); its output is differentiated.
        output: which output holds the logits, for a model with several (an index or a name).
        allow_softmax: accept a model whose output is a softmax. Defaults to True here;
            `HarmonizedModel` and `evaluate_alignment` pass False.

    Returns:
        A `SaliencyInput`. Results are cached per model.
    """
    check_not_a_bare_torch_module(model)
    if not isinstance(model, keras.layers.Layer):
        if not callable(model):
            raise TypeError(f"`model` must be a Keras model or a callable images -> logits; got {type(model).__name__}.")
        if saliency_input not in (AUTO, RAW_INPUT, None):
            raise ValueError(f"`saliency_input`={saliency_input!r} needs a Keras model; got a {type(model).__name__}.")
        view = _whole_model(model, output, "the callable's input")
        if preprocessing is None:
            return view
        return dataclasses.replace(view, preprocess=lambda images, training=False: preprocessing(images))
    if not model.built:  # an unbuilt model has no graph yet: resolve again once it is built
        return _resolve(model, saliency_input, preprocessing, output, allow_softmax)
    key = (saliency_input, id(preprocessing) if preprocessing is not None else None, output, bool(allow_softmax))
    with _CACHE_LOCK:
        cached = _CACHE.setdefault(model, {})
        if key not in cached:
            cached[key] = _resolve(model, saliency_input, preprocessing, output, allow_softmax)
        return cached[key]
