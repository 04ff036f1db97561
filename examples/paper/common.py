"""Steps shared by the paper reproductions: data, checkpoints and the probe run.

Each reproduction trains (or only initialises) a model in torch, saves its
checkpoints as state_dicts, then hands them to probecvx itself:
:func:`probe_checkpoints` runs ``extract_checkpoints``, ``fit_shards`` and
``load_table``, the library functions behind ``probecvx extract``, ``fit`` and
``report``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from probecvx.checkpoints import resolve_model_factory
from probecvx.datasets import SPLIT_CODES, ProbeDataset
from probecvx.extract import extract_checkpoints
from probecvx.fit import fit_shards
from probecvx.plots import write_report_figures
from probecvx.reports import load_table

logger = logging.getLogger(__name__)

MODELS_MODULE = "examples.paper.models"
SIZES = ("quick", "paper")
# Written next to the checkpoints when training ends; see load_training_record.
TRAINING_RECORD = "training.json"


@dataclass(frozen=True)
class ProbeRun:
    """The folders of one probe run: checkpoints, shards, reports and figures."""

    checkpoint_dir: Path
    acts_dir: Path
    reports_dir: Path
    figures_dir: Path

    @classmethod
    def under(cls, root: Path) -> ProbeRun:
        """Lay a run out in ``root``: checkpoints/, acts/, reports/, figures/."""
        return cls(
            checkpoint_dir=root / "checkpoints",
            acts_dir=root / "acts",
            reports_dir=root / "reports",
            figures_dir=root / "figures",
        )


def save_checkpoint(model: nn.Module, step: int, checkpoint_dir: Path) -> Path:
    """Save ``model``'s state_dict and the training step as ``step_{step:06d}.pt``."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / f"step_{step:06d}.pt"
    torch.save({"state_dict": model.state_dict(), "step": step}, path)
    return path


def load_training_record(
    run: ProbeRun, settings: Mapping[str, Any]
) -> list[dict[str, Any]] | None:
    """Return the history of an earlier training run with equal ``settings``.

    Training is seeded, so a run with equal settings saved the same
    checkpoints. Returns None, and training must run, when ``training.json``
    is missing, was written for other settings, or a checkpoint it lists is
    missing.
    """
    path = run.checkpoint_dir / TRAINING_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != json.loads(json.dumps(settings)):
        return None
    history: list[dict[str, Any]] = record["history"]
    for entry in history:
        if not (run.checkpoint_dir / f"step_{entry['step']:06d}.pt").is_file():
            return None
    return history


def write_training_record(
    run: ProbeRun, settings: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> None:
    """Record the settings and history of a finished training run."""
    doc = {"settings": dict(settings), "history": list(history)}
    write_json(run.checkpoint_dir / TRAINING_RECORD, doc)


def split_tensors(
    dataset: ProbeDataset, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the inputs and labels of one split (``train``, ``val``, ``test``).

    Training uses the rows that the probes also train on, so that the probes'
    test rows are never seen by the model either.
    """
    if not isinstance(dataset.inputs, np.ndarray):
        raise TypeError(
            f"dataset {dataset.name!r} holds a torch Dataset; the reproductions "
            "train on array data"
        )
    rows = np.flatnonzero(dataset.split == SPLIT_CODES[split])
    inputs = torch.from_numpy(np.asarray(dataset.inputs[rows], dtype=np.float32))
    labels = torch.from_numpy(dataset.labels[rows].astype(np.int64))
    return inputs, labels


def error_rate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the model's misclassification rate on ``inputs``, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            wrong = 0
            for start in range(0, len(labels), 1024):
                logits = model(inputs[start : start + 1024])
                predicted = logits.argmax(dim=1)
                wrong += int((predicted != labels[start : start + 1024]).sum())
    finally:
        model.train(was_training)
    return wrong / max(len(labels), 1)


def probe_checkpoints(
    run: ProbeRun,
    dataset: ProbeDataset,
    model_name: str,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    sites: Sequence[str] | None = None,
    early_stopping: bool = False,
    warm_start: bool = True,
    Cs: Sequence[float] | None = None,
    n_jobs: int = 1,
    figures: bool = True,
    animate: bool = False,
) -> list[dict[str, Any]]:
    """Probe every checkpoint of ``run`` with probecvx and return the table.

    Parameters
    ----------
    run : ProbeRun
        Its checkpoint folder must contain the saved state_dicts.
    dataset : ProbeDataset
        The samples the probes are fitted and scored on.
    model_name : str
        Class in :mod:`examples.paper.models` that the state_dicts load into.
    model_kwargs : mapping, optional
        Keyword arguments of that class (``--model-kwargs``).
    sites : sequence of str, optional
        Probe sites (names or globs); default every site.
    early_stopping : bool, default=False
        Stop each probe when its val loss stops improving (``--early-stopping``).
    warm_start : bool, default=True
        Start each probe from the previous checkpoint's solution for its site
        (``--no-warm-start`` turns it off).
    Cs : sequence of float, optional
        Inverse penalty strengths tried per probe; default probecvx's grid.
    n_jobs : int, default=1
        Probes fitted in parallel.
    figures : bool, default=True
        Also write probecvx's report figures into ``run.figures_dir``.
    animate : bool, default=False
        Also write the per-site bars over checkpoints as a GIF.

    Returns
    -------
    list of dict
        The records of :func:`probecvx.reports.load_table`.
    """
    kwargs_json = json.dumps(dict(model_kwargs or {}), sort_keys=True)
    factory = resolve_model_factory(f"{MODELS_MODULE}:{model_name}", kwargs_json)
    extract_checkpoints(
        run.checkpoint_dir,
        dataset,
        run.acts_dir,
        model_factory=factory,
        sites=None if sites is None else list(sites),
        progress=False,
    )
    summary = fit_shards(
        run.acts_dir,
        run.reports_dir,
        Cs=Cs,
        early_stopping=early_stopping,
        warm_start=warm_start,
        n_jobs=n_jobs,
        progress=False,
    )
    if not summary.ok:
        logger.warning(
            "%d probes failed in %s: %s",
            summary.n_failed,
            run.reports_dir,
            summary.failed_units[:3],
        )
    records = load_table(run.reports_dir)
    if figures:
        write_report_figures(
            records, run.figures_dir, animate="gif" if animate else None
        )
    return records


def errors_by_site(
    records: Sequence[Mapping[str, Any]], key: str = "test_error"
) -> dict[int | None, dict[str, float]]:
    """Arrange ``key`` of each record as ``{step: {site: error}}``."""
    table: dict[int | None, dict[str, float]] = {}
    for record in records:
        value = record[key]
        table.setdefault(record["step"], {})[record["site"]] = (
            float("nan") if value is None else float(value)
        )
    return table


def site_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the probe sites of ``records`` in forward order."""
    orders = {record["site"]: record["site_order"] for record in records}
    return sorted(orders, key=orders.__getitem__)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def limit_threads(n_threads: int) -> None:
    """Use at most ``n_threads`` torch and BLAS threads in this process.

    The models and probes here are small: a probe on 1,000 rows of 128
    features makes GEMMs too small to split across threads. OpenBLAS threads
    that wait for a busy core made such probes about 10 times slower than one
    thread on a 2-core machine shared with other jobs.
    """
    torch.set_num_threads(n_threads)
    threadpool_limits(limits=n_threads)
