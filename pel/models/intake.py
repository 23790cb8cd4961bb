"""Model intake without torch: which kind of model file a user brought, what tensors it holds, and whether they fit.

The API registers checkpoints with this module and must never import torch (its image ships without it), so
everything here reads files as bytes:

- **safetensors**: an 8-byte little-endian header length, then a JSON header (names, dtypes, shapes, offsets).
- **torch.save zip** (``<name>/data.pkl``): a state_dict or PEL Tune's own checkpoint dict. ``data.pkl`` is read
  by :class:`_TensorUnpickler`, which resolves only the few globals torch writes for tensors and plain containers
  (each to a stand-in of ours that records a dtype and a shape) and refuses any other global, naming it. Nothing
  in a user's pickle is ever called.
- **TorchScript zip** (``constants.pkl`` and ``code/`` beside ``data.pkl``): its own architecture; torch loads it
  on the worker (:func:`pel.checkpoint.load_model`).

Formats recorded on a checkpoint row: ``"pel-tune"``, ``"torchscript"``, ``"state_dict"``, ``"safetensors"``.
Architectures are JSON: ``{"name": "unet", ...UNetConfig fields}`` or
``{"name": "smp", "arch": "Unet", "encoder": "resnet34", "in_channels": 1, "classes": 2}``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pel.config import UNetConfig

__all__ = [
    "FORMATS",
    "IntakeError",
    "Inspection",
    "SMP_ARCHS",
    "TensorInfo",
    "expected_shapes",
    "fit_problems",
    "inspect_file",
    "parse_architecture",
    "read_spec",
    "resolve",
    "spec_path",
    "unet_state_shapes",
    "write_spec",
]

PEL_TUNE, TORCHSCRIPT, STATE_DICT, SAFETENSORS = "pel-tune", "torchscript", "state_dict", "safetensors"
FORMATS = (PEL_TUNE, TORCHSCRIPT, STATE_DICT, SAFETENSORS)
PEL_TUNE_FILE_FORMAT = "pel-tune.unet/1"  # the "format" entry inside PEL Tune's own files (= CHECKPOINT_FORMAT)
# segmentation_models_pytorch's architectures (smp.create_model names), checked here so a typo is a 422.
SMP_ARCHS = (
    "Unet",
    "UnetPlusPlus",
    "MAnet",
    "Linknet",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "PAN",
    "UPerNet",
    "Segformer",
    "DPT",
)
SAFETENSORS_ARCH_KEY = "pel_tune.architecture"  # in a safetensors header's __metadata__


def file_suffix(fmt: str) -> str:
    """The file name suffix a checkpoint of this format is stored and downloaded under."""
    return ".safetensors" if fmt == SAFETENSORS else ".pt"


MAX_NAMES = 8  # key lists in messages are cut here: a wrong architecture can differ in hundreds of keys
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own reader refuses larger headers too
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # data.pkl holds names and shapes only; the tensor bytes are separate entries


class IntakeError(ValueError):
    """The file or the declared architecture cannot be used; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Inspection:
    """What a model file holds: its format, its tensors (None for TorchScript) and, for PEL Tune's own files
    (and safetensors written by PEL Tune), the architecture stored in it."""

    format: str
    tensors: dict[str, TensorInfo] | None
    architecture: dict[str, Any] | None = None


# -- reading files -------------------------------------------------------------------------------------------------


