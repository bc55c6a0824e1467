"""The accelerator pipeline: the device thread equals inline bit for bit, bounds what is in flight, the GPU
path (mocked device choice here; real CUDA under ``-m gpu``), and the settings that drive it."""

from __future__ import annotations

import contextlib
import itertools
import threading

import numpy as np
import pytest
import torch
import zarr

from volseg_dask.config import PredictSettings, Settings
from volseg_dask.errors import ConfigError
from volseg_dask.prediction import inference, predict
from volseg_dask.prediction import tasks as tasks_mod
from volseg_dask.synthetic import write_demo_data

from .conftest import make_model_file, read_array


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    """A 40 x 48 x 36 volume in uneven chunks: blocks of 16 x 20 x 16 leave partial blocks on every axis."""
    return write_demo_data(tmp_path_factory.mktemp("pipe"), (40, 48, 36), seed=5, chunks=16)[0]


@pytest.fixture(scope="module")
def model25d(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("m25") / "m.pt", n_slices=3, seed=2)


def _settings(**predict):
    return Settings().with_overrides({"predict.chunks": [16, 20, 16], "predict.halo": 8, "predict.device": "cpu",
                                      **{f"predict.{k}": v for k, v in predict.items()}})


def _outputs(path):
    group = zarr.open_group(str(path), mode="r")
    names = ["labels", "confidence", *(f"probabilities/{a}" for a in group["probabilities"].array_keys())]
    return {name: read_array(path / name) for name in names}


@pytest.mark.parametrize("case", ["2d", "2.5d+tta"])
def test_device_thread_equals_inline_bit_for_bit(vol, tiny_model, model25d, tmp_path, case):
    model, extra = (tiny_model, {}) if case == "2d" else (model25d, {"tta_flips": True, "axes": "zx"})
    inline = predict(vol, model, tmp_path / "i.zarr", _settings(pipeline="inline", **extra))
    queued = predict(vol, model, tmp_path / "d.zarr", _settings(pipeline="device-thread", **extra))
    assert inline.blocks_computed == queued.blocks_computed > 0
    a, b = _outputs(tmp_path / "i.zarr"), _outputs(tmp_path / "d.zarr")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_one_read_per_block_for_all_axes(vol, tiny_model, tmp_path, monkeypatch):
    """A block's axes come from one read of the block and the union of their contexts."""
    reads = []
    real = tasks_mod.read_block

    def counting(volume, grid, block, pads):
        reads.append(block)
        return real(volume, grid, block, pads)

    monkeypatch.setattr(tasks_mod, "read_block", counting)
    result = predict(vol, tiny_model, tmp_path / "o.zarr", _settings())
    blocks = 3 * 3 * 3  # 40/16, 48/20, 36/16 rounded up
    assert len(reads) == blocks and len(set(reads)) == blocks
    assert result.blocks_computed == 3 * blocks  # block-axes


def test_blocks_in_flight_are_bounded(vol, tiny_model, tmp_path, monkeypatch):
    """With a device thread and 3 dask threads: never two blocks on the device at once, at most
    QUEUE_BLOCKS waiting for it, and at most IN_FLIGHT axes of a block submitted but not yet written."""
    import dask

    engine = inference.get_engine(inference.SlabSpec(model_path=str(tiny_model),
                                                     normalization=inference.Normalization(0.0, 1.0), device="cpu"))
    engine.close()
    state = {"pending": 0, "max_pending": 0, "max_queue": 0}
    lock = threading.Lock()
    real_submit = inference.Engine.submit

    def submit(self, block, axis, crop, spec):
        future = real_submit(self, block, axis, crop, spec)
        with lock:
            state["pending"] += 1
            state["max_pending"] = max(state["max_pending"], state["pending"])
            state["max_queue"] = max(state["max_queue"], self._thread.jobs.qsize())

        def taken(_):
            with lock:
                state["pending"] -= 1

        future.add_done_callback(taken)
        return future

    monkeypatch.setattr(inference.Engine, "submit", submit)
    with dask.config.set(scheduler="threads", num_workers=3):
        predict(vol, tiny_model, tmp_path / "o.zarr", _settings(pipeline="device-thread"))
    thread = inference.get_engine(inference.SlabSpec(model_path=str(tiny_model),
                                                     normalization=inference.Normalization(0.0, 1.0),
                                                     device="cpu"))._thread
    assert thread is not None and thread.max_busy == 1
    assert state["max_queue"] <= inference.QUEUE_BLOCKS
    assert 1 < state["max_pending"] <= 3 * tasks_mod.IN_FLIGHT


