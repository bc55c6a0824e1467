"""The ``volseg`` command: argument parsing, logging and progress set-up, calls into the API.

Nothing here does work of its own; every command maps onto one API function. A
:class:`~volseg_dask.errors.VolsegError` becomes one line on stderr and exit code 1 (``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .cluster import GPU_WORKER_THREADS
from .errors import VolsegError

log = logging.getLogger("volseg_dask.cli")


class _State:
    def __init__(self, verbose: int, quiet: bool, debug: bool) -> None:
        self.verbose, self.quiet, self.debug = verbose, quiet, debug

    @property
    def progress(self) -> bool:
        """A progress bar: on a terminal, unless quiet."""
        return not self.quiet and sys.stderr.isatty() and os.environ.get("CI") != "true"

    @property
    def blocks(self) -> bool | str:
        """Progress of block-wise work: a bar on a terminal, else a line per ~5 % (batch logs), unless quiet."""
        return True if self.progress else (False if self.quiet else "lines")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's walltime, ``kill``) delivered as an interrupt, so clean-ups run."""


_TERMINATED: list[int] = []  # set once SIGTERM arrived, for the exit code of a command that handled it itself


def _on_sigterm(signum: int, frame: Any) -> None:
    _TERMINATED.append(signum)
    raise Terminated()


