"""Tests for the clickme_synthetic builder and the generator it wraps (harmonization.synthetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import stats

from harmonization import synthetic
from tfds_clickme.clickme_synthetic import clickme_synthetic_dataset_builder as builder_module

SEED = 0


def _layouts(split: str, n: int, agreement: float = 0.9, seed: int = SEED):
    return [synthetic.sample_layout(seed, split, i, 64, agreement) for i in range(n)]


# ------------------------------------------------------------------------ the generator


def test_same_seed_gives_identical_examples():
    for split in ("train", "test"):
        for index in (0, 7, 123):
            a = synthetic.generate_example(SEED, split, index)
            b = synthetic.generate_example(SEED, split, index)
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.heatmap, b.heatmap)
            assert (a.label, a.id, a.layout) == (b.label, b.id, b.layout)


def test_examples_do_not_depend_on_generation_order():
    in_order = list(synthetic.generate_split(SEED, "train", 6))
    np.testing.assert_array_equal(in_order[5].image, synthetic.generate_example(SEED, "train", 5).image)


def test_seed_and_split_change_the_pixels():
    base = synthetic.generate_example(SEED, "train", 3).image
    assert not np.array_equal(base, synthetic.generate_example(SEED + 1, "train", 3).image)
    assert not np.array_equal(base, synthetic.generate_example(SEED, "test", 3).image)


def test_example_format():
    for size in (32, 64, 96):
        example = synthetic.generate_example(SEED, "train", 11, image_size=size)
        assert example.image.shape == (size, size, 3) and example.image.dtype == np.uint8
        assert example.heatmap.shape == (size, size, 1) and example.heatmap.dtype == np.uint8
        assert example.heatmap.max() == 255
        assert example.label == 11 % synthetic.NUM_CLASSES
        assert example.id == "train_000011"


def test_labels_are_balanced():
    for n in (100, 1234):
        labels = [layout.label for layout in _layouts("train", n)]
        counts = np.bincount(labels, minlength=synthetic.NUM_CLASSES)
        assert counts.max() - counts.min() <= 1, counts


def test_shortcut_agrees_with_label_at_the_configured_rate_in_train():
    n = 5000
    for agreement in (0.9, 0.5):
        layouts = _layouts("train", n, agreement)
        rate = np.mean([l.shortcut == l.label for l in layouts])
        # 4 binomial standard deviations (about 0.017 at p=0.9, n=5000); the data are fixed by the seed.
        assert abs(rate - agreement) < 4 * np.sqrt(agreement * (1 - agreement) / n), rate
        # When it disagrees, it names each other class about equally often.
        offsets = [(l.shortcut - l.label) % synthetic.NUM_CLASSES for l in layouts if l.shortcut != l.label]
        counts = np.bincount(offsets, minlength=synthetic.NUM_CLASSES)[1:]
        assert stats.chisquare(counts).pvalue > 1e-3, counts
    for agreement in (0.0, 1.0):
        rate = np.mean([l.shortcut == l.label for l in _layouts("train", 500, agreement)])
        assert rate == agreement


def test_shortcut_is_independent_of_the_label_in_test():
    n = 5000
    layouts = _layouts("test", n, agreement=1.0)  # ignored for "test"
    rate = np.mean([l.shortcut == l.label for l in layouts])
    chance = 1 / synthetic.NUM_CLASSES
    assert abs(rate - chance) < 4 * np.sqrt(chance * (1 - chance) / n), rate
    table = np.zeros((synthetic.NUM_CLASSES, synthetic.NUM_CLASSES))
    for l in layouts:
        table[l.label, l.shortcut] += 1
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_the_mark_in_the_pixels_is_the_layouts_shortcut():
    """The statistics above are about `Layout.shortcut`; check that it is what gets drawn."""
    patterns = [synthetic.mark_pattern(k, 12) for k in range(synthetic.NUM_CLASSES)]
    for a in range(len(patterns)):
        for b in range(a):
            assert not np.array_equal(patterns[a], patterns[b]), (a, b)
    for index in range(40):
        example = synthetic.generate_example(SEED, "train" if index % 2 else "test", index)
        top, left, bottom, right = synthetic.mark_box(example.layout.corner, 64)
        patch = example.image[top:bottom, left:right].astype(float)
        assert np.ptp(patch, axis=-1).max() <= 1  # achromatic: R = G = B up to rounding
        drawn = patch[..., 0] > patch[..., 0].mean()
        decoded = [k for k, p in enumerate(patterns) if p.shape == drawn.shape and np.array_equal(p, drawn)]
        assert decoded == [example.layout.shortcut]


def test_object_stays_inside_the_image_and_clear_of_the_mark():
    for split in ("train", "test"):
        for layout in _layouts(split, 2000):
            top, left, bottom, right = layout.bbox
            assert 0 <= top < bottom <= 64 and 0 <= left < right <= 64
            mt, ml, mb, mr = synthetic.mark_box(layout.corner, 64)
            assert bottom <= mt or mb <= top or right <= ml or mr <= left


def test_heatmap_marks_the_object():
    for index in range(60):
        example = synthetic.generate_example(SEED, "train", index)
        heat = example.heatmap[..., 0].astype(float)
        top, left, bottom, right = example.layout.bbox
        inside = heat[top:bottom, left:right].sum() / heat.sum()
        assert inside > 0.8, (index, inside)
        # Centre of mass at the object's centre (all footprints but the triangle are centred on it).
        rows, cols = np.mgrid[0:64, 0:64] + 0.5
        com = np.array([(heat * rows).sum(), (heat * cols).sum()]) / heat.sum()
        tolerance = 0.2 * example.layout.size if synthetic.CLASS_NAMES[example.label] == "triangle" else 1.0
        assert np.abs(com - np.array(example.layout.center)).max() < tolerance, (index, com, example.layout)
        # At most a faint blur tail on the corner mark, below the map's mean, so that the
        # harmonization loss's standardize-and-cut zeroes it there.
        mt, ml, mb, mr = synthetic.mark_box(example.layout.corner, 64)
        assert heat[mt:mb, ml:mr].max() < heat.mean()
        assert heat[mt:mb, ml:mr].sum() < 0.01 * heat.sum()


def test_object_is_drawn_where_the_layout_says():
    """Fully covered object pixels carry the shared light grey (R = G = B, at least 0.75)."""
    for index in range(30):
        example = synthetic.generate_example(SEED, "test", index)
        mask = synthetic.object_mask(example.layout, 64) > 0.99
        grey = example.image.astype(float).mean(-1)
        assert np.ptp(example.image[mask].astype(float), axis=-1).max() <= 1  # same grey on R, G, B
        assert grey[mask].min() >= 0.75 * 255 - 1


def test_classes_differ_in_shape_not_in_colour():
    layout = synthetic.Layout(label=0, shortcut=0, center=(32.0, 32.0), size=24.0, corner=0)
    masks = [
        synthetic.object_mask(synthetic.Layout(k, 0, layout.center, layout.size, 0), 64) > 0.5
        for k in range(synthetic.NUM_CLASSES)
    ]
    for a in range(len(masks)):
        for b in range(a):
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.75, (synthetic.CLASS_NAMES[a], synthetic.CLASS_NAMES[b], iou)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"seed": -1}, "seed"),
        ({"split": "validation"}, "split"),
        ({"index": -3}, "index"),
        ({"image_size": 16}, "image_size"),
        ({"shortcut_agreement": 1.5}, "shortcut_agreement"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    args = {"seed": 0, "split": "train", "index": 0, "image_size": 64, "shortcut_agreement": 0.9}
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        synthetic.generate_example(**args)


# ------------------------------------------------------------------------ the TFDS builder


class ClickmeSyntheticTest(tfds.testing.DatasetBuilderTestCase):
    """The standard TFDS checks (registration, features, split sizes, no overlap, path-free keys)."""

    DATASET_CLASS = builder_module.Builder
    BUILDER_CONFIG_NAMES_TO_TEST = ["quick"]
    SPLITS = {"train": 200, "test": 100}
    # Nothing is downloaded; the harness still wants a folder to hand to the download manager.
    EXAMPLE_DIR = str(Path(__file__).parent)


def test_version_is_the_highest_in_release_notes():
    versions = [tfds.core.Version(v) for v in builder_module.Builder.RELEASE_NOTES]
    assert builder_module.Builder.VERSION == max(versions)


def test_builder_is_registered_under_the_folder_name():
    assert builder_module.Builder.name == "clickme_synthetic"
    assert "clickme_synthetic" in tfds.list_builders(with_community_datasets=False)


def test_load_returns_clickme_features_equal_to_the_generator(tmp_path):
    builder = tfds.builder("clickme_synthetic", config="quick", data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert builder.info.splits["train"].num_examples == 200
    assert builder.info.splits["test"].num_examples == 100
    assert builder.info.features["label"].names == list(synthetic.CLASS_NAMES)
    config = builder.builder_config
    for split in ("train", "test"):
        ds = tfds.load("clickme_synthetic/quick", split=split, data_dir=str(tmp_path))
        spec = ds.element_spec
        assert spec["image"].shape == (64, 64, 3) and spec["image"].dtype.name == "uint8"
        assert spec["heatmap"].shape == (64, 64, 1) and spec["heatmap"].dtype.name == "uint8"
        assert spec["label"].dtype.name == "int64" and spec["id"].dtype.name == "string"
        seen = 0
        for record in tfds.as_numpy(ds.take(20)):
            index = int(record["id"].decode().rsplit("_", 1)[1])
            expected = synthetic.generate_example(
                config.seed, split, index, config.image_size, config.shortcut_agreement
            )
            assert record["id"].decode() == expected.id
            assert record["label"] == expected.label
            np.testing.assert_array_equal(record["image"], expected.image)  # PNG is lossless
            np.testing.assert_array_equal(record["heatmap"], expected.heatmap)
            seen += 1
        assert seen == 20


@pytest.mark.parametrize(
    "field, value",
    [("seed", -1), ("image_size", 8), ("num_train", 0), ("num_test", 2.5), ("shortcut_agreement", -0.1)],
)
def test_bad_builder_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        builder_module.BuilderConfig(name="bad", **{field: value})


def test_configs():
    configs = {c.name: c for c in builder_module.Builder.BUILDER_CONFIGS}
    assert set(configs) == {"default", "quick"}
    assert (configs["default"].num_train, configs["default"].num_test) == (3000, 1000)
    for config in configs.values():
        assert (config.seed, config.image_size, config.shortcut_agreement) == (0, 64, 0.9)
