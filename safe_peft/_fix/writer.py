"""The one writer of adapter directories: ``fix``, ``fix --target``, ``fix --merge-ranks`` and any future writer.

:func:`write_output` owns every guarantee about the user's files; a writer only says what goes into the new
directory (``fill``) and how to check it (``verify``). It never removes or writes anything outside a directory it
created itself:

* ``out_dir`` is refused when it is an input (or inside one, or holds one), a symbolic link, a filesystem root or
  mount point, a file, or a non-empty directory safe-peft did not write (it carries :data:`MARKER` and nothing but
  the files safe-peft writes); an existing output is replaced only with ``force=True``.
* The output is written into a new staging directory beside ``out_dir``, verified there, and moved into place in
  one step: a refused verification leaves ``out_dir`` as it was. Replacing swaps the two directories atomically
  (``renameat2(RENAME_EXCHANGE)``) before removing the old one, so a crash at any moment leaves either the old or
  the new output. Where the filesystem has no atomic exchange, the old output is renamed aside to
  ``.safe_peft_<name>.old`` for the instant between two renames, and the next write to ``out_dir`` puts it back if a
  crash fell in that instant (:func:`recover_output`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from safe_peft._files.locate import CONFIG_NAME, SAFETENSORS_NAME
from safe_peft._files.rewrite import write_weights
from safe_peft._plan.plan import LoadPlan, make_plan
from safe_peft._versions import SAFE_PEFT_VERSION
from safe_peft.errors import AdapterLoadError
from safe_peft.report import LoadReport
from safe_peft.rules import Remap, Repair

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MARKER",
    "OutputDirError",
    "fix_adapter",
    "recover_output",
    "replace_file",
    "temporary_directory",
    "write_fix",
    "write_output",
]

MARKER = ".safe-peft-fix.json"  # written into every output directory; names its source
_OWN_FILES = {MARKER, CONFIG_NAME, SAFETENSORS_NAME, "README.md"}


class OutputDirError(ValueError):
    """``out_dir`` cannot be written safely: it is the input (or inside it), a symlink, a filesystem root, or a
    non-empty directory safe-peft did not write. Nothing was written or removed.

    ``str(err)``: ``"/data/adapters: exists and holds files safe-peft did not write (notes.txt); choose a new
    directory (force=True only replaces a directory safe-peft wrote)"``
    """


def fix_adapter(
    base_model: nn.Module,
    model_id: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    remap: Remap = None,
    repair: Repair = (),
    allow_pickle: bool = False,
    force: bool = False,
    **peft_kwargs: Any,
) -> LoadReport:
    """Write the adapter, fixed by the given opt-ins, to ``out_dir``, so that plain peft loads it.

    A ``"vocab"`` repair cannot live in the adapter: before loading the written adapter, resize the base model to
    the vocabulary the report names.

    :param base_model: the model the adapter should load into, as :func:`safe_load_adapter` takes it.
    :param model_id: a local adapter directory, or a hub id when online.
    :param out_dir: a new directory, or one safe-peft wrote earlier (with ``force=True``).
    :param remap: as in :func:`safe_load_adapter`.
    :param repair: as in :func:`safe_load_adapter`.
    :param allow_pickle: as in :func:`safe_load_adapter`.
    :param force: replace an output safe-peft wrote earlier, atomically.
    :param peft_kwargs: ``**peft_kwargs``: as in :func:`safe_load_adapter`.
    :returns: the :class:`LoadReport` of the fixed adapter, with the renames and repairs applied.
    :raises AdapterLoadError: when the fixed adapter would still not fit. Nothing is written then.
    :raises OutputDirError: (a ``ValueError``; ``FileExistsError`` for an existing output) when ``out_dir`` is not
        safe to write.

    ```python
    >>> fixed = os.path.join(tmp, "fixed")
    >>> len(fix_adapter(base, compiled_adapter_dir, fixed, remap="auto").renames)
    8
    >>> diagnose(base, fixed).ok
    True

    ```
    """
    plan = make_plan(
        base_model, model_id, remap=remap, repair=tuple(repair), allow_pickle=allow_pickle, peft_kwargs=peft_kwargs
    )
    if not plan.report.ok:
        raise AdapterLoadError(plan.report)
    return write_fix(plan, out_dir, force=force)


def write_fix(
    plan: LoadPlan,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    verify: Callable[[str], object] | None = None,
) -> LoadReport:
    """Write the fixed adapter of ``plan`` to ``out_dir`` (through :func:`write_output`). ``verify(staging_dir)``
    runs on the complete output before it is moved into place: when it raises, nothing was written."""

    def fill(staging: str) -> None:
        write_weights(
            plan.files.weights_path,
            os.path.join(staging, SAFETENSORS_NAME),
            weights_format=plan.files.weights_format,
            renames=plan.renames,
            dropped=plan.dropped,
            legacy=plan.legacy,
            metadata=lambda keys: provenance(plan, keys),
        )
        plan.peft_config.save_pretrained(staging)

    record = {"source": plan.files.location, "repairs": plan.report.repairs}
    write_output(out_dir, [plan.files.directory], fill, verify=verify, force=force, record=record)
    return plan.report


def write_output(
    out_dir: str | os.PathLike[str],
    sources: Iterable[str | os.PathLike[str]],
    fill: Callable[[str], object],
    *,
    verify: Callable[[str], object] | None = None,
    force: bool = False,
    record: dict[str, Any] | None = None,
) -> None:
    """Write a new adapter directory at ``out_dir``: ``fill(staging)`` writes its files into a staging directory
    beside it, :data:`MARKER` (with ``record``) is added, ``verify(staging)`` checks the complete output, and only
    then is it moved into place. ``sources`` are the input directories, which ``out_dir`` must not be, hold or lie
    in. Raises :class:`OutputDirError` / ``FileExistsError`` before anything is written; whatever ``fill`` or
    ``verify`` raises leaves ``out_dir`` as it was, and no staging directory behind."""
    target = os.path.abspath(os.fspath(out_dir))
    inputs = [os.fspath(s) for s in sources]
    replacing = check_output_dir(target, inputs, force)
    if recover_output(target):  # a crash's old output put back: judged again, as it now stands
        replacing = check_output_dir(target, inputs, force)
    created = _make_parents(os.path.dirname(target))
    staging = ""
    try:
        staging = tempfile.mkdtemp(prefix=".safe_peft_", dir=os.path.dirname(target))
        os.chmod(staging, 0o777 & ~_umask())  # as a directory made by hand (mkdtemp's are private to the owner)
        fill(staging)
        with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
            json.dump(record or {}, f)
        if verify is not None:
            verify(staging)
        if replacing:
            _swap(staging, target)  # staging now holds the old output
        else:
            os.rename(staging, target)  # fails if something appeared at target meanwhile: nothing is lost
            staging = ""
    except BaseException:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
            staging = ""
        for directory in created:  # the parents made for it, innermost first, if nothing else went into them
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _make_parents(parent: str) -> list[str]:
    """Create ``parent`` and the directories missing above it: those it created, innermost first."""
    missing = []
    while not os.path.isdir(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.makedirs(directory, exist_ok=True)
    return missing


def _umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def check_output_dir(target: str, sources: Iterable[str], force: bool) -> bool:
    """Whether ``target`` is an existing safe-peft output to replace (False: a new directory). Raises
    :class:`OutputDirError` / ``FileExistsError`` for anything unsafe, touching nothing."""
    resolved = os.path.realpath(target)
    if os.path.islink(target):
        raise OutputDirError(f"{target}: is a symbolic link; pass the real directory (or a new one)")
    if resolved == os.path.dirname(resolved) or os.path.ismount(resolved):
        raise OutputDirError(f"{target}: is a filesystem root or mount point; pass a new directory below it")
    for source in (os.path.realpath(s) for s in sources):
        if resolved == source or source.startswith(resolved + os.sep) or _among(resolved, _lineage(source)):
            raise OutputDirError(f"{target}: is the adapter's own directory (or holds it); write the fix to a new one")
        if resolved.startswith(source + os.sep) or _among(source, _lineage(resolved)):
            raise OutputDirError(f"{target}: is inside the adapter directory {source}; write the fix outside it")
    if not os.path.lexists(target):
        return False
    if not os.path.isdir(target):
        raise OutputDirError(f"{target}: exists and is not a directory")
    names = set(os.listdir(target))
    if not names:
        return False  # empty: renaming onto it is one step (and leaves it as it was if anything fails)
    foreign = sorted(names - _OWN_FILES)
    if MARKER not in names or foreign:
        what = ", ".join(foreign[:5]) if foreign else "no safe-peft marker"
        raise FileExistsError(
            f"{target}: exists and holds files safe-peft did not write ({what}); choose a new directory "
            "(force=True only replaces a directory safe-peft wrote)"
        )
    if not force:
        raise FileExistsError(f"{target}: exists and is not empty; choose a new directory or pass force=True")
    return True


def _lineage(path: str) -> list[str]:
    """``path`` and every directory above it."""
    found = [path]
    while os.path.dirname(found[-1]) != found[-1]:
        found.append(os.path.dirname(found[-1]))
    return found


def _among(path: str, others: list[str]) -> bool:
    """Whether ``path`` is one of ``others`` as the filesystem sees it (the same device and inode: a bind mount, or
    another spelling on a case-insensitive filesystem)."""
    try:
        mine = os.stat(path)
    except OSError:
        return False
    for other in others:
        try:
            seen = os.stat(other)
        except OSError:
            continue
        if (seen.st_dev, seen.st_ino) == (mine.st_dev, mine.st_ino):
            return True
    return False


def _aside(target: str) -> str:
    """Where the fallback swap keeps the old output for the instant between its two renames."""
    return os.path.join(os.path.dirname(target), f".safe_peft_{os.path.basename(target)}.old")


def recover_output(target: str) -> bool:
    """Put back an old output that a crash left aside (fallback swap, between its two renames); True if it did."""
    aside = _aside(target)
    if os.path.lexists(target) or not _own_output(aside):
        return False
    os.rename(aside, target)
    return True


def _own_output(path: str) -> bool:
    """A real directory holding the marker and nothing but the files safe-peft writes."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    return MARKER in names and names <= _OWN_FILES


