"""Tests of probe site listing, selection and capture."""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn

from probecvx.errors import ExtractionError, SiteError
from probecvx.sites import (
    SiteRecorder,
    eval_mode,
    list_sites,
    select_sites,
)
from tests.tinymodels import (
    SharedActNet,
    StructuredNet,
    TinyConvNet,
    reference_forward,
    set_dyadic_weights,
)

TINY_SITES = [
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


def capture(model: nn.Module, sites, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    with (
        SiteRecorder(model, sites) as recorder,
        eval_mode(model),
        torch.inference_mode(),
    ):
        return recorder.run(batch)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks)
        for module in model.modules()
    )


def test_list_sites_tiny_convnet(seed: int) -> None:
    infos = list_sites(TinyConvNet(), torch.rand(2, 1, 8, 8))

    assert [info.name for info in infos] == TINY_SITES
    assert [info.order for info in infos] == list(range(len(TINY_SITES)))
    by_name = {info.name: info for info in infos}
    assert by_name["input"].module_type == "input"
    assert by_name["input"].output_shape == (1, 8, 8)
    assert by_name["features.0"].module_type == "Conv2d"
    assert by_name["features.0"].output_shape == (4, 8, 8)
    assert by_name["features.0"].n_features == 256
    assert by_name["features.0"].bytes_per_sample == 1024.0
    assert by_name["features.2"].output_shape == (4, 4, 4)
    assert by_name["classifier"].output_shape == (3,)
    assert by_name["classifier"].calls == 1
    assert by_name["features"].leaf is False
    assert by_name["features.1"].leaf is True


def test_default_selection_is_input_and_leaves(seed: int) -> None:
    infos = list_sites(TinyConvNet(), torch.rand(2, 1, 8, 8))
    names = [info.name for info in select_sites(infos, None)]
    assert names == [name for name in TINY_SITES if name != "features"]


def test_repeated_module_calls_are_named(seed: int) -> None:
    model = SharedActNet()
    infos = list_sites(model, torch.randn(3, 6))

    act_sites = [info for info in infos if info.module_name == "act"]
    assert [info.name for info in act_sites] == ["act", "act:2", "act:3"]
    assert [info.call_index for info in act_sites] == [1, 2, 3]
    assert all(info.calls == 3 for info in act_sites)
    assert [info.output_shape for info in act_sites] == [(5,), (4,), (4,)]


def test_repeated_calls_capture_each_call(seed: int) -> None:
    model = SharedActNet()
    batch = torch.randn(7, 6)
    infos = list_sites(model, batch[:2])
    captured = capture(model, select_sites(infos, ["act", "act:2", "act:3"]), batch)

    with torch.no_grad():
        first = torch.relu(model.fc1(batch))
        second = torch.relu(model.fc2(first) - 0.5)
        third = torch.relu(second * 2.0)
    torch.testing.assert_close(captured["act"], first, rtol=0, atol=0)
    torch.testing.assert_close(captured["act:2"], second, rtol=0, atol=0)
    torch.testing.assert_close(captured["act:3"], third, rtol=0, atol=0)


def test_inplace_relu_does_not_change_conv(seed: int) -> None:
    model = set_dyadic_weights(TinyConvNet(), seed=3)
    batch = torch.rand(5, 1, 8, 8) - 0.5
    infos = list_sites(model, batch[:2])
    captured = capture(model, select_sites(infos, ["features.0", "features.1"]), batch)

    expected = reference_forward(model, batch)
    conv = captured["features.0"]
    assert bool((conv < 0).any()), "the test needs negative conv outputs"
    torch.testing.assert_close(
        conv, expected["features.0"].reshape(5, -1), rtol=0, atol=0
    )
    torch.testing.assert_close(captured["features.1"], conv.clamp(min=0))


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (["classifier", "input"], ["input", "classifier"]),
        (
            ["features.*"],
            ["features.0", "features.1", "features.2", "features.3", "features.4"],
        ),
        (["type:ReLU"], ["features.1", "features.4"]),
        (["type:Conv*"], ["features.0", "features.3"]),
        (["type:MaxPool2d", " flatten "], ["features.2", "flatten"]),
        (["features"], ["features"]),
        (["feat?res.[02]"], ["features.0", "features.2"]),
    ],
)
def test_select_sites(seed: int, requested: list[str], expected: list[str]) -> None:
    infos = list_sites(TinyConvNet(), torch.rand(2, 1, 8, 8))
    assert [info.name for info in select_sites(infos, requested)] == expected


