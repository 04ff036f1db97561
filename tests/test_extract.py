"""Tests of extraction: shard values, layout, skipping and failures."""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from probecvx.atomic import TEMP_PREFIX, host_name, output_folder
from probecvx.checkpoints import checkpoint_sha256, resolve_model_factory
from probecvx.cli import main
from probecvx.datasets import ProbeDataset, load_dataset
from probecvx.errors import ExtractionError, InvalidInputError, SiteError
from probecvx.extract import (
    FLOAT16_MAX,
    _describe_factory,
    extract_checkpoints,
    resolve_device,
    shard_id_for,
)
from probecvx.shards import (
    SHARD_FORMAT,
    SHARD_SCHEMA_VERSION,
    ShardWriter,
    list_shards,
    read_shard_info,
    read_site,
    read_targets,
)
from tests.tinymodels import (
    TINY_MODEL_SPEC,
    LogNet,
    TinyConvNet,
    reference_forward,
    set_dyadic_weights,
)

CONV_SITES = [
    "input",
    "features.0",
    "features.1",
    "features.2",
    "features.3",
    "features.4",
    "flatten",
    "classifier",
]


@pytest.fixture
def dataset(tiny_data_file: Path) -> ProbeDataset:
    return load_dataset(str(tiny_data_file))


@pytest.fixture
def factory():
    return resolve_model_factory(TINY_MODEL_SPEC)


def load_tiny(path: Path) -> TinyConvNet:
    model = TinyConvNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def expected_sites(model: TinyConvNet, dataset: ProbeDataset) -> dict[str, np.ndarray]:
    inputs = torch.from_numpy(np.asarray(dataset.inputs))
    with torch.no_grad():
        values = reference_forward(model, inputs)
    return {
        name: value.reshape(len(inputs), -1).numpy() for name, value in values.items()
    }


def file_state(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


def run(checkpoint_dir: Path, dataset: ProbeDataset, out: Path, factory, **options):
    return extract_checkpoints(
        checkpoint_dir,
        dataset,
        out,
        model_factory=factory,
        progress=False,
        device="cpu",
        **options,
    )


@pytest.mark.parametrize("batch_size", [1, 5, 37, 256])
def test_values_match_reference(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, batch_size: int
) -> None:
    out = tmp_path / "acts"
    summary = run(checkpoint_dir, dataset, out, factory, batch_size=batch_size)

    assert [record.status for record in summary.records] == ["written"] * 3
    for checkpoint in sorted(checkpoint_dir.iterdir()):
        shard = out / f"{checkpoint.stem}.h5"
        expected = expected_sites(load_tiny(checkpoint), dataset)
        assert read_shard_info(shard).sites == CONV_SITES
        for site in CONV_SITES:
            stored = read_site(shard, site)
            assert stored.dtype == np.float32
            np.testing.assert_array_equal(stored, expected[site], err_msg=site)


def test_shard_layout(checkpoint_dir: Path, dataset, factory, tmp_path: Path) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory)
    checkpoint = checkpoint_dir / "step_20.pt"
    shard = out / "step_20.h5"

    info = read_shard_info(shard)
    assert info.attrs["format"] == SHARD_FORMAT
    assert info.attrs["schema_version"] == SHARD_SCHEMA_VERSION
    assert info.checkpoint_name == "step_20"
    assert info.checkpoint_path == str(checkpoint)
    assert info.checkpoint_kind == "state_dict"
    assert info.step == 20
    assert info.checkpoint_sha256 == checkpoint_sha256(checkpoint)
    assert info.dataset_name == dataset.name
    assert info.dataset_fingerprint == dataset.fingerprint
    assert info.shard_id == shard_id_for(
        info.checkpoint_sha256, dataset.fingerprint, info.settings_hash
    )
    assert info.storage_dtype == "float32"
    assert info.pooling == "none"
    assert info.n_samples == dataset.n_samples
    assert info.class_names == dataset.class_names
    assert info.attrs["torch_version"] == torch.__version__
    settings = json.loads(info.attrs["settings_json"])
    assert settings == {
        "sites": None,
        "pooling": "none",
        "storage_dtype": "float32",
        "shard_schema_version": SHARD_SCHEMA_VERSION,
    }

    conv = info.site_attrs["features.0"]
    assert conv["site"] == "features.0"
    assert conv["module_type"] == "Conv2d"
    assert conv["original_shape"] == [4, 8, 8]
    assert conv["call_index"] == 1
    assert conv["pooling"] == "none"
    assert conv["overflow_count"] == 0
    assert conv["n_features"] == 256

    labels, split, sample_ids = read_targets(shard)
    np.testing.assert_array_equal(labels, dataset.labels)
    np.testing.assert_array_equal(split, dataset.split)
    np.testing.assert_array_equal(sample_ids, dataset.sample_ids)
    assert [path.name for path in list_shards(out)] == [
        "step_10.h5",
        "step_20.h5",
        "step_30.h5",
    ]


