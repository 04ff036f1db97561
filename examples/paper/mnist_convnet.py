"""Probe the MNIST convnet of TensorFlow's tutorial at initialisation and trained.

The second experiment of Alain & Bengio (2016, arXiv:1610.01644): the
convolutional network of TensorFlow's MNIST tutorial (see
:class:`examples.paper.models.TutorialConvNet`), probed on each side of every
convolution, ReLU and max-pooling, once at initialisation and once at the end
of training. Probes stop early on a validation set (``probecvx fit
--early-stopping``) and are scored on the test set. At initialisation the
random features already help a linear classifier, and the first ReLU helps
most. After training, the probe error falls from site to site towards the
output.

The model trains as in the tutorial: SGD with momentum 0.9, batches of 64, a
learning rate of 0.01 decayed by 0.95 every epoch, dropout 0.5 after ``fc1``
and an L2 penalty of 5e-4 on the fully-connected weights and biases. By
default it runs on scikit-learn's 8x8 digits with the convnet scaled to 8x8
inputs; ``--data`` takes a folder of MNIST IDX files instead. The script
writes ``results.json``, ``mnist_convnet.png`` and probecvx's figures to
``--out``. A second run with the same settings reuses the checkpoints, shards
and probes of the first.

    python -m examples.paper.mnist_convnet --size quick --out runs/convnet
    python -m examples.paper.mnist_convnet --size paper --data mnist/ --out runs/mn
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from examples.paper.common import (
    SIZES,
    ProbeRun,
    error_rate,
    errors_by_site,
    limit_threads,
    load_training_record,
    probe_checkpoints,
    save_checkpoint,
    site_order,
    split_tensors,
    write_json,
    write_training_record,
)
from examples.paper.models import TutorialConvNet
from probecvx.datasets import ProbeDataset, load_dataset

SITES = (
    "input",
    "conv1",
    "relu1",
    "pool1",
    "conv2",
    "relu2",
    "pool2",
    "fc1",
    "relu3",
    "fc2",
)

# The tutorial's training settings.
BATCH_SIZE = 64
LEARNING_RATE = 0.01
MOMENTUM = 0.9
DECAY_PER_EPOCH = 0.95
WEIGHT_DECAY = 5e-4  # tf.nn.l2_loss is sum(w²) / 2, so its gradient is 5e-4 w
# The tutorial holds out 5,000 of the 60,000 MNIST training images for
# validation. probecvx moves val / (train + val) of an IDX train set to val.
MNIST_SPLIT = (0.55, 0.05, 0.40)

# Epochs by data and size. The tutorial trains 10 epochs on MNIST. Digits has
# 1,078 train rows, 17 batches an epoch, so it needs more epochs.
EPOCHS = {
    "digits": {"quick": 20, "paper": 60},
    "mnist": {"quick": 1, "paper": 10},
}
# Probe C grids by size: None is probecvx's default, 1e-3 to 100. The quick
# grid keeps the three middle values, which halves the probe time.
PROBE_CS: dict[str, tuple[float, ...] | None] = {
    "quick": (0.01, 0.1, 1.0),
    "paper": None,
}
# Rows of MNIST that the probes use. conv1 and relu1 have 28·28·32 = 25,088
# features a sample, so 10,000 rows make a 1 GB float32 matrix per site.
DEFAULT_PROBE_LIMIT = 10_000


def train(
    model: TutorialConvNet,
    dataset: ProbeDataset,
    epochs: int,
    run: ProbeRun,
    seed: int,
) -> list[dict[str, float]]:
    """Train as the tutorial does, saving checkpoints at step 0 and at the end.

    Returns the model's train and val error at both checkpoints.
    """
    inputs, labels = split_tensors(dataset, "train")
    val_inputs, val_labels = split_tensors(dataset, "val")
    fully_connected = [*model.fc1.parameters(), *model.fc2.parameters()]
    convolutional = [*model.conv1.parameters(), *model.conv2.parameters()]
    optimizer = torch.optim.SGD(
        [
            {"params": convolutional, "weight_decay": 0.0},
            {"params": fully_connected, "weight_decay": WEIGHT_DECAY},
        ],
        lr=LEARNING_RATE,
        momentum=MOMENTUM,
    )
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, DECAY_PER_EPOCH)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / BATCH_SIZE)

    def checkpoint(step: int) -> dict[str, float]:
        save_checkpoint(model, step, run.checkpoint_dir)
        return {
            "step": step,
            "train_error": error_rate(model, inputs, labels),
            "val_error": error_rate(model, val_inputs, val_labels),
        }

    history = [checkpoint(0)]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = loss_fn(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    history.append(checkpoint(epochs * steps_per_epoch))
    return history


def plot_results(
    sites: list[str], errors: dict[str, dict[str, float]], data_name: str, path: Path
) -> None:
    """Draw the probe test error per site, at initialisation and trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(sites))
    steps = list(errors)
    labels = {steps[0]: "at initialisation", steps[-1]: f"trained (step {steps[-1]})"}
    percent = {step: [100 * errors[step][site] for site in sites] for step in steps}
    y_top = _axis_top([value for values in percent.values() for value in values])
    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    width = 0.38
    for offset, step, color in ((-1, steps[0], "#C44E52"), (1, steps[-1], "#4C72B0")):
        # Bars above y_top are cut at it and hatched; their label gives the value.
        shown = [min(value, y_top) for value in percent[step]]
        positions = x + offset * width / 2
        bars = axes.bar(positions, shown, width, color=color, label=labels[step])
        for bar, value in zip(bars, percent[step], strict=True):
            if value > y_top:
                bar.set_hatch("//")
        for position, value, height in zip(
            positions, percent[step], shown, strict=True
        ):
            axes.text(
                position, height, f"{value:.1f}", ha="center", va="bottom", fontsize=6
            )
    axes.set_ylim(0, 1.1 * y_top)
    axes.set_xticks(x, sites, rotation=45, ha="right")
    axes.set_ylabel("probe test error (%)")
    axes.set_title(f"TensorFlow tutorial convnet on {data_name}: probes at every layer")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper center")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _axis_top(values: list[float]) -> float:
    """Return a y limit that keeps small errors readable beside one large one.

    Values more than 5 times the median are left out of the limit, so that
    the logits of an untrained model (near chance) do not flatten the rest.
    """
    median = float(np.median(values))
    kept = [value for value in values if value <= 5 * max(median, 0.1)]
    return 1.15 * max(kept)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="quick")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="Folder for checkpoints, shards, reports and figures; created if missing.",
    )
    parser.add_argument(
        "--data",
        default="digits",
        help="digits (default) or a folder of MNIST IDX files.",
    )
    parser.add_argument("--epochs", type=int, help="Epochs (overrides --size).")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the weights, the data split and the batch order.",
    )
    parser.add_argument(
        "--probe-limit",
        type=int,
        default=DEFAULT_PROBE_LIMIT,
        help="Rows of MNIST that the probes use, a subsample stratified by split "
        "and class; the model trains on every train row.",
    )
    parser.add_argument("--jobs", type=int, default=1, help="Probes fitted at once.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (default 1)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    limit_threads(args.threads)

    is_digits = args.data == "digits"
    split = (0.6, 0.2, 0.2) if is_digits else MNIST_SPLIT
    dataset = load_dataset(args.data, split=split, seed=args.seed)
    probe_dataset = dataset
    if not is_digits:
        probe_dataset = load_dataset(
            args.data, split=split, seed=args.seed, limit=args.probe_limit
        )
    image_size = dataset.sample_shape[-1]
    epochs = args.epochs or EPOCHS["digits" if is_digits else "mnist"][args.size]

    started = time.perf_counter()
    model_kwargs = {"image_size": image_size, "n_classes": dataset.n_classes}
    run = ProbeRun.under(args.out)
    training = {
        "model_kwargs": model_kwargs,
        "epochs": epochs,
        "seed": args.seed,
        "dataset": dataset.fingerprint,
    }
    history = load_training_record(run, training)
    if history is None:
        torch.manual_seed(args.seed)
        model = TutorialConvNet(**model_kwargs, seed=args.seed)
        history = train(model, dataset, epochs, run, args.seed)
        write_training_record(run, training, history)
    trained_seconds = time.perf_counter() - started

    records = probe_checkpoints(
        run,
        probe_dataset,
        "TutorialConvNet",
        model_kwargs=model_kwargs,
        sites=SITES,
        early_stopping=True,
        # An early-stopped probe depends on where it starts, so each checkpoint's
        # probes start from zero: a warm start from the untrained model's probes
        # changed the test error of the input probe on the same data.
        warm_start=False,
        Cs=PROBE_CS[args.size],
        n_jobs=args.jobs,
    )
    sites = site_order(records)
    errors = {str(step): row for step, row in sorted(errors_by_site(records).items())}
    doc = {
        "size": args.size,
        "data": dataset.name,
        "epochs": epochs,
        "probe_rows": int(probe_dataset.n_samples),
        "probe_split_sizes": np.bincount(probe_dataset.split, minlength=3).tolist(),
        "model": history,
        "sites": sites,
        "test_error": errors,
        "train_seconds": round(trained_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out / "results.json", doc)
    plot_results(sites, errors, dataset.name, args.out / "mnist_convnet.png")

    steps = list(errors)
    print(f"data: {dataset.name}, epochs: {epochs}, probe rows: {doc['probe_rows']}")
    print(f"model val error after training: {history[-1]['val_error']:.4f}")
    print(f"{'site':>6}  {'init':>7}  {'trained':>7}")
    for site in sites:
        initial, trained = errors[steps[0]][site], errors[steps[-1]][site]
        print(f"{site:>6}  {initial:7.4f}  {trained:7.4f}")
    print(f"figure: {args.out / 'mnist_convnet.png'}")
    return doc


if __name__ == "__main__":
    main()