def test_select_unknown_site_lists_valid(seed: int) -> None:
    infos = list_sites(TinyConvNet(), torch.rand(2, 1, 8, 8))
    with pytest.raises(SiteError) as excinfo:
        select_sites(infos, ["classifier", "fc3"])

    message = str(excinfo.value)
    assert "unknown probe site 'fc3'" in message
    assert "valid sites: input, features.0, features.1" in message
    assert "run `probecvx layers CKPT`" in message


def test_type_filter_is_case_sensitive(seed: int) -> None:
    infos = list_sites(TinyConvNet(), torch.rand(2, 1, 8, 8))
    with pytest.raises(SiteError, match=r"'type:relu' matches no module type.*ReLU"):
        select_sites(infos, ["type:relu"])


def test_long_site_list_is_cut(seed: int) -> None:
    model = nn.Sequential(*[nn.Identity() for _ in range(50)])
    infos = list_sites(model, torch.randn(2, 3))
    with pytest.raises(SiteError, match=r", … \(21 more\); run `probecvx layers"):
        select_sites(infos, ["missing"])


def test_tuple_output_takes_first_tensor(seed: int) -> None:
    model = StructuredNet()
    batch = torch.randn(4, 6)
    infos = list_sites(model, batch)
    pair = next(info for info in infos if info.name == "pair")
    assert pair.output_type == "tuple"
    assert pair.n_tensors == 2

    with pytest.warns(UserWarning, match="probe sites pair return several tensors"):
        sites = select_sites(infos, ["pair", "mapping"])
    captured = capture(model, sites, batch)
    with torch.no_grad():
        hidden = model.fc(batch)
    torch.testing.assert_close(captured["pair"], hidden + 1)
    torch.testing.assert_close(captured["mapping"], 2 * (hidden + 1) * (hidden - 1))


