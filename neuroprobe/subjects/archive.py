"""Reading tensors out of torch zip archives without running anything from the file.

Two released formats hold whole pickled modules rather than plain state dicts: OpenAI's
CLIP checkpoints (TorchScript archives, ``RN50.pt``) and OpenAI's dVAE (``encoder.pkl``, a
``torch.save``'d ``dall_e`` module).  ``torch.load(weights_only=True)`` refuses both, and a
full unpickle would import and run code named by the file.  :func:`read_module_tree`
unpickles an archive's ``data.pkl`` with a restricted unpickler instead: it admits tensor
records, storages, ordered dicts, sets and devices, and replaces the module classes of a
few known namespaces (``__torch__``, ``torch.nn.modules``, ``dall_e``) by inert placeholder
objects that keep their attributes; any other name is refused.  :func:`module_state_dict`
then walks the tree into a state dict, exactly as ``module.state_dict()`` would name it.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

#: Storage classes an archive names, and their dtypes.
STORAGES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}

#: Namespaces whose classes become placeholders (never imported).
PLACEHOLDER_NAMESPACES = ("__torch__", "torch.nn.modules.", "dall_e.")


class Placeholder:
    """Stands for an object of a class from the file: keeps its constructor arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    @property
    def state(self) -> dict[str, Any]:
        """The pickled attribute dict (empty if there was none)."""
        s = self.__dict__.get("_state")
        if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], dict):  # (dict, slots)
            s = s[0]
        return s if isinstance(s, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("torch", "device"): _device,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in STORAGES:
            return STORAGES[name]
        if module.startswith(PLACEHOLDER_NAMESPACES):
            return Placeholder
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        _, dtype, key, _location, numel = pid[:5]
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("a tensor record names no known storage type")
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype)[:numel]


def read_module_tree(path: str | Path) -> Any:
    """The unpickled ``data.pkl`` of a torch zip archive, module objects as :class:`Placeholder`.

    Raises ``pickle.UnpicklingError`` for a name outside the allowed set, ``zipfile.BadZipFile``
    for a file that is not a zip archive (e.g. the pre-1.6 torch format).
    """
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not names:
            raise pickle.UnpicklingError(f"{path} has no data.pkl record")
        prefix = names[0].split("/")[0]
        return _Unpickler(archive.read(names[0]), archive, prefix).load()


def module_state_dict(root: Any) -> dict[str, torch.Tensor]:
    """Dotted names -> tensors of a placeholder module tree.

    A ``torch.save``'d ``nn.Module`` keeps its tensors in ``_parameters``/``_buffers`` and its
    children in ``_modules``; a TorchScript module keeps them as plain attributes.
    """
    out: dict[str, torch.Tensor] = {}

    def walk(obj: Any, where: str) -> None:
        state = obj.state if isinstance(obj, Placeholder) else {}
        if "_parameters" in state or "_modules" in state:
            non_persistent = state.get("_non_persistent_buffers_set") or set()
            for group in ("_parameters", "_buffers"):
                for key, value in (state.get(group) or {}).items():
                    if isinstance(value, torch.Tensor) and not (group == "_buffers" and key in non_persistent):
                        out[where + key] = value
            for key, child in (state.get("_modules") or {}).items():
                if child is not None:
                    walk(child, f"{where}{key}.")
            return
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[where + key] = value
            elif isinstance(value, Placeholder):
                walk(value, f"{where}{key}.")

    walk(root, "")
    return out