def _more_verbose(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """``-v``/``-q``/``--debug`` given after the subcommand (``volseg predict ... -v``): update the state."""
    state = ctx.find_object(_State)
    if state is None or not value:
        return
    if param.name == "verbose":
        state.verbose += int(value)
    elif param.name == "quiet":
        state.quiet = True
    else:
        state.debug = True
    _setup_logging(state.verbose, state.quiet)


class _Command(click.Command):
    """A subcommand that also takes the group's ``-v``, ``-q`` and ``--debug``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_more_verbose,
                         help="More log output (-v info, -vv debug)."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_more_verbose,
                         help="Errors only; no progress bars."),
            click.Option(["--debug"], is_flag=True, expose_value=False, callback=_more_verbose,
                         help="Show full tracebacks."),
        ]


class _Group(click.Group):
    """Turns our errors into one clear line and a non-zero exit code."""

    command_class = _Command
    group_class = type  # subgroups are _Group too

    def invoke(self, ctx: click.Context) -> Any:
        def debug() -> bool:  # read when an error arrives: a subcommand's --debug is parsed after this starts
            state = ctx.find_object(_State)
            return bool(ctx.params.get("debug")) or bool(state is not None and state.debug)

        try:
            return super().invoke(ctx)
        except VolsegError as exc:
            if debug():
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except click.UsageError as exc:  # one line, like our own errors, instead of click's usage block
            if debug():
                raise
            command = exc.ctx.command_path if exc.ctx else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            if debug():
                raise
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            hint = _RESUME_HINTS.get(ctx.invoked_subcommand or "", "rerun the command to finish (predict resumes "
                                     "where it stopped)")
            click.echo(f"{what}; {hint}", err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)


_RESUME_HINTS = {"train": "rerun the same command to resume training from its last checkpoint (MODEL.ckpt beside "
                          "the model, once an epoch has finished; --restart starts afresh)"}
"""How to finish an interrupted command, where it is not rerunning it as it was."""

_BATCH_PROGRESS_LOGGERS = ("volseg_dask.training.progress",)
"""Loggers of progress lines (one per epoch): shown without -v when stderr is not a terminal (batch jobs)."""


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("volseg_dask")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    batch = not quiet and not sys.stderr.isatty()  # no progress bars there: a line now and then instead
    for name in _BATCH_PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if batch and level > logging.INFO else logging.NOTSET)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="volseg")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Errors only; no progress bars.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """Segment large 3D volumes with 2D networks trained on small labelled regions.

    \b
    volseg convert  raw.h5:/data raw.zarr
    volseg train    raw.zarr labels.zarr -o model.pt
    volseg predict  big.zarr model.pt -o seg.zarr
    volseg fuse fit held_out_pred.zarr held_out_labels.zarr -o fused.pt --model model.pt
    volseg evaluate seg.zarr/labels truth.zarr
    volseg export   seg.zarr/labels seg.tif
    volseg demo
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    _setup_logging(verbose, quiet)
    ctx.obj = _State(verbose, quiet, debug)


def _chunks(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give one size (128) or three (64,128,128)") from None
    if len(parts) not in (1, 3) or min(parts) < 1:
        raise click.BadParameter(f"{value!r}: give one size (128) or three (64,128,128), all positive")
    return parts * 3 if len(parts) == 1 else parts


# ---- data -------------------------------------------------------------------------------------


def _scheduler_options(func: Any) -> Any:
    func = click.option("--scheduler", "address", default=None, metavar="ADDRESS",
                        help="Run on an existing dask scheduler (tcp://host:8786).")(func)
    func = click.option("--workers", type=click.IntRange(1), default=None,
                        help="Start a local dask-distributed cluster of N worker processes.")(func)
    return func


@cli.command()
@click.argument("src")
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--chunks", default="128", show_default=True, help="Zarr chunk shape: N or Z,Y,X.")
@click.option("--codec", default="zstd", show_default=True,
              type=click.Choice(["zstd", "lz4", "lz4hc", "zlib", "blosclz"]), help="Blosc compressor.")
@click.option("--clevel", default=5, show_default=True, type=click.IntRange(0, 9), help="Compression level.")
@click.option("--region", default=None, metavar="Z0:Z1,Y0:Y1,X0:X1",
              help="Only this box of SRC (e.g. the image crop of a labelled sub-volume); ':' is a whole axis.")
@click.option("--overwrite", is_flag=True, help="Replace DST once the new array is complete.")
@_scheduler_options
@click.pass_obj
def convert(state: _State, src: str, dst: Path, chunks: str, codec: str, clevel: int, region: str | None,
            overwrite: bool, workers: int | None, address: str | None) -> None:
    """Convert a volume (TIFF, TIFF folder, HDF5 file.h5:/key, NPY, MRC, Zarr), or a box of it, to Zarr v3."""
    from .cluster import dask_scheduler
    from .io.conversion import convert as api

    with dask_scheduler(workers, address, echo=click.echo):
        out = api(src, dst, chunks=_chunks(chunks) or (128,) * 3, codec=codec, clevel=clevel, overwrite=overwrite,
                  progress=state.progress, region=region)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--compression", default=None, help="TIFF: zlib/zstd/lzw; HDF5: gzip/lzf. Default none.")
@click.option("--overwrite", is_flag=True, help="Replace DST once the new file is complete.")
@click.pass_obj
def export(state: _State, src: str, dst: str, compression: str | None, overwrite: bool) -> None:
    """Export a volume to .tif, .h5[:key], .npy, or a folder of TIFF slices (DST without suffix)."""
    from .io.conversion import export as api

    out = api(src, dst, overwrite=overwrite, compression=compression, progress=state.progress)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: str, as_json: bool) -> None:
    """Shape, dtype, chunks, codec, size on disk and value range (on a sample) of a volume."""
    from .io.volume import volume_info

    details = volume_info(path)
    if as_json:
        click.echo(json.dumps(details, indent=2))
        return
    width = max(len(k) for k in details)
    for key, value in details.items():
        if isinstance(value, int) and key.endswith("_bytes"):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:<{width}}  {value}")


@cli.command("demo-data")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shape", default="256", show_default=True, help="Volume shape: N or Z,Y,X.")
@click.option("--seed", default=0, show_default=True, type=int, help="Scene seed.")
@click.option("--chunks", default=128, show_default=True, type=click.IntRange(8), help="Zarr chunk edge.")
@click.option("--overwrite", is_flag=True, help="Replace existing image.zarr / labels.zarr.")
@click.pass_obj
def demo_data(state: _State, out: Path, shape: str, seed: int, chunks: int, overwrite: bool) -> None:
    """Write a synthetic SXCT-like volume (sand, brine, gas) and its labels to OUT/{image,labels}.zarr."""
    from .synthetic import write_demo_data

    image, labels = write_demo_data(out, _chunks(shape) or 256, seed, chunks=chunks, overwrite=overwrite,
                                    progress=state.progress)
    click.echo(f"wrote {image} and {labels}")


