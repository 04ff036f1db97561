"""The built-in end-to-end example: train a small convnet, then probe every layer.

:func:`run_demo` trains :class:`DemoConvNet` on scikit-learn's 8x8 digits (or
on MNIST-style data given with ``data``), saves checkpoints from step 0
(untrained) onwards, and runs the whole pipeline over them: extraction into
shards, probe fits into reports, then the table and figures. It is what
``probecvx demo`` runs.

The network has two blocks of 5x5 convolution, ReLU and 2x2 max-pooling, a
fully-connected hidden layer with ReLU, and a linear classifier. That is the
layer sequence of the MNIST convnet in TensorFlow's example
``tutorials/image/mnist/convolutional.py`` (tensorflow/models), without its
dropout.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shlex
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from probecvx.atomic import atomic_path, prepare_out_dir, write_text_atomic
from probecvx.datasets import SPLIT_CODES, ProbeDataset, load_dataset
from probecvx.errors import InvalidInputError
from probecvx.extract import extract_checkpoints
from probecvx.fit import fit_shards
from probecvx.plots import HTML_NAME, build_error_grid, write_report_figures
from probecvx.reports import load_table

logger = logging.getLogger(__name__)

MODEL_SPEC = "probecvx.demo:DemoConvNet"
DEFAULT_OUT_DIR = Path("probecvx-demo")
MARKER_NAME = "probecvx-demo.json"
MARKER_FORMAT = "probecvx-demo"
SUBFOLDERS = ("checkpoints", "acts", "reports", "figures")

DIGITS = "digits"
# Rows used from a dataset other than digits, unless the caller sets a limit:
# the first conv layer of the 28x28 model has 25,088 features a sample, so a
# shard of all 70,000 MNIST rows would take 7 GB per checkpoint for that site.
DEFAULT_OTHER_LIMIT = 10_000


class DemoConvNet(nn.Module):
    """A two-block convnet with a hidden fully-connected layer, for square images.

    ``conv1 -> relu1 -> pool1 -> conv2 -> relu2 -> pool2 -> fc1 -> relu3 ->
    fc2``: 5x5 convolutions with padding 2, 2x2 max-pooling, and a linear
    classifier ``fc2`` whose outputs are the logits. Every layer is a child
    module, so each is a probe site named after it.

    Parameters
    ----------
    image_size : int, default=8
        Height and width of the input images, at least 4.
    in_channels : int, default=1
    n_classes : int, default=10
    conv1_channels, conv2_channels, hidden : int, optional
        Widths of the two convolutions and of ``fc1``. The defaults depend on
        ``image_size``: 32, 64 and 512 from 28 pixels up (the widths of
        TensorFlow's MNIST example ``convolutional.py``), else 16, 32 and 128.
    """

    def __init__(
        self,
        image_size: int = 8,
        in_channels: int = 1,
        n_classes: int = 10,
        conv1_channels: int | None = None,
        conv2_channels: int | None = None,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise InvalidInputError(
                f"invalid image_size {image_size}; DemoConvNet needs images of "
                "at least 4x4 pixels"
            )
        widths = default_widths(image_size)
        conv1_channels = conv1_channels or widths["conv1_channels"]
        conv2_channels = conv2_channels or widths["conv2_channels"]
        hidden = hidden or widths["hidden"]
        pooled_size = image_size // 2 // 2

        self.conv1 = nn.Conv2d(in_channels, conv1_channels, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(conv1_channels, conv2_channels, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(conv2_channels * pooled_size**2, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits, shape ``(batch, n_classes)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def default_widths(image_size: int) -> dict[str, int]:
    """Return the layer widths :class:`DemoConvNet` uses for ``image_size``."""
    if image_size >= 28:
        return {"conv1_channels": 32, "conv2_channels": 64, "hidden": 512}
    return {"conv1_channels": 16, "conv2_channels": 32, "hidden": 128}


def model_kwargs_for(dataset: ProbeDataset) -> dict[str, int]:
    """Return the :class:`DemoConvNet` keyword arguments that fit ``dataset``.

    Raises
    ------
    InvalidInputError
        If the inputs are not square images of shape ``(channels, size, size)``.
    """
    shape = dataset.sample_shape
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] < 4:
        raise InvalidInputError(
            f"dataset {dataset.name!r} has inputs of shape {shape}; the demo needs "
            "square images (channels, size, size) of at least 4x4 pixels, such as "
            "a folder of MNIST IDX files"
        )
    return {
        "image_size": int(shape[1]),
        "in_channels": int(shape[0]),
        "n_classes": dataset.n_classes,
        **default_widths(int(shape[1])),
    }


def checkpoint_steps(n_steps: int, n_checkpoints: int) -> list[int]:
    """Return the training steps to save checkpoints at: 0, then doubling up to
    ``n_steps``.

    Step 0 is the untrained network. The others are spaced by factors of 2
    ending at ``n_steps`` (``800, 6`` gives 0, 50, 100, 200, 400, 800), because
    probe errors change fastest early in training. Steps that would repeat are
    dropped, so fewer checkpoints come back when ``n_steps`` is small.
    """
    if n_steps < 1 or n_checkpoints < 2:
        raise InvalidInputError(
            f"invalid schedule of {n_checkpoints} checkpoints over {n_steps} steps; "
            "give at least 1 step and 2 checkpoints"
        )
    later = [max(1, round(n_steps / 2**k)) for k in reversed(range(n_checkpoints - 1))]
    return sorted({0, *later})


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of the demo's training run.

    Attributes
    ----------
    steps : list of int
        Steps to save a checkpoint at, from 0; training stops at the last one.
    batch_size : int
        Training examples per SGD step, drawn without replacement each epoch.
    learning_rate : float
        Adam's step size.
    seed : int
        Seed of the weight initialisation and of the order of examples.
    """

    steps: list[int]
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


def train_demo_model(
    dataset: ProbeDataset,
    model_kwargs: Mapping[str, Any],
    config: TrainingConfig,
    checkpoint_dir: Path,
    *,
    progress: bool = True,
) -> list[Path]:
    """Train :class:`DemoConvNet` on the train split and save checkpoints.

    Each checkpoint is ``step_NNNNNN.pt``, a dict with the ``state_dict`` and
    its ``step``, written atomically. The val and test rows are never used.

    Parameters
    ----------
    dataset : ProbeDataset
        Data with array inputs; only the rows of the train split are used.
    model_kwargs : mapping
        Keyword arguments of :class:`DemoConvNet`.
    config : TrainingConfig
    checkpoint_dir : Path
        Folder for the checkpoints, created if missing.
    progress : bool, default=True
        Show a progress bar on stderr.

    Returns
    -------
    list of Path
        The checkpoint files, in step order.
    """
    inputs, labels = _train_tensors(dataset)
    torch.manual_seed(config.seed)
    model = DemoConvNet(**model_kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _shuffled_batches(len(labels), config.batch_size, generator)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    saved = [_save_checkpoint(model, 0, checkpoint_dir)]
    save_at = set(config.steps)
    model.train()
    bar = tqdm(total=max(config.steps), desc="train", unit="step", disable=not progress)
    with bar, _one_torch_thread():
        for step in range(1, max(config.steps) + 1):
            rows = next(batches)
            loss = nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update()
            if step in save_at:
                saved.append(_save_checkpoint(model, step, checkpoint_dir))
                bar.set_postfix(loss=f"{loss.item():.3f}")
                logger.info("step %d: training loss %.4f", step, loss.item())
    return saved


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread inside the block, then restore the count.

    The demo's layers are too small for intra-op threads to pay off. Measured
    on a 2-core machine that other jobs kept busy, a training step of the 8x8
    model took 0.2 s with 2 threads and 0.014 s with 1.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def _train_tensors(dataset: ProbeDataset) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(dataset.inputs, np.ndarray):
        raise InvalidInputError(
            f"dataset {dataset.name!r} is a torch Dataset; the demo trains on "
            "array data such as digits or a folder of MNIST IDX files"
        )
    train = dataset.split == SPLIT_CODES["train"]
    if not train.any():
        raise InvalidInputError(
            f"dataset {dataset.name!r} has no train rows; give data with train "
            "rows or without a split column"
        )
    inputs = torch.from_numpy(np.asarray(dataset.inputs[train], dtype=np.float32))
    labels = torch.from_numpy(dataset.labels[train].astype(np.int64))
    return inputs, labels


def _shuffled_batches(
    n_rows: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Yield index batches forever, reshuffling the rows at each epoch.

    The rows left over at the end of an epoch are skipped, so every batch has
    ``min(batch_size, n_rows)`` rows.
    """
    size = min(batch_size, n_rows)
    while True:
        order = torch.randperm(n_rows, generator=generator)
        for start in range(0, n_rows - size + 1, size):
            yield order[start : start + size]


def checkpoint_name(step: int) -> str:
    """Return the file name of the demo checkpoint saved at ``step``."""
    return f"step_{step:06d}.pt"


def _save_checkpoint(model: nn.Module, step: int, checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / checkpoint_name(step)
    with atomic_path(path) as temp:
        torch.save({"state_dict": model.state_dict(), "step": step}, temp)
    logger.debug("saved %s", path)
    return path


DEFAULT_STEPS = 800
DEFAULT_CHECKPOINTS = 6
QUICK_STEPS = 40
QUICK_CHECKPOINTS = 3
QUICK_LIMIT = 300
QUICK_CS = (0.1, 1.0, 10.0)
# Narrow layers for --quick: conv1 then has 256 features a sample instead of 1,024.
QUICK_WIDTHS = {"conv1_channels": 4, "conv2_channels": 8, "hidden": 32}
# Sites shown in the printed summary, with what each one is.
SUMMARY_SITES = (
    ("input", "the input"),
    ("relu1", "first ReLU"),
    ("relu3", "last hidden layer"),
    ("fc2", "logits"),
)


@dataclass(frozen=True)
class DemoResult:
    """Paths, table of results and timings of one :func:`run_demo` run.

    Attributes
    ----------
    out_dir : Path
        The demo folder; ``checkpoint_dir``, ``acts_dir``, ``reports_dir`` and
        ``figures_dir`` are its subfolders.
    checkpoints : list of Path
        The checkpoint files, in step order.
    trained : bool
        False when the checkpoints of an earlier run with the same settings
        were reused.
    figures : list of Path
        The files of :func:`probecvx.plots.write_report_figures`.
    records : list of dict
        The table of results, :func:`probecvx.reports.load_table`.
    settings : dict
        The settings stored in the folder's marker file: data, limit, seed,
        steps and model keyword arguments.
    seconds : dict of str to float
        Wall time of each stage: train, extract, fit, report.
    """

    out_dir: Path
    checkpoint_dir: Path
    acts_dir: Path
    reports_dir: Path
    figures_dir: Path
    checkpoints: list[Path]
    trained: bool
    figures: list[Path]
    records: list[dict[str, Any]]
    settings: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def extract_command(self) -> str:
        """Return the ``probecvx extract`` command that re-extracts these
        checkpoints, for the user to adapt."""
        kwargs = json.dumps(self.settings["model_kwargs"], separators=(",", ":"))
        words = [
            "probecvx",
            "extract",
            str(self.checkpoint_dir),
            "--model",
            MODEL_SPEC,
            "--model-kwargs",
            kwargs,
            "--data",
            self.settings["data"],
            "--seed",
            str(self.settings["seed"]),
        ]
        if self.settings["limit"] is not None:
            words += ["--limit", str(self.settings["limit"])]
        words += ["--out", str(self.out_dir / "acts-again")]
        return shlex.join(words)

    def summary(self) -> list[tuple[str, str, float | None, float | None]]:
        """Return ``(site, description, first error, last error)`` for the
        summary sites, as test-error fractions at the first and last step.

        An error is None where the unit failed.
        """
        grid = build_error_grid(self.records)
        rows = []
        for site, description in SUMMARY_SITES:
            if site not in grid.sites:
                continue
            errors = grid.test_error[grid.sites.index(site)]
            first, last = (float(errors[0]), float(errors[-1]))
            rows.append(
                (
                    site,
                    description,
                    None if math.isnan(first) else first,
                    None if math.isnan(last) else last,
                )
            )
        return rows


def run_demo(
    out_dir: Path = DEFAULT_OUT_DIR,
    *,
    data: str = DIGITS,
    steps: int | None = None,
    limit: int | None = None,
    n_jobs: int = -1,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    max_iter: int | None = None,
    tol: float | None = None,
) -> DemoResult:
    """Train the demo network, then extract, fit and report on its checkpoints.

    Parameters
    ----------
    out_dir : Path, default="probecvx-demo"
        The demo folder. It must be missing, empty, or the output of an earlier
        demo. With the same settings the earlier checkpoints, shards and reports
        are reused; with other settings they are deleted and made again.
    data : str, default="digits"
        Any dataset spec of :func:`probecvx.datasets.load_dataset` with square
        images, such as a folder of MNIST IDX files.
    steps : int, optional
        Training steps; default 800 (40 with ``quick``). Checkpoints are saved
        at step 0 and at steps that double up to ``steps``, see
        :func:`checkpoint_steps`.
    limit : int, optional
        Rows of the dataset to use. Default: all of digits, 10,000 of any other
        dataset (300 of digits with ``quick``).
    n_jobs : int, default=-1
        Probe fits run in parallel; -1 uses every core.
    quick : bool, default=False
        Train a narrower network briefly on fewer rows, keep 3 checkpoints and
        a grid of 3 values of C, so that the whole demo runs in seconds (for
        tests).
    seed : int, default=0
        Seed of the data split, the weight initialisation and the order of
        training examples.
    progress : bool, default=True
        Show progress bars on stderr.
    max_iter, tol : optional
        The iteration cap and tolerance of the probe solver, as for
        :func:`probecvx.fit.fit_shards`. A change refits the probes only.

    Returns
    -------
    DemoResult

    Raises
    ------
    InvalidInputError
        When ``out_dir`` contains files that are not demo output, or the data
        or a setting is invalid.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    n_steps = steps or (QUICK_STEPS if quick else DEFAULT_STEPS)
    schedule = checkpoint_steps(
        n_steps, QUICK_CHECKPOINTS if quick else DEFAULT_CHECKPOINTS
    )
    limit = _default_limit(data, limit, quick)
    seconds: dict[str, float] = {}

    dataset = load_dataset(data, seed=seed, limit=limit)
    model_kwargs = model_kwargs_for(dataset)
    if quick:
        model_kwargs.update(QUICK_WIDTHS)
    settings: dict[str, Any] = {
        "data": data if data == DIGITS else str(Path(data).resolve()),
        "dataset_fingerprint": dataset.fingerprint,
        "limit": limit,
        "seed": seed,
        "steps": schedule,
        "quick": quick,
        "model_kwargs": model_kwargs,
    }
    reuse = _claim_out_dir(out_dir, settings)
    checkpoint_dir, acts_dir, reports_dir, figures_dir = (
        out_dir / name for name in SUBFOLDERS
    )

    start = time.perf_counter()
    checkpoints = [checkpoint_dir / checkpoint_name(step) for step in schedule]
    trained = not (reuse and all(path.is_file() for path in checkpoints))
    if trained:
        config = TrainingConfig(steps=schedule, seed=seed)
        train_demo_model(
            dataset, model_kwargs, config, checkpoint_dir, progress=progress
        )
    else:
        logger.info("reusing the checkpoints in %s", checkpoint_dir)
    seconds["train"] = time.perf_counter() - start

    start = time.perf_counter()
    extract_checkpoints(
        checkpoint_dir,
        dataset,
        acts_dir,
        model_factory=functools.partial(DemoConvNet, **model_kwargs),
        device="cpu",
        progress=progress,
    )
    seconds["extract"] = time.perf_counter() - start

    start = time.perf_counter()
    fit_shards(
        acts_dir,
        reports_dir,
        Cs=QUICK_CS if quick else None,
        n_jobs=n_jobs,
        tol=tol,
        max_iter=max_iter,
        progress=progress,
    )
    seconds["fit"] = time.perf_counter() - start

    start = time.perf_counter()
    records = load_table(reports_dir)
    figures = write_report_figures(records, figures_dir, fmt="html")
    seconds["report"] = time.perf_counter() - start

    return DemoResult(
        out_dir=out_dir,
        checkpoint_dir=checkpoint_dir,
        acts_dir=acts_dir,
        reports_dir=reports_dir,
        figures_dir=figures_dir,
        checkpoints=checkpoints,
        trained=trained,
        figures=figures,
        records=records,
        settings=settings,
        seconds=seconds,
    )


def format_demo_summary(result: DemoResult) -> str:
    """Describe a demo run for a person: where the files are, the key probe
    errors, and the command that re-extracts the checkpoints."""
    steps = result.settings["steps"]
    lines = [
        f"checkpoints: {result.checkpoint_dir} ({len(result.checkpoints)} files, "
        f"steps {', '.join(str(step) for step in steps)})",
        f"activations: {result.acts_dir}",
        f"reports:     {result.reports_dir}",
        f"figures:     {result.figures_dir} (open {HTML_NAME} in a browser)",
        "",
    ]

    header = f"step {steps[0]}", f"step {steps[-1]}"
    labels = [f"{site} ({description})" for site, description, _, _ in result.summary()]
    width = max([len("probe test error (%)"), *map(len, labels)])
    lines.append(f"{'probe test error (%)':<{width}}  {header[0]:>8}  {header[1]:>9}")
    for label, (_, _, first, last) in zip(labels, result.summary(), strict=True):
        lines.append(f"{label:<{width}}  {_percent(first):>8}  {_percent(last):>9}")
    chance = _chance_percent(result.records)
    if chance is not None:
        lines.append(f"chance level: {chance:.2f}%")

    timings = ", ".join(f"{stage} {sec:.1f}" for stage, sec in result.seconds.items())
    lines += [
        "",
        f"wall time (s): {timings}",
        "Full table: probecvx report " + shlex.quote(str(result.reports_dir)),
        "Probe the demo checkpoints yourself, for example with other settings:",
        "  " + result.extract_command(),
    ]
    return "\n".join(lines) + "\n"


def _percent(error: float | None) -> str:
    return "failed" if error is None else f"{100 * error:.2f}"


def _chance_percent(records: Sequence[Mapping[str, Any]]) -> float | None:
    values = [r["chance_error"] for r in records if r.get("chance_error") is not None]
    return 100 * float(values[-1]) if values else None


def _default_limit(data: str, limit: int | None, quick: bool) -> int | None:
    if limit is not None:
        return limit
    if quick:
        return QUICK_LIMIT
    return None if data == DIGITS else DEFAULT_OTHER_LIMIT


def _check_out_dir(out_dir: Path) -> None:
    """Raise unless ``out_dir`` is missing, empty or an earlier demo's output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(
            f"demo output {out_dir} is a file; pass --out with a folder name"
        )
    not_empty = out_dir.is_dir() and any(out_dir.iterdir())
    if not_empty and _read_marker(out_dir / MARKER_NAME) is None:
        raise InvalidInputError(
            f"folder {out_dir} is not empty and is not the output of an earlier "
            "demo; pass --out with a new folder, or remove this one"
        )


def _claim_out_dir(out_dir: Path, settings: Mapping[str, Any]) -> bool:
    """Write the marker file into ``out_dir`` and return whether earlier output
    with the same settings can be reused.

    Earlier output made with other settings is deleted, because its
    checkpoints, shards and reports would mix with the new ones.
    """
    previous = _read_marker(out_dir / MARKER_NAME)
    if previous is not None and previous == dict(settings):
        return True
    if previous is not None:
        logger.warning(
            "demo settings differ from the earlier run in %s; replacing its output",
            out_dir,
        )
        for name in SUBFOLDERS:
            shutil.rmtree(out_dir / name, ignore_errors=True)
    prepare_out_dir(out_dir)
    marker = {"format": MARKER_FORMAT, "settings": dict(settings)}
    write_text_atomic(out_dir / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
    return False


def _read_marker(path: Path) -> dict[str, Any] | None:
    """Return the settings stored in a demo marker file, or None if the file is
    missing or is not a demo marker."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(content, dict) or content.get("format") != MARKER_FORMAT:
        return None
    settings = content.get("settings")
    return settings if isinstance(settings, dict) else None
