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

For batch jobs, ``shard=(I, N)`` gives task ``I`` of ``N`` its part of the
checkpoints, balanced by file size. Before writing a shard, a process claims
it with the hidden file ``.<checkpoint name>.h5.claim`` (see
:mod:`probecvx.claims`), so two jobs that overlap by mistake do not extract
the same checkpoint twice. With ``keep_going``, a checkpoint that fails is
recorded in ``.<checkpoint name>.h5.failed.json`` and the others are still
extracted. Later runs skip it until ``retry_failed``, unless they load or run
it differently: another model, ``trust``, batch size or device (see
:func:`_attempt_settings`), because any of those can make it succeed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from probecvx import cluster
from probecvx.atomic import (
    output_folder,
    remove_stale_temp_files,
    write_text_atomic,
)
from probecvx.checkpoints import (
    CheckpointRef,
    ModelFactory,
    checkpoint_sha256,
    discover_checkpoints,
    load_model,
)
from probecvx.claims import (
    CLAIM_SUFFIX,
    DEFAULT_CLAIM_TIMEOUT,
    Claim,
    Owner,
    check_claim_timeout,
    remove_stale_claims,
    slurm_task_label,
    try_claim,
    utc_now,
)
from probecvx.datasets import ProbeDataset
from probecvx.errors import (
    CheckpointError,
    ExtractionError,
    InvalidInputError,
    ShardError,
)
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


#: Suffix of the hidden file beside a shard that records why its checkpoint
#: failed (with ``keep_going``). Its claim is ``.<name>.h5`` + CLAIM_SUFFIX.
FAILURE_SUFFIX = ".failed.json"
FAILURE_FORMAT = "probecvx-extract-failure"


@dataclass(frozen=True)
class ShardRecord:
    """Outcome for the shard of one checkpoint.

    ``status`` is one of:

    - ``written``;
    - ``skipped``, when a current shard already existed;
    - ``failed``, with the ``error``, when the checkpoint failed in this run
      or in an earlier one (with ``keep_going``);
    - ``claimed``, when another live process was writing it.

    ``seconds`` is the wall time spent on it, hashing included.
    """

    checkpoint: str
    step: int | None
    path: Path
    status: str
    shard_id: str
    n_sites: int
    seconds: float
    error: str | None = None


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

    @property
    def failed(self) -> list[ShardRecord]:
        """Checkpoints that failed, in this run or in an earlier one."""
        return [record for record in self.records if record.status == "failed"]

    @property
    def claimed(self) -> list[ShardRecord]:
        """Checkpoints left to another process that was writing their shard."""
        return [record for record in self.records if record.status == "claimed"]


