"""Labelled inputs of an audit: a benchmark folder (labels, groups, masks from its manifest)
or an image folder with one sub-folder per class (the torchvision ImageFolder layout)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitsem.data.shortcut import DATASET_INFO, ShortcutDataset
from vitsem.errors import AuditInputError
from vitsem.method.images import list_images


@dataclass(frozen=True)
class LabelledImage:
    """An image to audit: its class name, group (default: the class), whether it is known
    to hold no shortcut (None: unknown) and an optional object-mask file."""

    path: str
    label: str
    group: str
    clean: bool | None = None
    mask: str | None = None


def labelled_images(data: str | Path, split: str = "test") -> list[LabelledImage]:
    """The labelled images under ``data``, in a deterministic order."""
    root = Path(data).resolve()
    if (root / DATASET_INFO).is_file():
        ds = ShortcutDataset.load(root)
        return [LabelledImage(str(ds.root / s.file), s.class_name, s.group, not s.shortcut,
                              str(ds.root / s.mask)) for s in ds.split(split)]
    if not root.is_dir():
        raise AuditInputError(f"{data}: no such folder; the audit needs a benchmark folder "
                              "(`vitsem data make`) or a folder with one sub-folder per class")
    files = list_images(root)
    flat = [p for p in files if p.parent == root]
    if flat:
        raise AuditInputError(
            f"{data}: {len(flat)} images sit directly in the folder, without a class; the "
            "audit needs labels: put each class's images in a sub-folder named after the class")
    out = []
    for p in files:
        label = p.relative_to(root).parts[0]
        out.append(LabelledImage(str(p), label, label))
    return out