try:
    from distributed.diagnostics.plugin import SchedulerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    SchedulerPlugin = object  # type: ignore[misc,assignment]


class RecordResources(SchedulerPlugin):
    """A scheduler plugin: the resources each prediction task asked for when it went to a worker."""

    name = "record"

    def __init__(self):
        self.seen = set()
        self.scheduler = None

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing" and str(key).startswith("predict-"):
            self.seen.add(str(self.scheduler.tasks[key].resource_restrictions))


@pytest.mark.distributed
def test_gpu_worker_threads_share_the_device_thread(vol, tiny_model, tmp_path):
    """A LocalCluster worker with 2 threads and GPU=1 (the GPU-node set-up): each block task asks for half
    the GPU, both threads run block tasks at once, the worker's one device thread runs one block at a time,
    and the result equals the threaded one."""
    from distributed import Client, LocalCluster, get_task_stream

    reference = predict(vol, tiny_model, tmp_path / "t.zarr", _settings(pipeline="device-thread"))
    with LocalCluster(n_workers=1, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.register_plugin(RecordResources())
        settings = _settings(pipeline="device-thread").with_overrides({"predict.device": "auto"})
        with get_task_stream(client) as stream:
            result = predict(vol, tiny_model, tmp_path / "c.zarr", settings)
        asked = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.plugins["record"].seen))

        def device_thread_busy():
            engines = list(inference._ENGINES.values())
            return max(e._thread.max_busy for e in engines if e._thread is not None)

        busy = client.run(device_thread_busy)
    assert result.blocks_computed == reference.blocks_computed
    assert asked == [str({"GPU": 0.5})]
    assert list(busy.values()) == [1]
    spans = sorted((t["startstops"][0]["start"], t["startstops"][-1]["stop"]) for t in stream.data
                   if str(t["key"]).startswith("predict-"))
    assert any(b0 < a1 for (_, a1), (b0, _) in itertools.pairwise(spans)), "block tasks never overlapped"
    for name, value in _outputs(tmp_path / "t.zarr").items():
        np.testing.assert_array_equal(read_array(tmp_path / "c.zarr" / name), value, err_msg=name)


