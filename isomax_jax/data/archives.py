"""Safe, in-memory reading of the zip / tar / gzip archives the OOD builders are made from.

Nothing is ever extracted to disk: members are read into memory one at a time. Before the first
member is returned, every member name of the archive is checked, and the whole archive is refused
(:class:`ArchiveError`) if any member

* has an absolute path (``/x``, ``C:\\x``) or a ``..`` component, or
* is a symbolic or hard link whose target is absolute or leaves the archive root.

**Bounded memory.** Decompressed sizes are capped, per member (``max_member_bytes``, default
64 MiB) and in total (``max_total_bytes``, default 4 GiB; for a tar archive every member counts,
as the whole stream is decompressed, for a zip archive the members read). The caps are far above
the real data (the largest source, the TinyImageNet test zip, holds 10,000 images of a few KiB;
the full DTD tarball is about 0.6 GB) and far below what a decompression bomb asks for. Sizes
recorded in the archive are checked before anything is decompressed, and members are inflated
in 1 MiB chunks that stop at the cap, so a 1 MB zip holding a 1 GiB member fails at once without
allocating it. :func:`read_gzip` streams the same way under ``max_bytes``.

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

__all__ = ["MAX_MEMBER_BYTES", "MAX_TOTAL_BYTES", "ArchiveError", "iter_archive", "read_gzip"]

#: Default cap on the decompressed size of one archive member (and of a ``.gz`` file).
MAX_MEMBER_BYTES = 64 * 2**20
#: Default cap on the bytes decompressed from one archive.
MAX_TOTAL_BYTES = 4 * 2**30
_CHUNK_BYTES = 2**20
_MAX_LINK_BYTES = 4096

_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, ValueError)


class ArchiveError(ValueError):
    """An archive is corrupted, truncated, of an unknown type, too big, or has unsafe members."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n} bytes"


def _too_large(where: str, size: str | None, cap_name: str, cap: int) -> ArchiveError:
    size = f"{size}, more than" if size is not None else "more than"
    return ArchiveError(
        f"{where} decompresses to {size} {cap_name}={cap} ({_mib(cap)}); refusing to inflate it "
        f"(a decompression bomb or the wrong file?). Pass a larger {cap_name} if the archive is "
        "genuine."
    )


def _read_capped(fobj, *, where: str, limit: int, cap_name: str, cap: int) -> bytes:
    """Reads ``fobj`` to its end in chunks; raises as soon as more than ``limit`` bytes come."""
    chunks, size = [], 0
    while True:
        chunk = fobj.read(min(_CHUNK_BYTES, limit - size + 1))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _too_large(where, None, cap_name, cap)
        chunks.append(chunk)


def _read_member(fobj, where: str, max_member: int, remaining: int, max_total: int) -> bytes:
    """One member under both caps: ``max_member`` and what is left of ``max_total``."""
    if remaining < max_member:
        return _read_capped(
            fobj, where=where, limit=remaining, cap_name="max_total_bytes", cap=max_total
        )
    return _read_capped(
        fobj, where=where, limit=max_member, cap_name="max_member_bytes", cap=max_member
    )


