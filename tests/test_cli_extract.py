"""Tests of `probecvx layers` and `probecvx extract` on the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from probecvx.atomic import TEMP_PREFIX
from probecvx.cli import main
from probecvx.datasets import load_dataset
from probecvx.shards import list_shards, read_shard_info, read_site
from tests.tinymodels import (
    TINY_MODEL_SPEC,
    LogNet,
    TinyConvNet,
    dyadic_inputs,
    reference_forward,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_TABLE = """\
site        type       output shape  features  bytes/sample  calls
input       input      (1, 8, 8)     64        256           1
features.0  Conv2d     (4, 8, 8)     256       1024          1
features.1  ReLU       (4, 8, 8)     256       1024          1
features.2  MaxPool2d  (4, 4, 4)     64        256           1
features.3  Conv2d     (4, 4, 4)     64        256           1
features.4  ReLU       (4, 4, 4)     64        256           1
flatten     Flatten    (64,)         64        256           1
classifier  Linear     (3,)          3         12            1
"""


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def extract_args(checkpoint_dir: Path, data: Path, out: Path, *extra: str) -> list:
    return [
        "extract",
        checkpoint_dir,
        "--data",
        data,
        "--out",
        out,
        "--model",
        TINY_MODEL_SPEC,
        "--device",
        "cpu",
        *extra,
    ]


def stdout_lines(result: Result) -> list[str]:
    return result.stdout.splitlines()


def test_layers_table(checkpoint_dir: Path) -> None:
    result = invoke(
        "layers",
        checkpoint_dir / "step_10.pt",
        "--model",
        TINY_MODEL_SPEC,
        "--input-shape",
        "1,8,8",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == TINY_TABLE


def test_layers_all_with_data(checkpoint_dir: Path, tiny_data_file: Path) -> None:
    result = invoke(
        "layers",
        checkpoint_dir,
        "--model",
        TINY_MODEL_SPEC,
        "--data",
        tiny_data_file,
        "--pool",
        "avg",
        "--all",
    )
    assert result.exit_code == 0, result.output
    lines = stdout_lines(result)
    assert lines[0].split() == TINY_TABLE.splitlines()[0].split()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == [
        "input",
        "features.0",
        "features.1",
        "features.2",
        "features.3",
        "features.4",
        "features",
        "flatten",
        "classifier",
    ]
    assert rows["features"][1] == "Sequential"
    assert rows["features.0"][-3:] == ["4", "16", "1"]
    assert rows["input"][-3:] == ["64", "256", "1"]


def test_layers_needs_an_input(checkpoint_dir: Path) -> None:
    result = invoke("layers", checkpoint_dir / "step_10.pt", "--model", TINY_MODEL_SPEC)
    assert result.exit_code == 2
    assert "pass either --data DATA or --input-shape C,H,W" in result.stderr


def test_layers_bad_input_shape(checkpoint_dir: Path) -> None:
    path = checkpoint_dir / "step_10.pt"
    result = invoke("layers", path, "--model", TINY_MODEL_SPEC, "--input-shape", "1,x")
    assert result.exit_code == 2
    assert "invalid --input-shape '1,x'" in result.stderr


def test_layers_wrong_channels(checkpoint_dir: Path) -> None:
    path = checkpoint_dir / "step_10.pt"
    result = invoke(
        "layers", path, "--model", TINY_MODEL_SPEC, "--input-shape", "3,8,8"
    )
    assert result.exit_code == 1
    assert "inputs of shape (4, 3, 8, 8)" in result.stderr
    assert "module 'features.0' (Conv2d)" in result.stderr


def test_layers_weights_need_model(checkpoint_dir: Path) -> None:
    result = invoke("layers", checkpoint_dir / "step_10.pt", "--input-shape", "1,8,8")
    assert result.exit_code == 2
    assert "pass --model MODULE:CALLABLE" in result.stderr


def test_layers_kwargs_need_model(checkpoint_dir: Path) -> None:
    result = invoke(
        "layers",
        checkpoint_dir / "step_10.pt",
        "--input-shape",
        "1,8,8",
        "--model-kwargs",
        "{}",
    )
    assert result.exit_code == 2
    assert "--model-kwargs needs --model" in result.stderr


def test_extract_writes_then_skips(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    args = extract_args(checkpoint_dir, tiny_data_file, out, "--batch-size", "8")

    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert stdout_lines(first) == [
        f"{out / name}.h5\twritten" for name in ["step_10", "step_20", "step_30"]
    ]
    assert "batch" in first.stderr

    second = invoke(*args, "--quiet")
    assert second.exit_code == 0, second.output
    assert stdout_lines(second) == [
        f"{out / name}.h5\tskipped" for name in ["step_10", "step_20", "step_30"]
    ]
    # The 37 rows of the tiny data leave 8 val and 7 test rows: only that warning.
    other_stderr = [
        line for line in second.stderr.splitlines() if "are unreliable" not in line
    ]
    assert other_stderr == []

    forced = invoke(*args, "--quiet", "--force")
    assert forced.exit_code == 0, forced.output
    assert [line.split("\t")[1] for line in stdout_lines(forced)] == ["written"] * 3


def test_extract_warns_of_small_split(checkpoint_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "seven.npz"
    np.savez(data, x=dyadic_inputs(7, seed=1), y=np.arange(7) % 2)

    result = invoke(*extract_args(checkpoint_dir, data, tmp_path / "acts", "--quiet"))

    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(
        "Warning: dataset 'seven.npz' has only 2 val rows and 2 test rows"
    )
    assert "--split" in result.stderr


def test_extract_warns_of_class_without_train_rows(
    checkpoint_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "split.npz"
    labels = np.arange(30) % 3
    # Rows 0-9 are val, 10-19 test, and the train rows 20-29 hold no class 2.
    split = np.repeat([1, 2, 0], 10)
    split[(split == 0) & (labels == 2)] = 2
    np.savez(data, x=dyadic_inputs(30, seed=1), y=labels, split=split)

    result = invoke(*extract_args(checkpoint_dir, data, tmp_path / "acts", "--quiet"))

    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "train rows" in line]
    assert len(lines) == 1
    assert lines[0].startswith(
        "Warning: dataset 'split.npz' has 1 of 3 classes without train rows ('2')"
    )
    assert "--split" in lines[0]


def test_extract_options_reach_shards(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    options = [
        "--sites",
        "type:ReLU, classifier",
        "--sites",
        "input",
        "--pool",
        "max",
        "--dtype",
        "float16",
        "--glob",
        "step_[12]0.pt",
        "--limit",
        "30",
        "--quiet",
    ]
    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, out, *options))
    assert result.exit_code == 0, result.output

    assert [path.name for path in list_shards(out)] == ["step_10.h5", "step_20.h5"]
    info = read_shard_info(out / "step_10.h5")
    assert info.sites == ["input", "features.1", "features.4", "classifier"]
    assert info.pooling == "max"
    assert info.site_attrs["input"]["n_features"] == 64
    assert info.site_attrs["features.1"]["n_features"] == 4
    assert info.storage_dtype == "float16"
    assert info.n_samples == 30


def test_extract_split_and_seed(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    options = ["--split", "0.5,0.25,0.25", "--seed", "3", "--quiet"]
    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, out, *options))
    assert result.exit_code == 0, result.output

    expected = load_dataset(str(tiny_data_file), split=(0.5, 0.25, 0.25), seed=3)
    assert read_shard_info(out / "step_10.h5").dataset_fingerprint == (
        expected.fingerprint
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sites", "fc9"], "unknown probe site 'fc9'"),
        (["--split", "0.5,0.5"], "invalid --split '0.5,0.5'"),
        (["--device", "tpu"], "invalid device 'tpu'"),
        (["--dtype", "int8"], "'int8' is not one of 'float32', 'float16'"),
        (["--batch-size", "0"], "0 is not in the range x>=1"),
        (["--pool", "mean"], "'mean' is not one of 'none', 'avg', 'max'"),
        (["--model-kwargs", "[1]"], "is a JSON list, not an object"),
    ],
)
def test_extract_bad_usage_exits_2(
    checkpoint_dir: Path,
    tiny_data_file: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "acts"
    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, out, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_extract_missing_checkpoint_dir(tiny_data_file: Path, tmp_path: Path) -> None:
    args = extract_args(tmp_path / "absent", tiny_data_file, tmp_path / "acts")
    result = invoke(*args)
    assert result.exit_code == 2
    assert "checkpoint directory not found" in result.stderr


def test_extract_failure_exits_1(tiny_data_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    model = LogNet()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)
    torch.save(model.state_dict(), folder / "step_7.pt")
    out = tmp_path / "acts"

    args = extract_args(folder, tiny_data_file, out, "--quiet")
    args[args.index(TINY_MODEL_SPEC)] = "tests.tinymodels:LogNet"
    result = invoke(*args)
    assert result.exit_code == 1
    # The tiny data's small-split warning comes first.
    assert result.stderr.splitlines()[-1].startswith("Error: checkpoint step_7 (")
    assert "probe site log has" in result.stderr
    assert not out.exists()


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_killed_run_resumes(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "probecvx"]
    args = [str(arg) for arg in extract_args(checkpoint_dir, tiny_data_file, out)]
    slow = [*args, "--model-kwargs", '{"delay": 0.1}', "--batch-size", "4", "--quiet"]

    process = subprocess.Popen(
        [*command, *slow],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        first_done = wait_for((out / "step_10.h5").exists, timeout=60)
        second_started = wait_for(
            lambda: any(out.glob(f"{TEMP_PREFIX}step_20.h5.*")), timeout=30
        )
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=30)
    assert first_done, stderr.decode()
    assert second_started, stderr.decode()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "step_20.h5").exists()
    finished = (out / "step_10.h5").stat()

    # The rerun goes in-process: it only has to see what the killed run left.
    rerun = invoke(*args, "--quiet")
    assert rerun.exit_code == 0, rerun.output
    assert [line.split("\t")[1] for line in stdout_lines(rerun)] == [
        "skipped",
        "written",
        "written",
    ]
    assert sorted(path.name for path in out.iterdir()) == [
        "step_10.h5",
        "step_20.h5",
        "step_30.h5",
    ]
    after = (out / "step_10.h5").stat()
    assert after.st_ino == finished.st_ino
    assert after.st_mtime_ns == finished.st_mtime_ns

    dataset = load_dataset(str(tiny_data_file))
    inputs = torch.from_numpy(np.asarray(dataset.inputs))
    for name in ["step_10", "step_20", "step_30"]:
        model = TinyConvNet()
        model.load_state_dict(torch.load(checkpoint_dir / f"{name}.pt"))
        with torch.no_grad():
            expected = reference_forward(model.eval(), inputs)["classifier"]
        stored = read_site(out / f"{name}.h5", "classifier")
        np.testing.assert_array_equal(stored, expected.numpy())
