"""Folders written whole or not at all, with a record of what was written.

A folder is written into a hidden temporary folder beside its target; the sha256 and size of
every file in it go into its `checksums.json`; every file and the folder are fsynced; only
then is it renamed into place. So a folder of the target's name is complete, and a file
damaged later (a flipped bit, a truncation by a failing disk) is found by comparing it with
the record. A leftover hidden folder (a killed write or delete) is removed at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

TEMPORARY_PREFIX = "."  # hidden folders: being written, or being deleted
CHECKSUMS = "checksums.json"


# ---- files ---------------------------------------------------------------------------------


def write_atomically(target: Path, write) -> None:
    """`write(folder)` into a hidden folder beside `target`, record its checksums, fsync it,
    then rename it into place (replacing an older `target`). Whatever writes into the folder
    (other processes too, for sharded files) must have finished when `write` returns."""
    temporary = staging_folder(target)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    write(temporary)  # a failure leaves the folder, as a kill would: remove_unfinished finds it
    record_checksums(temporary)
    _fsync_tree(temporary)
    if target.exists():
        delete_out_of_sight(target)
    os.rename(temporary, target)
    _fsync(target.parent)


def staging_folder(target: Path) -> Path:
    """Where this process writes `target` before renaming it into place."""
    return target.with_name(f"{TEMPORARY_PREFIX}{target.name}.writing-{os.getpid()}")


def publish_files(staging: Path, output_dir: Path) -> None:
    """Move a fully written model folder's files into `output_dir`, weights last (and a
    sharded model's index after its shards): whoever sees the weights sees a whole model."""
    _fsync_tree(staging)

    def order(path: Path) -> int:
        if path.name.endswith(".safetensors.index.json"):
            return 2
        return 1 if path.name.endswith(".safetensors") else 0

    for path in sorted(staging.iterdir(), key=order):
        destination = output_dir / path.name
        if destination.is_dir():
            shutil.rmtree(destination)
        os.replace(path, destination)
    _fsync(output_dir)
    staging.rmdir()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_out_of_sight(path: Path) -> None:
    """Rename out of sight first, so a kill during the delete never leaves a checkpoint-named
    folder with files missing."""
    doomed = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.deleting-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def record_checksums(folder: Path) -> None:
    """Write `checksums.json` in `folder`: each file's (recursively, relative posix path)
    sha256 and size."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / CHECKSUMS)
    manifest = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        for p in files
    }
    (folder / CHECKSUMS).write_text(json.dumps(manifest, indent=1), "utf-8")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
