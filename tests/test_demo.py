"""Tests of the demo network, its training, and `probecvx demo` end to end."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from probecvx import demo, plots
from probecvx.cli import main
from probecvx.datasets import load_dataset
from probecvx.errors import InvalidInputError
from probecvx.reports import load_table

CHILDREN = [
    "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2",
]  # fmt: skip
TINY_WIDTHS = {"conv1_channels": 2, "conv2_channels": 3, "hidden": 5}


@pytest.mark.parametrize(
    ("image_size", "fc1_in", "hidden"), [(8, 32 * 2 * 2, 128), (28, 64 * 7 * 7, 512)]
)
def test_convnet_shapes(image_size: int, fc1_in: int, hidden: int) -> None:
    model = demo.DemoConvNet(image_size=image_size)
    assert [name for name, _ in model.named_children()] == CHILDREN
    assert model.fc1.in_features == fc1_in
    assert model.fc1.out_features == hidden
    logits = model(torch.zeros(3, 1, image_size, image_size))
    assert logits.shape == (3, 10)


def test_convnet_explicit_widths() -> None:
    model = demo.DemoConvNet(image_size=12, in_channels=3, n_classes=4, **TINY_WIDTHS)
    assert model.conv1.in_channels == 3
    assert model.conv2.out_channels == 3
    assert model.fc1.in_features == 3 * 3 * 3
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 4)


def test_convnet_rejects_small_images() -> None:
    with pytest.raises(InvalidInputError, match="image_size 3"):
        demo.DemoConvNet(image_size=3)


@pytest.mark.parametrize(
    ("n_steps", "n_checkpoints", "expected"),
    [
        (800, 6, [0, 50, 100, 200, 400, 800]),
        (40, 3, [0, 20, 40]),
        (3, 6, [0, 1, 2, 3]),
        (1, 2, [0, 1]),
    ],
)
def test_checkpoint_steps(
    n_steps: int, n_checkpoints: int, expected: list[int]
) -> None:
    assert demo.checkpoint_steps(n_steps, n_checkpoints) == expected


@pytest.mark.parametrize(("n_steps", "n_checkpoints"), [(0, 6), (10, 1)])
def test_checkpoint_steps_rejects(n_steps: int, n_checkpoints: int) -> None:
    with pytest.raises(InvalidInputError, match="invalid schedule"):
        demo.checkpoint_steps(n_steps, n_checkpoints)


def test_model_kwargs_for_digits() -> None:
    kwargs = demo.model_kwargs_for(load_dataset("digits", limit=50))
    assert kwargs == {
        "image_size": 8,
        "in_channels": 1,
        "n_classes": 10,
        "conv1_channels": 16,
        "conv2_channels": 32,
        "hidden": 128,
    }


def test_model_kwargs_for_rejects_flat_inputs() -> None:
    with pytest.raises(InvalidInputError, match="square images"):
        demo.model_kwargs_for(load_dataset("toy", n_samples=40))


def train_tiny(out: Path) -> list[Path]:
    dataset = load_dataset("digits", limit=100)
    kwargs = {**demo.model_kwargs_for(dataset), **TINY_WIDTHS}
    config = demo.TrainingConfig(steps=[0, 2, 5], batch_size=16, seed=3)
    return demo.train_demo_model(dataset, kwargs, config, out, progress=False)


def test_training_saves_checkpoints(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    paths = train_tiny(tmp_path)
    assert torch.get_num_threads() == threads
    assert [p.name for p in paths] == [
        "step_000000.pt", "step_000002.pt", "step_000005.pt",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]

    states = [torch.load(p, weights_only=True) for p in paths]
    assert [state["step"] for state in states] == [0, 2, 5]
    model = demo.DemoConvNet(image_size=8, **TINY_WIDTHS)
    model.load_state_dict(states[-1]["state_dict"])
    assert not torch.equal(states[0]["state_dict"]["fc2.weight"], model.fc2.weight)


def test_training_is_deterministic(tmp_path: Path) -> None:
    first = train_tiny(tmp_path / "a")[-1]
    second = train_tiny(tmp_path / "b")[-1]
    weights_a = torch.load(first, weights_only=True)["state_dict"]
    weights_b = torch.load(second, weights_only=True)["state_dict"]
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name


def test_demo_rejects_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="pass --out with a new folder"):
        demo.run_demo(tmp_path, quick=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_demo_rejects_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(InvalidInputError, match="is a file"):
        demo.run_demo(path, quick=True, progress=False)


def test_demo_rejects_wrong_data(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="square images"):
        demo.run_demo(tmp_path / "out", data="toy", quick=True, progress=False)


def test_claim_folder_replaces_other_settings(tmp_path: Path) -> None:
    old = {"data": "digits", "steps": [0, 5]}
    marker = {"format": demo.MARKER_FORMAT, "settings": old}
    (tmp_path / demo.MARKER_NAME).write_text(json.dumps(marker))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000005.pt").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("user file")

    assert demo._claim_out_dir(tmp_path, old) is True
    assert (tmp_path / "checkpoints" / "step_000005.pt").exists()

    new = {"data": "digits", "steps": [0, 10]}
    assert demo._claim_out_dir(tmp_path, new) is False
    assert not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "keep.txt").exists()
    stored = json.loads((tmp_path / demo.MARKER_NAME).read_text())
    assert stored == {"format": demo.MARKER_FORMAT, "settings": new}


def test_demo_passes_max_iter_and_tol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_run_demo(out_dir: Path, **kwargs: Any) -> None:
        calls.append(kwargs)
        raise InvalidInputError("stop after the call")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    args = ["demo", "--out", str(tmp_path), "--max-iter", "50", "--tol", "1e-3"]
    result = CliRunner().invoke(main, args)

    assert result.exit_code == 2
    assert calls[0]["max_iter"] == 50
    assert calls[0]["tol"] == 1e-3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jobs", "0"], "Invalid value for '--jobs'"),
        (["--tol", "0"], "Invalid value for '--tol'"),
        (["--max-iter", "0"], "Invalid value for '--max-iter'"),
    ],
)
def test_demo_bad_values_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), *args])

    assert result.exit_code == 2
    assert message in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run `probecvx demo --quick` once; return its folder and stdout."""
    out = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(
        main, ["demo", "--out", str(out), "--quick", "--no-progress", "--jobs", "1"]
    )
    assert result.exit_code == 0, result.output
    return out, result.stdout