def _exchange(first: str, second: str) -> bool:
    """Exchange two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(code, os.strerror(code), second)
    return False


def _swap(staging: str, target: str) -> None:
    """Put ``staging`` at ``target`` and the old ``target`` at ``staging``: atomically, else by two renames with the
    old output at a fixed place aside (:func:`recover_output` puts it back after a crash in between)."""
    if _exchange(staging, target):
        return
    aside = _aside(target)
    if os.path.lexists(aside):  # a finished swap's leftover (the recovery ran first, and target is there)
        if not _own_output(aside):
            raise OutputDirError(f"{aside}: is in the way of replacing {target} and safe-peft did not write it")
        shutil.rmtree(aside)
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, target)
        raise
    os.rename(aside, staging)


@contextlib.contextmanager
def temporary_directory() -> Iterator[str]:
    """A private scratch directory (``/tmp/safe_peft_*``) for a load's rewritten files, removed when the block
    fails; on success the caller owns it (the load removes it when it is done)."""
    workdir = tempfile.mkdtemp(prefix="safe_peft_")
    try:
        yield workdir
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def provenance(plan: LoadPlan, original_keys: list[str]) -> dict[str, str]:
    """Metadata that says where a fixed adapter came from."""
    digest = hashlib.sha256("\n".join(sorted(original_keys)).encode()).hexdigest()
    return {
        "format": "pt",
        "safe_peft.version": SAFE_PEFT_VERSION,
        "safe_peft.source": plan.files.location,
        "safe_peft.source_keys_sha256": digest,
        "safe_peft.renamed": str(len(plan.renames)),
        "safe_peft.dropped": str(len(plan.dropped)),
        "safe_peft.rules": ",".join(plan.rules),
        "safe_peft.repairs": json.dumps(plan.report.repairs),
    }


def replace_file(path: str | os.PathLike[str], write: Callable[[Any], None]) -> None:
    """Replace the file at ``path`` atomically with what ``write(f)`` writes into a binary file object.

    The new content goes to a temporary file in the same directory, is flushed and fsynced, takes the old file's
    permissions, and is renamed over ``path`` in one step (``os.replace``); the directory is fsynced after. Nothing
    else in the directory is touched. When ``write`` (or anything before the rename) fails, ``path`` is unchanged
    and no temporary file is left. A symbolic link is refused (replacing it would cut the link: a hub cache).

    >>> replace_file("adapter/adapter_model.safetensors", lambda f: f.write(new_bytes))  # doctest: +SKIP
    """
    target = os.fspath(path)
    if os.path.islink(target):
        raise OutputDirError(f"{target}: is a symbolic link (a hub cache?); copy the adapter to a directory first")
    mode = os.stat(target).st_mode & 0o7777
    directory = os.path.dirname(os.path.abspath(target))
    fd, temporary = tempfile.mkstemp(prefix=".safe_peft_", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash once the directory is synced
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
