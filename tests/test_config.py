from __future__ import annotations

import re

import pytest
import yaml

from volseg_dask.config import Settings, load_settings, settings_reference_markdown
from volseg_dask.errors import ConfigError


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    Settings().save(path)
    assert load_settings(path) == Settings()
    # the written file is commented YAML that parses to the same values
    assert yaml.safe_load(path.read_text())["train"]["epochs"] == Settings().train.epochs


def test_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  encoder: resnet18\ntrain:\n  epochs: 3\n")
    s = load_settings(path)
    assert s.model.encoder == "resnet18" and s.train.epochs == 3
    assert s.data.image_size == 256


def test_architecture_is_case_insensitive():
    assert Settings.from_dict({"model": {"architecture": "unetplusplus"}}).model.architecture == "UnetPlusPlus"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, "unknown key 'trian'; did you mean 'train'?"),
        ({"train": {"epoch": 3}}, "unknown key train.'epoch'; did you mean 'epochs'?"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, found 'ten'"),
        ({"train": {"epochs": 0}}, "train.epochs: 0 is below the minimum 1"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer"),
        ({"data": {"image_size": 100}}, "data.image_size: 100 must be a multiple of 32"),
        ({"data": {"image_size": -64}}, "data.image_size: -64 is below the minimum 32"),
        ({"train": {"loss": "mse"}}, "train.loss: 'mse' is not allowed; choose one of 'dice_ce'"),
        ({"model": {"architecture": "UNetX"}}, "model.architecture: 'UNetX' is not allowed; choose one of Unet"),
        ({"model": {"n_slices": 2}}, "model.n_slices: 2 must be odd"),
        ({"predict": {"axes": "zz"}}, "predict.axes: 'zz' is not allowed"),
        ({"predict": {"axes": "q"}}, "predict.axes: 'q' is not allowed"),
        ({"predict": {"device": "gpu"}}, "predict.device: 'gpu' is not allowed; expected auto, cpu"),
        ({"predict": {"chunks": [64, 64]}}, "predict.chunks: expected 3 values"),
        ({"predict": {"halo": -1}}, "predict.halo: -1 is below the minimum 0"),
        ({"data": {"clip_percentiles": [99, 1]}}, "data.clip_percentiles: values must increase"),
        ({"data": {"axis_weights": {"w": 1}}}, "data.axis_weights: unknown key 'w'"),
        ({"data": {"axis_weights": {"z": 0, "y": 0, "x": 0}}}, "at least one weight must be positive"),
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate: expected a finite number"),
        ({"train": {"seed": None, "patience": None}}, "train.patience: must not be null"),
        ({"train": [1, 2]}, "train: expected a mapping of keys"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_dict(raw, source="s.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("s.yaml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="settings file not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(evil)


def test_overrides_are_validated():
    s = Settings().with_overrides({"train.epochs": 2, "predict.axes": None})
    assert s.train.epochs == 2 and s.predict.axes == "zyx"
    with pytest.raises(ConfigError, match="train.epochs: -1 is below the minimum"):
        Settings().with_overrides({"train.epochs": -1})
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        Settings().with_overrides({"nope": 1})


def test_reference_lists_every_key():
    text = settings_reference_markdown()
    for section, obj in Settings().to_dict().items():
        for key in obj:
            assert f"| `{key}` |" in text, (section, key)


def test_settings_built_in_python_are_checked_like_a_file():
    """Validation runs when a section is constructed: the API raises the ConfigError the CLI shows."""
    import dataclasses

    from volseg_dask.config import DataSettings, ModelSettings, PredictSettings, TrainSettings

    for build, key in ((lambda: PredictSettings(halo=-5), "predict.halo: -5 is below the minimum 0"),
                       (lambda: TrainSettings(epochs=0), "train.epochs: 0 is below the minimum 1"),
                       (lambda: DataSettings(image_size=100), "data.image_size: 100 must be a multiple of 32"),
                       (lambda: ModelSettings(architecture="NoSuchNet"), "model.architecture: 'NoSuchNet'"),
                       (lambda: dataclasses.replace(TrainSettings(), batch_size=0), "train.batch_size"),
                       (lambda: Settings(train={"epochz": 3}), "unknown key train.'epochz'")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            build()
    # coerced as from YAML: a tuple becomes a list, an int a float, a name its smp spelling
    s = Settings(predict={"chunks": (64, 64, 64)}, train={"learning_rate": 1},
                 model={"architecture": "unetplusplus"})
    assert s.predict.chunks == [64, 64, 64] and s.train.learning_rate == 1.0
    assert s.model.architecture == "UnetPlusPlus"