@pytest.mark.slow
def test_quick_demo_writes_every_stage(quick_demo: tuple[Path, str]) -> None:
    out, _ = quick_demo
    names = [f"step_{step:06d}" for step in (0, 20, 40)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"{name}.pt" for name in names
    ]
    assert sorted(p.name for p in (out / "acts").glob("*.h5")) == [
        f"{name}.h5" for name in names
    ]
    assert sorted(p.name for p in (out / "reports").glob("step_*.json")) == [
        f"{name}.json" for name in names
    ]
    figures = out / "figures"
    for name in (plots.HEATMAP_NAME, plots.CURVES_NAME, plots.HTML_NAME):
        assert (figures / name).is_file(), name
    assert len(list(figures.glob("site_error_step_*.png"))) == 3
    marker = json.loads((out / demo.MARKER_NAME).read_text())
    assert marker["format"] == demo.MARKER_FORMAT
    assert marker["settings"]["steps"] == [0, 20, 40]


@pytest.mark.slow
def test_quick_demo_summary_matches_reports(quick_demo: tuple[Path, str]) -> None:
    out, stdout = quick_demo
    records = load_table(out / "reports")
    errors = {(r["site"], r["step"]): r["test_error"] for r in records}
    lines = stdout.splitlines()
    for site, description in demo.SUMMARY_SITES:
        [line] = [ln for ln in lines if ln.startswith(f"{site} ({description})")]
        first, last = line.split()[-2:]
        assert first == f"{100 * errors[site, 0]:.2f}", line
        assert last == f"{100 * errors[site, 40]:.2f}", line
    chance = records[0]["chance_error"]
    assert f"chance level: {100 * chance:.2f}%" in lines


@pytest.mark.slow
def test_quick_demo_extract_command_reproduces_shards(
    quick_demo: tuple[Path, str],
) -> None:
    out, stdout = quick_demo
    [command] = [ln.strip() for ln in stdout.splitlines() if "probecvx extract" in ln]
    words = shlex.split(command)
    assert words[:2] == ["probecvx", "extract"]
    words[words.index("--out") + 1] = str(out / "acts")
    result = CliRunner().invoke(main, [*words[1:], "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(line.endswith("\tskipped") for line in lines), lines


@pytest.mark.slow
def test_quick_demo_rerun_reuses_output(quick_demo: tuple[Path, str]) -> None:
    out, _ = quick_demo
    before = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    reports_before = load_table(out / "reports")
    result = demo.run_demo(out, quick=True, n_jobs=1, progress=False)
    assert not result.trained
    after = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert after == before
    assert strip_timing(result.records) == strip_timing(reports_before)


def strip_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "fit_seconds"} for r in records]