@cli.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(path_type=Path),
              help="Folder for every demo output (the demo's own files in it are replaced).")
@click.option("--size", default=192, show_default=True, type=click.IntRange(64),
              help="Edge of the unseen volume predicted out-of-core.")
@click.option("--train-size", default=160, show_default=True, type=click.IntRange(64),
              help="Edge of the labelled training volume.")
@click.option("--minutes", type=click.FloatRange(0.1), default=None, help="Training time budget (default 3).")
@click.option("--seed", default=0, show_default=True, type=int, help="Scene seed.")
@click.pass_obj
def demo(state: _State, out: Path, size: int, train_size: int, minutes: float | None, seed: int) -> None:
    """Run the whole flow on the built-in synthetic CT volume: train, predict, evaluate."""
    from .demo import run_demo

    run_demo(out, size=size, train_size=train_size, seed=seed, minutes=minutes, progress=state.progress,
             echo=click.echo)


# ---- settings ----------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Write, show and check settings files."""


@config.command("write-defaults")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--preset", type=click.Choice(["default", "cpu"]), default="default", show_default=True,
              help="'cpu': the demo's light network (MobileNetV3-small encoder, 128-px slices), for machines "
              "without a GPU.")
def config_write_defaults(file: Path, overwrite: bool, preset: str) -> None:
    """Write every setting with its default and a comment to FILE (YAML)."""
    from .config import Settings
    from .demo import cpu_settings
    from .outputs import check_output_path

    check_output_path(file, overwrite)
    (cpu_settings() if preset == "cpu" else Settings()).save(file)
    click.echo(f"wrote {file}")


@config.command("show")
@click.argument("file", required=False, type=click.Path(path_type=Path))
def config_show(file: Path | None) -> None:
    """Print the effective settings (FILE merged over the defaults), validated."""
    from .config import load_settings

    click.echo(load_settings(file).to_yaml())


