"""The examples users copy from: the notebook runs top to bottom, the cluster recipes work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from volseg_dask.config import Settings
from volseg_dask.prediction import predict
from volseg_dask.synthetic import write_demo_data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_output(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("nb")
    image, labels = write_demo_data(root, 32, seed=4, chunks=16)
    s = Settings().with_overrides({"predict.chunks": [16, 16, 16], "predict.halo": 8})
    return predict(image, tiny_model, root / "prediction.zarr", s).output, image, labels


def test_notebook_runs_top_to_bottom(tiny_output, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    out, image, labels = tiny_output
    monkeypatch.setenv("VOLSEG_OUTPUT", str(out))
    monkeypatch.setenv("VOLSEG_IMAGE", str(image))
    monkeypatch.setenv("VOLSEG_TRUTH", str(labels))
    nb = nbformat.read(EXAMPLES / "explore_outputs.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "pyramid levels" in text and "axes disagree on" in text and "mean Dice" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


def test_slurm_recipe_asks_for_one_gpu_per_worker():
    pytest.importorskip("dask_jobqueue")
    module = _load("slurm_predict")
    cluster = module.make_cluster(queue="gpu", account="proj", walltime="01:00:00", memory="16GB")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script and "#SBATCH -A proj" in script
    assert "--resources GPU=1" in script and "--nthreads 4" in script and "--lifetime 55m" in script


def test_slurm_recipe_on_cpu_nodes_asks_for_no_gpu():
    pytest.importorskip("dask_jobqueue")
    module = _load("slurm_predict")
    cluster = module.make_cluster(queue="debug", memory="2GB", cores=1, gres="", lifetime=None, python="/opt/py",
                                  prologue=["export PYTHONPATH=/src"])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "--gres" not in script and "GPU=1" not in script and "--lifetime" not in script
    assert "--nthreads 1" in script  # one per core of a CPU-only job
    assert "export PYTHONPATH=/src" in script and "/opt/py -m distributed.cli.dask_worker" in script


@pytest.mark.distributed
def test_local_cluster_example_runs(tiny_output, tiny_model, tmp_path, capsys):
    _, image, _ = tiny_output
    module = _load("local_cluster")
    module.main([str(image), str(tiny_model), str(tmp_path / "o.zarr"), "--workers", "1", "--chunks", "32"])
    assert "voxels per class" in capsys.readouterr().out
