"""Find, order and load model checkpoints.

A checkpoint directory is scanned once by :func:`discover_checkpoints`, which
returns one :class:`CheckpointRef` per checkpoint, ordered by training step.
:func:`load_model` turns a reference into an ``nn.Module``. Files that carry
only weights (state_dicts, safetensors, Hugging Face Trainer folders) are
loaded into a fresh model from a factory, usually built by
:func:`resolve_model_factory` from the ``--model`` option. TorchScript
archives and ``torch.export`` programs carry their own code and need no
factory.

Loading is safe by default: torch files are read with
``torch.load(weights_only=True)``, which rejects pickled code. A whole pickled
``nn.Module`` loads only with ``trust=True`` (``--trust-checkpoints``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from probecvx.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)

KINDS = (
    "state_dict",
    "safetensors",
    "hf_folder",
    "torchscript",
    "export",
    "pickled_module",
)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".pt2")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Keys under which training scripts commonly nest the state_dict, tried in order.
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Leading key components added by DataParallel/DDP, torch.compile and Lightning.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Entries inside a torch file that record when it was saved, most specific first.
STEP_ENTRY_KEYS = ("step", "global_step", "epoch")

TRUST_FLAG = "--trust-checkpoints"
MODEL_FLAG = "--model"
MODEL_KWARGS_FLAG = "--model-kwargs"

_BLOCK_SIZE = 1 << 20
_MAX_LISTED_KEYS = 5
# Larger data.pkl files are not scanned for pickled modules at discovery.
_MAX_SCANNED_PICKLE_BYTES = 16 << 20
_STEP_KEYWORD_PATTERNS = (
    re.compile(r"(?<![a-z])step[=_\-]?(\d+)", re.IGNORECASE),
    re.compile(r"(?<![a-z])(?:iteration|iter|it)[=_\-]?(\d+)", re.IGNORECASE),
    re.compile(r"(?<![a-z])(?:checkpoint|ckpt)[=_\-]?(\d+)", re.IGNORECASE),
)
# A number that ends the name after a separator, as in ``ckpt_12`` or ``model-500``;
# ``resnet18`` does not count.
_TRAILING_NUMBER = re.compile(r"(?:^|[=_\-.])(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint found on disk.

    Attributes
    ----------
    path : Path
        The checkpoint file, or the folder for a Hugging Face Trainer checkpoint.
    name : str
        Identifier that names output files (``step_000100`` for
        ``step_000100.pt``); unique among the checkpoints of one discovery.
    step : int or None
        Training step, from the name or from an entry inside the file; None
        when neither records it.
    kind : str
        One of :data:`KINDS`. Discovery decides it from the suffix and a cheap
        look at the content; :func:`load_model` may find that a ``state_dict``
        file contains a ``pickled_module``.
    """

    path: Path
    name: str
    step: int | None
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown checkpoint kind {self.kind!r}; valid: {KINDS}")


# Discovery ----------------------------------------------------------------------


def discover_checkpoints(
    directory: Path, pattern: str | None = None
) -> list[CheckpointRef]:
    """Find the checkpoints in ``directory`` and order them by training step.

    Parameters
    ----------
    directory : Path
        Folder to scan. Without ``pattern`` only its direct entries are looked
        at: files ending in one of :data:`CHECKPOINT_SUFFIXES`, TorchScript
        archives under any suffix, and folders that contain Hugging Face weights
        (``model.safetensors``, ``pytorch_model.bin`` or a sharded index).
    pattern : str, optional
        Glob relative to ``directory`` (``--glob``), such as ``'*.pt'`` or
        ``'run1/*.ckpt'``. A matched file with an unknown suffix is accepted
        when its content is a torch zip archive.

    Returns
    -------
    list of CheckpointRef
        Checkpoints with a step first, by step, then those without one, in
        natural order of their names (``a2`` before ``a10``). Ties go by name.
        Entries whose name starts with ``.`` (hidden and temporary files) are
        skipped.

    Raises
    ------
    InvalidInputError
        If ``directory`` is missing or not a folder, ``pattern`` is not a
        relative glob, or no checkpoint is found.
    """
    directory = Path(directory)
    _validate_directory(directory)

    candidates = _find_candidates(directory, pattern)
    if not candidates:
        raise InvalidInputError(_nothing_found_message(directory, pattern))

    names = _assign_names(directory, [path for path, _ in candidates])
    refs = [
        CheckpointRef(path=path, name=name, step=_read_step(path, kind), kind=kind)
        for (path, kind), name in zip(candidates, names, strict=True)
    ]
    refs.sort(key=_order_key)

    n_with_step = sum(ref.step is not None for ref in refs)
    logger.info(
        "found %d checkpoints in %s (%d with a step)", len(refs), directory, n_with_step
    )
    for ref in refs:
        logger.debug("checkpoint %s: step=%s kind=%s", ref.path, ref.step, ref.kind)
    return refs


