"""Tests for finding, ordering, loading and hashing checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from probecvx.checkpoints import (
    CheckpointRef,
    checkpoint_sha256,
    discover_checkpoints,
    load_model,
    make_checkpoint_ref,
    resolve_model_factory,
)
from probecvx.errors import CheckpointError, InvalidInputError


class TinyNet(nn.Module):
    """Conv → ReLU → Linear, with children literally named ``model`` and ``submodule``.

    Those two names are the traps for prefix stripping: ``model.`` is
    Lightning's wrapper prefix and ``submodule`` contains ``module``.
    """

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, kernel_size=3)
        self.model = nn.Sequential(nn.Conv2d(width, width, kernel_size=1), nn.ReLU())
        self.submodule = nn.Linear(width * 4 * 4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(torch.relu(self.conv(x)))
        return self.head(torch.relu(self.submodule(hidden.flatten(1))))


class Wrapper(nn.Module):
    """A model whose only child is named ``model``, so every key starts ``model.``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TiedNet(nn.Module):
    """Embedding and output layer that share one weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens))


class MkdirOnUnpickle:
    """Pickle payload that creates a folder when unpickled, as an attack would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def trained_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def example_input() -> torch.Tensor:
    return torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def save_state(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path


def ref_named(refs: list[CheckpointRef], name: str) -> CheckpointRef:
    return next(ref for ref in refs if ref.name == name)


# Every supported kind, built once, with the kind discovery should report.
EXPECTED_KINDS = {
    "plain": "state_dict",
    "nested_state_dict": "state_dict",
    "nested_model": "state_dict",
    "nested_model_state_dict": "state_dict",
    "nested_module": "state_dict",
    "data_parallel": "state_dict",
    "compiled": "state_dict",
    "compiled_data_parallel": "state_dict",
    "lightning": "state_dict",
    "legacy_format": "state_dict",
    "weights": "safetensors",
    "hf_safetensors": "hf_folder",
    "hf_bin": "hf_folder",
    "hf_sharded": "hf_folder",
    "scripted": "torchscript",
    "exported": "export",
    "whole_module": "pickled_module",
}


@pytest.fixture(scope="module")
def all_kinds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyNet]:
    folder = tmp_path_factory.mktemp("kinds")
    net = trained_net()
    state = net.state_dict()

    torch.save(state, folder / "plain.pt")
    for key in ("state_dict", "model", "model_state_dict", "module"):
        torch.save({key: state, "optimizer": {"lr": 0.1}}, folder / f"nested_{key}.pth")
    torch.save(prefixed(state, "module."), folder / "data_parallel.pt")
    torch.save(prefixed(state, "_orig_mod."), folder / "compiled.pt")
    torch.save(
        prefixed(state, "_orig_mod.module."), folder / "compiled_data_parallel.pt"
    )
    torch.save(
        {"state_dict": prefixed(state, "model."), "epoch": 2}, folder / "lightning.ckpt"
    )
    torch.save(
        state, folder / "legacy_format.bin", _use_new_zipfile_serialization=False
    )
    safetensors.torch.save_file(dict(state), folder / "weights.safetensors")

    (folder / "hf_safetensors").mkdir()
    safetensors.torch.save_file(
        dict(state), folder / "hf_safetensors" / "model.safetensors"
    )
    (folder / "hf_bin").mkdir()
    torch.save(state, folder / "hf_bin" / "pytorch_model.bin")
    write_sharded_folder(folder / "hf_sharded", dict(state))

    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit, but TorchScript files still exist.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(net, example_input()), folder / "scripted.pt")
    program = torch.export.export(net, (example_input(),))
    torch.export.save(program, folder / "exported.pt2")
    torch.save(net, folder / "whole_module.pt")
    return folder, net