@dataclass(frozen=True)
class _Settings:
    """Extraction settings that decide the content of a shard."""

    sites: tuple[str, ...] | None
    pooling: str
    dtype: str

    def to_json(self) -> str:
        settings: dict[str, object] = {
            "sites": None if self.sites is None else list(self.sites),
            "pooling": self.pooling,
            "storage_dtype": self.dtype,
            "shard_schema_version": SHARD_SCHEMA_VERSION,
        }
        if self.pooling != "none":
            # Shards written without this key pooled the input site too. The
            # key changes the id of pooled shards only, so those are rewritten.
            settings["input_pooled"] = False
        return json.dumps(settings, sort_keys=True)

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
    shard: tuple[int, int] | None = None,
    keep_going: bool = False,
    retry_failed: bool = False,
    hdf5_locking: str | None = None,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    task: str | None = None,
) -> ExtractSummary:
    """Write one shard of activations per checkpoint in ``checkpoint_dir``.

    Parameters
    ----------
    checkpoint_dir : Path
        Folder of checkpoints, see :func:`probecvx.checkpoints.discover_checkpoints`.
    dataset : ProbeDataset
        The samples to run through each model.
    out_dir : Path
        Folder for the shards; created if missing. A folder created by this
        call is removed again when the call raises before writing any file.
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
        Spatial pooling of module outputs with 3 or more dimensions per
        sample, such as (C, H, W), to C features. The ``input`` site is
        never pooled.
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
        Called with each :class:`ShardRecord` as soon as its shard is written,
        skipped, failed or left to another process.
    shard : tuple of (int, int), optional
        ``(I, N)``: extract only the checkpoints of task ``I`` of ``N``
        (``0 <= I < N``). Every task computes the same partition, balanced by
        checkpoint size. Default: every checkpoint.
    keep_going : bool, default=False
        Record a checkpoint that cannot be loaded or run in a hidden
        ``.<name>.h5.failed.json`` file and go on with the others, instead of
        raising. Later runs skip it until ``retry_failed``.
    retry_failed : bool, default=False
        Extract the checkpoints recorded as failed by an earlier run.
    hdf5_locking : {"true", "false", "best-effort"}, optional
        HDF5 file locking of the shards being written, see
        :func:`probecvx.cluster.hdf5_locking`.
    claim_timeout : float, default=600
        Seconds without a heartbeat after which another process's claim on a
        checkpoint counts as stale and is broken.
    task : str, optional
        Label of this task in shards and logs; default the SLURM job and
        array task ids, else ``I/N`` of ``shard``.

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
    shard = cluster.check_shard(shard)
    claim_timeout = check_claim_timeout(claim_timeout)
    cluster.check_hdf5_locking(hdf5_locking)
    refs = discover_checkpoints(Path(checkpoint_dir), pattern)
    refs = _refs_of_shard(refs, shard)
    if task is None:
        task = slurm_task_label()
    if task is None and shard is not None:
        task = f"{shard[0]}/{shard[1]}"
    # A run that fails before it writes anything removes the folder it created.
    with output_folder(Path(out_dir)) as out_dir, cluster.hdf5_locking(hdf5_locking):
        job = _Job(
            out_dir=out_dir,
            settings=settings,
            owner=Owner.new_run(task),
            claim_timeout=claim_timeout,
            force=force,
            keep_going=keep_going,
            retry_failed=retry_failed,
            attempt=_attempt_settings(model_factory, trust, batch_size, torch_device),
        )
        return _extract_all(
            refs,
            dataset,
            job,
            model_factory=model_factory,
            batch_size=batch_size,
            device=torch_device,
            trust=trust,
            progress=progress,
            on_shard=on_shard,
        )


def _extract_all(
    refs: list[CheckpointRef],
    dataset: ProbeDataset,
    job: _Job,
    *,
    model_factory: Callable[[], nn.Module] | None,
    batch_size: int,
    device: torch.device,
    trust: bool,
    progress: bool,
    on_shard: Callable[[ShardRecord], object] | None,
) -> ExtractSummary:
    """Clean ``job.out_dir`` of dead runs' files, then extract or skip each ref."""
    out_dir = job.out_dir
    # Only files of processes that are gone are removed, so a job may start
    # while another one writes to the same folder.
    removed = remove_stale_temp_files(out_dir)
    if removed:
        logger.info(
            "removed %d temporary files of a killed run in %s", len(removed), out_dir
        )
    remove_stale_claims(
        out_dir, f".*{SHARD_SUFFIX}{CLAIM_SUFFIX}", timeout=job.claim_timeout
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
            batches = _BatchCounter(bar.update)
            record = _extract_or_skip(
                ref,
                dataset,
                job,
                model_factory=model_factory,
                batch_size=batch_size,
                device=device,
                trust=trust,
                on_batch=batches,
            )
            bar.update(n_batches - batches.count)
            summary.records.append(record)
            if on_shard is not None:
                on_shard(record)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "extraction done in %.1f s: %d shards written, %d skipped as current, "
        "%d failed, %d left to other processes",
        summary.seconds,
        len(summary.written),
        len(summary.skipped),
        len(summary.failed),
        len(summary.claimed),
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


@dataclass(frozen=True)
class _Job:
    """The settings of one extract run that every checkpoint shares."""

    out_dir: Path
    settings: _Settings
    owner: Owner
    claim_timeout: float
    force: bool
    keep_going: bool
    retry_failed: bool
    # The load and run settings of this run, stored in failure records.
    attempt: dict[str, Any]


class _BatchCounter:
    """Forward progress updates and count them, to complete the bar on a skip."""

    def __init__(self, update: Callable[[int], object]) -> None:
        self.update = update
        self.count = 0

    def __call__(self, n: int) -> None:
        self.count += n
        self.update(n)


def _refs_of_shard(
    refs: list[CheckpointRef], shard: tuple[int, int] | None
) -> list[CheckpointRef]:
    """Return the checkpoints of task ``shard``, balanced by checkpoint size."""
    if shard is None:
        return refs
    costs = [float(_checkpoint_bytes(ref.path)) for ref in refs]
    mine = [refs[i] for i in cluster.items_of_shard(costs, shard)]
    logger.info(
        "task shard %d/%d: %d of %d checkpoints",
        shard[0],
        shard[1],
        len(mine),
        len(refs),
    )
    return mine


def _checkpoint_bytes(path: Path) -> int:
    """Return the size of a checkpoint file, or of every file in its folder."""
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def claim_path_of(final: Path) -> Path:
    """Return the hidden claim file of the shard at ``final``."""
    return final.with_name(f".{final.name}{CLAIM_SUFFIX}")


def failure_path_of(final: Path) -> Path:
    """Return the hidden failure record of the shard at ``final``."""
    return final.with_name(f".{final.name}{FAILURE_SUFFIX}")


def read_failure(final: Path) -> dict[str, Any] | None:
    """Return the failure recorded for the shard at ``final``, or None."""
    path = failure_path_of(final)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable failure record %s (%s)", path, err)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FAILURE_FORMAT:
        logger.warning("ignoring malformed failure record %s", path)
        return None
    return doc


def _extract_or_skip(
    ref: CheckpointRef,
    dataset: ProbeDataset,
    job: _Job,
    *,
    model_factory: Callable[[], nn.Module] | None,
    batch_size: int,
    device: torch.device,
    trust: bool,
    on_batch: Callable[[int], object],
) -> ShardRecord:
    """Write the shard of one checkpoint unless it is current, failed or claimed."""
    started = time.perf_counter()
    final = job.out_dir / f"{ref.name}{SHARD_SUFFIX}"
    checkpoint_hash = checkpoint_sha256(ref.path)
    shard_id = shard_id_for(checkpoint_hash, dataset.fingerprint, job.settings.hash())

    def outcome(status: str, n_sites: int = 0, error: str | None = None) -> ShardRecord:
        seconds = time.perf_counter() - started
        return ShardRecord(
            ref.name, ref.step, final, status, shard_id, n_sites, seconds, error
        )

    if not job.force:
        current_sites = _current_shard_sites(final, shard_id)
        if current_sites is not None:
            logger.info("shard %s is current, skipped", final)
            return outcome("skipped", current_sites)
        earlier = _earlier_failure(final, shard_id, job)
        if earlier is not None:
            return outcome("failed", error=earlier)

    held = try_claim(claim_path_of(final), job.owner, timeout=job.claim_timeout)
    if not isinstance(held, Claim):
        logger.info(
            "checkpoint %s is claimed by %s; left to it", ref.name, held.describe()
        )
        return outcome("claimed")
    with held:
        if not job.force:
            # Another process may have written the shard just before the claim.
            current_sites = _current_shard_sites(final, shard_id, log=False)
            if current_sites is not None:
                logger.info("shard %s was written by another process", final)
                return outcome("skipped", current_sites)
        try:
            n_sites = _load_and_write(
                ref,
                dataset,
                final,
                job,
                _shard_attrs(ref, checkpoint_hash, dataset, job.settings, shard_id),
                model_factory=model_factory,
                batch_size=batch_size,
                device=device,
                trust=trust,
                on_batch=on_batch,
            )
        except (CheckpointError, ExtractionError) as err:
            if not job.keep_going:
                raise
            _write_failure(final, shard_id, str(err), job)
            logger.error("checkpoint %s failed, going on: %s", ref.name, err)
            return outcome("failed", error=str(err))
    with contextlib.suppress(FileNotFoundError):
        failure_path_of(final).unlink()
    return outcome("written", n_sites)


def _earlier_failure(final: Path, shard_id: str, job: _Job) -> str | None:
    """Return the error of a failure recorded for this shard id, unless retried."""
    failure = read_failure(final)
    if failure is None or failure.get("shard_id") != shard_id:
        return None
    if job.retry_failed:
        logger.info("retrying %s, which failed in an earlier run", final)
        return None
    earlier_attempt = failure.get("attempt")
    if earlier_attempt != job.attempt:
        # Records written before attempts were stored have none; retry those too.
        changed = sorted(
            key
            for key in job.attempt
            if not isinstance(earlier_attempt, dict)
            or earlier_attempt.get(key) != job.attempt[key]
        )
        logger.info(
            "retrying %s, which failed in an earlier run with other settings (%s)",
            final,
            ", ".join(changed) or "not recorded",
        )
        return None
    error = str(failure.get("error"))
    logger.warning(
        "skipping %s: it failed in an earlier run with the same settings (%s); "
        "pass --retry-failed to extract it again",
        final,
        error,
    )
    return f"failed in an earlier run: {error}"


def _attempt_settings(
    model_factory: Callable[[], nn.Module] | None,
    trust: bool,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """Return the settings that decide whether a checkpoint loads and runs.

    They are not part of the shard id, because they do not change the stored
    activations. But a checkpoint that failed with some of them may succeed
    with others, such as ``trust`` for a pickled module, another model, or a
    smaller batch size after running out of memory.
    """
    return {
        "model": _describe_factory(model_factory),
        "trust_checkpoints": bool(trust),
        "batch_size": int(batch_size),
        "device": str(device),
    }


def _describe_factory(factory: object) -> str | None:
    """Return a text that names a model factory the same way in every process."""
    if factory is None:
        return None
    if isinstance(factory, ModelFactory):
        return f"{factory.spec} {factory.kwargs_json or ''}".strip()
    if isinstance(factory, functools.partial):
        keywords = ", ".join(
            f"{key}={value!r}" for key, value in sorted(factory.keywords.items())
        )
        return f"{_describe_factory(factory.func)}(*{factory.args!r}, {keywords})"
    # Classes and functions by name, because a function's repr contains its
    # memory address.
    module = getattr(factory, "__module__", type(factory).__module__)
    name = getattr(factory, "__qualname__", type(factory).__qualname__)
    return f"{module}:{name}"


def _write_failure(final: Path, shard_id: str, error: str, job: _Job) -> None:
    doc = {
        "format": FAILURE_FORMAT,
        "checkpoint": final.stem,
        "shard_id": shard_id,
        "attempt": job.attempt,
        "error": error,
        "provenance": {**job.owner.here().record(), "time": utc_now()},
    }
    write_text_atomic(failure_path_of(final), json.dumps(doc, indent=1) + "\n")


def _load_and_write(
    ref: CheckpointRef,
    dataset: ProbeDataset,
    final: Path,
    job: _Job,
    attrs: dict[str, str | int],
    *,
    model_factory: Callable[[], nn.Module] | None,
    batch_size: int,
    device: torch.device,
    trust: bool,
    on_batch: Callable[[int], object],
) -> int:
    """Load one checkpoint and write its shard; return the number of sites."""
    started = time.perf_counter()
    provenance = {**job.owner.here().record(), "started": utc_now()}
    attrs = {**attrs, "provenance_json": json.dumps(provenance, sort_keys=True)}
    model = load_model(ref, model_factory, trust=trust, map_location=str(device))
    model.to(device)
    try:
        n_sites, overflow = _write_shard(
            model, dataset, final, attrs, job.settings, batch_size, device, on_batch
        )
    except ExtractionError as err:
        message = cluster.explain_lock_error(str(err))
        raise ExtractionError(f"checkpoint {ref.name} ({ref.path}): {message}") from err

    if overflow:
        counts = ", ".join(f"{site} ({count})" for site, count in overflow.items())
        warnings.warn(
            f"checkpoint {ref.name}: {sum(overflow.values())} values exceeded the "
            f"float16 range ±{FLOAT16_MAX:g} and were clipped, in sites {counts}; "
            "use --dtype float32 to store them exactly",
            UserWarning,
            stacklevel=4,
        )
    logger.info(
        "wrote shard %s on %s: %d sites, %d samples, %.1f s",
        final,
        job.owner.here().label(),
        n_sites,
        dataset.n_samples,
        time.perf_counter() - started,
    )
    return n_sites


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


def _current_shard_sites(final: Path, shard_id: str, *, log: bool = True) -> int | None:
    """Return the site count of the shard at ``final`` if its id is ``shard_id``.

    With ``log``, say why an existing shard is not current.
    """
    if not final.exists():
        return None
    try:
        info = read_shard_info(final)
    except ShardError as err:
        if log:
            logger.warning(
                "shard %s is unreadable, so this run extracts it again to "
                "replace it. Read error: %s",
                final,
                _without_advice(str(err)),
            )
        return None
    if info.shard_id != shard_id:
        if log:
            logger.info(
                "shard %s is stale (checkpoint, data or settings changed)", final
            )
        return None
    return len(info.sites)


def _without_advice(message: str) -> str:
    """Drop the advice to re-run `probecvx extract` from a shard error message.

    Shard errors end with advice such as "delete it and re-run `probecvx
    extract`", which is for readers of the shard. Extraction replaces the
    shard itself, so that advice does not apply here.
    """
    problem, separator, advice = message.rpartition("; ")
    if separator and "probecvx extract" in advice:
        return problem
    return message


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