def make_checkpoint_ref(path: Path) -> CheckpointRef:
    """Build the reference for a single checkpoint file or folder.

    The name, step and kind follow the same rules as in
    :func:`discover_checkpoints`, except that a file with an unknown suffix is
    accepted when its content is a torch zip archive.

    Raises
    ------
    InvalidInputError
        If ``path`` does not exist or is not a checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"checkpoint not found: {path}; check the path")
    kind = _detect_kind(path, matched_by_pattern=True)
    if kind is None:
        raise InvalidInputError(
            f"{path} is not a checkpoint: expected a file ending in "
            f"{', '.join(CHECKPOINT_SUFFIXES)}, a TorchScript archive, or a folder "
            f"containing {' or '.join(HF_WEIGHT_FILES)}"
        )
    return CheckpointRef(
        path=path, name=_base_name(path), step=_read_step(path, kind), kind=kind
    )


def _validate_directory(directory: Path) -> None:
    if not directory.exists():
        raise InvalidInputError(
            f"checkpoint directory not found: {directory}; check the path"
        )
    if not directory.is_dir():
        raise InvalidInputError(
            f"checkpoint directory {directory} is a file, not a folder; pass the "
            "folder that contains the checkpoints, or use --glob to select files in it"
        )


def _find_candidates(directory: Path, pattern: str | None) -> list[tuple[Path, str]]:
    if pattern is None:
        entries = sorted(directory.iterdir())
    else:
        try:
            entries = sorted(directory.glob(pattern))
        except (ValueError, NotImplementedError) as err:
            raise InvalidInputError(
                f"invalid --glob {pattern!r}: {err}; pass a pattern relative to "
                f"{directory}, such as '*.pt'"
            ) from err

    candidates = []
    for path in entries:
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            logger.debug("skipping hidden or temporary entry %s", path)
            continue
        kind = _detect_kind(path, matched_by_pattern=pattern is not None)
        if kind is None:
            logger.debug("skipping %s: not a checkpoint", path)
            continue
        candidates.append((path, kind))
    return candidates


def _nothing_found_message(directory: Path, pattern: str | None) -> str:
    looked_for = (
        f"files ending in {', '.join(CHECKPOINT_SUFFIXES)}, TorchScript archives, "
        f"or folders containing {' or '.join(HF_WEIGHT_FILES)}"
    )
    if pattern is None:
        return (
            f"no checkpoints found in {directory}: looked for {looked_for}; "
            "select other files with --glob, for example --glob '*.model'"
        )
    return (
        f"no checkpoints in {directory} match --glob {pattern!r}: looked for "
        f"{looked_for}, or torch zip archives under other suffixes; "
        "check the pattern"
    )


def _detect_kind(path: Path, *, matched_by_pattern: bool) -> str | None:
    """Return the checkpoint kind of ``path``, or None if it is not one."""
    if path.is_dir():
        has_weights = any(
            (path / filename).is_file() for filename in HF_WEIGHT_FILES + HF_INDEX_FILES
        )
        return "hf_folder" if has_weights else None
    if not path.is_file():
        return None

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".pt2":
        return "export"
    zip_kind = _sniff_zip_kind(path)
    if suffix in TORCH_SUFFIXES:
        # A non-zip file here is a legacy torch.save pickle, or broken; loading
        # it decides which.
        return zip_kind or "state_dict"
    if zip_kind == "torchscript" or (matched_by_pattern and zip_kind is not None):
        return zip_kind
    return None


def _sniff_zip_kind(path: Path) -> str | None:
    """Classify a torch zip archive by its entry names and pickle opcodes.

    Nothing is unpickled: the opcodes of ``data.pkl`` are only listed.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            # torch writes every entry under one top folder named after the file.
            inner = {
                entry.filename.split("/", 1)[1]: entry
                for entry in entries
                if "/" in entry.filename
            }
            if "constants.pkl" in inner or any(
                name.startswith("code/") for name in inner
            ):
                return "torchscript"
            if "archive_format" in inner:
                return "export"
            if "data.pkl" not in inner:
                return None
            pickle_entry = inner["data.pkl"]
            if pickle_entry.file_size > _MAX_SCANNED_PICKLE_BYTES:
                return "state_dict"
            pickle_bytes = archive.read(pickle_entry)
    except (zipfile.BadZipFile, OSError):
        return None
    return "pickled_module" if _references_nn_modules(pickle_bytes) else "state_dict"