def inspect_file(path: str | os.PathLike[str]) -> Inspection:
    """Detect the format of the file at ``path`` and read its tensor names and shapes, without torch."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _inspect_zip(path)
    if len(head) == 9 and head[8:9] == b"{":
        return _inspect_safetensors(path)
    if head[:2] == b"\x80\x02":
        raise IntakeError(
            "a legacy (pre-1.6, non-zip) torch.save file: re-save it with a current torch (torch.save(obj, path))"
        )
    raise IntakeError(
        "not a model file PEL Tune reads: expected a torch.save zip (state_dict or PEL Tune checkpoint), "
        "a TorchScript archive (torch.jit.save) or a safetensors file"
    )


def _inspect_safetensors(path: Path) -> Inspection:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise IntakeError(f"not a valid safetensors file: header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntakeError(f"not a valid safetensors file: unreadable JSON header ({exc})") from None
    if not isinstance(header, dict):
        raise IntakeError("not a valid safetensors file: the header is not a JSON object")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
        )
        if not ok:
            raise IntakeError(f"not a valid safetensors file: malformed header entry for {name!r}")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= data_bytes:
            raise IntakeError(f"not a valid safetensors file: the data of {name!r} lies outside the file")
        tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]))
    architecture = None
    if isinstance(metadata, dict) and isinstance(metadata.get(SAFETENSORS_ARCH_KEY), str):
        try:
            architecture = parse_architecture(json.loads(metadata[SAFETENSORS_ARCH_KEY]))
        except (ValueError, IntakeError):
            architecture = None  # a foreign or stale note: the caller must then declare one
    return Inspection(SAFETENSORS, tensors, architecture)


def _inspect_zip(path: Path) -> Inspection:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                return Inspection(TORCHSCRIPT, None)
            pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise IntakeError("a zip file that is not a torch.save file (expected exactly one data.pkl)")
            info = archive.getinfo(pickles[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise IntakeError(f"data.pkl is {info.file_size} bytes: too large for a state_dict's index")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile as exc:
        raise IntakeError(f"a damaged zip file: {exc}") from None
    payload = read_torch_pickle(data)
    if isinstance(payload, dict) and "format" in payload and not _all_tensors(payload):
        if payload["format"] != PEL_TUNE_FILE_FORMAT:
            raise IntakeError(f"unsupported PEL Tune checkpoint format {payload['format']!r}")
        state, arch = payload.get("state_dict"), payload.get("architecture")
        if not isinstance(state, dict) or not _all_tensors(state) or not isinstance(arch, dict):
            raise IntakeError('a PEL Tune checkpoint needs "architecture" (a dict) and "state_dict" (tensors)')
        return Inspection(PEL_TUNE, dict(state), parse_architecture({"name": "unet", **arch}))
    if isinstance(payload, dict) and payload and _all_tensors(payload):
        return Inspection(STATE_DICT, dict(payload))
    if isinstance(payload, dict):
        non_tensors = [str(k) for k, v in payload.items() if not isinstance(v, TensorInfo)]
        raise IntakeError(
            "a torch.save file must hold a state_dict (a dict of parameter names to tensors); this dict has "
            f"entries that are not tensors: {names_text(non_tensors)} (save model.state_dict() itself)"
        )
    raise IntakeError(f"a torch.save file must hold a state_dict (a dict of tensors), not a {type(payload).__name__}")


def _all_tensors(d: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, TensorInfo) for k, v in d.items())


# -- the restricted unpickler --------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Dtype:
    name: str


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, *rest: Any) -> TensorInfo:
    if not isinstance(storage, _Storage) or not isinstance(size, tuple):
        raise IntakeError("a malformed tensor record in data.pkl")
    return TensorInfo(storage.dtype, tuple(int(d) for d in size))


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any, *_: Any):
    info = _rebuild_tensor_v2(storage, offset, size)
    return TensorInfo(dtype.name if isinstance(dtype, _Dtype) else info.dtype, info.shape)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # a Parameter is its tensor, for a state_dict


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 writes bytes as _codecs.encode(str, "latin1"); only that exact use is honoured.
    if not isinstance(text, str) or encoding != "latin1":
        raise IntakeError("refused: data.pkl uses _codecs.encode other than for bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): lambda dims=(): tuple(dims),
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _Dtype(name) for name in _DTYPE_NAMES},
}


class _TensorUnpickler(pickle.Unpickler):
    """Every global a pickle names goes through ``find_class``: only the stand-ins above are ever returned, so a
    pickle can build tensors' names and shapes and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise IntakeError(
                f"refused: data.pkl references {module}.{name}, which is neither a tensor nor plain data "
                "(unpickling it could run code); save a state_dict of tensors instead"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        # torch.save's storage records: ("storage", storage type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType):
            return _Storage(pid[1].dtype, int(pid[4]))
        raise IntakeError("a malformed storage record in data.pkl")


