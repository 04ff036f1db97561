"""Probe sites: where a probe reads activations, how they are named and captured.

A probe site is the model input (named ``input``) or the output of one call of
one module. Sites are named by the module's dotted path from
``named_modules()``. A module called more than once in a forward pass yields
``path`` for its first call and ``path:2``, ``path:3``, … for later calls.
By default the input and every leaf module (one without children) are
probed, which covers both sides of each convolution, activation and pooling
layer. Container modules (a ``Sequential``, a residual block) are listed too
and can be selected by name, glob or type.

A module output that is not a tensor is reduced to one. A tuple, list, dict
or Hugging Face ``ModelOutput`` that contains one tensor gives that tensor.
One that contains several gives the first in depth-first order, with a
warning, and one without a tensor cannot be probed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from probecvx.errors import ExtractionError, SiteError

logger = logging.getLogger(__name__)

INPUT_SITE = "input"
POOLINGS = ("none", "avg", "max")
TYPE_PREFIX = "type:"
# Site of the model's return value, listed only when no module hook fired: for
# a model without children, a TorchScript module or a torch.export graph.
ROOT_SITE = "output"
# Per-sample dimensions a tensor needs before pooling applies: (C, H, W) or more.
MIN_POOLED_DIMS = 3
_MAX_LISTED_NAMES = 30


@dataclass(frozen=True)
class SiteInfo:
    """One probe site, as seen on one dry forward pass.

    Attributes
    ----------
    name : str
        ``input``, a dotted module path, or ``path:k`` for the k-th call.
    module_type : str
        Class name of the module, ``input`` for the input.
    output_shape : tuple of int
        Shape of one sample's value, before flattening or pooling.
    n_features : int
        Width of the stored activations under ``pooling``.
    bytes_per_sample : float
        Bytes one sample takes stored as float32 under ``pooling``.
    calls : int
        How many times the module ran in the forward pass.
    order : int
        Position in forward order, 0 for the input.
    module_name : str
        Dotted path of the module, ``""`` for the input.
    call_index : int
        Which call of the module this site is, from 1.
    leaf : bool
        Whether the module has no children; the input counts as a leaf.
    pooling : str
        Pooling applied to this site: ``none`` unless the requested pooling
        applies, which needs a module output with at least 3 dimensions per
        sample. The ``input`` site is never pooled.
    output_type : str
        Type name of the module's raw output, e.g. ``Tensor`` or ``tuple``.
    n_tensors : int
        Number of tensors found in the raw output.
    problem : str
        Why the site cannot be probed (no tensor output, no batch axis), or
        ``""`` when it can.
    """

    name: str
    module_type: str
    output_shape: tuple[int, ...]
    n_features: int
    bytes_per_sample: float
    calls: int
    order: int
    module_name: str = ""
    call_index: int = 1
    leaf: bool = True
    pooling: str = "none"
    output_type: str = "Tensor"
    n_tensors: int = 1
    problem: str = ""


def check_pooling(pooling: str) -> str:
    """Return ``pooling`` if it is ``none``, ``avg`` or ``max``, else raise."""
    if pooling not in POOLINGS:
        raise SiteError(
            f"invalid pooling {pooling!r}; choose one of {', '.join(POOLINGS)}"
        )
    return pooling


def site_pooling(output_shape: Sequence[int], pooling: str) -> str:
    """Return the pooling that applies to a site with this per-sample shape."""
    return pooling if len(output_shape) >= MIN_POOLED_DIMS else "none"


def pooled_features(output_shape: Sequence[int], pooling: str) -> int:
    """Return the number of stored features for this per-sample shape."""
    if site_pooling(output_shape, pooling) != "none":
        return int(output_shape[0])
    return math.prod(output_shape)


def list_sites(
    model: nn.Module, example_batch: torch.Tensor, *, pooling: str = "none"
) -> list[SiteInfo]:
    """List every probe site of ``model`` from one dry forward pass.

    The pass runs in eval mode under ``torch.inference_mode()``; the training
    flag of every submodule is restored afterwards, even on error.

    Parameters
    ----------
    model : nn.Module
        The model, on the same device as ``example_batch``.
    example_batch : Tensor of shape (b, *sample_shape)
        A few samples; 2 or more let a missing batch axis be detected.
    pooling : {"none", "avg", "max"}, default="none"
        ``avg`` or ``max`` reduce each module output with at least 3
        dimensions per sample, such as (C, H, W), over every dimension after
        the channel axis, to C features. The ``input`` site and other sites
        are flattened. Sets each site's ``pooling``, ``n_features`` and
        ``bytes_per_sample``.

    Returns
    -------
    list of SiteInfo
        The input first, then every module call in the order the calls
        finished (a container after its children).

    Raises
    ------
    ExtractionError
        When the forward pass fails; the message names the input shape and
        the module that failed.
    """
    check_pooling(pooling)
    batch_size = int(example_batch.shape[0])
    modules = _hookable_modules(model)
    records: list[tuple[str, str, int, _OutputSummary]] = []
    counts: dict[str, int] = {}

    def make_hook(module_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            counts[module_name] = counts.get(module_name, 0) + 1
            summary = _summarize_output(output, batch_size)
            records.append(
                (module_name, type(module).__name__, counts[module_name], summary)
            )

        return hook

    handles = [
        module.register_forward_hook(make_hook(name)) for name, module in modules
    ]
    try:
        with eval_mode(model), torch.inference_mode():
            output = run_forward(model, example_batch)
    finally:
        for handle in handles:
            handle.remove()

    leaves = {name for name, module in modules if _is_leaf(module)}
    infos = [_input_info(example_batch)]
    for module_name, module_type, call_index, summary in records:
        infos.append(
            _module_info(
                module_name,
                module_type,
                call_index,
                counts[module_name],
                len(infos),
                module_name in leaves,
                summary,
                pooling,
            )
        )
    if not any(summary.n_tensors for *_, summary in records):
        infos.append(_root_info(model, output, batch_size, pooling))
    return infos


def select_sites(
    infos: Sequence[SiteInfo], requested: Sequence[str] | None
) -> list[SiteInfo]:
    """Choose the probe sites to extract, in forward order.

    Parameters
    ----------
    infos : sequence of SiteInfo
        From :func:`list_sites`.
    requested : sequence of str, optional
        Exact site names, globs on site names (``features.*``) and type
        filters (``type:ReLU``, ``type:Conv*``, matched case-sensitively on
        the module's class name). Default: the input and every leaf module.

    Returns
    -------
    list of SiteInfo

    Raises
    ------
    SiteError
        When a request matches no site, a site requested by its exact name
        has no tensor output or no batch axis, or no site is left.

    Notes
    -----
    Sites that the default, a glob or a type filter chose but that cannot be
    probed are left out: silently when they return no tensor (such as the
    guard function of a ``torch.export`` graph), with a warning when their
    tensor has no batch axis.
    """
    exact_names: set[str] = set()
    if requested is None:
        chosen = [info for info in infos if info.leaf]
    else:
        chosen_names: set[str] = set()
        for raw_request in requested:
            request = raw_request.strip()
            matches = _match_request(infos, request)
            if not matches:
                raise SiteError(_unknown_site_message(infos, request))
            chosen_names.update(matches)
            if not _is_pattern(request):
                exact_names.add(request)
        chosen = [info for info in infos if info.name in chosen_names]

    chosen = _drop_unusable(chosen, exact_names)
    multi = [info.name for info in chosen if info.n_tensors > 1]
    if multi:
        warnings.warn(
            f"probe sites {format_site_names(multi)} return several tensors; "
            "probing the first tensor of each (depth-first order)",
            UserWarning,
            stacklevel=2,
        )
    return chosen


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore each submodule's flag on exit.

    A ``torch.export`` graph module, which rejects ``eval()``, runs in the
    mode it was exported in.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        # A torch.export graph rejects eval(): its mode was fixed at export time.
        logger.debug("%s does not support eval(); running it as exported", model)
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def run_forward(model: nn.Module, batch: torch.Tensor) -> Any:
    """Call ``model(batch)``; on failure name the input shape and failing module.

    Raises
    ------
    ExtractionError
        When the forward pass raises; chained to the original error.
    """
    stack: list[str] = []  # modules entered and not yet finished, outermost first

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(f"{name or '<model>'!r} ({type(module).__name__})")

        return hook

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles: list[RemovableHandle] = []
    for name, module in [("", model), *_hookable_modules(model)]:
        if not _is_scripted(module):
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
    try:
        return model(batch)
    except ExtractionError:
        raise
    except Exception as err:
        failing = stack[-1] if stack else "<model>"
        raise ExtractionError(
            f"forward pass failed on inputs of shape {tuple(batch.shape)} in "
            f"module {failing}: {type(err).__name__}: {_first_line(err)}; "
            "check that the data fits the model (sample shape, channels, dtype)"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


class SiteRecorder:
    """Capture copies of the selected sites' activations, batch by batch.

    Use it as a context manager: hooks are registered on entry and removed on
    exit, even on error. Each :meth:`run` calls the model once and returns the
    activations of every selected site as a (b, n_features) tensor on the
    model's device. Each tensor is a copy, so in-place operations that run
    after a module (``ReLU(inplace=True)``) do not change what was captured.
    Callers put the model in eval mode and under ``torch.inference_mode()``.

    Parameters
    ----------
    model : nn.Module
        The model the sites were listed on.
    sites : sequence of SiteInfo
        The selected sites, from :func:`select_sites`. Each is pooled by the
        method in its ``pooling`` field, which :func:`list_sites` sets.
    """

    def __init__(self, model: nn.Module, sites: Sequence[SiteInfo]) -> None:
        self.model = model
        self.sites = list(sites)
        self._by_name = {info.name: info for info in self.sites}
        # Sites without a module name (input, output) come from the forward
        # pass's argument and return value, not from hooks.
        self._hooked_modules = {
            info.module_name for info in self.sites if info.module_name
        }
        self._handles: list[RemovableHandle] = []
        self._counts: dict[str, int] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._batch_size = 0

    def __enter__(self) -> SiteRecorder:
        modules = dict(_hookable_modules(self.model))
        missing = sorted(self._hooked_modules - set(modules))
        if missing:
            raise SiteError(
                f"probe sites name modules that this model does not have: "
                f"{', '.join(missing)}; run `probecvx layers CKPT`"
            )
        try:
            for name in sorted(self._hooked_modules):
                hook = self._make_hook(name)
                self._handles.append(modules[name].register_forward_hook(hook))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove_hooks()

    def run(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run ``model(batch)`` and return ``{site: (b, n_features) tensor}``.

        Raises
        ------
        ExtractionError
            When the forward pass fails, or a site is not produced or has a
            shape other than the one listed.
        """
        self._counts = {}
        self._captured = {}
        self._batch_size = int(batch.shape[0])
        if INPUT_SITE in self._by_name:
            self._store(self._by_name[INPUT_SITE], batch)
        try:
            output = run_forward(self.model, batch)
            root = self._by_name.get(ROOT_SITE)
            if root is not None and not root.module_name:
                self._store_output(root, output)
            missing = [
                info.name for info in self.sites if info.name not in self._captured
            ]
            if missing:
                raise ExtractionError(
                    f"probe sites {', '.join(missing)} were not produced by the "
                    "forward pass; a module that runs only on some inputs cannot "
                    "be probed, so leave it out of --sites"
                )
            return {info.name: self._captured[info.name] for info in self.sites}
        finally:
            self._captured = {}

    def _make_hook(self, module_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            call_index = self._counts.get(module_name, 0) + 1
            self._counts[module_name] = call_index
            info = self._by_name.get(_site_name(module_name, call_index))
            if info is not None:
                self._store_output(info, output)

        return hook

    def _store_output(self, info: SiteInfo, output: Any) -> None:
        tensor, _ = _first_tensor(output)
        if tensor is None:
            raise ExtractionError(
                f"probe site {info.name} returned {type(output).__name__} "
                "without a tensor; leave it out of --sites"
            )
        self._store(info, tensor)

    def _store(self, info: SiteInfo, tensor: torch.Tensor) -> None:
        shape = tuple(tensor.shape)
        if shape[:1] != (self._batch_size,) or shape[1:] != info.output_shape:
            raise ExtractionError(
                f"probe site {info.name} produced shape {shape} for a batch of "
                f"{self._batch_size}, expected ({self._batch_size}, "
                f"{', '.join(map(str, info.output_shape))}); sites whose shape "
                "changes between batches cannot be stored"
            )
        self._captured[info.name] = flatten_site(tensor.detach(), info.pooling)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def flatten_site(tensor: torch.Tensor, pooling: str) -> torch.Tensor:
    """Return a new (b, n_features) tensor from a (b, *shape) module output.

    ``avg`` and ``max`` reduce over every dimension after the channel axis;
    ``none`` flattens. The result never shares memory with ``tensor``.
    """
    batch_size = tensor.shape[0]
    if pooling == "none" or tensor.dim() < MIN_POOLED_DIMS + 1:
        return tensor.reshape(batch_size, -1).clone()
    spatial = tensor.flatten(2)
    if pooling == "avg":
        return spatial.mean(dim=2)
    return spatial.amax(dim=2)


def format_site_names(names: Sequence[str], limit: int = _MAX_LISTED_NAMES) -> str:
    """Join site names with commas, cut to ``limit`` names with a count."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … ({len(names) - limit} more)"


def _hookable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return (dotted name, module) for every submodule that takes hooks."""
    if _is_scripted(model):
        return []
    return [(name, module) for name, module in model.named_modules() if name]


def _is_scripted(model: nn.Module) -> bool:
    """Return whether ``model`` is TorchScript, whose modules reject hooks."""
    return isinstance(model, torch.jit.ScriptModule)


def _root_info(
    model: nn.Module, output: Any, batch_size: int, pooling: str
) -> SiteInfo:
    """Describe the model's return value as the site ``output``."""
    module_type = type(model).__name__
    if _is_scripted(model):
        module_type = str(getattr(model, "original_name", module_type))
        warnings.warn(
            f"TorchScript model {module_type} does not support module hooks, so "
            f"only the sites {INPUT_SITE} and {ROOT_SITE} (its return value) can "
            "be probed; save a state_dict to probe every layer",
            UserWarning,
            stacklevel=3,
        )
    summary = _summarize_output(output, batch_size)
    return _module_info("", module_type, 1, 1, 1, True, summary, pooling, ROOT_SITE)


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _site_name(module_name: str, call_index: int) -> str:
    return module_name if call_index == 1 else f"{module_name}:{call_index}"


def _first_tensor(output: Any) -> tuple[torch.Tensor | None, int]:
    """Return the first tensor in ``output`` (depth first) and the tensor count."""
    tensors: list[torch.Tensor] = []
    _collect_tensors(output, tensors, depth=0)
    return (tensors[0] if tensors else None), len(tensors)


def _collect_tensors(value: Any, found: list[torch.Tensor], depth: int) -> None:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif depth > 8:  # NOTE: tensors nested deeper than 8 levels are not found
        return
    elif isinstance(value, Mapping):  # includes Hugging Face ModelOutput
        for item in value.values():
            _collect_tensors(item, found, depth + 1)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect_tensors(item, found, depth + 1)


@dataclass(frozen=True)
class _OutputSummary:
    """The parts of one module output that list_sites keeps."""

    output_shape: tuple[int, ...]
    output_type: str
    n_tensors: int
    problem: str


def _summarize_output(output: Any, batch_size: int) -> _OutputSummary:
    tensor, n_tensors = _first_tensor(output)
    output_type = type(output).__name__
    if tensor is None:
        return _OutputSummary(
            (), output_type, 0, f"returns {output_type} without a tensor"
        )
    shape = tuple(int(size) for size in tensor.shape)
    if tensor.dim() == 0 or shape[0] != batch_size:
        return _OutputSummary(
            (),
            output_type,
            n_tensors,
            f"has output shape {shape} without a leading batch axis of size "
            f"{batch_size}",
        )
    if tensor.is_complex():
        return _OutputSummary(
            shape[1:], output_type, n_tensors, f"has complex dtype {tensor.dtype}"
        )
    return _OutputSummary(shape[1:], output_type, n_tensors, "")


def _input_info(batch: torch.Tensor) -> SiteInfo:
    # The input is never pooled because it is raw data, not a feature map.
    # Pooling a grayscale image would leave one feature per sample.
    shape = tuple(int(size) for size in batch.shape[1:])
    n_features = math.prod(shape)
    return SiteInfo(
        name=INPUT_SITE,
        module_type="input",
        output_shape=shape,
        n_features=n_features,
        bytes_per_sample=4.0 * n_features,
        calls=1,
        order=0,
        pooling="none",
    )


def _module_info(
    module_name: str,
    module_type: str,
    call_index: int,
    calls: int,
    order: int,
    leaf: bool,
    summary: _OutputSummary,
    pooling: str,
    name: str | None = None,
) -> SiteInfo:
    # A site with a problem gets 0 features; select_sites rejects it if chosen.
    shape = summary.output_shape
    n_features = 0 if summary.problem else pooled_features(shape, pooling)
    return SiteInfo(
        name=name or _site_name(module_name, call_index),
        module_type=module_type,
        output_shape=shape,
        n_features=n_features,
        bytes_per_sample=4.0 * n_features,
        calls=calls,
        order=order,
        module_name=module_name,
        call_index=call_index,
        leaf=leaf,
        pooling=site_pooling(shape, pooling),
        output_type=summary.output_type,
        n_tensors=summary.n_tensors,
        problem=summary.problem,
    )


def _drop_unusable(chosen: list[SiteInfo], exact_names: set[str]) -> list[SiteInfo]:
    """Remove sites that cannot be probed; raise if one was requested by name."""
    unusable = [info for info in chosen if info.problem]
    named = [info for info in unusable if info.name in exact_names]
    if named:
        details = "; ".join(
            f"site {info.name!r}: it {info.problem}" for info in named[:5]
        )
        raise SiteError(
            f"cannot probe {details}; choose other sites with --sites "
            "(run `probecvx layers CKPT` to list them)"
        )

    without_batch = [info.name for info in unusable if info.n_tensors]
    if without_batch:
        warnings.warn(
            f"leaving out probe sites {format_site_names(without_batch)} because "
            "their output has no leading batch axis",
            UserWarning,
            stacklevel=3,
        )
    usable = [info for info in chosen if not info.problem]
    if not usable:
        raise SiteError(
            "none of the chosen probe sites returns a tensor with a batch axis; "
            "choose other sites with --sites (run `probecvx layers CKPT`)"
        )
    return usable


def _is_pattern(request: str) -> bool:
    return request.startswith(TYPE_PREFIX) or any(char in request for char in "*?[")


def _match_request(infos: Sequence[SiteInfo], request: str) -> list[str]:
    """Return the names of the sites that one --sites entry selects."""
    if request.startswith(TYPE_PREFIX):
        pattern = request[len(TYPE_PREFIX) :]
        return [
            info.name
            for info in infos
            if fnmatch.fnmatchcase(info.module_type, pattern)
        ]
    if _is_pattern(request):
        return [info.name for info in infos if fnmatch.fnmatchcase(info.name, request)]
    return [info.name for info in infos if info.name == request]


def _unknown_site_message(infos: Sequence[SiteInfo], request: str) -> str:
    valid = format_site_names([info.name for info in infos])
    if request.startswith(TYPE_PREFIX):
        types = sorted({info.module_type for info in infos})
        return (
            f"probe site filter {request!r} matches no module type; types in "
            f"this model: {format_site_names(types)}; run `probecvx layers CKPT`"
        )
    return (
        f"unknown probe site {request!r}; valid sites: {valid}; "
        "run `probecvx layers CKPT` to list them"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"
