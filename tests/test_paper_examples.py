"""Run each paper reproduction at quick size and check the paper's finding.

Each test trains (or only initialises) a model, probes it with probecvx in
``tmp_path`` and checks the qualitative result that Alain & Bengio (2016,
arXiv:1610.01644) report, on scikit-learn's digits and probecvx's ``toy``
data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The reproductions live in examples/, outside the installed package, and
# probecvx imports their models by the module path examples.paper.models.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples.paper import deep_mlp, mnist_convnet, untrained_mlp  # noqa: E402


def test_untrained_mlp_error_rises_with_depth(tmp_path: Path) -> None:
    summary = untrained_mlp.main(["--size", "quick", "--out", str(tmp_path)])

    errors = dict(zip(summary["sites"], summary["mean_test_error"], strict=True))
    assert summary["n_experiments"] == 5
    assert errors["input"] < 0.1
    assert errors["act32"] > 0.35
    assert errors["act16"] > errors["act4"]
    assert (tmp_path / "untrained_mlp.png").is_file()


# NOTE: probecvx issues a ConvergenceWarning for every probe that early
# stopping ends before the solver's tolerance, which is what early stopping is
# for; the probes' errors are still the ones to check.
@pytest.mark.filterwarnings("ignore::probecvx.errors.ConvergenceWarning")
def test_convnet_random_features_help_and_training_helps_more(tmp_path: Path) -> None:
    doc = mnist_convnet.main(["--size", "quick", "--out", str(tmp_path)])

    steps = list(doc["test_error"])
    initial, trained = doc["test_error"][steps[0]], doc["test_error"][steps[-1]]
    assert steps[0] == "0"
    assert initial["relu1"] < initial["input"]
    assert trained["relu3"] < trained["input"]
    assert trained["fc2"] < initial["fc2"]
    assert (tmp_path / "mnist_convnet.png").is_file()


def test_deep_mlp_aux_trains_and_skip_ignores_first_half(tmp_path: Path) -> None:
    doc = deep_mlp.main(["--size", "quick", "--out", str(tmp_path)])

    aux = doc["variants"]["aux"]["train_error"]
    steps = list(aux)
    first, middle, last = aux[steps[0]], aux[steps[1]], aux[steps[-1]]
    # At initialisation the classifier side is useless; the auxiliary heads
    # make it useful from left to right: by the middle checkpoint the error
    # still grows with depth, and by the end the deepest layer is nearly as
    # separable as the early ones.
    assert first["act128"] > 0.8
    assert middle["act32"] < middle["act64"] < middle["act128"]
    assert last["act128"] < 0.15
    assert last["act128"] < middle["act128"] / 2
    assert last["act128"] - last["act32"] < 0.1

    skip = doc["variants"]["skip"]["train_error"]
    chance = doc["variants"]["skip"]["chance_error"]
    for step in skip:
        assert skip[step]["act63"] > chance - 0.1
    assert skip[steps[-1]]["act64"] < 0.05
    assert skip[steps[-1]]["head"] < 0.3
    assert (tmp_path / "skip" / "figures" / "site_error_animation.gif").is_file()
