"""One resolver for every input a command or flow takes: image files, image folders, benchmark
folders (labels, groups, masks from their manifest) and labelled folders with one sub-folder per
class (the torchvision ImageFolder layout).

Every entry under an input folder is either an image to process or a rejection with a reason
(:data:`ENTRY_REASONS`), never silently dropped: symlinks are followed only to regular files
inside the folder, hidden entries (``.name``) are skipped with a note, FIFOs, devices,
sockets and folders named like images are refused. Sub-folders are walked; in a labelled
folder an image's class is its first-level folder, whatever the depth below it."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vitsem.data.remote import is_remote, list_keys
from vitsem.data.shortcut import DATASET_INFO, ShortcutDataset
from vitsem.errors import AuditInputError, DatasetError
from vitsem.method.images import IMAGE_SUFFIXES
from vitsem.method.keypoints import Rejected
from vitsem.paths import path_text

ENTRY_REASONS = {
    "hidden": "a hidden entry (name starts with '.'); skipped, rename it to include it",
    "not_a_regular_file": "not a regular file (a FIFO, device, socket, or a folder named "
                          "like an image); only image files are read",
    "symlink_outside_input": "a symbolic link to a file outside the input folder; copy the "
                             "file in instead",
    "broken_symlink": "a symbolic link to nothing (dangling or looping)",
    "symlink_to_directory": "a symbolic link to a folder; folders are not followed through "
                            "links (no loops, no escapes)",
    "unsupported_suffix": f"not an image file name (expected one of "
                          f"{', '.join(sorted(IMAGE_SUFFIXES))})",
    "unreadable": "a folder that cannot be listed (permissions)",
}
"""Why an entry under an input folder is not processed; the reason codes of
``rejected.jsonl`` beside the image decoder's own (``truncated``, ``not_an_image``, ...)."""


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
    rejected: list[Rejected] = field(default_factory=list, compare=False)
    """Entries under the input folders that are not images to process, with the reason."""

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
    return InputSet(f"{path_text(root)}#{split}", f"{path_text(root.name)}:{split}", items,
                    list(ds.class_names))


def _reject(rejected: list[Rejected], path: str, reason: str, extra: str = "") -> None:
    rejected.append(Rejected(path, reason, ENTRY_REASONS[reason] + extra))


def scan_folder(root: Path) -> tuple[list[Path], list[Rejected]]:
    """The image files under ``root`` (sorted, recursive) and every other entry with its
    reason (:data:`ENTRY_REASONS`). Folders are walked without following links; a link is
    kept when it resolves to a regular file inside ``root``."""
    root = root.resolve()
    files: list[Path] = []
    rejected: list[Rejected] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            _reject(rejected, str(folder), "unreadable", f" ({e.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                _reject(rejected, entry.path, "hidden")
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                _reject(rejected, entry.path, "unreadable", f" ({e.strerror})")
                continue
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = path.resolve(strict=True)
                    st = target.stat()
                except (OSError, RuntimeError):
                    _reject(rejected, entry.path, "broken_symlink")
                    continue
                if not target.is_relative_to(root):
                    _reject(rejected, entry.path, "symlink_outside_input")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    _reject(rejected, entry.path, "symlink_to_directory")
                    continue
            is_image_name = path.suffix.lower() in IMAGE_SUFFIXES
            if stat.S_ISDIR(st.st_mode) and not is_image_name:
                stack.append(path)
            elif not stat.S_ISREG(st.st_mode):
                _reject(rejected, entry.path, "not_a_regular_file")
            elif not is_image_name:
                _reject(rejected, entry.path, "unsupported_suffix")
            else:
                files.append(path)
    rejected.sort(key=lambda r: r.path)
    return sorted(files), rejected


def _folder(root: Path, shown: str) -> InputSet:
    files, rejected = scan_folder(root)
    return _layout(path_text(root), path_text(root.name), shown,
                   [(str(p), tuple(path_text(x) for x in p.relative_to(root).parts))
                    for p in files], rejected)


def _layout(uri: str, name: str, shown: str, files: list[tuple[str, tuple[str, ...]]],
            rejected: list[Rejected]) -> InputSet:
    """The input set of a folder's image ``files`` (each its path and its parts relative to
    the folder): labelled by first-level sub-folder when no image sits at the top."""
    flat = [f for f, parts in files if len(parts) == 1]
    if flat:
        return InputSet(uri, name, [InputImage(f) for f, _ in files], None, (
            f"{path_text(shown)}: {len(flat)} images sit directly in the folder, without a "
            "class; the audit needs labels: put each class's images in a sub-folder named "
            "after the class"),
            rejected)
    items = [InputImage(f, parts[0], parts[0]) for f, parts in files]
    classes = sorted({it.label for it in items if it.label is not None})
    if not items:
        return InputSet(uri, name, [], None, f"{path_text(shown)}: the folder holds no images",
                        rejected)
    return InputSet(uri, name, items, classes, None, rejected)


def _remote_folder(uri: str) -> InputSet:
    """An ``s3://bucket/prefix`` folder: its objects sorted into images and rejections as a
    local folder's entries are (hidden names, other suffixes); the images are addressed by
    URI, so whoever runs a task reads them from the store itself."""
    root = uri.rstrip("/")
    keys = list_keys(root)
    if DATASET_INFO in keys:
        raise DatasetError(f"{uri}: a benchmark folder on S3 is not read yet (its manifest, "
                           "masks); copy it to a local folder, or upload its images in one "
                           "sub-folder per class")
    files: list[tuple[str, tuple[str, ...]]] = []
    rejected: list[Rejected] = []
    for key in keys:
        parts = tuple(key.split("/"))
        if any(part.startswith(".") for part in parts):
            _reject(rejected, f"{root}/{key}", "hidden")
        elif Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            _reject(rejected, f"{root}/{key}", "unsupported_suffix")
        else:
            files.append((f"{root}/{key}", parts))
    if not keys:
        raise DatasetError(f"{uri}: no objects under this prefix; check the bucket and prefix")
    return _layout(root, root.rsplit("/", 1)[-1], uri, files, rejected)


def _one(source: str | Path, split: str) -> InputSet:
    if is_remote(source):
        return _remote_folder(str(source))
    root = Path(source).resolve()
    if root.is_dir() and (root / DATASET_INFO).is_file():
        return _benchmark(root, split)
    if root.is_dir():
        return _folder(root, str(source))
    if root.is_file():
        return InputSet(path_text(root), path_text(root.name), [InputImage(str(root))], None,
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
                    reasons[0] if reasons else None, [r for s in sets for r in s.rejected])


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
