"""What every zoo architecture's tests share: each family has a test file that feeds the shared harness
(tests/architecture_helpers.py) its tiny config, and the harness catches what it promises to catch.

Per family, tests/test_architectures_<module>.py holds the data (`INIT_KWARGS`, the feature shape) and what only
that family needs: independent references (a float64 numpy ViT, `keras.applications`) and the published weight
layouts (tests/fixtures/reference/). Every zoo entry at full size is tested in tests/test_registry.py.
"""

import inspect
from pathlib import Path

import pytest

import harmonization.architectures as architectures
from harmonization.architectures import VGG, ImageClassifier
from architecture_helpers import run_architecture_test

HERE = Path(__file__).parent
# (module, class) of every architecture the package exports, e.g. ("resnet_v2", ResNetV2).
FAMILIES = sorted(
    ((cls.__module__.rsplit(".", 1)[-1], cls)
     for cls in (getattr(architectures, name) for name in architectures.__all__)
     if inspect.isclass(cls) and issubclass(cls, ImageClassifier) and cls is not ImageClassifier),
    key=lambda family: (family[0], family[1].__name__),
)


def test_every_zoo_architecture_is_a_family_here():
    from harmonization.zoo import list_models, model_info

    entries = [model_info(name)["architecture"] for name in list_models()]
    zoo = {(a["module"].rsplit(".", 1)[-1], a["class_name"]) for a in entries}
    assert zoo <= {(module, cls.__name__) for module, cls in FAMILIES}


@pytest.mark.parametrize("module, cls", FAMILIES, ids=[module for module, _ in FAMILIES])
def test_every_family_has_a_test_file_that_runs_the_shared_harness(module, cls):
    path = HERE / f"test_architectures_{module}.py"
    assert path.is_file(), f"{cls.__name__} has no test file: add {path.name} with a tiny INIT_KWARGS (see vgg's)"
    source = path.read_text(encoding="utf-8")
    for call in (f"run_architecture_test({cls.__name__}, INIT_KWARGS", f"run_preset_test({cls.__name__}, INIT_KWARGS"):
        assert call in source, f"{path.name} does not call {call}...)"


class _ForgetsAnArgument(VGG):
    """A get_config that never writes `fc_units`: a config round trip alone cannot notice."""

    def get_config(self):
        config = super().get_config()
        del config["fc_units"]
        return config


class _ChangesAnArgument(VGG):
    """A get_config that writes a value other than the one passed."""

    def get_config(self):
        return {**super().get_config(), "fc_units": 16}


@pytest.mark.parametrize("cls, message", [(_ForgetsAnArgument, "fc_units"), (_ChangesAnArgument, "fc_units")])
def test_the_harness_catches_a_config_that_is_not_the_constructor_arguments(cls, message):
    from test_architectures_vgg import INIT_KWARGS

    with pytest.raises(AssertionError, match=message):
        run_architecture_test(cls, INIT_KWARGS, expected_feature_shape=(None, 8), expect_norms=False)