def write_sharded_folder(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir()
    keys = sorted(state)
    halves = {"part-1.safetensors": keys[:3], "part-2.safetensors": keys[3:]}
    weight_map = {}
    for filename, shard_keys in halves.items():
        safetensors.torch.save_file(
            {k: state[k] for k in shard_keys}, folder / filename
        )
        weight_map.update(dict.fromkeys(shard_keys, filename))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# Discovery: kinds and names ---------------------------------------------------------


def test_discover_detects_every_kind(all_kinds: tuple[Path, TinyNet]) -> None:
    folder, _ = all_kinds
    refs = discover_checkpoints(folder)
    kinds = {ref.name: ref.kind for ref in refs}
    assert kinds == EXPECTED_KINDS


def test_discover_paths_point_at_entries(all_kinds: tuple[Path, TinyNet]) -> None:
    folder, _ = all_kinds
    refs = discover_checkpoints(folder)
    assert ref_named(refs, "plain").path == folder / "plain.pt"
    assert ref_named(refs, "hf_bin").path == folder / "hf_bin"


@pytest.mark.parametrize(
    ("filenames", "expected_steps"),
    [
        (
            ["step_000300.pt", "step_000100.pt", "step_000200.pt"],
            {"step_000100": 100, "step_000200": 200, "step_000300": 300},
        ),
        (
            ["model_iter_500.pth", "model_iter_50.pth", "model_iter_5000.pth"],
            {"model_iter_50": 50, "model_iter_500": 500, "model_iter_5000": 5000},
        ),
        (
            [
                "epoch=3-step=1000.ckpt",
                "epoch=0-step=250.ckpt",
                "epoch=1-step=500.ckpt",
            ],
            {
                "epoch=0-step=250": 250,
                "epoch=1-step=500": 500,
                "epoch=3-step=1000": 1000,
            },
        ),
        (
            ["ckpt_12.safetensors", "ckpt_3.safetensors", "ckpt_100.safetensors"],
            {"ckpt_3": 3, "ckpt_12": 12, "ckpt_100": 100},
        ),
    ],
)
def test_discover_orders_by_step_in_name(
    tmp_path: Path, filenames: list[str], expected_steps: dict[str, int]
) -> None:
    state = TinyNet().state_dict()
    for filename in filenames:
        if filename.endswith(".safetensors"):
            safetensors.torch.save_file(dict(state), tmp_path / filename)
        else:
            torch.save(state, tmp_path / filename)

    refs = discover_checkpoints(tmp_path)

    assert [ref.name for ref in refs] == list(expected_steps)
    assert [ref.step for ref in refs] == list(expected_steps.values())


def test_discover_hf_folders_by_step(tmp_path: Path) -> None:
    state = dict(TinyNet().state_dict())
    for step in (1000, 500, 1500):
        (tmp_path / f"checkpoint-{step}").mkdir()
        safetensors.torch.save_file(
            state, tmp_path / f"checkpoint-{step}" / "model.safetensors"
        )
    (tmp_path / "runs").mkdir()  # a folder without weights, e.g. TensorBoard logs

    refs = discover_checkpoints(tmp_path)

    assert [ref.name for ref in refs] == [
        "checkpoint-500",
        "checkpoint-1000",
        "checkpoint-1500",
    ]
    assert [ref.step for ref in refs] == [500, 1000, 1500]


def test_discover_reads_steps_inside_files(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    torch.save(
        {"state_dict": state, "global_step": 70, "epoch": 1}, tmp_path / "last.ckpt"
    )
    torch.save({"model": state, "step": torch.tensor(30)}, tmp_path / "best.pt")
    torch.save({"model": state, "epoch": 5}, tmp_path / "final.pth")
    torch.save(state, tmp_path / "anonymous.pt")
    safetensors.torch.save_file(
        dict(state), tmp_path / "ema.safetensors", metadata={"step": "50"}
    )
    (tmp_path / "export").mkdir()
    torch.save(state, tmp_path / "export" / "pytorch_model.bin")
    (tmp_path / "export" / "trainer_state.json").write_text('{"global_step": 60}')

    refs = discover_checkpoints(tmp_path)

    assert [(ref.name, ref.step) for ref in refs] == [
        ("final", 5),
        ("best", 30),
        ("ema", 50),
        ("export", 60),
        ("last", 70),
        ("anonymous", None),
    ]


def test_discover_skips_step_from_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    torch.save({"step": 3, "payload": MkdirOnUnpickle(marker)}, tmp_path / "odd.pt")
    with open(tmp_path / "plain.pth", "wb") as handle:
        pickle.dump({"step": 4, "payload": MkdirOnUnpickle(marker)}, handle, protocol=5)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = discover_checkpoints(tmp_path)

    assert [ref.step for ref in refs] == [None, None]
    assert not marker.exists()
    assert [str(warning.message) for warning in caught] == []


@pytest.mark.parametrize("protocol", [2, 4])
def test_discover_spots_pickled_modules(tmp_path: Path, protocol: int) -> None:
    net = TinyNet()
    torch.save(net, tmp_path / "whole.pt", pickle_protocol=protocol)
    torch.save(
        {"model": net, "step": 1}, tmp_path / "nested.pt", pickle_protocol=protocol
    )
    torch.save(net.state_dict(), tmp_path / "weights.pt", pickle_protocol=protocol)

    kinds = {ref.name: ref.kind for ref in discover_checkpoints(tmp_path)}

    assert kinds == {
        "nested": "pickled_module",
        "weights": "state_dict",
        "whole": "pickled_module",
    }


def test_discover_natural_order_without_steps(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    for stem in ("a10", "a2", "b1", "a1"):
        torch.save(state, tmp_path / f"{stem}.pt")

    refs = discover_checkpoints(tmp_path)

    assert [ref.name for ref in refs] == ["a1", "a2", "a10", "b1"]
    assert all(ref.step is None for ref in refs)


def test_discover_breaks_step_ties_by_name(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    for stem in ("z_step_5", "a_step_5", "m_step_1", "no_step_here"):
        torch.save(state, tmp_path / f"{stem}.pt")

    refs = discover_checkpoints(tmp_path)

    assert [ref.name for ref in refs] == [
        "m_step_1",
        "a_step_5",
        "z_step_5",
        "no_step_here",
    ]


def test_discover_disambiguates_same_stem(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    torch.save(state, tmp_path / "step_100.pt")
    safetensors.torch.save_file(dict(state), tmp_path / "step_100.safetensors")
    torch.save(state, tmp_path / "step_200.pt")

    refs = discover_checkpoints(tmp_path)

    names = [ref.name for ref in refs]
    assert names == ["step_100_pt", "step_100_safetensors", "step_200"]
    assert [ref.step for ref in refs] == [100, 100, 200]


def test_discover_ignores_hidden_and_other_files(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    torch.save(state, tmp_path / "step_1.pt")
    torch.save(state, tmp_path / ".step_2.pt")
    torch.save(state, tmp_path / ".probecvx-tmp-step_3.pt.abc")
    (tmp_path / "notes.txt").write_text("learning rate 0.1\n")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    torch.save(state, tmp_path / ".cache" / "pytorch_model.bin")

    refs = discover_checkpoints(tmp_path)

    assert [ref.name for ref in refs] == ["step_1"]


def test_discover_torchscript_any_suffix(
    all_kinds: tuple[Path, TinyNet], tmp_path: Path
) -> None:
    source, _ = all_kinds
    (tmp_path / "scripted.zip").write_bytes((source / "scripted.pt").read_bytes())
    (tmp_path / "random.zip").write_bytes(b"PK\x05\x06" + bytes(18))

    refs = discover_checkpoints(tmp_path)

    assert [(ref.name, ref.kind) for ref in refs] == [("scripted", "torchscript")]


def test_discover_glob_selects_files(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    torch.save(state, tmp_path / "step_1.pt")
    torch.save(state, tmp_path / "step_2.pth")
    torch.save(state, tmp_path / "step_3.weights")  # unknown suffix, torch content
    (tmp_path / "step_4.weights").write_text("not a checkpoint")

    pt_only = discover_checkpoints(tmp_path, "*.pt")
    by_suffix = discover_checkpoints(tmp_path, "*.weights")

    assert [ref.name for ref in pt_only] == ["step_1"]
    assert [(ref.name, ref.kind) for ref in by_suffix] == [("step_3", "state_dict")]


def test_discover_glob_into_subfolders(tmp_path: Path) -> None:
    state = TinyNet().state_dict()
    save_state(tmp_path / "run1" / "step_10.pt", state)
    save_state(tmp_path / "run2" / "step_10.pt", state)
    save_state(tmp_path / "run2" / "step_20.pt", state)

    refs = discover_checkpoints(tmp_path, "run*/*.pt")

    assert [ref.name for ref in refs] == [
        "run1_step_10_pt",
        "run2_step_10_pt",
        "step_20",
    ]


def test_make_checkpoint_ref_single_file(tmp_path: Path) -> None:
    path = save_state(tmp_path / "step_000100.pt", TinyNet().state_dict())

    ref = make_checkpoint_ref(path)

    assert ref == CheckpointRef(
        path=path, name="step_000100", step=100, kind="state_dict"
    )


def test_make_checkpoint_ref_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidInputError, match=r"checkpoint not found: .*absent\.pt"):
        make_checkpoint_ref(tmp_path / "absent.pt")
    with pytest.raises(InvalidInputError, match=r"notes\.txt is not a checkpoint"):
        make_checkpoint_ref(tmp_path / "notes.txt")


def test_checkpoint_ref_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint kind 'onnx'"):
        CheckpointRef(path=tmp_path, name="x", step=None, kind="onnx")


# Discovery errors ---------------------------------------------------------------


def test_discover_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"directory not found: .*nowhere"):
        discover_checkpoints(tmp_path / "nowhere")


def test_discover_file_not_directory(tmp_path: Path) -> None:
    path = save_state(tmp_path / "step_1.pt", TinyNet().state_dict())
    with pytest.raises(InvalidInputError, match="is a file, not a folder"):
        discover_checkpoints(path)


def test_discover_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidInputError, match=r"no checkpoints found in .*\.pt, \.pth.*--glob"
    ):
        discover_checkpoints(tmp_path)


def test_discover_only_unrecognised_files(tmp_path: Path) -> None:
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF\r\n")
    with pytest.raises(InvalidInputError, match=r"looked for files ending in \.pt"):
        discover_checkpoints(tmp_path)


def test_discover_glob_matches_nothing(tmp_path: Path) -> None:
    save_state(tmp_path / "step_1.pt", TinyNet().state_dict())
    with pytest.raises(InvalidInputError, match=r"match --glob '\*\.ckpt'"):
        discover_checkpoints(tmp_path, "*.ckpt")


def test_discover_glob_absolute_pattern(tmp_path: Path) -> None:
    save_state(tmp_path / "step_1.pt", TinyNet().state_dict())
    with pytest.raises(InvalidInputError, match="invalid --glob"):
        discover_checkpoints(tmp_path, str(tmp_path / "*.pt"))


# Loading every kind -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_load_model_matches_original(
    all_kinds: tuple[Path, TinyNet], name: str
) -> None:
    folder, net = all_kinds
    ref = ref_named(discover_checkpoints(folder), name)
    trust = name == "whole_module"

    loaded = load_model(ref, TinyNet, trust=trust)

    x = example_input()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_load_model_copies_weights(all_kinds: tuple[Path, TinyNet]) -> None:
    folder, net = all_kinds
    ref = ref_named(discover_checkpoints(folder), "plain")
    loaded = load_model(ref, lambda: TinyNet())
    assert isinstance(loaded, TinyNet)
    torch.testing.assert_close(loaded.submodule.weight, net.submodule.weight)
    assert loaded.training  # returned as built, the extractor sets the mode


def test_load_code_kinds_need_no_factory(all_kinds: tuple[Path, TinyNet]) -> None:
    folder, net = all_kinds
    refs = discover_checkpoints(folder)
    x = example_input()
    for name in ("scripted", "exported"):
        loaded = load_model(ref_named(refs, name), None)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), net(x))


def test_load_tied_weights_from_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TiedNet()
    safetensors.torch.save_model(net, str(tmp_path / "tied.safetensors"))
    ref = discover_checkpoints(tmp_path)[0]

    loaded = load_model(ref, TiedNet)

    tokens = torch.tensor([[0, 3, 5]])
    torch.testing.assert_close(loaded(tokens), net(tokens))
    assert loaded.out.weight is loaded.embed.weight


# Trust and unsafe pickles -------------------------------------------------------


def test_pickled_module_needs_trust(all_kinds: tuple[Path, TinyNet]) -> None:
    folder, _ = all_kinds
    ref = ref_named(discover_checkpoints(folder), "whole_module")
    with pytest.raises(
        CheckpointError, match=r"weights_only=True: .*TinyNet.*--trust-checkpoints"
    ):
        load_model(ref, TinyNet)


def test_pickled_module_trusted_ignores_factory(
    all_kinds: tuple[Path, TinyNet],
) -> None:
    folder, net = all_kinds
    ref = ref_named(discover_checkpoints(folder), "whole_module")
    loaded = load_model(ref, None, trust=True)
    assert isinstance(loaded, TinyNet)
    torch.testing.assert_close(loaded.head.bias, net.head.bias)


def test_pickled_module_nested_under_model(tmp_path: Path) -> None:
    net = trained_net(seed=3)
    torch.save({"model": net, "step": 9}, tmp_path / "run.pt")
    ref = discover_checkpoints(tmp_path)[0]

    loaded = load_model(ref, None, trust=True)

    torch.testing.assert_close(loaded(example_input()), net(example_input()))


@pytest.mark.parametrize("file_format", ["torch_zip", "pickle_2", "pickle_5"])
def test_malicious_pickle_not_run(tmp_path: Path, file_format: str) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    if file_format == "torch_zip":
        torch.save({"state_dict": MkdirOnUnpickle(marker)}, path)
    else:
        protocol = int(file_format.removeprefix("pickle_"))
        with open(path, "wb") as handle:
            pickle.dump(MkdirOnUnpickle(marker), handle, protocol=protocol)
    ref = discover_checkpoints(tmp_path)[0]

    with pytest.raises(CheckpointError, match=r"arbitrary code.*--trust-checkpoints"):
        load_model(ref, TinyNet)
    assert not marker.exists()

    # The same file with trust does run the payload, so the check above can fail.
    # What the payload returns is no model, so loading still fails afterwards.
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_model(ref, TinyNet, trust=True)
    assert marker.exists()


# Key prefixes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    ["module.", "_orig_mod.", "model.", "_orig_mod.module.", "module._orig_mod."],
)
def test_load_strips_wrapper_prefix(tmp_path: Path, prefix: str) -> None:
    net = trained_net(seed=1)
    torch.save(prefixed(net.state_dict(), prefix), tmp_path / "step_1.pt")
    ref = discover_checkpoints(tmp_path)[0]

    loaded = load_model(ref, TinyNet)

    # ``model.0.weight`` and ``submodule.weight`` keep their own components.
    torch.testing.assert_close(loaded.model[0].weight, net.model[0].weight)
    torch.testing.assert_close(loaded.submodule.weight, net.submodule.weight)


