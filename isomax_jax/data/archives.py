"""Safe, in-memory reading of the zip / tar / gzip archives the OOD builders are made from.

Nothing is ever extracted to disk: members are read into memory one at a time. Before the first
member is returned, every member name of the archive is checked, and the whole archive is refused
(:class:`ArchiveError`) if any member

* has an absolute path (``/x``, ``C:\\x``) or a ``..`` component, or
* is a symbolic or hard link whose target is absolute or leaves the archive root.

Corrupted or truncated archives raise :class:`ArchiveError` naming the file (and the member when
the damage is found while reading it), never a bare ``zlib.error`` / ``EOFError``.

Example:
  >>> import io, zipfile, tempfile, pathlib
  >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.zip"
  >>> with zipfile.ZipFile(path, "w") as z:
  ...     z.writestr("d/x.png", b"123")
  ...     z.writestr("d/readme.txt", b"hi")
  >>> [(name, data) for name, data in iter_archive(path, suffixes=(".png",))]
  [('d/x.png', b'123')]
"""

from __future__ import annotations

import gzip
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence

__all__ = ["ArchiveError", "iter_archive", "read_gzip"]

_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, ValueError)


class ArchiveError(ValueError):
    """An archive is corrupted, truncated, of an unknown type, or holds unsafe members."""


def _check_name(archive: os.PathLike | str, name: str) -> str:
    """Returns the normalised member name, or raises if it is absolute or climbs out."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise ArchiveError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in unified.split("/"):
        raise ArchiveError(f"{archive}: refusing member {name!r}: '..' path component")
    return unified


def _check_link(archive: os.PathLike | str, name: str, target: str, *, hard: bool = False) -> None:
    """Raises if a link member's target is absolute or points outside the archive root.

    Symbolic link targets are relative to the link's folder, hard link targets to the root.
    """
    target = target.replace("\\", "/")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise ArchiveError(f"{archive}: refusing link {name!r} -> {target!r}: absolute target")
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise ArchiveError(f"{archive}: refusing link {name!r} -> {target!r}: points outside")


def _wanted(name: str, suffixes: Sequence[str], prefix: str) -> bool:
    return name.startswith(prefix) and name.lower().endswith(tuple(s.lower() for s in suffixes))


def _iter_zip(path, suffixes, prefix) -> Iterator[tuple[str, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: not a readable zip archive ({e})") from e
    with zf:
        selected = []
        for info in zf.infolist():
            name = _check_name(path, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                try:
                    target = zf.read(info).decode("utf-8", "replace")
                except _READ_ERRORS as e:
                    raise ArchiveError(f"{path}: cannot read link member {name!r} ({e})") from e
                _check_link(path, name, target)
                continue  # links inside the archive are skipped, never followed
            if not info.is_dir() and _wanted(name, suffixes, prefix):
                selected.append((name, info))
        for name, info in sorted(selected, key=lambda item: item[0]):
            try:
                data = zf.read(info)
            except _READ_ERRORS as e:
                raise ArchiveError(
                    f"{path}: member {name!r} is corrupted or truncated ({e})"
                ) from e
            yield name, data


def _iter_tar(path, suffixes, prefix) -> Iterator[tuple[str, bytes]]:
    # Pass 1: validate every member name before anything is returned.
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf.getmembers():
                name = _check_name(path, member.name)
                if member.issym() or member.islnk():
                    _check_link(path, name, member.linkname, hard=member.islnk())
    except ArchiveError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: not a readable tar archive or truncated ({e})") from e
    # Pass 2: stream the regular files that match.
    name = None
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                name = member.name.replace("\\", "/")
                if member.isfile() and _wanted(name, suffixes, prefix):
                    fobj = tf.extractfile(member)
                    yield name, fobj.read()
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: corrupted or truncated near member {name!r} ({e})") from e


def iter_archive(
    path: os.PathLike | str, *, suffixes: Sequence[str], prefix: str = ""
) -> Iterator[tuple[str, bytes]]:
    """Yields ``(member_name, bytes)`` for the regular-file members of a zip or tar archive.

    Args:
      path: a ``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz`` (any compression tarfile reads) file.
      suffixes: keep members whose name ends with one of these (case-insensitive).
      prefix: keep members whose name starts with this (e.g. ``"dtd/images/"``).

    Yields:
      Member name (``/``-separated) and its content. Zip members come sorted by name, tar members
      in archive order.

    Raises:
      ArchiveError: unknown/corrupted/truncated archive, or an unsafe member (see module doc).
      FileNotFoundError: ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"archive not found: {path}")
    if zipfile.is_zipfile(path):
        yield from _iter_zip(path, suffixes, prefix)
        return
    lower = path.lower()
    if lower.endswith(".zip"):
        raise ArchiveError(f"{path}: not a readable zip archive (corrupted or truncated)")
    try:
        is_tar = tarfile.is_tarfile(path)
    except _READ_ERRORS:
        is_tar = False
    if not is_tar and not any(lower.endswith(s) for s in (".tar", ".tar.gz", ".tgz", ".tar.bz2")):
        raise ArchiveError(f"{path}: unknown archive type (expected .zip or .tar[.gz])")
    yield from _iter_tar(path, suffixes, prefix)


def read_gzip(path: os.PathLike | str) -> bytes:
    """Returns the decompressed content of a ``.gz`` file (raises ArchiveError if damaged)."""
    path = os.fspath(path)
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: corrupted or truncated gzip file ({e})") from e
