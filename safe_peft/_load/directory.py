"""The directory peft loads an adapter from: the adapter's own, or a temporary one with the checked config and the
weights, renamed when an opt-in asked."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from safe_peft._files.rewrite import write_weights

if TYPE_CHECKING:
    from safe_peft._plan.plan import LoadPlan

__all__ = [
    "load_directory",
]


def load_directory(plan: LoadPlan, *, with_config: bool) -> tuple[str, str | None]:
    """The directory peft loads from: the adapter's own, or a temporary one holding the weights (rewritten when keys
    are renamed or dropped, else linked) and, ``with_config``, the checked config. Returns it and the temporary
    directory to remove (None when there is none)."""
    renamed = bool(plan.renames or plan.dropped or plan.legacy is not None)
    if not (renamed or with_config):
        return plan.files.directory, None
    from safe_peft._fix.writer import temporary_directory

    with temporary_directory() as workdir:  # removed if writing into it fails half-way
        if renamed:
            write_weights(
                plan.files.weights_path,
                os.path.join(workdir, "adapter_model.safetensors"),
                weights_format=plan.files.weights_format,
                renames=plan.renames,
                dropped=plan.dropped,
                legacy=plan.legacy,
            )
        else:
            target = os.path.join(workdir, os.path.basename(plan.files.weights_path))
            try:
                os.symlink(os.path.abspath(plan.files.weights_path), target)
            except OSError:  # no symbolic links here: copy
                shutil.copyfile(plan.files.weights_path, target)
        if with_config:
            plan.peft_config.save_pretrained(workdir)
    return workdir, workdir