def read_torch_pickle(data: bytes) -> Any:
    """Unpickle a torch.save ``data.pkl`` into plain containers with :class:`TensorInfo` for every tensor."""
    import io

    try:
        return _TensorUnpickler(io.BytesIO(data)).load()
    except IntakeError:
        raise
    except Exception as exc:  # truncated or corrupt pickles raise many kinds of errors
        raise IntakeError(f"unreadable data.pkl ({type(exc).__name__}: {exc})") from None


# -- architectures -------------------------------------------------------------------------------------------------

_SMP_KEYS = {"name", "arch", "encoder", "in_channels", "classes"}
_ENCODER_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def parse_architecture(value: Any) -> dict[str, Any]:
    """Validate a declared architecture and return it normalised (defaults filled in)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise IntakeError(f"architecture is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise IntakeError(f"architecture must be a JSON object, got {type(value).__name__}")
    name = value.get("name")
    if name == "unet":
        try:
            config = UNetConfig.from_dict({k: v for k, v in value.items() if k != "name"})
        except (TypeError, ValueError) as exc:
            raise IntakeError(f"architecture: {exc}") from None
        return {"name": "unet", **config.to_dict()}
    if name == "smp":
        unknown = sorted(set(value) - _SMP_KEYS)
        if unknown:
            raise IntakeError(f"unknown smp architecture keys: {', '.join(unknown)} (known: {', '.join(_SMP_KEYS)})")
        arch, encoder = value.get("arch"), value.get("encoder")
        if arch not in SMP_ARCHS:
            raise IntakeError(f"architecture.arch must be one of {', '.join(SMP_ARCHS)}, got {arch!r}")
        if not isinstance(encoder, str) or not _ENCODER_NAME.fullmatch(encoder):
            raise IntakeError(f"architecture.encoder must be an smp encoder name such as 'resnet34', got {encoder!r}")
        out = {"name": "smp", "arch": arch, "encoder": encoder, "in_channels": 1, "classes": 2}
        for key in ("in_channels", "classes"):
            v = value.get(key, out[key])
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise IntakeError(f"architecture.{key} must be a positive integer, got {v!r}")
            out[key] = v
        return out
    raise IntakeError(f'architecture.name must be "unet" (the built-in U-Net) or "smp", got {name!r}')


def unet_state_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``UNet(config).state_dict()``, in its order, computed without torch."""
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, channels: int) -> None:
        shapes[f"{prefix}.weight"] = (channels,)
        shapes[f"{prefix}.bias"] = (channels,)
        if config.norm == "batch":
            shapes[f"{prefix}.running_mean"] = (channels,)
            shapes[f"{prefix}.running_var"] = (channels,)
            shapes[f"{prefix}.num_batches_tracked"] = ()

    def block(prefix: str, cin: int, cout: int) -> None:  # pel.models.unet.ConvBlock: conv, norm, relu (x2)
        shapes[f"{prefix}.0.weight"] = (cout, cin, 3, 3)
        norm(f"{prefix}.1", cout)
        shapes[f"{prefix}.3.weight"] = (cout, cout, 3, 3)
        norm(f"{prefix}.4", cout)

    widths = [config.width * 2**level for level in range(config.depth + 1)]
    cin = config.in_channels
    for i, w in enumerate(widths[:-1]):
        block(f"encoders.{i}", cin, w)
        cin = w
    block("bottleneck", cin, widths[-1])
    levels = list(reversed(range(config.depth)))
    for j, level in enumerate(levels):
        shapes[f"upsamplers.{j}.weight"] = (widths[level + 1], widths[level], 2, 2)
        shapes[f"upsamplers.{j}.bias"] = (widths[level],)
    for j, level in enumerate(levels):
        block(f"decoders.{j}", 2 * widths[level], widths[level])
    shapes["head.weight"] = (config.out_channels, widths[0], 1, 1)
    shapes["head.bias"] = (config.out_channels,)
    return shapes