def test_gpu_path_with_the_device_choice_mocked(vol, tiny_model, tmp_path, monkeypatch):
    """No GPU here: the device choice says CUDA, tensors stay on the host. The CUDA-only parts are recorded:
    float16 autocast, pinned staging buffers, non-blocking copies, cudnn.benchmark, the auto batch size from
    the free device memory; and the result equals the CPU's."""
    reference = _outputs(predict(vol, tiny_model, tmp_path / "cpu.zarr", _settings()).output)
    seen: dict[str, list] = {"autocast": [], "pinned": [], "copies": [], "events": 0, "probe": []}
    cuda = torch.device("cuda", 0)

    def fake_autocast(device, enabled=True, dtype="float16"):
        seen["autocast"].append((device.type, enabled, dtype))
        return contextlib.nullcontext()

    def to_device(t, device):
        if isinstance(t, torch.Tensor):
            seen["copies"].append(device.type)
        return t

    class Event:
        def synchronize(self):
            seen["events"] += 1

    class Pool(inference._PinnedPool):
        def take(self, nbytes):
            seen["pinned"].append(nbytes)
            return torch.empty(nbytes, dtype=torch.uint8)

    per_plane = 10 * 2**20
    allocated = {"now": 0}
    monkeypatch.setattr(inference, "select_device", lambda setting: cuda)
    monkeypatch.setattr(inference, "to_device", to_device)
    monkeypatch.setattr(inference, "autocast", fake_autocast)
    monkeypatch.setattr(inference, "_event", Event)
    monkeypatch.setattr(inference, "_PinnedPool", Pool)
    monkeypatch.setattr(inference, "_device_context", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["now"] + 2 * per_plane)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (700 * 2**20, 1000 * 2**20))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with monkeypatch.context() as m:
        real_probe = inference.Engine._probe_batch

        def probe(self, spec, channels, h, w):
            batch = real_probe(self, spec, channels, h, w)
            seen["probe"].append(((channels, h, w), batch))
            return batch

        m.setattr(inference.Engine, "_probe_batch", probe)
        monkeypatch.setattr(inference, "_ENGINES", {})
        result = predict(vol, tiny_model, tmp_path / "gpu.zarr", _settings(device="cuda"))
    assert torch.backends.cudnn.benchmark is True
    assert seen["autocast"] and set(seen["autocast"]) == {("cuda", True, "float16")}
    assert seen["pinned"] and seen["copies"] and set(seen["copies"]) == {"cuda"} and seen["events"]
    # 700 MB free, 10 MB per plane: half of the free memory holds 35 planes -> 32, the largest power of two
    assert seen["probe"] and {b for _, b in seen["probe"]} == {32}
    got = _outputs(result.output)
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    seen["autocast"].clear()
    monkeypatch.setattr(inference, "_ENGINES", {})
    predict(vol, tiny_model, tmp_path / "bf.zarr", _settings(device="cuda", amp_dtype="bfloat16", batch_size=3))
    assert set(seen["autocast"]) == {("cuda", True, "bfloat16")}


def test_auto_batch_is_four_on_the_cpu_and_an_explicit_number_wins(tiny_model):
    spec = inference.SlabSpec(model_path=str(tiny_model), normalization=inference.Normalization(0.0, 1.0),
                              device="cpu")
    engine = inference.get_engine(spec)
    assert engine.batch_size(spec, 1, 100, 90) == inference.CPU_BATCH == 4
    assert engine.batch_size(inference.SlabSpec(**{**spec.__dict__, "batch_size": 7}), 1, 100, 90) == 7


def test_pipeline_settings_are_checked():
    assert PredictSettings().batch_size == "auto" and PredictSettings(batch_size=16).batch_size == 16
    for bad, message in ((0, "below the minimum 1"), ("many", "expected a number or 'auto', found 'many'")):
        with pytest.raises(ConfigError, match=f"predict.batch_size: .*{message}"):
            PredictSettings(batch_size=bad)
    with pytest.raises(ConfigError, match="predict.pipeline"):
        PredictSettings(pipeline="gpu")
    with pytest.raises(ConfigError, match="predict.amp_dtype"):
        PredictSettings(amp_dtype="float8")


def test_raw_dtypes_reach_the_device_as_they_are():
    """uint8, uint16, int16 and float32 blocks give the same probabilities as their float32 values."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 60000, (6, 20, 24)).astype(np.float32)
    torch_values = {}
    for dtype in (np.uint16, np.float32, np.int32):
        host, unsigned = inference._as_torch(values.astype(dtype))
        torch_values[dtype] = inference._widen(host, unsigned).numpy()
    for got in torch_values.values():
        np.testing.assert_array_equal(got, values)
    host, unsigned = inference._as_torch(np.array([[[0, 255]]], np.uint8))
    assert unsigned is None and inference._widen(host, unsigned).tolist() == [[[0.0, 255.0]]]


@pytest.mark.gpu
def test_cuda_labels_match_the_cpu(vol, tiny_model, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu = predict(vol, tiny_model, tmp_path / "c.zarr", _settings())
    gpu = predict(vol, tiny_model, tmp_path / "g.zarr", _settings(device="cuda"))
    agree = np.mean(read_array(cpu.output / "labels") == read_array(gpu.output / "labels"))
    assert agree >= 0.999
    engine = next(iter(inference._ENGINES.values()))
    assert engine.device.type == "cuda" and engine.pinned is not None and engine._auto_batch
    assert all(b >= 1 for b in engine._auto_batch.values())