def _references_nn_modules(pickle_bytes: bytes) -> bool:
    """Return whether a pickle names a class from ``torch.nn.modules``.

    A pickled model nearly always contains a standard layer. A model built only
    from custom classes is missed here, and :func:`load_model` detects it.
    """
    recent_strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(pickle_bytes):
            if opcode.name == "GLOBAL":
                module_name = str(argument).split(" ", 1)[0]
            elif opcode.name == "STACK_GLOBAL" and len(recent_strings) >= 2:
                # Protocol 4 and later push module and name as two strings first.
                module_name = recent_strings[-2]
            elif isinstance(argument, str):
                recent_strings = [*recent_strings[-1:], argument]
                continue
            else:
                continue
            if module_name.startswith("torch.nn.modules"):
                return True
    except (ValueError, pickle.UnpicklingError):
        return False
    return False


def _base_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _assign_names(directory: Path, paths: list[Path]) -> list[str]:
    """Name each checkpoint by its stem, or by its relative path where stems clash."""
    stems = [_base_name(path) for path in paths]
    stem_counts = Counter(stems)
    names = []
    for path, stem in zip(paths, stems, strict=True):
        if stem_counts[stem] == 1:
            names.append(stem)
        else:
            relative = path.relative_to(directory).as_posix()
            names.append(re.sub(r"[/.]", "_", relative))

    # Relative paths can still clash with another stem (``a.pt`` beside ``a_pt``).
    seen: set[str] = set()
    unique = []
    for name in names:
        candidate, counter = name, 2
        while candidate in seen:
            candidate, counter = f"{name}-{counter}", counter + 1
        seen.add(candidate)
        unique.append(candidate)
    return unique


def _order_key(ref: CheckpointRef) -> tuple[int, int, tuple[tuple[int, int, str], ...]]:
    if ref.step is None:
        return (1, 0, _natural_key(ref.name))
    return (0, ref.step, _natural_key(ref.name))