@config.command("reference")
def config_reference() -> None:
    """Print the settings reference (Markdown), generated from the settings dataclasses."""
    from .config import settings_reference_markdown

    click.echo(settings_reference_markdown())


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE; print 'ok' or the first problem."""
    from .config import load_settings

    load_settings(file)
    click.echo(f"{file}: ok")


# ---- training -----------------------------------------------------------------------------------


def _pairs(values: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    if not values or len(values) % 2:
        raise click.UsageError(f"{what}: give IMAGE LABELS pairs (an even number of paths), found {len(values)} "
                               f"path(s): {' '.join(values) or 'none'}")
    return list(zip(values[::2], values[1::2]))


@cli.command("train")
@click.argument("volumes", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Model file to write (.pt).")
@click.option("-c", "--config", "config_file", type=click.Path(path_type=Path), help="Settings YAML.")
@click.option("--validation", "validation", nargs=2, multiple=True, metavar="IMAGE LABELS",
              help="A volume used only for validation (repeatable); default: hold out slabs of the training ones.")
@click.option("--epochs", type=int, help="Maximum number of epochs.")
@click.option("--lr", type=float, help="Peak learning rate (skips the learning-rate range test).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--max-minutes", type=float,
              help="Stop after this much wall time, over all attempts of a resumed run (the best model is kept).")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="Fine-tune this model file (model.init_from): its network and weights are the start.")
@click.option("--restart", is_flag=True, help="Delete the checkpoint of an unfinished run and start afresh.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model file.")
@click.option("--fit-fusion", "fusion_pair", nargs=2, default=None, metavar="IMAGE LABELS",
              help="After training, predict this labelled volume (not one trained on) and fit a learned fusion of "
              "the axes into the model file (`volseg fuse fit`).")
@click.option("--fusion-kind", type=click.Choice(["linear", "conv"]), default="conv", show_default=True,
              help="The fusion model --fit-fusion fits.")
@click.pass_obj
def train_command(state: _State, volumes: tuple[str, ...], output: Path, config_file: Path | None,
                  validation: tuple[tuple[str, str], ...], epochs: int | None, lr: float | None, device: str | None,
                  max_minutes: float | None, init_from: Path | None, restart: bool, overwrite: bool,
                  fusion_pair: tuple[str, str] | None, fusion_kind: str) -> None:
    """Train a 2D model on slices of labelled volumes: IMAGE LABELS [IMAGE LABELS ...].

    Slices along z, y and x are read lazily from any format `convert` reads; label values may be any
    integers. Plots and metrics are written beside the model, and a checkpoint every epoch: rerunning
    an interrupted or killed command resumes it. Ctrl-C stops training and saves the best model so
    far. Started by torchrun or srun, the processes train together (README: multi-GPU training).
    """
    from .config import load_settings
    from .training.distributed import env_ranks
    from .training.run import train as api

    pairs = _pairs(volumes, "volseg train")
    settings = load_settings(config_file, {"train.epochs": epochs, "train.learning_rate": lr,
                                           "train.device": device, "train.max_minutes": max_minutes,
                                           "model.init_from": None if init_from is None else str(init_from)})
    rank = env_ranks()[0]
    if rank and state.verbose < 2:  # the other ranks say only what goes wrong (-vv: everything)
        logging.getLogger("volseg_dask").setLevel(logging.ERROR)
    if fusion_pair:
        from .prediction.fusion_fit import check_labelled_volume

        check_labelled_volume(*fusion_pair)  # before training, not after it
    result = api(pairs, output, settings, validation=[(a, b) for a, b in validation] or None, overwrite=overwrite,
                 progress=state.progress and not rank, restart=restart)
    if not rank:
        _train_summary(result)
        if fusion_pair and result.stop_reason != "interrupted":
            from .prediction.fusion_fit import fit_fusion_on_volume

            click.echo(f"fitting a {fusion_kind} fusion of the axes on {fusion_pair[0]} ...")
            fusion = fit_fusion_on_volume(result.model_path, *fusion_pair, kind=fusion_kind, settings=settings,
                                          progress=state.progress)
            click.echo(fusion.summary())
    if result.stop_reason == "interrupted":
        # the best model so far, not a finished one: a batch script can tell
        click.get_current_context().exit(143 if _TERMINATED else 130)


def _train_summary(result: Any) -> None:
    dice = ", ".join(f"{label}: {'-' if d is None else f'{d:.3f}'}" for label, d in result.val_dice.items())
    lrs = ", ".join(f"{v:.3g}" for v in result.learning_rates)
    click.echo(f"wrote {result.model_path} ({result.epochs_run} epochs, best {result.best_epoch}, stopped: "
               f"{result.stop_reason}; {result.seconds:.0f} s; learning rate {lrs})")
    click.echo(f"validation Dice per label value: {dice or 'n/a (no validation data)'}")


@cli.command("models")
@click.option("--encoders", "encoder_filter", default=None, metavar="TEXT",
              help="Only encoders whose name contains TEXT (e.g. resnet, efficientnet).")
def models_command(encoder_filter: str | None) -> None:
    """List the architectures and encoders the installed segmentation-models-pytorch offers."""
    from .models import architectures, encoder_names

    click.echo("architectures: " + ", ".join(sorted(architectures())))
    names = [n for n in encoder_names() if encoder_filter is None or encoder_filter.lower() in n.lower()]
    native = [n for n in names if not n.startswith("tu-")]
    timm = [n for n in names if n.startswith("tu-")]
    click.echo(f"encoders ({len(native)}): " + ", ".join(native))
    click.echo(f"timm encoders ({len(timm)}, as tu-NAME): " + ", ".join(timm))


# ---- prediction ---------------------------------------------------------------------------------


def _peak_memory(workers: int | None, address: str | None) -> str:
    """``, peak memory N MB`` of this process, where that is where the work ran."""
    if workers or address:
        return ""  # the work ran in worker processes: see the dashboard
    from .memory import peak_rss_mb

    return f", peak memory {peak_rss_mb():.0f} MB"


@cli.command()
@click.argument("volume")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output Zarr folder.")
@click.option("-c", "--config", "config_file", type=click.Path(path_type=Path), help="Settings YAML.")
@click.option("--axes", help="z, y, x, any combination (zyx), or all12 (3 axes x 4 rotations).")
@click.option("--merge", "merge_method", type=click.Choice(["auto", "max", "mean", "vote", "learned"]),
              help="Vote across axes; learned: the fusion in MODEL (`volseg fuse fit`); auto (default): learned "
              "when MODEL has one, else max.")
@click.option("--chunks", help="Block (= output chunk) shape: N or Z,Y,X.")
@click.option("--halo", type=int, help="In-plane context around each block (voxels).")
@click.option("--batch-size", help="Planes per forward pass, or auto (from the GPU's free memory; 4 on the CPU).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--pipeline", type=click.Choice(["auto", "device-thread", "inline"]),
              help="device-thread: one thread per worker feeds the device while the others read and write.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help=f"Threads per worker of --workers (default 1 on the CPU; {GPU_WORKER_THREADS} with --device "
              "cuda, each worker on its own GPU).")
@click.option("--fused/--per-axis", default=None, help="All axes in one task; write only labels and extras.")
@click.option("--tta-flips/--no-tta-flips", default=None, help="Also predict flipped planes.")
@click.option("--keep-probabilities/--no-keep-probabilities", default=None,
              help="Keep the per-axis probability arrays after the merge.")
@click.option("--confidence/--no-confidence", default=None, help="Write the merged confidence.")
@click.option("--entropy/--no-entropy", default=None, help="Write the per-voxel entropy.")
@click.option("--disagreement/--no-disagreement", default=None, help="Write how many axes disagree.")
@click.option("--normalization", type=click.Choice(["model", "recompute"]),
              help="Reuse the training intensity statistics, or measure this volume.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@_scheduler_options
@click.pass_obj
def predict(state: _State, volume: str, model: Path, output: Path, config_file: Path | None, axes: str | None,
            merge_method: str | None, chunks: str | None, halo: int | None, batch_size: str | None,
            device: str | None, pipeline: str | None, threads: int | None, fused: bool | None,
            tta_flips: bool | None, keep_probabilities: bool | None, confidence: bool | None, entropy: bool | None,
            disagreement: bool | None, normalization: str | None, overwrite: bool, workers: int | None,
            address: str | None) -> None:
    """Segment VOLUME with MODEL, out-of-core; rerunning an interrupted command resumes it."""
    from .cluster import dask_scheduler
    from .config import load_settings
    from .prediction.run import predict as api

    batch: int | str | None = batch_size
    if batch_size is not None and batch_size != "auto":
        try:
            batch = int(batch_size)
        except ValueError:
            raise click.BadParameter(f"{batch_size!r}: give a number of planes or auto",
                                     param_hint="--batch-size") from None
    settings = load_settings(config_file, {
        "predict.axes": axes, "predict.merge": merge_method, "predict.chunks": _chunks(chunks),
        "predict.halo": halo, "predict.batch_size": batch, "predict.device": device, "predict.pipeline": pipeline,
        "predict.fused": fused, "predict.tta_flips": tta_flips, "predict.keep_probabilities": keep_probabilities,
        "predict.confidence": confidence, "predict.entropy": entropy, "predict.disagreement": disagreement,
        "predict.normalization": normalization,
    })
    gpus = settings.predict.device.startswith("cuda")
    with dask_scheduler(workers, address, echo=click.echo, gpus=gpus,
                        threads_per_worker=threads or (GPU_WORKER_THREADS if gpus else 1)):
        result = api(volume, model, output, settings, overwrite=overwrite, progress=state.blocks)
    click.echo(f"wrote {result.output} ({result.blocks_computed} blocks computed, {result.blocks_skipped} already "
               f"done; {result.seconds:.1f} s, {result.voxels_per_second / 1e6:.2f} Mvoxel/s"
               f"{_peak_memory(workers, address)})")


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["max", "mean", "vote", "learned"]),
              help="Default: as recorded by predict. learned: the fusion of --model.")
@click.option("--model", "fusion_model", type=click.Path(path_type=Path), default=None,
              help="learned: the model file with the fusion (default: the one that predicted OUTPUT).")
@click.option("--confidence/--no-confidence", default=None, help="Write the merged confidence.")
@click.option("--entropy/--no-entropy", default=None, help="Write the per-voxel entropy.")
@click.option("--disagreement/--no-disagreement", default=None, help="Write how many axes disagree.")
@click.option("--keep-probabilities/--no-keep-probabilities", default=True, show_default=True,
              help="Keep the per-axis probability arrays.")
@_scheduler_options
@click.pass_obj
def merge(state: _State, output: Path, method: str | None, fusion_model: Path | None, confidence: bool | None,
          entropy: bool | None, disagreement: bool | None, keep_probabilities: bool, workers: int | None,
          address: str | None) -> None:
    """(Re)merge the per-axis probabilities of a prediction OUTPUT into labels."""
    from .cluster import dask_scheduler
    from .prediction.merging import merge as api

    flags = {"confidence": confidence, "entropy": entropy, "disagreement": disagreement}
    outputs = None
    if any(v is not None for v in flags.values()):
        import zarr

        from .outputs import status

        recorded = set((status(zarr.open_group(str(output), mode="r")) or {}).get("outputs", []))
        outputs = [n for n in ("confidence", "entropy", "disagreement")
                   if flags[n] or (flags[n] is None and n in recorded)]
    with dask_scheduler(workers, address, echo=click.echo):
        api(output, method=method, outputs=outputs, keep_probabilities=keep_probabilities, model=fusion_model,
            progress=state.blocks)
    click.echo(f"wrote {output / 'labels'}")


@cli.group()
def fuse() -> None:
    """Learned fusion of the per-axis probabilities (instead of max / mean / vote)."""


@fuse.command("fit")
@click.argument("prediction", type=click.Path(path_type=Path))
@click.argument("truth")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Model file to write: MODEL's network plus the fusion (.pt).")
@click.option("--model", required=True, type=click.Path(path_type=Path),
              help="The model file that predicted PREDICTION.")
@click.option("--kind", type=click.Choice(["linear", "conv"]), default="conv", show_default=True,
              help="linear: a weight per axis and class; conv: a 3x3x3 convolution over the axes' probabilities.")
@click.option("--samples", type=click.IntRange(100), default=200_000, show_default=True,
              help="Voxels sampled for the fit (equal shares per class).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--ignore-label", type=int, default=None, help="Truth value left out (besides the model's own).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@_scheduler_options
@click.pass_obj
def fuse_fit(state: _State, prediction: Path, truth: str, output: Path, model: Path, kind: str, samples: int,
             seed: int, ignore_label: int | None, overwrite: bool, workers: int | None, address: str | None) -> None:
    """Fit a fusion on PREDICTION (`volseg predict` of a labelled volume, probabilities kept) and its TRUTH.

    Use a labelled volume the network did not train on; then `volseg predict ... --merge learned`
    or `volseg merge OUT.zarr --method learned --model OUTPUT` apply it.
    """
    from .cluster import dask_scheduler
    from .prediction.fusion_fit import fit_fusion as api

    with dask_scheduler(workers, address, echo=click.echo):
        result = api(prediction, truth, output, model=model, kind=kind, samples=samples, seed=seed,
                     ignore_label=ignore_label, overwrite=overwrite, progress=state.progress)
    click.echo(result.summary())


@cli.command()
@click.argument("prediction")
@click.argument("truth")
@click.option("--ignore-label", type=int, default=None, help="Truth value left out of the scores.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the scores as JSON to this file ('-' prints JSON instead of the table).")
@_scheduler_options
@click.pass_obj
def evaluate(state: _State, prediction: str, truth: str, ignore_label: int | None, json_path: Path | None,
             workers: int | None, address: str | None) -> None:
    """Per-class Dice and IoU of PREDICTION against TRUTH (label volumes), blockwise."""
    from .cluster import dask_scheduler
    from .metrics import evaluate as api

    to_stdout = json_path is not None and str(json_path) == "-"
    with dask_scheduler(workers, address, echo=click.echo):
        result = api(prediction, truth, ignore_label=ignore_label,
                     json_path=None if to_stdout else json_path, progress=state.progress)
    click.echo(json.dumps(result.to_dict(), indent=2) if to_stdout else result.table())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``volseg`` console script."""
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    cli.main(args=argv, prog_name="volseg")


if __name__ == "__main__":  # pragma: no cover
    main()
