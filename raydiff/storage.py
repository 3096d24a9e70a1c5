"""A folder on local disk, NFS or object storage (``s3://``, ``gs://``), with whole writes.

Sample folders, evaluation outputs and checkpoints may live on the shared storage a cluster
uses. Everything written through ``Folder`` appears whole or not at all: on a filesystem by
writing a hidden temporary sibling and renaming it; on an object store because an object
becomes visible only when its upload completes. Nothing here imports Ray.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from raydiff.errors import RaydiffError


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A hidden temporary sibling of ``final`` (file or folder) to write into; renamed to
    ``final`` when the block ends, removed if it raises. Readers never see half of it."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


class Folder:
    """A local path or a URI, and pyarrow's filesystem for it."""

    def __init__(self, location: str | Path):
        self.location = str(location).rstrip("/")
        if is_uri(self.location):
            try:
                self.fs, self.base = pafs.FileSystem.from_uri(self.location)
            except (pa.ArrowInvalid, OSError) as err:
                raise RaydiffError(f"cannot open {self.location}: {err}") from None
            self.local: Path | None = None
        else:
            self.local = Path(self.location).resolve()
            self.fs, self.base = pafs.LocalFileSystem(), str(self.local)

    def __str__(self) -> str:
        return self.location

    def path(self, relative: str) -> str:
        """Inside the filesystem (what ``self.fs`` takes)."""
        return posixpath.join(self.base, relative) if relative else self.base

    def uri(self, relative: str) -> str:
        """What Ray Data's readers and people take: a local path or a full URI."""
        if self.local is not None:
            return str(self.local / relative)
        return f"{self.location}/{relative}" if relative else self.location

    def sub(self, relative: str) -> Folder:
        return Folder(self.uri(relative))

    def exists(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def is_file(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def is_dir(self, relative: str = "") -> bool:
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.Directory

    def names(self, relative: str = "", pattern: str = "*") -> list[str]:
        """Sorted names of the entries directly in ``relative`` that match ``pattern``."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        names = [posixpath.basename(info.path) for info in self.fs.get_file_info(selector)]
        return sorted(n for n in names if fnmatch.fnmatch(n, pattern))

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def read_json(self, relative: str) -> dict:
        return json.loads(self.read_bytes(relative).decode("utf-8"))

    def open_input_file(self, relative: str):
        return self.fs.open_input_file(self.path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.local:
            final = self.local / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as tmp:
                tmp.write_bytes(data)
            return
        self._parent_folder(relative)
        with self.fs.open_output_stream(self.path(relative)) as stream:
            stream.write(data)

    def write_json(self, relative: str, data: dict) -> None:
        self.write_bytes(relative, (json.dumps(data, indent=2) + "\n").encode("utf-8"))

    @contextmanager
    def writing_file(self, relative: str) -> Iterator[Path]:
        """A local file path to write (e.g. with numpy) that then appears at ``relative``."""
        if self.local:
            final = self.local / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir) / posixpath.basename(relative)
            yield tmp
            self.put_file(tmp, relative)

    def put_file(self, source: Path, relative: str) -> None:
        """Copy a local file to ``relative``, whole (streamed, not read into memory)."""
        if self.local:
            final = self.local / relative
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as tmp:
                shutil.copyfile(source, tmp)
            return
        self._parent_folder(relative)
        pafs.copy_files(str(source), self.path(relative), destination_filesystem=self.fs)

    def _parent_folder(self, relative: str) -> None:
        """A ``file://`` URI's local filesystem needs the folders an object store does not."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(posixpath.dirname(self.path(relative)), recursive=True)

    def delete(self, relative: str) -> None:
        try:
            self.fs.delete_file(self.path(relative))
        except FileNotFoundError:
            pass

    def makedirs(self, relative: str = "") -> None:
        self.fs.create_dir(self.path(relative), recursive=True)

    def sha256(self, names: list[str], prefix: bytes = b"", named: bool = False) -> str:
        """sha256 of ``prefix`` and the named files' bytes in order (streamed), each file
        preceded by its name and a NUL byte when ``named``."""
        digest = hashlib.sha256(prefix)
        for name in names:
            if named:
                digest.update(name.encode() + b"\0")
            with self.fs.open_input_stream(self.path(name)) as stream:
                while block := stream.read(1 << 22):
                    digest.update(block)
        return digest.hexdigest()

    def download(self, names: list[str], into: Path) -> Path:
        """Copy the named files of this folder into a local folder."""
        into.mkdir(parents=True, exist_ok=True)
        for name in names:
            (into / name).write_bytes(self.read_bytes(name))
        return into


def read_verified(path: str | Path, sha256: str | None = None, prefix: bytes = b"",
                  what: str = "weights") -> tuple[bytes, str]:
    """A local file's bytes, read once, and the sha256 of ``prefix`` + those bytes. With
    ``sha256``, refused unless they hash to it: whatever is parsed from the bytes is what was
    checked, never a file replaced after the check."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RaydiffError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    digest = hashlib.sha256(prefix + data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise RaydiffError(f"{path} changed after it was checked (sha256 {digest[:16]}..., "
                           f"expected {sha256[:16]}...)")
    return data, digest


def latest_checkpoint_folder(location: str | Path, marker: str) -> str | None:
    """The ``checkpoint_<step>`` folder of a run folder with the highest step that holds
    ``marker`` (a file every complete checkpoint of its kind has), or None."""
    folder = Folder(location)
    steps = [(int(name.removeprefix("checkpoint_")), name)
             for name in folder.names(pattern="checkpoint_*")
             if name.removeprefix("checkpoint_").isdigit() and folder.is_file(f"{name}/{marker}")]
    return folder.uri(max(steps)[1]) if steps else None


def local_copy(location: str | Path, cache: str,
               keep: Callable[[str], bool] = lambda name: True) -> Path:
    """A folder as a local path: itself, or a copy of a remote one (the files ``keep``
    accepts), made once per node under ``$TMPDIR/<cache>`` and shared by its processes."""
    folder = Folder(location)
    if folder.local is not None:
        return folder.local
    copy = Path(tempfile.gettempdir()) / cache / hashlib.sha256(
        folder.location.encode()).hexdigest()[:24]
    if not copy.is_dir():
        copy.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(copy) as tmp:
            folder.download([name for name in folder.names() if keep(name)], tmp)
    return copy


def json_safe(value):
    """Numbers as JSON has them: NaN and infinities (a metric that needs more images than
    there are) as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def to_buffer(write) -> bytes:
    """The bytes ``write(file_object)`` produces (Parquet tables, PNG charts, ...)."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()