def _natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders digit runs by value, so ``a2`` comes before ``a10``."""
    parts = re.split(r"(\d+)", name)
    key = [(1, int(part), "") if part.isdigit() else (0, 0, part) for part in parts]
    # The exact name breaks ties such as ``a01`` against ``a1``.
    key.append((2, 0, name))
    return tuple(key)


# Steps ---------------------------------------------------------------------------


def _read_step(path: Path, kind: str) -> int | None:
    step = _step_from_name(_base_name(path))
    if step is not None:
        return step
    if kind == "state_dict":
        return _step_from_torch_file(path)
    if kind == "safetensors":
        return _step_from_safetensors(path)
    if kind == "hf_folder":
        return _step_from_trainer_state(path)
    return None


def _step_from_name(name: str) -> int | None:
    for pattern in _STEP_KEYWORD_PATTERNS:
        matches = pattern.findall(name)
        if matches:
            return int(matches[-1])
    match = _TRAILING_NUMBER.search(name)
    return int(match.group(1)) if match else None


def _step_from_torch_file(path: Path) -> int | None:
    """Read a ``step``-like entry from a torch file without unpickling code."""
    # mmap keeps this cheap for zip files: tensors are mapped, not read. Legacy
    # (non-zip) files cannot be mapped and are read in full.
    use_mmap = zipfile.is_zipfile(path)
    try:
        content = _load_weights_only(path, "cpu", mmap=use_mmap)
    except Exception as err:  # any unreadable file simply has no step
        logger.debug("no step read from %s: %s: %s", path, type(err).__name__, err)
        return None
    if not isinstance(content, Mapping):
        return None
    for key in STEP_ENTRY_KEYS:
        step = _as_step(content.get(key))
        if step is not None:
            logger.debug("step %d of %s read from its %r entry", step, path, key)
            return step
    return None


def _as_step(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.is_floating_point()
        and value.dtype != torch.bool
    ):
        return int(value.item())
    return None


def _step_from_safetensors(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # a broken file has no step; loading reports it
        logger.debug("no step read from %s: %s: %s", path, type(err).__name__, err)
        return None
    for key in STEP_ENTRY_KEYS:
        value = metadata.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def _step_from_trainer_state(folder: Path) -> int | None:
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _as_step(state.get("global_step")) if isinstance(state, dict) else None


# Model factory -------------------------------------------------------------------


class ModelFactory:
    """Callable that builds a fresh, untrained model from a ``--model`` spec.

    Instances pickle as their spec and keyword arguments, so a factory can be
    sent to worker processes, which import the model code again.
    """

    def __init__(
        self,
        spec: str,
        kwargs_json: str | None,
        target: Callable[..., Any],
        kwargs: dict[str, Any],
    ) -> None:
        self.spec = spec
        self.kwargs_json = kwargs_json
        self._target = target
        self._kwargs = kwargs

    def __call__(self) -> nn.Module:
        try:
            model = self._target(**self._kwargs)
        except Exception as err:
            raise InvalidInputError(
                f"building the model with {MODEL_FLAG} {self.spec!r} failed: "
                f"{type(err).__name__}: {err}; check the model code and "
                f"{MODEL_KWARGS_FLAG}"
            ) from err
        if not isinstance(model, nn.Module):
            raise InvalidInputError(
                f"{MODEL_FLAG} {self.spec!r} returned {type(model).__name__}, not a "
                "torch.nn.Module; point it at a model class or at a function that "
                "returns a model"
            )
        return model

    def __reduce__(self) -> tuple[Any, tuple[str, str | None]]:
        return (resolve_model_factory, (self.spec, self.kwargs_json))

    def __repr__(self) -> str:
        return f"ModelFactory({self.spec!r}, kwargs={self._kwargs!r})"


def resolve_model_factory(
    spec: str, kwargs_json: str | None = None
) -> Callable[[], nn.Module]:
    """Import the model constructor named by ``spec`` and bind its arguments.

    Parameters
    ----------
    spec : str
        ``PKG.MODULE:CALLABLE`` for an importable module, or
        ``path/to/file.py:CALLABLE`` for a source file. ``CALLABLE`` may be a
        dotted attribute path (``Nets.small``).
    kwargs_json : str, optional
        JSON object of keyword arguments for the callable
        (``--model-kwargs '{"width": 64}'``).

    Returns
    -------
    ModelFactory
        A callable without arguments that returns a new ``nn.Module``; it
        raises InvalidInputError if the callable returns anything else.

    Raises
    ------
    InvalidInputError
        If the spec is malformed, the module does not import, the attribute is
        missing or not callable, or the keyword arguments are not a JSON object
        that fits the callable's signature.
    """
    module_name, _, attribute_path = spec.rpartition(":")
    if not module_name or not attribute_path:
        raise InvalidInputError(
            f"invalid {MODEL_FLAG} {spec!r}: expected MODULE:CALLABLE, such as "
            "mypkg.nets:ConvNet, or FILE.py:CALLABLE, such as nets.py:ConvNet"
        )
    kwargs = _parse_model_kwargs(kwargs_json)

    module = _import_model_module(module_name, spec)
    target = _resolve_attribute(module, attribute_path, spec)
    _check_kwargs_fit(target, kwargs, spec)
    logger.debug("model factory %s resolved to %r", spec, target)
    return ModelFactory(spec, kwargs_json, target, kwargs)


def _parse_model_kwargs(kwargs_json: str | None) -> dict[str, Any]:
    if kwargs_json is None:
        return {}
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as err:
        raise InvalidInputError(
            f"{MODEL_KWARGS_FLAG} {kwargs_json!r} is not valid JSON ({err}); pass a "
            "JSON object such as '{\"width\": 64}'"
        ) from err
    if not isinstance(kwargs, dict):
        raise InvalidInputError(
            f"{MODEL_KWARGS_FLAG} {kwargs_json!r} is a JSON {type(kwargs).__name__}, "
            "not an object; pass keyword arguments such as '{\"width\": 64}'"
        )
    return kwargs


def _is_file_spec(module_name: str) -> bool:
    """Return whether the part of ``--model`` before ':' is a file path."""
    return module_name.endswith(".py") or "/" in module_name or "\\" in module_name


def _import_model_module(module_name: str, spec: str) -> ModuleType:
    if _is_file_spec(module_name):
        return _import_source_file(Path(module_name).expanduser(), spec)
    try:
        return importlib.import_module(module_name)
    except Exception as err:
        raise InvalidInputError(
            f"cannot import module {module_name!r} from {MODEL_FLAG} {spec!r}: "
            f"{type(err).__name__}: {err}; install the package or add its folder "
            "to PYTHONPATH, or pass a file path such as path/to/nets.py:ConvNet"
        ) from err


def _import_source_file(path: Path, spec: str) -> ModuleType:
    if not path.is_file():
        raise InvalidInputError(
            f"model file not found: {path} (from {MODEL_FLAG} {spec!r}); check the path"
        )
    # One module per resolved file path, registered so that dataclasses and
    # pickling inside the file can find it, and so that a second resolve reuses it.
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:16]
    module_name = f"_probecvx_model_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]

    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise InvalidInputError(
            f"cannot import {path} from {MODEL_FLAG} {spec!r}: not a Python source "
            "file; pass a .py file"
        )
    module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = module
    try:
        import_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise InvalidInputError(
            f"cannot import model file {path} from {MODEL_FLAG} {spec!r}: "
            f"{type(err).__name__}: {err}; fix the error in that file"
        ) from err
    return module


def _resolve_attribute(
    module: ModuleType, attribute_path: str, spec: str
) -> Callable[..., Any]:
    target: Any = module
    for part in attribute_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as err:
            # Name the module as the user wrote it, because a source file is imported
            # under an internal name such as _probecvx_model_nets_<hash>.
            source = spec.rpartition(":")[0]
            kind = "file" if _is_file_spec(source) else "module"
            callables = _list_callables(module)
            fix = f"name one of the callables defined there after ':': {callables}"
            if not callables:
                fix = (
                    "it defines no public class or function, so define the model "
                    f"there or point {MODEL_FLAG} at the file that defines it"
                )
            raise InvalidInputError(
                f"{MODEL_FLAG} {spec!r}: {kind} {source} has no attribute "
                f"{attribute_path!r}; {fix}"
            ) from err
    if not callable(target):
        raise InvalidInputError(
            f"{MODEL_FLAG} {spec!r}: {attribute_path!r} is a "
            f"{type(target).__name__}, not a class or function; name the model "
            "class or a function that returns the model"
        )
    return target


def _list_callables(module: ModuleType) -> str:
    names = sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
    )
    return ", ".join(names[:10]) + (", …" if len(names) > 10 else "")


def _check_kwargs_fit(
    target: Callable[..., Any], kwargs: dict[str, Any], spec: str
) -> None:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature are checked when called
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise InvalidInputError(
            f"{MODEL_KWARGS_FLAG} {json.dumps(kwargs)} does not fit "
            f"{MODEL_FLAG} {spec!r}{signature}: {err}; pass the arguments that "
            "the model takes"
        ) from err


# Loading -------------------------------------------------------------------------


def load_model(
    ref: CheckpointRef,
    factory: Callable[[], nn.Module] | None,
    *,
    trust: bool = False,
    map_location: str = "cpu",
) -> nn.Module:
    """Load the model saved in checkpoint ``ref``.

    Parameters
    ----------
    ref : CheckpointRef
        The checkpoint, usually from :func:`discover_checkpoints`.
    factory : callable or None
        Builds the untrained model that a state_dict is loaded into. Required
        for ``state_dict``, ``safetensors`` and ``hf_folder`` checkpoints,
        ignored for TorchScript, ``torch.export`` and pickled modules.
    trust : bool, default=False
        Allow a torch file that contains more than tensors (a whole pickled
        ``nn.Module``) to be unpickled. Unpickling runs code from the file,
        so set this only for files from a trusted source.
    map_location : str, default="cpu"
        Device that the weights are loaded onto.

    Returns
    -------
    nn.Module
        The model with the checkpoint's weights, in whatever train/eval mode
        the factory or the file left it.

    Raises
    ------
    InvalidInputError
        If a factory is needed and ``factory`` is None.
    CheckpointError
        If the file is unreadable, truncated or not a checkpoint, needs
        ``trust`` to load, or its keys or shapes do not match the model.
    """
    path = Path(ref.path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; was it moved or deleted?")
    logger.info("loading checkpoint %s (%s) from %s", ref.name, ref.kind, path)

    if ref.kind == "torchscript":
        return _load_torchscript(path, map_location)
    if ref.kind == "export":
        return _load_exported_program(path, map_location)
    if ref.kind == "safetensors":
        model = _build_model(factory, path)
        weights = _read_safetensors(path, map_location)
        return _load_state_dict_into(model, weights, path, map_location)
    if ref.kind == "hf_folder":
        model = _build_model(factory, path)
        folder_weights = _read_hf_folder(path, map_location, trust)
        return _load_state_dict_into(model, folder_weights, path, map_location)

    content = _torch_load(path, map_location, trust)
    if isinstance(content, nn.Module):
        logger.info("checkpoint %s is a pickled %s", path, type(content).__name__)
        return content
    state_dict = _find_state_dict(content)
    if state_dict is None:
        return _nested_module_or_raise(content, path, trust)
    model = _build_model(factory, path)
    return _load_state_dict_into(model, state_dict, path, map_location)


def _build_model(factory: Callable[[], nn.Module] | None, path: Path) -> nn.Module:
    if factory is None:
        raise InvalidInputError(
            f"checkpoint {path} contains only weights, so the model code is needed: "
            f"pass {MODEL_FLAG} MODULE:CALLABLE, such as {MODEL_FLAG} "
            "mypkg.nets:ConvNet"
        )
    return factory()


def _load_torchscript(path: Path, map_location: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit but still loads TorchScript archives;
            # a user of this tool cannot act on the warning.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=map_location)
    except Exception as err:
        raise CheckpointError(
            f"cannot load TorchScript archive {path}: {type(err).__name__}: "
            f"{_first_line(err)}; check that the file is complete"
        ) from err
    return module


def _load_exported_program(path: Path, map_location: str) -> nn.Module:
    try:
        program = torch.export.load(path)
        module = program.module()
    except Exception as err:
        raise CheckpointError(
            f"cannot load torch.export program {path}: {type(err).__name__}: "
            f"{_first_line(err)}; check that it was written by torch.export.save "
            f"and is complete (this is torch {torch.__version__})"
        ) from err
    # NOTE: an exported program may record its device in the graph, so moving
    # the weights to another device than the one it was exported on can fail.
    return module.to(map_location)


def _read_safetensors(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=map_location)
    except Exception as err:
        raise CheckpointError(
            f"cannot read safetensors file {path}: {type(err).__name__}: "
            f"{_first_line(err)}; the file is truncated or not a safetensors file"
        ) from err


def _read_hf_folder(
    folder: Path, map_location: str, trust: bool
) -> Mapping[str, torch.Tensor]:
    single_files = [folder / filename for filename in HF_WEIGHT_FILES]
    index_files = [folder / filename for filename in HF_INDEX_FILES]
    for weight_file in single_files:
        if weight_file.is_file():
            return _read_weight_file(weight_file, map_location, trust)
    for index_file in index_files:
        if index_file.is_file():
            return _read_sharded_weights(index_file, map_location, trust)
    raise CheckpointError(
        f"checkpoint folder {folder} contains none of "
        f"{', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)}; was it written completely?"
    )


def _read_weight_file(
    path: Path, map_location: str, trust: bool
) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    state_dict = _find_state_dict(_torch_load(path, map_location, trust))
    if state_dict is None:
        raise CheckpointError(
            f"{path} contains no state_dict; expected a mapping of parameter names "
            "to tensors"
        )
    return state_dict


def _read_sharded_weights(
    index_file: Path, map_location: str, trust: bool
) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"cannot read shard index {index_file}: {type(err).__name__}: {err}; "
            'expected JSON with a "weight_map" object'
        ) from err

    state_dict: dict[str, torch.Tensor] = {}
    for shard_name in shard_names:
        shard = index_file.parent / shard_name
        if not shard.is_file():
            raise CheckpointError(
                f"weight shard {shard} listed in {index_file} is missing; was the "
                "checkpoint copied completely?"
            )
        state_dict.update(_read_weight_file(shard, map_location, trust))
    return state_dict


def _torch_load(path: Path, map_location: str, trust: bool) -> object:
    """Read a torch file, unpickling arbitrary objects only when ``trust`` is set."""
    try:
        return _load_weights_only(path, map_location)
    except pickle.UnpicklingError as err:
        if not _looks_like_torch_file(path):
            raise CheckpointError(_unreadable_message(path, err)) from err
        if not trust:
            raise CheckpointError(_needs_trust_message(path, err)) from err
        safe_error: Exception = err
    except Exception as err:  # torch.load raises many types on a bad file
        raise CheckpointError(_unreadable_message(path, err)) from err

    logger.info(
        "loading %s with full unpickling because %s is set (weights_only=True "
        "failed: %s)",
        path,
        TRUST_FLAG,
        _unpickling_reason(safe_error),
    )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {path} pickles a class that cannot be imported here "
            f"({type(err).__name__}: {_first_line(err)}); put the module that "
            "defines the model on PYTHONPATH, or save a state_dict and pass --model"
        ) from err
    except Exception as err:
        raise CheckpointError(_unreadable_message(path, err)) from err


def _load_weights_only(path: Path, map_location: str, mmap: bool = False) -> object:
    with warnings.catch_warnings():
        # torch warns about a plain pickle written with a protocol other than 2
        # before it rejects or reads it; callers report the outcome themselves.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _looks_like_torch_file(path: Path) -> bool:
    """Return whether ``path`` starts as a zip archive or a pickle stream."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    # Pickle protocols 2 and later start with the PROTO opcode, 0x80.
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _needs_trust_message(path: Path, err: Exception) -> str:
    return (
        f"checkpoint {path} cannot be loaded safely with weights_only=True: "
        f"{_unpickling_reason(err)}. It contains objects other than tensors and plain "
        "containers (for example a whole pickled nn.Module), and unpickling those "
        f"can run arbitrary code. If you trust the file's source, pass {TRUST_FLAG}; "
        "otherwise save only the model's state_dict"
    )