def test_single_tensor_in_dict_has_no_warning(seed: int) -> None:
    infos = list_sites(StructuredNet(), torch.randn(4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sites = select_sites(infos, ["mapping"])
    assert sites[0].output_type == "dict"
    assert sites[0].n_tensors == 1


def test_ordered_dict_output(seed: int) -> None:
    class ModelOutputLike(collections.OrderedDict):
        pass

    class Wrapper(nn.Module):
        def forward(self, x: torch.Tensor) -> ModelOutputLike:
            return ModelOutputLike(logits=x * 3)

    model = nn.Sequential(nn.Linear(6, 2), Wrapper())
    batch = torch.randn(4, 6)
    infos = list_sites(model, batch)
    captured = capture(model, select_sites(infos, ["1"]), batch)
    with torch.no_grad():
        torch.testing.assert_close(captured["1"], model[0](batch) * 3)


def test_output_without_tensor_by_name(seed: int) -> None:
    infos = list_sites(StructuredNet(), torch.randn(4, 6))
    with pytest.raises(
        SiteError, match="cannot probe site 'text': it returns str without a tensor"
    ):
        select_sites(infos, ["fc", "text"])


def test_output_without_tensor_left_out(seed: int) -> None:
    infos = list_sites(StructuredNet(), torch.randn(4, 6))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "probe sites pair return several")
        default = [info.name for info in select_sites(infos, None)]
    assert default == ["input", "fc", "pair", "mapping"]
    with pytest.raises(SiteError, match="none of the chosen probe sites"):
        select_sites(infos, ["te*"])


class Total(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


def test_output_without_batch_axis_by_name(seed: int) -> None:
    infos = list_sites(nn.Sequential(nn.Linear(3, 2), Total()), torch.randn(4, 3))
    with pytest.raises(
        SiteError, match=r"'1': it has output shape \(\) without a leading batch"
    ):
        select_sites(infos, ["1"])


def test_output_without_batch_axis_left_out(seed: int) -> None:
    infos = list_sites(nn.Sequential(nn.Linear(3, 2), Total()), torch.randn(4, 3))
    with pytest.warns(UserWarning, match="leaving out probe sites 1 because"):
        sites = select_sites(infos, None)
    assert [info.name for info in sites] == ["input", "0"]


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooling(seed: int, pooling: str) -> None:
    model = set_dyadic_weights(TinyConvNet(), seed=4)
    batch = torch.rand(6, 1, 8, 8)
    infos = list_sites(model, batch[:2], pooling=pooling)
    by_name = {info.name: info for info in infos}
    assert by_name["features.0"].n_features == 4
    assert by_name["features.0"].pooling == pooling
    assert by_name["input"].n_features == 64
    assert by_name["input"].pooling == "none"
    assert by_name["classifier"].n_features == 3
    assert by_name["classifier"].pooling == "none"

    captured = capture(model, select_sites(infos, None), batch)
    expected = reference_forward(model, batch)
    for name in ["features.0", "features.2", "features.4"]:
        spatial = expected[name].flatten(2)
        pooled = spatial.mean(2) if pooling == "avg" else spatial.amax(2)
        torch.testing.assert_close(captured[name], pooled, rtol=0, atol=0)
    torch.testing.assert_close(captured["input"], batch.flatten(1), rtol=0, atol=0)
    torch.testing.assert_close(captured["classifier"], expected["classifier"])


def test_invalid_pooling(seed: int) -> None:
    with pytest.raises(SiteError, match="invalid pooling 'mean'; choose one of none"):
        list_sites(TinyConvNet(), torch.rand(2, 1, 8, 8), pooling="mean")


def test_training_mode_restored(seed: int) -> None:
    model = TinyConvNet().train()
    model.features[2].eval()
    flags = [module.training for module in model.modules()]

    list_sites(model, torch.rand(2, 1, 8, 8))
    assert [module.training for module in model.modules()] == flags

    with pytest.raises(ExtractionError):
        list_sites(model, torch.rand(2, 3, 8, 8))
    assert [module.training for module in model.modules()] == flags
    assert hook_count(model) == 0


def test_list_sites_runs_in_eval_mode(seed: int) -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    list_sites(nn.Sequential(nn.Linear(3, 3), Probe()).train(), torch.randn(2, 3))
    assert seen == [False]


def test_wrong_input_shape_names_layer(seed: int) -> None:
    with pytest.raises(ExtractionError) as excinfo:
        list_sites(TinyConvNet(), torch.rand(2, 3, 8, 8))

    message = str(excinfo.value)
    assert "inputs of shape (2, 3, 8, 8)" in message
    assert "module 'features.0' (Conv2d)" in message
    assert "check that the data fits the model" in message


def test_wrong_image_size_names_linear(seed: int) -> None:
    with pytest.raises(ExtractionError, match=r"module 'classifier' \(Linear\)"):
        list_sites(TinyConvNet(), torch.rand(2, 1, 12, 12))


def test_recorder_removes_hooks(seed: int) -> None:
    model = TinyConvNet()
    infos = list_sites(model, torch.rand(2, 1, 8, 8))
    sites = select_sites(infos, None)

    capture(model, sites, torch.rand(3, 1, 8, 8))
    assert hook_count(model) == 0
    with pytest.raises(ExtractionError), SiteRecorder(model, sites) as recorder:
        recorder.run(torch.rand(3, 1, 9, 9))
    assert hook_count(model) == 0


def test_recorder_rejects_changed_shape(seed: int) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    infos = list_sites(model, torch.rand(2, 1, 4, 4))
    with (
        pytest.raises(ExtractionError, match=r"probe site 1 produced shape \(3, 25\)"),
        SiteRecorder(model, select_sites(infos, ["1"])) as recorder,
    ):
        recorder.run(torch.rand(3, 1, 5, 5))


def test_leaf_model_is_named_output(seed: int) -> None:
    infos = list_sites(nn.Linear(3, 2), torch.randn(2, 3))
    assert [info.name for info in infos] == ["input", "output"]
    assert infos[1].module_type == "Linear"


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_torchscript_probes_input_and_output(seed: int) -> None:
    model = TinyConvNet().eval()
    scripted = torch.jit.trace(model, torch.rand(2, 1, 8, 8))
    with pytest.warns(UserWarning, match="does not support module hooks"):
        infos = list_sites(scripted, torch.rand(2, 1, 8, 8))
    assert [info.name for info in infos] == ["input", "output"]
    assert infos[1].module_type == "TinyConvNet"

    batch = torch.rand(5, 1, 8, 8)
    captured = capture(scripted, select_sites(infos, None), batch)
    with torch.no_grad():
        torch.testing.assert_close(captured["output"], model(batch))


def test_exported_graph_probes_output(seed: int) -> None:
    model = TinyConvNet().eval()
    batch_dim = torch.export.Dim("batch")
    exported = torch.export.export(
        model, (torch.rand(2, 1, 8, 8),), dynamic_shapes={"x": {0: batch_dim}}
    ).module()
    infos = list_sites(exported, torch.rand(2, 1, 8, 8))
    assert [info.name for info in select_sites(infos, None)] == ["input", "output"]

    batch = torch.rand(5, 1, 8, 8)
    captured = capture(exported, select_sites(infos, ["output"]), batch)
    with torch.no_grad():
        torch.testing.assert_close(captured["output"], model(batch))
