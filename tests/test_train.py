"""The fit loop: losses, schedule, LR finder, a short fit, the model file, interruptions, the GPU path, the CLI."""

from __future__ import annotations

import contextlib
import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from volseg_dask.config import ModelSettings, Settings
from volseg_dask.errors import OutputExistsError, VolumeFormatError, VolumeValueError
from volseg_dask.labels import IGNORE_INDEX
from volseg_dask.models import build_model, load_model
from volseg_dask.training import loop as loop_mod
from volseg_dask.training import run as run_mod
from volseg_dask.training import step as step_mod
from volseg_dask.training import train
from volseg_dask.training.loop import lr_at
from volseg_dask.training.losses import make_loss
from volseg_dask.training.lr_finder import lr_range_test

from .conftest import interrupt_validation

TINY = {"architecture": "Unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]}


def tiny_settings(**train_kw) -> Settings:
    raw = {"model": TINY, "data": {"image_size": 32, "validation_block": 4},
           "train": {"epochs": 2, "samples_per_epoch": 16, "batch_size": 8, "learning_rate": 3e-3,
                     "torch_threads": 1, "device": "cpu", **train_kw}}
    return Settings.from_dict(raw)


@pytest.fixture(scope="module")
def odd_labels(small_volume, tmp_path_factory):
    """The small volume with labels 0, 7, 255 instead of 0, 1, 2, as .npy files."""
    image, labels = small_volume
    folder = tmp_path_factory.mktemp("odd")
    np.save(folder / "image.npy", image)
    np.save(folder / "labels.npy", np.array([0, 7, 255], np.uint8)[labels])
    return folder / "image.npy", folder / "labels.npy"


@pytest.fixture(scope="module")
def fitted(odd_labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "model.pt"
    result = train([odd_labels], out, tiny_settings(epochs=4, learning_rate=None, lr_finder_steps=12))
    return result, out


def test_losses_skip_ignored_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    masked = target.clone()
    masked[:, :4] = IGNORE_INDEX
    for name in ("dice_ce", "dice", "cross_entropy", "focal", "tversky", "lovasz"):
        loss = make_loss(name)
        assert torch.isfinite(loss(logits, target)), name
        # ignored voxels do not count: changing the logits there leaves the loss unchanged
        other = logits.clone()
        other[:, :, :4] = torch.randn(2, 3, 4, 8) * 10
        assert torch.allclose(loss(logits, masked), loss(other, masked), atol=1e-5), name
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("mse")


def test_schedules():
    assert lr_at("constant", 0.7, 1.0) == 1.0
    assert lr_at("one_cycle", 0.0, 1.0) == pytest.approx(1 / 25)
    assert lr_at("one_cycle", 0.25, 1.0) == pytest.approx(1.0)
    assert lr_at("one_cycle", 1.0, 1.0) < 1e-4
    assert lr_at("cosine", 0.0, 1.0) == 1.0 and lr_at("cosine", 1.0, 1.0) == pytest.approx(1e-3)
    values = [lr_at("one_cycle", p / 100, 1.0) for p in range(26, 101)]
    assert all(b <= a for a, b in itertools.pairwise(values))


def test_lr_finder_returns_a_finite_rate_on_a_toy_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            x = torch.rand(8, 1, 16, 16, generator=gen)
            yield x, (x[:, 0] > 0.5).long()

    result = lr_range_test(model, torch.nn.CrossEntropyLoss(), batches(),
                           lambda lr: torch.optim.AdamW(model.parameters(), lr), [1e-5, 10.0], 60)
    assert np.isfinite(result.suggestion) and 1e-5 <= result.suggestion <= 10.0
    assert result.minimum is not None and result.suggestion < result.minimum
    assert len(result.lrs) == len(result.smoothed) <= 60
    for k, v in model.state_dict().items():  # the sweep leaves the model as it was
        assert torch.equal(v, before[k])


def test_a_sweep_cut_short_at_low_rates_falls_back_to_a_common_rate():
    """16 of 100 steps (a CPU time budget) cover only 1e-6..6e-6: the descent there is no choice."""
    from volseg_dask.training.lr_finder import FALLBACK_LR, _suggest

    lrs = [1e-6 * (10 ** (4 * i / 99)) for i in range(16)]
    losses = [1.2 - 0.01 * i for i in range(16)]  # still falling
    cut = _suggest(lrs, losses, losses, 1e-6, 1e-2, cut=True)
    assert cut.suggestion == FALLBACK_LR and "below" in cut.reason
    further = [1e-6 * (10 ** (4 * i / 99)) for i in range(80)]  # reached 1e-3 and beyond: its descent counts
    falling = [1.2 - 0.01 * i - (0.3 if i > 60 else 0.0) for i in range(80)]
    assert _suggest(further, falling, falling, 1e-6, 1e-2, cut=True).suggestion != FALLBACK_LR


def test_short_fit_decreases_the_loss_and_writes_everything(fitted, odd_labels):
    result, _out = fitted
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.stop_reason in ("completed", "early stopping") and result.epochs_run >= 2
    assert set(result.val_dice) == {"0", "7", "255"}
    assert len(result.learning_rates) == 1 and np.isfinite(result.learning_rates[0])
    for key in ("curves", "samples", "metrics_csv", "metrics_json", "lr_finder_0"):
        assert result.outputs[key].is_file() and result.outputs[key].stat().st_size > 0, key
    record = json.loads(result.outputs["metrics_json"].read_text())
    assert record["complete"] and len(record["history"]) == result.epochs_run
    header = result.outputs["metrics_csv"].read_text().splitlines()[0]
    assert header.startswith("epoch,phase,lr,train_loss,val_loss,dice_0,dice_7,dice_255")


def test_model_file_loads_predicts_and_maps_labels_back(fitted, odd_labels, small_volume):
    result, out = fitted
    model, meta = load_model(out)
    assert meta.label_values == (0, 7, 255) and meta.classes == 3
    assert meta.n_slices == meta.in_channels == 1 and meta.ignore_label is None
    assert meta.pad_multiple == 8 and meta.model.encoder == "resnet18"
    assert meta.settings["train"]["epochs"] == 4
    training = meta.training
    assert training["stop_reason"] == result.stop_reason and training["best_epoch"] == result.best_epoch
    assert set(training["val_dice"]) == {"0", "7", "255"} and training["learning_rates"]
    assert meta.train_data[0]["shape"] == [40, 48, 56] and meta.train_data[0]["split"]["z"]["val"] > 0
    from volseg_dask.normalize import Normalization, apply

    image, _labels = small_volume
    assert isinstance(meta.normalization, Normalization)
    x = torch.from_numpy(apply(image[20:21, :, :48], meta.normalization))[None]
    with torch.inference_mode():
        pred = model(x).argmax(1).numpy()
    values = np.asarray(meta.label_values)[pred]
    assert set(np.unique(values)) <= {0, 7, 255}


def test_existing_output_is_refused_before_any_work(fitted, odd_labels, monkeypatch):
    _, out = fitted
    monkeypatch.setattr(run_mod, "open_training_volumes", lambda *a, **k: pytest.fail("did work"))
    with pytest.raises(OutputExistsError, match="already exists"):
        train([odd_labels], out, tiny_settings())


def test_bad_inputs_through_train(small_volume, tmp_path):
    image, labels = small_volume
    with pytest.raises(VolumeFormatError, match="do not match the image"):
        train([(image, labels[:-1])], tmp_path / "m.pt", tiny_settings())
    with pytest.raises(VolumeValueError, match="nothing to learn"):
        train([(image, np.ones_like(labels))], tmp_path / "m.pt", tiny_settings())
    with pytest.raises(VolumeValueError, match=r"label values \[9\] do not occur in the training labels"):
        bad = labels.copy()
        bad[0, 0, 0] = 9
        train([(image, labels)], tmp_path / "m.pt", tiny_settings(), validation=[(image, bad)])
    assert not (tmp_path / "m.pt").exists()


def test_same_seed_same_run_with_or_without_workers(small_zarr, tmp_path):
    runs = [train([small_zarr], tmp_path / f"m{w}.pt", tiny_settings(epochs=1, num_workers=w)) for w in (0, 2)]
    a, b = ([h["train_loss"] for h in r.history] + [h["val_loss"] for h in r.history] for r in runs)
    assert a == b
    wa, _ = load_model(tmp_path / "m0.pt")
    wb, _ = load_model(tmp_path / "m2.pt")
    for (k, v), w in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(v, w), k


def test_separate_validation_volumes_and_no_validation(small_volume, tmp_path):
    from volseg_dask.synthetic import make_volume

    image, labels = small_volume
    other = make_volume(32, seed=2)
    result = train([(image, labels)], tmp_path / "a.pt", tiny_settings(epochs=1), validation=[other])
    _, meta = load_model(tmp_path / "a.pt")
    assert meta.validation_data[0]["shape"] == [32, 32, 32] and result.best_val_loss is not None
    assert meta.train_data[0]["split"]["z"]["val"] == 0  # the training volume is used whole
    settings = tiny_settings(epochs=1).with_overrides({"data.validation_fraction": 0.0})
    result = train([(image, labels)], tmp_path / "b.pt", settings)
    assert result.best_val_loss is None and "val_loss" not in result.history[0]


def test_ctrl_c_saves_the_best_model_so_far_and_says_so(small_volume, tmp_path, monkeypatch, caplog):
    image, labels = small_volume
    interrupt_validation(monkeypatch)
    with caplog.at_level("WARNING", logger="volseg_dask.training"):
        result = train([(image, labels)], tmp_path / "m.pt", tiny_settings(epochs=5))
    assert result.stop_reason == "interrupted" and result.best_epoch == 1
    assert "interrupted: saved the best model so far (epoch 1" in caplog.text
    _, meta = load_model(tmp_path / "m.pt")
    assert meta.training["stop_reason"] == "interrupted"

    monkeypatch.setattr(loop_mod.Runner, "validate", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train([(image, labels)], tmp_path / "none.pt", tiny_settings(epochs=5))
    assert not (tmp_path / "none.pt").exists() and not list(tmp_path.glob(".none.pt*"))


def test_time_limit_stops_after_at_least_one_step(small_volume, tmp_path):
    image, labels = small_volume
    result = train([(image, labels)], tmp_path / "m.pt", tiny_settings(epochs=50, max_minutes=0.0))
    assert result.stop_reason == "time limit" and result.epochs_run == 1
    assert load_model(tmp_path / "m.pt")[1].training["stop_reason"] == "time limit"


def test_two_phase_fine_tuning_with_local_encoder_weights(small_volume, tmp_path):
    image, labels = small_volume
    weights = tmp_path / "encoder.pt"
    torch.save(build_model(ModelSettings(**TINY), classes=2).encoder.state_dict(), weights)
    raw = tiny_settings().to_dict()
    raw["model"]["encoder_weights"] = str(weights)
    raw["train"].update(epochs=2, frozen_epochs=1, learning_rate=None, lr_finder_steps=10, encoder_lr_factor=0.1)
    settings = Settings.from_dict(raw)
    result = train([(image, labels)], tmp_path / "m.pt", settings)
    assert [h["phase"] for h in result.history] == ["frozen encoder", "fine-tune"]
    assert len(result.learning_rates) == 2 and "lr_finder_1" in result.outputs

    model = build_model(ModelSettings(**TINY), classes=3)
    frozen = loop_mod.optimizer_factory(model, loop_mod.Phase("f", 1, True, 0.0, False), 0.0)(1e-2)
    assert len(frozen.param_groups) == 1 and not any(p.requires_grad for p in model.encoder.parameters())
    tuned = loop_mod.optimizer_factory(model, loop_mod.Phase("t", 1, False, 0.1, True), 0.0)(1e-2)
    assert [g["lr"] for g in tuned.param_groups] == pytest.approx([1e-2, 1e-3])
    assert all(p.requires_grad for p in model.parameters())


def test_gpu_path_uses_autocast_grad_scaler_and_pinned_memory(small_volume, tmp_path, monkeypatch):
    """No GPU here: the device choice is mocked, tensors stay on the CPU, the CUDA-only parts are recorded."""
    image, labels = small_volume
    seen = {"autocast": [], "scaler": [], "pin_memory": []}

    class FakeScaler:
        def __init__(self, device="cuda", enabled=True):
            seen["scaler"].append((device, enabled))

        def scale(self, loss):
            seen["scaler"].append("scale")
            return loss

        def step(self, optimizer):
            optimizer.step()

        def update(self):
            seen["scaler"].append("update")

        def state_dict(self):  # checkpoints keep the scaler's state
            return {"scale": 1.0}

    def fake_autocast(device, enabled=True):
        seen["autocast"].append((device.type, enabled))
        return contextlib.nullcontext()

    real_loader = torch.utils.data.DataLoader

    def loader(*args, **kwargs):
        seen["pin_memory"].append(kwargs.get("pin_memory"))
        kwargs["pin_memory"] = False
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(run_mod, "select_device", lambda setting: torch.device("cuda"))
    for module in (run_mod, loop_mod, step_mod):
        monkeypatch.setattr(module, "to_device", lambda t, device: t, raising=False)
    for module in (loop_mod, step_mod):
        monkeypatch.setattr(module, "autocast", fake_autocast)
    monkeypatch.setattr(torch.amp, "GradScaler", FakeScaler)
    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    result = train([(image, labels)], tmp_path / "m.pt", tiny_settings(epochs=1, device="auto"))
    assert result.epochs_run == 1
    assert ("cuda", True) in seen["scaler"] and "scale" in seen["scaler"] and "update" in seen["scaler"]
    assert seen["autocast"] and all(a == ("cuda", True) for a in seen["autocast"])
    assert seen["pin_memory"] and all(seen["pin_memory"])
    # with amp off, neither autocast nor loss scaling is enabled
    seen["scaler"].clear()
    seen["autocast"].clear()
    train([(image, labels)], tmp_path / "n.pt", tiny_settings(epochs=1, amp=False))
    assert ("cuda", False) in seen["scaler"] and all(a == ("cuda", False) for a in seen["autocast"])


def test_cli_train_and_models(odd_labels, tmp_path):
    from volseg_dask.cli import cli

    config = tmp_path / "s.yaml"
    tiny_settings().save(config)
    image, labels = odd_labels
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(image), str(labels), "-o", str(tmp_path / "m.pt"), "-c", str(config),
                                 "--epochs", "1", "--lr", "0.002", "--device", "cpu", "--max-minutes", "5"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "m.pt" in result.output and "Dice" in result.output
    _, meta = load_model(tmp_path / "m.pt")
    assert meta.settings["train"]["epochs"] == 1 and meta.settings["train"]["learning_rate"] == 0.002
    again = runner.invoke(cli, ["train", str(image), str(labels), "-o", str(tmp_path / "m.pt"), "-c", str(config)])
    assert again.exit_code == 1 and "already exists" in again.output
    odd = runner.invoke(cli, ["train", str(image), "-o", str(tmp_path / "x.pt")])
    assert odd.exit_code != 0 and "pairs" in odd.output
    listing = runner.invoke(cli, ["models"])
    assert listing.exit_code == 0 and "UnetPlusPlus" in listing.output and "resnet18" in listing.output
