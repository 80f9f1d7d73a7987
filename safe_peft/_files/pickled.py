"""Read an adapter_model.bin (only with ``allow_pickle=True``): ``torch.load(weights_only=True)``, and the names a
refused pickle would have imported, read from its opcodes without running anything."""

from __future__ import annotations

from typing import Any

from safe_peft.errors import AdapterFormatError

__all__ = ["load_pickle"]


def load_pickle(path: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: a pickle that asks for anything but tensors is refused."""
    import pickle

    import torch

    from safe_peft._bounds import open_regular

    try:
        f, _ = open_regular(path)  # a device or FIFO in its place is refused, never read
    except OSError as exc:
        raise AdapterFormatError.of(
            "unreadable_pickle", f"{path}: cannot be read ({exc.strerror or exc})", adapter=path
        ) from None
    try:
        with f:
            data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for refused or damaged pickles
        foreign = pickle_globals(path)
        if not foreign and not isinstance(exc, pickle.UnpicklingError):
            raise AdapterFormatError.of(
                "unreadable_pickle",
                f"{path}: cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                adapter=path,
            ) from None
        raise AdapterFormatError.of(
            "pickle_payload_refused",
            f"{path}: the pickle asks to run code or build objects that are not tensors; it was refused "
            f"without running ({str(exc).splitlines()[0][:200]})",
            adapter=path,
            details={"globals": foreign[:20]},
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in data.items()):
        raise AdapterFormatError.of(
            "not_a_state_dict",
            f"{path}: does not hold a dict of tensors",
            adapter=path,
        )
    return data


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")


def pickle_globals(path: str) -> list[str]:
    """Globals a pickle would import, found by reading its opcodes (nothing is executed).

    Only names outside torch's own tensor-rebuilding helpers are returned.
    """
    import pickletools
    import zipfile

    from safe_peft._bounds import open_regular

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return []
                data = archive.read(member)
        else:
            f, size = open_regular(path)
            with f:
                data = f.read(min(size, 64 * 1024 * 1024))
    except (OSError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a damaged stream ends the scan; what was found still counts
        pass
    return [n for n in names if not n.startswith(_SAFE_GLOBAL_PREFIXES)]