def test_writes_one_batch_at_a_time(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, monkeypatch
) -> None:
    rows_per_write: list[int] = []
    original = ShardWriter.write_rows

    def recording(self, name, start, array):
        rows_per_write.append(array.shape[0])
        return original(self, name, start, array)

    monkeypatch.setattr(ShardWriter, "write_rows", recording)
    run(checkpoint_dir, dataset, tmp_path / "acts", factory, batch_size=8)

    assert max(rows_per_write) == 8
    assert sum(rows_per_write) == 3 * len(CONV_SITES) * dataset.n_samples


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooled_values(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, pooling: str
) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory, pooling=pooling, batch_size=6)
    model = load_tiny(checkpoint_dir / "step_10.pt")
    inputs = torch.from_numpy(np.asarray(dataset.inputs))
    with torch.no_grad():
        reference = reference_forward(model, inputs)

    shard = out / "step_10.h5"
    info = read_shard_info(shard)
    assert info.pooling == pooling
    assert info.site_attrs["features.2"]["pooling"] == pooling
    assert info.site_attrs["features.2"]["original_shape"] == [4, 4, 4]
    assert info.site_attrs["classifier"]["pooling"] == "none"
    assert info.site_attrs["input"]["pooling"] == "none"
    assert info.site_attrs["input"]["n_features"] == 64
    assert json.loads(info.attrs["settings_json"])["input_pooled"] is False
    for site in ["features.0", "features.2", "features.4"]:
        spatial = reference[site].flatten(2)
        pooled = spatial.mean(2) if pooling == "avg" else spatial.amax(2)
        np.testing.assert_array_equal(read_site(shard, site), pooled.numpy())
    np.testing.assert_array_equal(
        read_site(shard, "input"), reference["input"].flatten(1).numpy()
    )


def test_selected_sites_only(checkpoint_dir: Path, dataset, factory, tmp_path) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory, sites=["type:ReLU", "classifier"])
    assert read_shard_info(out / "step_10.h5").sites == [
        "features.1",
        "features.4",
        "classifier",
    ]


