"""Forward passes over every checkpoint, streamed into one shard per checkpoint.

:func:`extract_checkpoints` loads each checkpoint of a folder in step order,
runs the dataset through it batch by batch in eval mode under
``torch.inference_mode()``, and writes the activations of the selected probe
sites to ``<out_dir>/<checkpoint name>.h5`` (layout in ``docs/shards.md``).
Only one batch of activations is held in memory at a time.

A shard is skipped when a shard of the same ``shard_id`` already exists. The
id hashes the checkpoint bytes, the dataset fingerprint and the extraction
settings (the ``sites`` request, pooling, storage dtype and shard schema
version), so deciding to skip reads the checkpoint's bytes but does not load
the model. Batch size and device are not part of the id because they change
stored values by float32 rounding at most: a BLAS library may pick another
summation order for another batch size or device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from probecvx.atomic import remove_stale_temp_files
from probecvx.checkpoints import (
    CheckpointRef,
    checkpoint_sha256,
    discover_checkpoints,
    load_model,
)
from probecvx.datasets import ProbeDataset
from probecvx.errors import ExtractionError, InvalidInputError, ShardError
from probecvx.shards import (
    SHARD_SCHEMA_VERSION,
    SHARD_SUFFIX,
    STORAGE_DTYPES,
    ShardWriter,
    read_shard_info,
)
from probecvx.sites import (
    SiteInfo,
    SiteRecorder,
    check_pooling,
    eval_mode,
    list_sites,
    select_sites,
)

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
# Rows of the dry batch that sites are listed on; fixed, so that the listing
# does not depend on --batch-size.
DRY_BATCH_ROWS = 4


@dataclass(frozen=True)
class ShardRecord:
    """Outcome for the shard of one checkpoint.

    ``status`` is ``written``, or ``skipped`` when a current shard already
    existed. ``seconds`` is the wall time spent on it, hashing included.
    """

    checkpoint: str
    step: int | None
    path: Path
    status: str
    shard_id: str
    n_sites: int
    seconds: float


@dataclass
class ExtractSummary:
    """The shards of one :func:`extract_checkpoints` run, in step order."""

    records: list[ShardRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def written(self) -> list[ShardRecord]:
        """Shards written by this run."""
        return [record for record in self.records if record.status == "written"]

    @property
    def skipped(self) -> list[ShardRecord]:
        """Shards left as they were because they were already current."""
        return [record for record in self.records if record.status == "skipped"]


@dataclass(frozen=True)
class _Settings:
    """Extraction settings that decide the content of a shard."""

    sites: tuple[str, ...] | None
    pooling: str
    dtype: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "sites": None if self.sites is None else list(self.sites),
                "pooling": self.pooling,
                "storage_dtype": self.dtype,
                "shard_schema_version": SHARD_SCHEMA_VERSION,
            },
            sort_keys=True,
        )

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def extract_checkpoints(
    checkpoint_dir: Path,
    dataset: ProbeDataset,
    out_dir: Path,
    *,
    model_factory: Callable[[], nn.Module] | None = None,
    pattern: str | None = None,
    sites: Sequence[str] | None = None,
    pooling: str = "none",
    dtype: str = "float32",
    batch_size: int = 256,
    device: str = "auto",
    trust: bool = False,
    force: bool = False,
    progress: bool = True,
    on_shard: Callable[[ShardRecord], object] | None = None,
) -> ExtractSummary:
    """Write one shard of activations per checkpoint in ``checkpoint_dir``.

    Parameters
    ----------
    checkpoint_dir : Path
        Folder of checkpoints, see :func:`probecvx.checkpoints.discover_checkpoints`.
    dataset : ProbeDataset
        The samples to run through each model.
    out_dir : Path
        Folder for the shards; created if missing.
    model_factory : callable, optional
        Builds the untrained model that weight-only checkpoints are loaded
        into; not needed for TorchScript and pickled modules.
    pattern : str, optional
        Glob that selects checkpoint files (``--glob``).
    sites : sequence of str, optional
        Site names, globs and ``type:`` filters, see
        :func:`probecvx.sites.select_sites`. Default: the input and every
        leaf module.
    pooling : {"none", "avg", "max"}, default="none"
        Spatial pooling of sites with 3 or more dimensions per sample.
    dtype : {"float32", "float16"}, default="float32"
        Storage dtype. float16 halves the size; values beyond ±65504 are
        clipped, counted in the site's ``overflow_count`` and warned about.
    batch_size : int, default=256
        Samples per forward pass. It changes stored values by float32 rounding
        at most, and not at all where the kernels sum in the same order.
    device : {"auto", "cpu", "cuda", "mps"} or "cuda:N", default="auto"
        ``auto`` picks CUDA if available, else MPS, else the CPU.
    trust : bool, default=False
        Allow pickled modules to be unpickled (``--trust-checkpoints``).
    force : bool, default=False
        Rewrite shards that are already current.
    progress : bool, default=True
        Show a progress bar over batches on stderr.
    on_shard : callable, optional
        Called with each :class:`ShardRecord` as soon as its shard is written
        or skipped.

    Returns
    -------
    ExtractSummary

    Raises
    ------
    InvalidInputError
        For an invalid option, a missing checkpoint folder, or an output
        folder that cannot be created or written.
    CheckpointError
        When a checkpoint cannot be loaded.
    ExtractionError
        When a forward pass fails, produces NaN or infinite values, or a
        shard cannot be written.
    """
    settings = _check_settings(sites, pooling, dtype, batch_size)
    torch_device = resolve_device(device)
    refs = discover_checkpoints(Path(checkpoint_dir), pattern)
    out_dir = prepare_out_dir(Path(out_dir))

    # NOTE: this also deletes the temporary file of another extract writing to
    # the same folder right now, which then fails; run one extract per folder.
    removed = remove_stale_temp_files(out_dir)
    if removed:
        logger.info(
            "removed %d temporary files of a killed run in %s", len(removed), out_dir
        )

    started = time.perf_counter()
    summary = ExtractSummary()
    n_batches = -(-dataset.n_samples // batch_size)
    with tqdm(
        total=n_batches * len(refs),
        unit="batch",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for ref in refs:
            bar.set_description(ref.name)
            record = _extract_or_skip(
                ref,
                dataset,
                out_dir,
                settings,
                model_factory=model_factory,
                batch_size=batch_size,
                device=torch_device,
                trust=trust,
                force=force,
                on_batch=bar.update,
            )
            if record.status == "skipped":
                bar.update(n_batches)
            summary.records.append(record)
            if on_shard is not None:
                on_shard(record)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "extraction done in %.1f s: %d shards written, %d skipped as current",
        summary.seconds,
        len(summary.written),
        len(summary.skipped),
    )
    return summary


def resolve_device(device: str) -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises
    ------
    InvalidInputError
        For another name, or a device that this machine does not have.
    """
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    kind, _, index = name.partition(":")
    if kind not in DEVICES[1:] or (index and (kind != "cuda" or not index.isdigit())):
        raise InvalidInputError(
            f"invalid device {device!r}; choose auto, cpu, cuda, cuda:N or mps"
        )
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidInputError(
                f"device {device!r} requested but CUDA is not available on this "
                "machine; use --device cpu or --device auto"
            )
        if index and int(index) >= count:
            raise InvalidInputError(
                f"device {device!r} requested but this machine has {count} CUDA "
                f"devices (cuda:0 to cuda:{count - 1}); pick one of those"
            )
    if kind == "mps" and not _mps_available():
        raise InvalidInputError(
            f"device {device!r} requested but MPS is not available on this "
            "machine; use --device cpu or --device auto"
        )
    return torch.device(name)


def prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` if missing and check that files can be created in it.

    Raises
    ------
    InvalidInputError
        When it is a file, cannot be created, or is not writable.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(
            f"output folder {out_dir} is a file; pass a folder to --out"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A real file creation catches read-only mounts that os.access misses.
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise InvalidInputError(
            f"output folder {out_dir} cannot be created or written "
            f"({err.strerror or err}); pass a folder you can write to with --out"
        ) from err
    return out_dir


def shard_id_for(
    checkpoint_hash: str, dataset_fingerprint: str, settings_hash: str
) -> str:
    """Return the sha256 that identifies a shard's content."""
    text = f"{checkpoint_hash}\n{dataset_fingerprint}\n{settings_hash}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_settings(
    sites: Sequence[str] | None, pooling: str, dtype: str, batch_size: int
) -> _Settings:
    check_pooling(pooling)
    if dtype not in STORAGE_DTYPES:
        raise InvalidInputError(
            f"invalid storage dtype {dtype!r}; "
            f"choose one of {', '.join(STORAGE_DTYPES)}"
        )
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise InvalidInputError(
            f"invalid batch size {batch_size!r}; give a positive integer"
        )
    requested = None
    if sites is not None:
        if isinstance(sites, str):
            raise TypeError("sites must be a sequence of names, not one string")
        requested = tuple(name.strip() for name in sites if name.strip())
        if not requested:
            raise InvalidInputError(
                "the list of probe sites is empty; name at least one site or "
                "leave --sites out to probe every leaf module"
            )
    return _Settings(sites=requested, pooling=pooling, dtype=dtype)


def _extract_or_skip(
    ref: CheckpointRef,
    dataset: ProbeDataset,
    out_dir: Path,
    settings: _Settings,
    *,
    model_factory: Callable[[], nn.Module] | None,
    batch_size: int,
    device: torch.device,
    trust: bool,
    force: bool,
    on_batch: Callable[[int], object],
) -> ShardRecord:
    """Write the shard of one checkpoint unless a current one exists."""
    started = time.perf_counter()
    final = out_dir / f"{ref.name}{SHARD_SUFFIX}"
    checkpoint_hash = checkpoint_sha256(ref.path)
    shard_id = shard_id_for(checkpoint_hash, dataset.fingerprint, settings.hash())

    if not force:
        current_sites = _current_shard_sites(final, shard_id)
        if current_sites is not None:
            seconds = time.perf_counter() - started
            logger.info("shard %s is current, skipped", final)
            return ShardRecord(
                ref.name, ref.step, final, "skipped", shard_id, current_sites, seconds
            )

    attrs = _shard_attrs(ref, checkpoint_hash, dataset, settings, shard_id)
    model = load_model(ref, model_factory, trust=trust, map_location=str(device))
    model.to(device)
    try:
        n_sites, overflow = _write_shard(
            model, dataset, final, attrs, settings, batch_size, device, on_batch
        )
    except ExtractionError as err:
        raise ExtractionError(f"checkpoint {ref.name} ({ref.path}): {err}") from err

    if overflow:
        counts = ", ".join(f"{site} ({count})" for site, count in overflow.items())
        warnings.warn(
            f"checkpoint {ref.name}: {sum(overflow.values())} values exceeded the "
            f"float16 range ±{FLOAT16_MAX:g} and were clipped, in sites {counts}; "
            "use --dtype float32 to store them exactly",
            UserWarning,
            stacklevel=3,
        )
    seconds = time.perf_counter() - started
    logger.info(
        "wrote shard %s: %d sites, %d samples, %.1f s",
        final,
        n_sites,
        dataset.n_samples,
        seconds,
    )
    return ShardRecord(ref.name, ref.step, final, "written", shard_id, n_sites, seconds)


def _shard_attrs(
    ref: CheckpointRef,
    checkpoint_hash: str,
    dataset: ProbeDataset,
    settings: _Settings,
    shard_id: str,
) -> dict[str, str | int]:
    """Return the root attributes of a shard, see ``docs/shards.md``."""
    return {
        "checkpoint_name": ref.name,
        "checkpoint_path": str(ref.path),
        "checkpoint_kind": ref.kind,
        "step": -1 if ref.step is None else int(ref.step),
        "checkpoint_sha256": checkpoint_hash,
        "dataset_name": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
        "settings_json": settings.to_json(),
        "settings_hash": settings.hash(),
        "shard_id": shard_id,
        "storage_dtype": settings.dtype,
        "pooling": settings.pooling,
        "torch_version": torch.__version__,
    }


def _current_shard_sites(final: Path, shard_id: str) -> int | None:
    """Return the site count of the shard at ``final`` if its id is ``shard_id``."""
    if not final.exists():
        return None
    try:
        info = read_shard_info(final)
    except ShardError as err:
        logger.warning("rewriting unreadable shard %s: %s", final, err)
        return None
    if info.shard_id != shard_id:
        logger.info("shard %s is stale (checkpoint, data or settings changed)", final)
        return None
    return len(info.sites)


def _write_shard(
    model: nn.Module,
    dataset: ProbeDataset,
    final: Path,
    attrs: dict[str, str | int],
    settings: _Settings,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], object],
) -> tuple[int, dict[str, int]]:
    """Stream the dataset through ``model`` into a shard at ``final``.

    Returns the number of sites and the float16 overflow count of each site
    that had any.
    """
    overflow: dict[str, int] = {}
    with eval_mode(model), torch.inference_mode():
        selected = _select_on_dry_batch(model, dataset, settings, device)
        with (
            ShardWriter(
                final,
                attrs=attrs,
                labels=dataset.labels,
                class_names=dataset.class_names,
                split=dataset.split,
                sample_ids=dataset.sample_ids,
            ) as writer,
            SiteRecorder(model, selected) as recorder,
        ):
            for info in selected:
                writer.create_site(
                    info.name, info.n_features, settings.dtype, _site_attrs(info)
                )

            next_row = 0
            for rows, batch in dataset.iter_batches(batch_size):
                activations = recorder.run(batch.to(device))
                for info in selected:
                    values = _to_storage(
                        activations[info.name],
                        info.name,
                        next_row,
                        settings.dtype,
                        overflow,
                    )
                    writer.write_rows(info.name, next_row, values)
                next_row += len(rows)
                on_batch(1)

            for info in selected:
                writer.set_site_attrs(
                    info.name, {"overflow_count": overflow.get(info.name, 0)}
                )
    return len(selected), {site: count for site, count in overflow.items() if count}


def _select_on_dry_batch(
    model: nn.Module, dataset: ProbeDataset, settings: _Settings, device: torch.device
) -> list[SiteInfo]:
    _, dry_batch = next(dataset.iter_batches(DRY_BATCH_ROWS))
    infos = list_sites(model, dry_batch.to(device), pooling=settings.pooling)
    return select_sites(infos, settings.sites)


def _site_attrs(info: SiteInfo) -> dict[str, object]:
    return {
        "site": info.name,
        "module_type": info.module_type,
        "original_shape": np.asarray(info.output_shape, dtype=np.int64),
        "call_index": info.call_index,
        "pooling": info.pooling,
        "overflow_count": 0,
    }


def _to_storage(
    values: torch.Tensor,
    site: str,
    first_row: int,
    dtype: str,
    overflow: dict[str, int],
) -> np.ndarray:
    """Check one batch of a site for NaN/Inf and convert it to the storage dtype."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad_rows = (~finite).any(dim=1).nonzero()
        row = first_row + int(bad_rows[0, 0])
        count = int((~finite).sum())
        raise ExtractionError(
            f"probe site {site} has {count} NaN or infinite values in this batch, "
            f"first in sample row {row}; the model diverged at this checkpoint or "
            "the input is out of range, so leave the checkpoint out with --glob or "
            "the site out with --sites"
        )

    array = values.to(device="cpu", dtype=torch.float32).numpy()
    if dtype == "float32":
        return array
    too_large = np.abs(array) > FLOAT16_MAX
    overflow[site] = overflow.get(site, 0) + int(np.count_nonzero(too_large))
    return np.clip(array, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