def test_load_keeps_leading_model_component(tmp_path: Path) -> None:
    torch.manual_seed(2)
    wrapper = Wrapper()
    torch.save(wrapper.state_dict(), tmp_path / "plain.pt")
    torch.save(prefixed(wrapper.state_dict(), "model."), tmp_path / "lightning.pt")
    refs = discover_checkpoints(tmp_path)

    for ref in refs:
        loaded = load_model(ref, Wrapper)
        torch.testing.assert_close(loaded(example_input()), wrapper(example_input()))


def test_load_prefix_only_when_all_keys_have_it(tmp_path: Path) -> None:
    state = trained_net().state_dict()
    mixed = {
        ("module." + key if key.startswith("conv") else key): value
        for key, value in state.items()
    }
    torch.save(mixed, tmp_path / "mixed.pt")
    ref = discover_checkpoints(tmp_path)[0]

    with pytest.raises(
        CheckpointError, match=r"2 missing keys \(conv.bias, conv.weight\)"
    ):
        load_model(ref, TinyNet)


def test_load_never_strips_by_substring(tmp_path: Path) -> None:
    # Every key contains "module." as a substring, but none starts with it.
    state = {"submodule.weight": torch.zeros(2, 2), "submodule.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "sub.pt")

    class OnlySub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.submodule = nn.Linear(2, 2)

    loaded = load_model(discover_checkpoints(tmp_path)[0], OnlySub)

    assert torch.count_nonzero(loaded.submodule.weight) == 0


# Mismatches and bad files -------------------------------------------------------


def test_load_reports_shape_mismatch(tmp_path: Path) -> None:
    torch.save(TinyNet(width=4).state_dict(), tmp_path / "wide.pt")
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches \(conv\.bias: checkpoint \(4,\), model \(3,\)",
    ):
        load_model(ref, TinyNet)


def test_load_reports_missing_and_unexpected(tmp_path: Path) -> None:
    state = dict(trained_net().state_dict())
    del state["head.bias"]
    for index in range(7):
        state[f"extra.{index}"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pt")
    ref = discover_checkpoints(tmp_path)[0]

    with pytest.raises(CheckpointError) as excinfo:
        load_model(ref, TinyNet)

    message = str(excinfo.value)
    assert "1 missing key (head.bias)" in message
    assert (
        "7 unexpected keys (extra.0, extra.1, extra.2, extra.3, extra.4, …)" in message
    )
    assert "Check that --model" in message


@pytest.mark.parametrize("name", ["plain", "weights", "hf_safetensors", "hf_bin"])
def test_load_weights_without_factory(
    all_kinds: tuple[Path, TinyNet], name: str
) -> None:
    folder, _ = all_kinds
    ref = ref_named(discover_checkpoints(folder), name)
    with pytest.raises(InvalidInputError, match=r"contains only weights.*pass --model"):
        load_model(ref, None)


def test_load_truncated_file(all_kinds: tuple[Path, TinyNet], tmp_path: Path) -> None:
    data = (all_kinds[0] / "plain.pt").read_bytes()
    (tmp_path / "step_5.pt").write_bytes(data[: len(data) // 2])
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(CheckpointError, match=r"step_5\.pt is truncated"):
        load_model(ref, TinyNet)


def test_load_truncated_safetensors(
    all_kinds: tuple[Path, TinyNet], tmp_path: Path
) -> None:
    data = (all_kinds[0] / "weights.safetensors").read_bytes()
    (tmp_path / "step_5.safetensors").write_bytes(data[: len(data) // 2])
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*step_5"):
        load_model(ref, TinyNet)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"hello, this is text\n", "not a PyTorch checkpoint or it is corrupt"),
        (bytes(range(256)) * 4, "not a PyTorch checkpoint or it is corrupt"),
    ],
)
def test_load_not_a_checkpoint(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "fake.pt").write_bytes(content)
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(CheckpointError, match=rf"fake\.pt.*{expected}"):
        load_model(ref, TinyNet)


def test_load_file_without_state_dict(tmp_path: Path) -> None:
    torch.save({"optimizer": {"lr": 0.1}, "note": "no weights"}, tmp_path / "opt.pt")
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(
        CheckpointError, match=r"contains no state_dict or model: .*'optimizer', 'note'"
    ):
        load_model(ref, TinyNet)


def test_load_bad_torchscript_and_export(tmp_path: Path) -> None:
    (tmp_path / "broken.pt2").write_bytes(b"not a zip")
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(CheckpointError, match=r"cannot load torch.export program"):
        load_model(ref, None)
    missing = CheckpointRef(tmp_path / "gone.pt", "gone", None, "torchscript")
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*gone\.pt"):
        load_model(missing, None)


def test_load_hf_folder_missing_shard(
    all_kinds: tuple[Path, TinyNet], tmp_path: Path
) -> None:
    write_sharded_folder(tmp_path / "checkpoint-7", dict(all_kinds[1].state_dict()))
    (tmp_path / "checkpoint-7" / "part-2.safetensors").unlink()
    ref = discover_checkpoints(tmp_path)[0]
    with pytest.raises(CheckpointError, match=r"part-2\.safetensors .* is missing"):
        load_model(ref, TinyNet)


# Model factories ----------------------------------------------------------------

MODEL_SOURCE = """
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(2, width)


def build(depth: int = 1) -> nn.Module:
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(depth)])


def not_a_model() -> str:
    return "weights"


VERSION = 3
"""


@pytest.fixture
def model_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "ckpt_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_factory_from_module(model_package: Path) -> None:
    factory = resolve_model_factory("ckpt_test_pkg.nets:Net", '{"width": 7}')
    model = factory()
    assert isinstance(model, nn.Module)
    assert model.fc.out_features == 7


def test_factory_from_file(model_package: Path) -> None:
    factory = resolve_model_factory(
        f"{model_package / 'nets.py'}:build", '{"depth": 3}'
    )
    assert len(factory()) == 3
    assert factory() is not factory()


def test_factory_pickles_by_spec(model_package: Path) -> None:
    factory = resolve_model_factory(f"{model_package / 'nets.py'}:Net", '{"width": 5}')
    restored = pickle.loads(pickle.dumps(factory))
    assert restored().fc.out_features == 5


def test_factory_errors(model_package: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def f(:\n")
    nets = model_package / "nets.py"
    cases = [
        ("ckpt_test_pkg.nets", None, "expected MODULE:CALLABLE"),
        (
            "no_such_pkg_xyz.nets:Net",
            None,
            "cannot import module 'no_such_pkg_xyz.nets'",
        ),
        ("no_such_pkg_xyz.nets:Net", None, "ModuleNotFoundError"),
        (f"{tmp_path / 'absent.py'}:Net", None, "model file not found"),
        (f"{tmp_path / 'broken.py'}:f", None, "SyntaxError"),
        ("ckpt_test_pkg.nets:Missing", None, "no attribute 'Missing'.*Net, build"),
        ("ckpt_test_pkg.nets:VERSION", None, "'VERSION' is a int, not a class"),
        (f"{nets}:Net", "[1, 2]", "--model-kwargs .* is a JSON list, not an object"),
        (f"{nets}:Net", "{width: 3}", "--model-kwargs .* is not valid JSON"),
        (f"{nets}:Net", '{"depth": 2}', "does not fit .*unexpected keyword"),
    ]
    for spec, kwargs_json, expected in cases:
        with pytest.raises(InvalidInputError, match=expected):
            resolve_model_factory(spec, kwargs_json)


def test_missing_attribute_names_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "nets.py").write_text(MODEL_SOURCE)
    (tmp_path / "empty.py").write_text("import torch\n")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(InvalidInputError) as with_callables:
        resolve_model_factory("nets.py:nothere")
    with pytest.raises(InvalidInputError) as without_callables:
        resolve_model_factory("empty.py:nothere")
    first, second = str(with_callables.value), str(without_callables.value)

    assert "_probecvx_model" not in first
    assert "_probecvx_model" not in second
    assert "file nets.py has no attribute 'nothere'" in first
    assert "callables defined there after ':': Net, build, not_a_model" in first
    assert "file empty.py has no attribute 'nothere'" in second
    assert "defines no public class or function" in second


def test_factory_must_return_module(model_package: Path) -> None:
    factory = resolve_model_factory("ckpt_test_pkg.nets:not_a_model")
    with pytest.raises(
        InvalidInputError, match=r"returned str, not a torch\.nn\.Module"
    ):
        factory()


def test_factory_feeds_load_model(tmp_path: Path, model_package: Path) -> None:
    factory = resolve_model_factory("ckpt_test_pkg.nets:Net", '{"width": 4}')
    source = factory()
    torch.save(source.state_dict(), tmp_path / "step_3.pt")

    loaded = load_model(discover_checkpoints(tmp_path)[0], factory)

    torch.testing.assert_close(loaded.fc.weight, source.fc.weight)


# Hashing ------------------------------------------------------------------------


def test_sha256_of_file_matches_hashlib(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (2_500_000,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert checkpoint_sha256(path) == hashlib.sha256(data).hexdigest()


def test_sha256_of_folder_tracks_names_and_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "sub" / "extra.json").write_bytes(b"{}")
    first = checkpoint_sha256(folder)

    assert checkpoint_sha256(folder) == first
    (folder / "sub" / "extra.json").write_bytes(b"{ }")
    changed_bytes = checkpoint_sha256(folder)
    assert changed_bytes != first
    (folder / "sub" / "extra.json").rename(folder / "sub" / "other.json")
    assert checkpoint_sha256(folder) not in (first, changed_bytes)