def test_unknown_site_writes_nothing(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    with pytest.raises(SiteError, match="unknown probe site 'fc9'"):
        run(checkpoint_dir, dataset, out, factory, sites=["fc9"])
    assert not out.exists()


def test_skips_current_shards(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory)
    before = {path.name: file_state(path) for path in out.iterdir()}

    summary = run(checkpoint_dir, dataset, out, factory, batch_size=3)
    assert [record.status for record in summary.records] == ["skipped"] * 3
    assert summary.written == []
    assert len(summary.skipped) == 3
    assert {path.name: file_state(path) for path in out.iterdir()} == before


def test_changed_checkpoint_is_rewritten(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory)
    before = {path.name: file_state(path) for path in out.iterdir()}
    changed = set_dyadic_weights(TinyConvNet(), seed=999)
    torch.save(changed.state_dict(), checkpoint_dir / "step_20.pt")

    summary = run(checkpoint_dir, dataset, out, factory)
    statuses = {record.checkpoint: record.status for record in summary.records}
    assert statuses == {
        "step_10": "skipped",
        "step_20": "written",
        "step_30": "skipped",
    }
    assert file_state(out / "step_10.h5") == before["step_10.h5"]
    assert file_state(out / "step_20.h5") != before["step_20.h5"]
    expected = expected_sites(changed.eval(), dataset)
    np.testing.assert_array_equal(
        read_site(out / "step_20.h5", "classifier"), expected["classifier"]
    )


@pytest.mark.parametrize(
    "options",
    [
        {"pooling": "avg"},
        {"dtype": "float16"},
        {"sites": ["classifier"]},
    ],
)
def test_changed_setting_rewrites(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, options: dict
) -> None:
    out = tmp_path / "acts"
    first = run(checkpoint_dir, dataset, out, factory)
    first_ids = {record.checkpoint: record.shard_id for record in first.records}

    summary = run(checkpoint_dir, dataset, out, factory, **options)
    assert [record.status for record in summary.records] == ["written"] * 3
    for record in summary.records:
        assert record.shard_id != first_ids[record.checkpoint]
        assert read_shard_info(record.path).shard_id == record.shard_id


def test_changed_dataset_rewrites(
    checkpoint_dir: Path, tiny_data_file: Path, factory, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, load_dataset(str(tiny_data_file)), out, factory)
    smaller = load_dataset(str(tiny_data_file), limit=20)

    summary = run(checkpoint_dir, smaller, out, factory)
    assert [record.status for record in summary.records] == ["written"] * 3
    assert read_shard_info(out / "step_10.h5").n_samples == 20


def test_force_rewrites(checkpoint_dir: Path, dataset, factory, tmp_path) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory)
    summary = run(checkpoint_dir, dataset, out, factory, force=True)
    assert [record.status for record in summary.records] == ["written"] * 3