def _unpickling_reason(err: Exception) -> str:
    """Return the line of torch's weights-only error that names the blocked object."""
    text = str(err)
    for marker in ("Unsupported global:", "unsupported GLOBAL", "Unsupported operand"):
        for line in text.splitlines():
            if marker in line:
                reason = line.replace("WeightsUnpickler error:", "")
                # Drop torch's advice to allow-list the class in code.
                return reason.split(" Please use", 1)[0].strip().rstrip(".")
    return "the file contains an object that the weights-only unpickler rejects"


def _unreadable_message(path: Path, err: Exception) -> str:
    cause = f"{type(err).__name__}: {_first_line(err)}"
    size = path.stat().st_size
    if size == 0:
        return f"checkpoint {path} is empty (0 bytes); save or copy it again"
    with open(path, "rb") as handle:
        starts_like_zip = handle.read(4) == b"PK\x03\x04"
    if starts_like_zip and not zipfile.is_zipfile(path):
        return (
            f"checkpoint {path} is truncated: it starts as a zip archive but its end "
            f"is missing ({size} bytes; {cause}); save or copy it again"
        )
    return (
        f"cannot read checkpoint {path}: it is not a PyTorch checkpoint or it is "
        f"corrupt ({cause})"
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _find_state_dict(content: object) -> Mapping[str, torch.Tensor] | None:
    """Return the state_dict in ``content``, bare or under a usual key, else None."""
    if _is_state_dict(content):
        return content  # type: ignore[return-value]
    if isinstance(content, Mapping):
        for key in NESTED_STATE_DICT_KEYS:
            nested = content.get(key)
            if _is_state_dict(nested):
                logger.debug("state_dict found under key %r", key)
                return nested
    return None


def _is_state_dict(content: object) -> bool:
    if not isinstance(content, Mapping) or not content:
        return False
    if not all(isinstance(key, str) for key in content):
        return False
    # Modules may store arbitrary values under ``<path>._extra_state``.
    return all(
        isinstance(value, torch.Tensor) or key.endswith("_extra_state")
        for key, value in content.items()
    ) and any(isinstance(value, torch.Tensor) for value in content.values())


def _nested_module_or_raise(content: object, path: Path, trust: bool) -> nn.Module:
    if trust and isinstance(content, Mapping):
        for key in NESTED_STATE_DICT_KEYS:
            if isinstance(content.get(key), nn.Module):
                logger.info(
                    "checkpoint %s contains a pickled module under %r", path, key
                )
                return content[key]
    raise CheckpointError(
        f"checkpoint {path} contains no state_dict or model: found "
        f"{_describe_content(content)}; expected a mapping of parameter names to "
        f"tensors, bare or under one of the keys {', '.join(NESTED_STATE_DICT_KEYS)}"
    )


def _describe_content(content: object) -> str:
    if isinstance(content, Mapping):
        keys = [repr(key) for key in list(content)[:10]]
        more = ", …" if len(content) > 10 else ""
        return f"a {type(content).__name__} with keys {', '.join(keys)}{more}"
    return f"a {type(content).__name__}"


# Matching keys to the model --------------------------------------------------------


def _load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    map_location: str,
) -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, after stripping wrapper prefixes."""
    model_state = model.state_dict()
    candidate = _match_wrapper_prefixes(state_dict, model_state.keys())
    candidate = _fill_tied_keys(candidate, model)
    _check_keys_and_shapes(candidate, model_state, path)

    model.to(map_location)
    try:
        model.load_state_dict(candidate, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"loading checkpoint {path} into the model failed: {err}; check that "
            f"{MODEL_FLAG} builds the architecture the checkpoint was saved from"
        ) from err
    return model


def _match_wrapper_prefixes(
    state_dict: Mapping[str, torch.Tensor], expected_keys: Iterable[str]
) -> Mapping[str, torch.Tensor]:
    """Strip leading wrapper components until the keys match the model's.

    The keys are tried as they are first. A prefix from
    :data:`WRAPPER_PREFIXES` is stripped only when every key starts with it,
    and only as a whole leading component, so ``submodule.weight`` keeps its
    name. When no stage matches exactly, the stage sharing most keys with the
    model is returned, for the mismatch report.
    """
    expected = set(expected_keys)
    stages: list[tuple[str, Mapping[str, torch.Tensor]]] = [("", state_dict)]
    current, stripped = state_dict, ""
    while (prefix := _shared_wrapper_prefix(current.keys())) is not None:
        current = {key[len(prefix) :]: value for key, value in current.items()}
        stripped += prefix
        stages.append((stripped, current))

    for stripped, stage in stages:
        if set(stage) == expected:
            if stripped:
                logger.debug("stripped key prefix %r to match the model", stripped)
            return stage
    return max(stages, key=lambda stage: len(set(stage[1]) & expected))[1]


def _shared_wrapper_prefix(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    for prefix in WRAPPER_PREFIXES:
        if keys and all(
            key.startswith(prefix) and len(key) > len(prefix) for key in keys
        ):
            return prefix
    return None


def _fill_tied_keys(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> Mapping[str, torch.Tensor]:
    """Copy shared weights to the keys of their aliases that the file omits.

    ``safetensors.torch.save_model`` stores a tied weight (one tensor under two
    module paths) only once, but a strict load needs every key.
    """
    alias_groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
            alias_groups.setdefault((tensor.data_ptr(), tensor.shape), []).append(key)

    filled = dict(state_dict)
    for keys in alias_groups.values():
        present = [key for key in keys if key in filled]
        if not present or len(present) == len(keys):
            continue
        for key in keys:
            if key not in filled:
                logger.debug("filling tied weight %s from %s", key, present[0])
                filled[key] = filled[present[0]]
    return filled


def _check_keys_and_shapes(
    state_dict: Mapping[str, torch.Tensor],
    model_state: Mapping[str, torch.Tensor],
    path: Path,
) -> None:
    missing = sorted(set(model_state) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model_state))
    wrong_shapes = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, model "
        f"{tuple(model_state[key].shape)}"
        for key in sorted(set(state_dict) & set(model_state))
        if isinstance(state_dict[key], torch.Tensor)
        and isinstance(model_state[key], torch.Tensor)
        and state_dict[key].shape != model_state[key].shape
    ]
    if not (missing or unexpected or wrong_shapes):
        return

    problems = []
    if missing:
        problems.append(_count_and_list(missing, "missing key"))
    if unexpected:
        problems.append(_count_and_list(unexpected, "unexpected key"))
    if wrong_shapes:
        problems.append(_count_and_list(wrong_shapes, "shape mismatch"))
    raise CheckpointError(
        f"checkpoint {path} does not match the model: {', '.join(problems)}. Check "
        f"that {MODEL_FLAG} and {MODEL_KWARGS_FLAG} build the architecture the "
        "checkpoint was saved from"
    )


def _count_and_list(items: list[str], noun: str) -> str:
    listed = ", ".join(items[:_MAX_LISTED_KEYS])
    more = ", …" if len(items) > _MAX_LISTED_KEYS else ""
    plural = "es" if noun.endswith("h") else "s"
    label = noun if len(items) == 1 else noun + plural
    return f"{len(items)} {label} ({listed}{more})"


# Hashing -------------------------------------------------------------------------


def checkpoint_sha256(path: Path) -> str:
    """Return the hex sha256 of a checkpoint's bytes.

    A file is hashed as its bytes, streamed in 1 MiB blocks. A folder is hashed
    over every file below it, in sorted order of relative path: for each file
    its relative path, a NUL byte, its size as 8 little-endian bytes, then its
    bytes. So renaming or changing any file changes the hash.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        files = sorted(
            (file for file in path.rglob("*") if file.is_file()),
            key=lambda file: file.relative_to(path).as_posix(),
        )
        for file in files:
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            digest.update(file.stat().st_size.to_bytes(8, "little"))
            _update_from_file(digest, file)
    else:
        _update_from_file(digest, path)
    return digest.hexdigest()


def _update_from_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK_SIZE):
            digest.update(block)
