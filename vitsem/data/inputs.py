"""One resolver for every input a command or flow takes: image files, image folders, benchmark
folders (labels, groups, masks from their manifest) and labelled folders with one sub-folder per
class (the torchvision ImageFolder layout)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vitsem.data.shortcut import DATASET_INFO, ShortcutDataset
from vitsem.errors import AuditInputError, DatasetError
from vitsem.method.images import list_images


@dataclass(frozen=True)
class InputImage:
    """One image to process: its absolute path and, where the input says, its class name,
    group (default: the class), whether it is known to hold no shortcut (None: unknown) and an
    object-mask file."""

    path: str
    label: str | None = None
    group: str | None = None
    clean: bool | None = None
    mask: str | None = None


@dataclass(frozen=True)
class InputSet:
    """The images of one or more sources, in a deterministic order. ``uri`` identifies the set
    (paths and split) for the metadata store, ``name`` is for people; ``class_names`` come from
    a benchmark's manifest or the class sub-folders (None for unlabelled input);
    ``unlabelled`` explains why the set carries no labels."""

    uri: str
    name: str
    items: list[InputImage]
    class_names: list[str] | None = None
    unlabelled: str | None = field(default=None, compare=False)

    @property
    def paths(self) -> list[str]:
        return [it.path for it in self.items]

    @property
    def labelled(self) -> bool:
        return self.unlabelled is None

    def require_labels(self) -> list[InputImage]:
        """The items, each with a label; :class:`AuditInputError` saying how to label them
        when the input carries none."""
        if self.unlabelled is not None:
            raise AuditInputError(self.unlabelled)
        return self.items


def _benchmark(root: Path, split: str) -> InputSet:
    ds = ShortcutDataset.load(root)
    items = [InputImage(str(ds.root / s.file), s.class_name, s.group, not s.shortcut,
                        str(ds.root / s.mask)) for s in ds.split(split)]
    return InputSet(f"{root}#{split}", f"{root.name}:{split}", items, list(ds.class_names))


def _folder(root: Path, shown: str) -> InputSet:
    files = list_images(root)
    flat = [p for p in files if p.parent == root]
    if flat:
        return InputSet(str(root), root.name, [InputImage(str(p)) for p in files], None, (
            f"{shown}: {len(flat)} images sit directly in the folder, without a class; the "
            "audit needs labels: put each class's images in a sub-folder named after the class"))
    items = []
    for p in files:
        label = p.relative_to(root).parts[0]
        items.append(InputImage(str(p), label, label))
    classes = sorted({it.label for it in items if it.label is not None})
    if not items:
        return InputSet(str(root), root.name, [], None, f"{shown}: the folder holds no images")
    return InputSet(str(root), root.name, items, classes)


def _one(source: str | Path, split: str) -> InputSet:
    root = Path(source).resolve()
    if root.is_dir() and (root / DATASET_INFO).is_file():
        return _benchmark(root, split)
    if root.is_dir():
        return _folder(root, str(source))
    if root.is_file():
        return InputSet(str(root), root.name, [InputImage(str(root))], None,
                        f"{source}: a single file carries no class label; the audit needs a "
                        "benchmark folder or a folder with one sub-folder per class")
    raise DatasetError(f"{source}: no such file or folder; give an image file, an image "
                       "folder, a benchmark folder (`vitsem data make`) or a folder with one "
                       "sub-folder per class")


def resolve_inputs(sources: str | Path | Sequence[str | Path], split: str = "test") -> InputSet:
    """The images of ``sources`` (one or several paths). A benchmark folder gives its ``split``
    with labels, groups and masks; a folder whose images all sit in class sub-folders gives
    labelled images; other folders and files give unlabelled images. Raises
    :class:`DatasetError` for a path that does not exist."""
    many = [sources] if isinstance(sources, str | Path) else list(sources)
    if not many:
        raise DatasetError("no input given; name image files or folders")
    sets = [_one(s, split) for s in many]
    if len(sets) == 1:
        return sets[0]
    reasons = [s.unlabelled for s in sets if s.unlabelled is not None]
    classes = sorted({c for s in sets for c in (s.class_names or [])}) if not reasons else None
    return InputSet(" + ".join(s.uri for s in sets), " + ".join(s.name for s in sets),
                    [it for s in sets for it in s.items], classes,
                    reasons[0] if reasons else None)


def labelled_images(data: str | Path, split: str = "test") -> list[InputImage]:
    """The labelled images under ``data``; :class:`AuditInputError` when it carries no labels
    or does not exist."""
    try:
        inputs = resolve_inputs(data, split)
    except DatasetError as e:
        raise AuditInputError(f"{data}: no such folder; the audit needs a benchmark folder "
                              "(`vitsem data make`) or a folder with one sub-folder per "
                              "class") from e
    return inputs.require_labels()
