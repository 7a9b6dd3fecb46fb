"""The batch contract (`harmonization.batch`): keys, forms, token default, tensors and arrays alike (issue 12, §3)."""

import numpy as np
import pytest
import tensorflow as tf

from harmonization import batch

N, SIZE = 4, 8


def parts(tensors=False):
    rng = np.random.default_rng(0)
    values = {
        "image": rng.uniform(0, 255, (N, SIZE, SIZE, 3)).astype("float32"),
        "heatmap": rng.uniform(0, 1, (N, SIZE, SIZE, 1)).astype("float32"),
        "label": np.arange(N, dtype="int32"),
        "token": np.array([1, 0, 1, 1], "float32"),
    }
    return {key: tf.constant(value) for key, value in values.items()} if tensors else values


def test_keys_and_token_default():
    assert batch.KEYS == ("image", "heatmap", "label", "token")
    assert batch.REQUIRED_KEYS == ("image", "heatmap", "label")
    assert batch.DEFAULT_TOKEN == 1.0


@pytest.mark.parametrize("tensors", [False, True], ids=["numpy", "tensors"])
def test_dict_and_tuple_forms_give_the_same_parts_unchanged(tensors):
    data = parts(tensors)
    forms = [data, (data["image"], data["heatmap"], data["label"], data["token"]),
             [data["image"], data["heatmap"], data["label"], data["token"]]]
    for form in forms:
        unpacked = batch.unpack(form)
        assert isinstance(unpacked, batch.Batch)
        for got, key in zip(unpacked, batch.KEYS):
            assert got is data[key]  # picked, not converted: NumPy stays NumPy, a tensor stays a tensor


@pytest.mark.parametrize("wrap", [lambda d: (d,), lambda d: (d, None), lambda d: (d, None, None)],
                         ids=["(dict,)", "(dict, None)", "(dict, None, None)"])
def test_keras_wrapping_of_a_dict_is_unwrapped(wrap):
    data = parts()
    assert batch.unpack(wrap(data)).label is data["label"]


def test_a_missing_token_is_none_in_both_forms():
    data = parts()
    del data["token"]
    assert batch.unpack(data).token is None
    assert batch.unpack((data["image"], data["heatmap"], data["label"])).token is None


def test_missing_keys_name_the_keys_found_and_missing():
    data = parts()
    del data["heatmap"], data["label"]
    with pytest.raises(ValueError, match=r"The batch lacks the key\(s\) \['heatmap', 'label'\].*"
                                         r"got keys \['image', 'token'\]\."):
        batch.unpack(data)
    with pytest.raises(ValueError, match=r"^Batch 2 of `dataset` lacks the key\(s\) \['heatmap', 'label'\]"):
        batch.unpack(data, where="batch 2 of `dataset`")


@pytest.mark.parametrize(
    "data, kind",
    [((1, 2), "tuple of 2 elements"), ([1, 2, 3, 4, 5], "list of 5 elements"), (np.zeros(3), "ndarray"),
     ((np.zeros(3), None), "tuple of 2 elements")],
)
def test_other_forms_are_refused_with_what_came_and_what_is_accepted(data, kind):
    with pytest.raises(ValueError, match=rf"The batch is a {kind}; a harmonization batch must be a dict "
                                         r"\{'image', 'heatmap', 'label'\[, 'token'\]\} or a tuple"):
        batch.unpack(data)


def test_a_dict_with_a_label_beside_it_is_not_mistaken_for_keras_wrapping():
    data = parts()
    with pytest.raises(ValueError, match="tuple of 2 elements"):
        batch.unpack((data, data["label"]))


@pytest.mark.parametrize("tensors", [False, True], ids=["numpy", "tensors"])
def test_heatmap_maps_drops_a_single_channel_and_keeps_the_type(tensors):
    heatmap = parts(tensors)["heatmap"]
    maps = batch.heatmap_maps(heatmap)
    assert tuple(maps.shape) == (N, SIZE, SIZE)
    assert isinstance(maps, np.ndarray) != tensors
    assert batch.heatmap_maps(maps) is maps
    with pytest.raises(ValueError, match=r"^`heatmap` of batch 1 must have shape \(N, H, W\) or \(N, H, W, 1\); "
                                         r"got \(4, 8, 8, 3\)\.$"):
        batch.heatmap_maps(np.zeros((N, SIZE, SIZE, 3)), "`heatmap` of batch 1")
    with pytest.raises(ValueError, match=r"got \(4, 8\)"):
        batch.heatmap_maps(tf.zeros((N, SIZE)))


def test_heatmap_size_must_match_the_image_size():
    data = parts()
    batch.check_heatmap_size(data["image"], batch.heatmap_maps(data["heatmap"]))
    batch.check_heatmap_size(tf.TensorSpec((None, None, None, 3)), np.zeros((N, 5, 5)))  # unknown: not refused
    with pytest.raises(ValueError, match=r"`heatmap` spatial size \(4, 4\) does not match `image` spatial size "
                                         r"\(8, 8\)"):
        batch.check_heatmap_size(data["image"], tf.zeros((N, 4, 4)))


def test_the_data_pipelines_use_the_batch_keys_and_token_default():
    from harmonization import data

    example = {"image": tf.zeros((SIZE, SIZE, 3), tf.uint8), "heatmap": tf.zeros((SIZE, SIZE)), "label": 3}
    standardised = data._standardise_fn(True)(example)
    assert tuple(standardised) == batch.KEYS
    assert float(standardised["token"]) == batch.DEFAULT_TOKEN
    assert float(data._standardise_fn(False)(example)["token"]) == 0.0
