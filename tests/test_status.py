"""Tests of probecvx.status on empty, unknown and barely started folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from probecvx.cli import main
from probecvx.errors import InvalidInputError
from probecvx.extract import claim_path_of
from probecvx.status import folder_status
from tests.test_fit import write_series


def make_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    "files",
    [{}, {"notes.txt": "hello", "data.csv": "1,2\n", ".hidden": ""}],
    ids=["empty", "random files"],
)
def test_status_rejects_unknown_folder(tmp_path: Path, files: dict[str, str]) -> None:
    folder = make_folder(tmp_path, files)

    with pytest.raises(InvalidInputError) as caught:
        folder_status(folder)
    message = str(caught.value)

    assert f"{folder} is not an extract or fit output folder" in message
    assert "no shards (*.h5)" in message
    assert "index.json" in message
    assert "--out folder of `probecvx extract` or `probecvx fit`" in message


def test_status_command_exits_2_on_unknown_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {"notes.txt": "hello"})

    result = CliRunner().invoke(main, ["status", str(folder)])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: {folder} is not an extract or fit")


def test_status_empty_folder_with_checkpoints(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {})
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    torch.save({"weight": torch.zeros(2)}, checkpoints / "step_5.pt")

    status = folder_status(folder, checkpoint_dir=checkpoints)

    assert status.kind == "activations"
    assert [(unit.checkpoint, unit.state) for unit in status.units] == [
        ("step_5", "pending")
    ]


def test_status_folder_with_only_claim(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, {})
    claim_path_of(folder / "step_5.h5").write_text("{}")

    status = folder_status(folder)

    assert [unit.checkpoint for unit in status.units] == ["step_5"]


def test_status_activations_folder_accepted(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))

    status = folder_status(tmp_path / "acts")

    assert status.counts()["done"] == 1