def test_corrupt_shard_is_rewritten(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory)
    (out / "step_10.h5").write_bytes(b"garbage")

    summary = run(checkpoint_dir, dataset, out, factory)
    assert [record.status for record in summary.records] == [
        "written",
        "skipped",
        "skipped",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "step_10.h5 is unreadable, so this run extracts it again" in warnings[0]
    assert "not an HDF5 file or truncated" in warnings[0]
    assert "delete it" not in warnings[0]
    assert "re-run" not in warnings[0]
    assert read_shard_info(out / "step_10.h5").sites == CONV_SITES


def test_incomplete_shard_is_rewritten(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "acts"
    run(checkpoint_dir, dataset, out, factory)
    with h5py.File(out / "step_20.h5", "a") as file:
        del file.attrs["step"]

    summary = run(checkpoint_dir, dataset, out, factory)
    assert [record.status for record in summary.records] == [
        "skipped",
        "written",
        "skipped",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].endswith(
        "Read error: shard " + str(out / "step_20.h5") + " has no root attribute 'step'"
    )
    assert read_shard_info(out / "step_20.h5").step == 20


def test_float16_overflow_is_counted(dataset, tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    model = set_dyadic_weights(TinyConvNet(), seed=5)
    with torch.no_grad():
        model.classifier.weight.mul_(1e5)
    torch.save(model.state_dict(), folder / "step_1.pt")
    expected = expected_sites(model.eval(), dataset)["classifier"]
    n_over = int(np.count_nonzero(np.abs(expected) > FLOAT16_MAX))
    assert n_over > 0, "the test needs values beyond the float16 range"

    out = tmp_path / "acts"
    factory = resolve_model_factory(TINY_MODEL_SPEC)
    with pytest.warns(UserWarning, match=f"{n_over} values exceeded the float16"):
        run(folder, dataset, out, factory, dtype="float16")

    shard = out / "step_1.h5"
    info = read_shard_info(shard)
    assert info.storage_dtype == "float16"
    assert info.site_attrs["classifier"]["overflow_count"] == n_over
    assert info.site_attrs["features.0"]["overflow_count"] == 0
    stored = read_site(shard, "classifier")
    assert stored.dtype == np.float16
    assert np.isfinite(stored).all()
    clipped = np.clip(expected, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
    np.testing.assert_array_equal(stored, clipped)


def test_nan_names_checkpoint_and_site(tmp_path: Path, dataset) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    model = LogNet()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)
    torch.save(model.state_dict(), folder / "step_7.pt")
    factory = resolve_model_factory("tests.tinymodels:LogNet")

    out = tmp_path / "acts"
    with pytest.raises(ExtractionError) as excinfo:
        run(folder, dataset, out, factory, batch_size=10)
    message = str(excinfo.value)
    assert message.startswith("checkpoint step_7 (")
    assert "probe site log has 40 NaN or infinite values" in message
    assert "first in sample row 0" in message
    assert not out.exists()


def test_keep_going_records_failure(tmp_path: Path, dataset) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for step, bias in ((5, 1.0), (7, -100.0), (9, 2.0)):
        model = LogNet()
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.fill_(bias)  # log of a negative number is NaN
        torch.save(model.state_dict(), folder / f"step_{step}.pt")
    factory = resolve_model_factory("tests.tinymodels:LogNet")
    out = tmp_path / "acts"

    first = run(folder, dataset, out, factory, keep_going=True)
    failure = json.loads((out / ".step_7.h5.failed.json").read_text())
    second = run(folder, dataset, out, factory, keep_going=True)
    retried = run(folder, dataset, out, factory, keep_going=True, retry_failed=True)

    assert [r.status for r in first.records] == ["written", "failed", "written"]
    assert "probe site log has" in (first.failed[0].error or "")
    assert failure["error"] == first.failed[0].error
    assert failure["shard_id"] == first.failed[0].shard_id
    assert failure["provenance"]["host"] == host_name()
    assert [r.status for r in second.records] == ["skipped", "failed", "skipped"]
    assert (second.failed[0].error or "").startswith("failed in an earlier run: ")
    assert [r.status for r in retried.records] == ["skipped", "failed", "skipped"]
    assert "probe site log has" in (retried.failed[0].error or "")
    assert sorted(p.name for p in out.iterdir()) == [
        ".step_7.h5.failed.json",
        "step_5.h5",
        "step_9.h5",
    ]


def test_failed_retried_when_trusted(tmp_path: Path, dataset, factory) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(set_dyadic_weights(TinyConvNet(), seed=3), folder / "step_5.pt")
    out = tmp_path / "acts"

    first = run(folder, dataset, out, factory, keep_going=True)
    failure = json.loads((out / ".step_5.h5.failed.json").read_text())
    same = run(folder, dataset, out, factory, keep_going=True)
    trusted = run(folder, dataset, out, factory, keep_going=True, trust=True)

    assert [r.status for r in first.records] == ["failed"]
    assert "--trust-checkpoints" in (first.failed[0].error or "")
    assert failure["attempt"] == {
        "model": TINY_MODEL_SPEC,
        "trust_checkpoints": False,
        "batch_size": 256,
        "device": "cpu",
    }
    assert [r.status for r in same.records] == ["failed"]
    assert (same.failed[0].error or "").startswith("failed in an earlier run: ")
    assert [r.status for r in trusted.records] == ["written"]
    assert not (out / ".step_5.h5.failed.json").exists()


@pytest.mark.parametrize(
    ("model_factory", "expected"),
    [
        (None, None),
        (TinyConvNet, "tests.tinymodels:TinyConvNet"),
        (
            functools.partial(TinyConvNet, channels=2),
            "tests.tinymodels:TinyConvNet(*(), channels=2)",
        ),
        (
            resolve_model_factory(TINY_MODEL_SPEC, '{"channels": 2}'),
            'tests.tinymodels:TinyConvNet {"channels": 2}',
        ),
    ],
)
def test_describe_factory_without_address(model_factory, expected) -> None:
    assert _describe_factory(model_factory) == expected


def test_cli_keep_going_exits_1(tmp_path: Path, tiny_data_file: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    model = LogNet()
    with torch.no_grad():
        model.fc.bias.fill_(-100.0)
    torch.save(model.state_dict(), folder / "step_7.pt")
    out = tmp_path / "acts"
    args = ["extract", str(folder), "--data", str(tiny_data_file), "--out", str(out)]
    args += ["--model", "tests.tinymodels:LogNet", "--device", "cpu", "--quiet"]

    result = CliRunner().invoke(main, [*args, "--keep-going"])

    assert result.exit_code == 1
    assert result.stdout == f"{out / 'step_7.h5'}\tfailed\n"
    assert result.stderr.splitlines()[-1].startswith(
        "Error: 1 of 1 checkpoints failed; the others"
    )
    assert "--retry-failed" in result.stderr
    assert "probe site log has" in result.stderr


def test_training_mode_restored_on_error(tmp_path: Path, dataset) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shared = LogNet()
    with torch.no_grad():
        shared.fc.bias.fill_(-100.0)
    torch.save(shared.state_dict(), folder / "step_7.pt")
    shared.train()

    with pytest.raises(ExtractionError):
        run(folder, dataset, tmp_path / "acts", lambda: shared)
    assert all(module.training for module in shared.modules())


def test_wrong_input_shape(checkpoint_dir: Path, factory, tmp_path: Path) -> None:
    data = tmp_path / "rgb.npz"
    np.savez(data, x=np.zeros((6, 3, 8, 8), np.float32), y=np.arange(6) % 2)

    with pytest.raises(ExtractionError) as excinfo:
        run(checkpoint_dir, load_dataset(str(data)), tmp_path / "acts", factory)
    message = str(excinfo.value)
    assert "checkpoint step_10" in message
    assert "inputs of shape (4, 3, 8, 8)" in message
    assert "module 'features.0' (Conv2d)" in message


def test_out_dir_created(checkpoint_dir: Path, dataset, factory, tmp_path) -> None:
    out = tmp_path / "deep" / "er" / "acts"
    run(checkpoint_dir, dataset, out, factory)
    assert len(list_shards(out)) == 3


def test_out_dir_is_a_file(checkpoint_dir: Path, dataset, factory, tmp_path) -> None:
    out = tmp_path / "acts"
    out.write_text("x")
    with pytest.raises(InvalidInputError, match=r"output folder .*acts is a file"):
        run(checkpoint_dir, dataset, out, factory)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_out_dir_not_writable(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(
            InvalidInputError, match="locked cannot be created or written"
        ):
            run(checkpoint_dir, dataset, out, factory)
    finally:
        out.chmod(stat.S_IRWXU)


def test_out_dir_under_a_file(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "acts"
    with pytest.raises(InvalidInputError, match=r"plain/acts cannot be created or"):
        run(checkpoint_dir, dataset, out, factory)


def test_stale_temp_files_removed(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    host = host_name()
    stale = out / f"{TEMP_PREFIX}step_10.h5.~{host}~{dead_pid}~abc123"
    stale.write_bytes(b"half a shard of a killed run")
    live = out / f"{TEMP_PREFIX}step_20.h5.~{host}~{os.getpid()}~def456"
    live.write_bytes(b"half a shard of a live run")

    run(checkpoint_dir, dataset, out, factory)

    assert sorted(path.name for path in out.iterdir()) == sorted(
        [live.name, "step_10.h5", "step_20.h5", "step_30.h5"]
    )


def test_disk_full_leaves_no_shard(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, monkeypatch
) -> None:
    calls = {"n": 0}
    original = h5py.Dataset.__setitem__

    def fail_later(self, key, value) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fail_later)
    out = tmp_path / "acts"
    with pytest.raises(ExtractionError, match=r"step_10\.h5: the disk is full"):
        run(checkpoint_dir, dataset, out, factory)
    assert not out.exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:0"])
def test_invalid_device(device: str) -> None:
    with pytest.raises(InvalidInputError, match=f"invalid device '{device}'"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_device() -> None:
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        resolve_device("cuda")


def test_auto_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else None
    device = resolve_device("auto")
    if expected:
        assert device.type == expected
    else:
        assert device.type in ("mps", "cpu")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pooling": "mean"}, "invalid pooling 'mean'"),
        ({"dtype": "int8"}, "invalid storage dtype 'int8'"),
        ({"batch_size": 0}, "invalid batch size 0"),
        ({"sites": [" "]}, "the list of probe sites is empty"),
    ],
)
def test_invalid_options(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path, options, message
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        run(checkpoint_dir, dataset, tmp_path / "acts", factory, **options)
    assert not (tmp_path / "acts").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:TorchScript model .* does not support module hooks")
def test_every_checkpoint_kind(dataset, tmp_path: Path) -> None:
    folder = tmp_path / "kinds"
    folder.mkdir()
    models = [set_dyadic_weights(TinyConvNet(), seed=50 + i).eval() for i in range(5)]
    torch.save(models[0].state_dict(), folder / "step_1.pt")
    safetensors.torch.save_file(models[1].state_dict(), folder / "step_2.safetensors")
    hf_folder = folder / "checkpoint-3"
    hf_folder.mkdir()
    safetensors.torch.save_file(models[2].state_dict(), hf_folder / "model.safetensors")
    traced = torch.jit.trace(models[3], torch.rand(2, 1, 8, 8))
    torch.jit.save(traced, folder / "step_4.pt")
    torch.save(models[4], folder / "step_5.pt")

    out = tmp_path / "acts"
    factory = resolve_model_factory(TINY_MODEL_SPEC)
    summary = run(folder, dataset, out, factory, trust=True, batch_size=16)

    kinds = {
        record.checkpoint: read_shard_info(record.path).checkpoint_kind
        for record in summary.records
    }
    assert kinds == {
        "step_1": "state_dict",
        "step_2": "safetensors",
        "checkpoint-3": "hf_folder",
        "step_4": "torchscript",
        "step_5": "pickled_module",
    }
    for record, model in zip(summary.records, models, strict=True):
        expected = expected_sites(model, dataset)
        info = read_shard_info(record.path)
        if info.checkpoint_kind == "torchscript":
            assert info.sites == ["input", "output"]
            np.testing.assert_array_equal(
                read_site(record.path, "output"), expected["classifier"]
            )
        else:
            assert info.sites == CONV_SITES
            np.testing.assert_array_equal(
                read_site(record.path, "classifier"), expected["classifier"]
            )


# --- Output folder of a failed run ---------------------------------------------------


def test_failed_run_keeps_existing_folder(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    out.mkdir()
    with pytest.raises(SiteError):
        run(checkpoint_dir, dataset, out, factory, sites=["fc9"])
    assert out.is_dir()


def test_failed_run_removes_created_parents(
    checkpoint_dir: Path, dataset, factory, tmp_path: Path
) -> None:
    with pytest.raises(SiteError):
        run(checkpoint_dir, dataset, tmp_path / "a" / "b", factory, sites=["fc9"])
    assert not (tmp_path / "a").exists()


def test_output_folder_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "a" / "out"
    with pytest.raises(RuntimeError), output_folder(out):
        (out / "written-by-another-job.h5").write_bytes(b"")
        raise RuntimeError("run failed")
    assert (out / "written-by-another-job.h5").is_file()


def test_output_folder_removes_scratch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), output_folder(out, scratch=[".u/plan"]):
        (out / ".u" / "step_0").mkdir(parents=True)
        (out / ".u" / "plan").write_text("{}")
        raise KeyboardInterrupt
    assert not out.exists()


def test_output_folder_kept_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_folder(out) as folder:
        assert folder == out
    assert out.is_dir()