def expected_shapes(architecture: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes an architecture needs, where knowable without torch (the built-in U-Net)."""
    if architecture.get("name") == "unet":
        return unet_state_shapes(UNetConfig.from_dict({k: v for k, v in architecture.items() if k != "name"}))
    return None


def fit_problems(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Every way ``actual`` (name -> shape) differs from ``expected``: missing, unexpected keys, shape mismatches."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(actual[k])}, model {tuple(v)})"
        for k, v in expected.items()
        if k in actual and tuple(actual[k]) != tuple(v)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {names_text(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {names_text(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {names_text(mismatched)}")
    ddp_names = {k.removeprefix("module.") for k in unexpected if k.startswith("module.")}
    if missing and len(ddp_names) == len(unexpected) and ddp_names >= set(missing):
        problems.append("hint: the names carry DDP's 'module.' prefix; save model.module.state_dict() instead")
    return problems


def names_text(items: Any) -> str:
    items = [str(i) for i in items]
    shown = ", ".join(items[:MAX_NAMES])
    return shown + (f", ... ({len(items) - MAX_NAMES} more)" if len(items) > MAX_NAMES else "")


def resolve(inspection: Inspection, declared: Any | None) -> tuple[str, dict[str, Any] | None]:
    """The (format, architecture) to record for a registered file, or :class:`IntakeError` saying why not.

    TorchScript carries its own architecture (declaring one is an error). PEL Tune's own files carry theirs (a
    declaration must agree). A state_dict or safetensors file needs one declared (a safetensors file written by
    PEL Tune carries it in its metadata). Where the expected names and shapes are knowable (the built-in U-Net)
    the tensors must fit exactly.
    """
    architecture = parse_architecture(declared) if declared is not None else None
    fmt = inspection.format
    if fmt == TORCHSCRIPT:
        if architecture is not None:
            raise IntakeError("a TorchScript file carries its own architecture: register it without one")
        return fmt, None
    if fmt == PEL_TUNE:
        assert inspection.architecture is not None
        if architecture is not None and architecture != inspection.architecture:
            raise IntakeError(
                f"the declared architecture {architecture} differs from the one in the file {inspection.architecture}"
            )
        architecture = inspection.architecture
    elif architecture is None:
        architecture = inspection.architecture
        if architecture is None:
            raise IntakeError(
                f"a {fmt} file holds weights only: declare its architecture, e.g. "
                '{"name": "unet", "width": 16, "depth": 3} or '
                '{"name": "smp", "arch": "Unet", "encoder": "resnet34", "in_channels": 1, "classes": 2}'
            )
    expected = expected_shapes(architecture)
    if expected is not None and inspection.tensors is not None:
        problems = fit_problems(expected, {k: v.shape for k, v in inspection.tensors.items()})
        if problems:
            raise IntakeError(f"the weights do not fit the architecture {architecture}: " + "; ".join(problems))
    return fmt, architecture


# -- the spec file beside a staged or trained model ----------------------------------------------------------------


def spec_path(model_path: str | os.PathLike[str]) -> Path:
    """``model.pt`` -> ``model.pt.json``: the format and architecture of a model file, for the worker and trainer."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def write_spec(model_path: str | os.PathLike[str], fmt: str, architecture: dict[str, Any] | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown model format {fmt!r} (known: {', '.join(FORMATS)})")
    spec_path(model_path).write_text(json.dumps({"format": fmt, "architecture": architecture}) + "\n")


def read_spec(model_path: str | os.PathLike[str]) -> tuple[str, dict[str, Any] | None] | None:
    """(format, architecture) from the spec file beside ``model_path``, or None when there is none."""
    path = spec_path(model_path)
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    fmt, architecture = spec.get("format"), spec.get("architecture")
    if fmt not in FORMATS:
        raise IntakeError(f"{path}: unknown model format {fmt!r}")
    return fmt, parse_architecture(architecture) if architecture is not None else None