def _check_caps(max_member_bytes: int, max_total_bytes: int) -> None:
    for name, value in (
        ("max_member_bytes", max_member_bytes),
        ("max_total_bytes", max_total_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


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


def _iter_zip(path, suffixes, prefix, max_member, max_total) -> Iterator[tuple[str, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: not a readable zip archive ({e})") from e
    with zf:
        selected, declared = [], 0
        for info in zf.infolist():
            name = _check_name(path, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                where = f"{path}: link member {name!r}"
                try:
                    with zf.open(info) as f:
                        raw = _read_member(f, where, _MAX_LINK_BYTES, _MAX_LINK_BYTES, max_total)
                except ArchiveError:
                    raise
                except _READ_ERRORS as e:
                    raise ArchiveError(f"{path}: cannot read link member {name!r} ({e})") from e
                _check_link(path, name, raw.decode("utf-8", "replace"))
                continue  # links inside the archive are skipped, never followed
            if not info.is_dir() and _wanted(name, suffixes, prefix):
                if info.file_size > max_member:
                    where = f"{path}: member {name!r}"
                    raise _too_large(
                        where, f"{info.file_size} bytes", "max_member_bytes", max_member
                    )
                declared += info.file_size
                if declared > max_total:
                    where = f"{path}: the selected members (up to {name!r})"
                    raise _too_large(where, f"{declared}+ bytes", "max_total_bytes", max_total)
                selected.append((name, info))
        total = 0
        for name, info in sorted(selected, key=lambda item: item[0]):
            where = f"{path}: member {name!r}"
            try:
                with zf.open(info) as f:
                    data = _read_member(f, where, max_member, max_total - total, max_total)
            except ArchiveError:
                raise
            except _READ_ERRORS as e:
                raise ArchiveError(f"{where} is corrupted or truncated ({e})") from e
            total += len(data)
            yield name, data


def _iter_tar(path, suffixes, prefix, max_member, max_total) -> Iterator[tuple[str, bytes]]:
    # Pass 1: validate every member name and size before anything is returned. A header is
    # checked before the data behind it is decompressed (to reach the next header).
    total = 0
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                name = _check_name(path, member.name)
                if member.issym() or member.islnk():
                    _check_link(path, name, member.linkname, hard=member.islnk())
                if not member.isfile():
                    continue
                where = f"{path}: member {name!r}"
                if member.size > max_member and _wanted(name, suffixes, prefix):
                    raise _too_large(where, f"{member.size} bytes", "max_member_bytes", max_member)
                total += member.size
                if total > max_total:
                    where = f"{path}: the archive (up to member {name!r})"
                    raise _too_large(where, f"{total}+ bytes", "max_total_bytes", max_total)
    except ArchiveError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: not a readable tar archive or truncated ({e})") from e
    # Pass 2: stream the regular files that match, each read under the member cap.
    name = None
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                name = member.name.replace("\\", "/")
                if member.isfile() and _wanted(name, suffixes, prefix):
                    fobj = tf.extractfile(member)
                    where = f"{path}: member {name!r}"
                    yield name, _read_member(fobj, where, max_member, max_member, max_total)
    except ArchiveError:
        raise
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: corrupted or truncated near member {name!r} ({e})") from e


def iter_archive(
    path: os.PathLike | str,
    *,
    suffixes: Sequence[str],
    prefix: str = "",
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> Iterator[tuple[str, bytes]]:
    """Yields ``(member_name, bytes)`` for the regular-file members of a zip or tar archive.

    Args:
      path: a ``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz`` (any compression tarfile reads) file.
      suffixes: keep members whose name ends with one of these (case-insensitive).
      prefix: keep members whose name starts with this (e.g. ``"dtd/images/"``).
      max_member_bytes: cap on the decompressed size of one returned member.
      max_total_bytes: cap on the bytes decompressed from the archive (see the module doc).

    Yields:
      Member name (``/``-separated) and its content. Zip members come sorted by name, tar members
      in archive order.

    Raises:
      ArchiveError: unknown/corrupted/truncated archive, an unsafe member, or a size over a cap
        (see the module doc).
      FileNotFoundError: ``path`` does not exist.
    """
    _check_caps(max_member_bytes, max_total_bytes)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"archive not found: {path}")
    if zipfile.is_zipfile(path):
        yield from _iter_zip(path, suffixes, prefix, max_member_bytes, max_total_bytes)
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
    yield from _iter_tar(path, suffixes, prefix, max_member_bytes, max_total_bytes)


def read_gzip(path: os.PathLike | str, *, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """Returns the decompressed content of a ``.gz`` file.

    Decompression streams in 1 MiB chunks and stops as soon as ``max_bytes`` is exceeded.

    Raises:
      ArchiveError: the file is damaged, or decompresses to more than ``max_bytes``.
      FileNotFoundError: ``path`` does not exist.
    """
    _check_caps(max_bytes, max_bytes)
    path = os.fspath(path)
    try:
        with gzip.open(path, "rb") as f:
            return _read_capped(f, where=path, limit=max_bytes, cap_name="max_bytes", cap=max_bytes)
    except (FileNotFoundError, ArchiveError):
        raise
    except _READ_ERRORS as e:
        raise ArchiveError(f"{path}: corrupted or truncated gzip file ({e})") from e
