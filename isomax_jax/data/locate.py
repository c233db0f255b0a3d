"""Finding prepared datasets, building the OOD sets, and failing fast when data is missing.

**Where data is read from.** ``data_dir`` is one directory or a sequence of directories; with
``None``, ``$TFDS_DATA_DIR``, else tfds's default (``~/tensorflow_datasets``). Directories are
searched in order and the first one holding the prepared dataset is used, so a read-only shared
directory can sit next to a writable one: ``data_dir=[my_dir, "/shared/tfds"]``.

**Where builds go.** An OOD set that is not prepared anywhere is built (from ``manual_dir``, or
generated for the noise sets) into ``build_dir`` if given, else into the first *writable* directory
of ``data_dir``, else into the default directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)
if that is writable; this build directory is searched too, so a set is built only once. If there
is no writable directory, :class:`DataNotFoundError` says so. A failed build leaves
nothing behind in the build directory (tfds writes into an ``incomplete.*`` folder that is renamed
only on success; this module also removes the empty folders it created).

**No network by default.** Nothing is ever downloaded unless ``download=True``. Without prepared
data and without the files in ``manual_dir``, :class:`DataNotFoundError` (a
``FileNotFoundError``) is raised at once, naming the dataset, every directory searched and how to
provide the data; tfds never gets the chance to retry a download.

**Clear errors, nothing left behind.** A ``data_dir``, ``$TFDS_DATA_DIR`` or ``build_dir`` that
exists but is a file raises ``NotADirectoryError`` (it used to be skipped silently, and the set
was built into ``~/tensorflow_datasets``). tfds creates an empty ``tmp*tfds`` folder in the temp
directory whenever a builder is created for a set that is not prepared; the OOD builders skip
that step, and a builder of tfds's own sets is created only where the set's files are (or to
download it, with ``download=True``).

Pipelines are tested on generated examples with :func:`isomax_jax.data.testing.mock_data`,
which stands in for this module's search.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Sequence

import tensorflow_datasets as tfds

from isomax_jax.data.builders import OOD_BUILDERS

__all__ = ["DataNotFoundError", "build_target", "load_builder", "resolve_data_dirs"]

DataDir = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither prepared in the data directories nor buildable from local files."""


def _directory(path: str | os.PathLike, what: str) -> pathlib.Path:
    """``path`` as a Path; raises if it exists and is not a directory."""
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{what} {str(path)!r} is a file, not a directory; point it at the folder that holds "
            "(or should hold) the prepared tfds datasets"
        )
    return path


def resolve_data_dirs(data_dir: DataDir) -> list[pathlib.Path]:
    """``data_dir`` argument -> ordered list of directories to search (see module doc).

    Raises:
      NotADirectoryError: one of the directories exists and is a file.
      ValueError: ``data_dir`` is an empty sequence.
    """
    if data_dir is None:
        env = os.environ.get("TFDS_DATA_DIR")
        if env:
            return [_directory(env, "$TFDS_DATA_DIR")]
        return [_directory(os.path.join("~", "tensorflow_datasets"), "the default data_dir")]
    if isinstance(data_dir, str | os.PathLike):
        dirs = [data_dir]
    else:
        dirs = list(data_dir)
        if not dirs:
            raise ValueError("data_dir is an empty sequence; give at least one directory")
    return [_directory(d, "data_dir") for d in dirs]


def _is_writable(path: pathlib.Path) -> bool:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    if not probe.is_dir():
        return False
    # Permission bits count even for root (who may write anywhere): a folder marked read-only,
    # like a shared dataset directory, is never written to.
    mode = probe.stat().st_mode
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(
        probe, os.W_OK | os.X_OK
    )


def build_target(dirs: Sequence[pathlib.Path], build_dir=None) -> pathlib.Path | None:
    """Where missing OOD sets are built: ``build_dir``, else the first writable of ``dirs``,
    else the default directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) if writable."""
    if build_dir is not None:
        return _directory(build_dir, "build_dir")
    for d in (*dirs, *resolve_data_dirs(None)):
        if _is_writable(d):
            return d
    return None


def _info_on_disk(name: str, directory: pathlib.Path) -> bool:
    """Whether ``directory`` holds the ``dataset_info.json`` of tfds set ``name`` at the version
    its code builds (any config): only then is a builder created to read it."""
    version = str(tfds.builder_cls(name).VERSION)
    folder = directory / name
    return (folder / version / "dataset_info.json").is_file() or any(
        folder.glob(f"*/{version}/dataset_info.json")
    )


def _prepared(name: str, dirs: Sequence[pathlib.Path]):
    for d in dirs:
        if not (d / name).is_dir():
            continue
        # The OOD builders skip tfds's bucket lookup (see builders.base); a tfds set gets a
        # builder only when its files are there, so the lookup (which leaves an empty tmp*tfds
        # folder in the temp directory) never runs for a set that is not prepared.
        if name not in OOD_BUILDERS and not _info_on_disk(name, d):
            continue
        builder = tfds.builder(name, data_dir=os.fspath(d))
        if builder.is_prepared():
            return builder
    return None


def _remove_leftovers(created: Sequence[pathlib.Path]) -> None:
    """Removes the folders this module created (deepest first) if a failed build left them."""
    for path in reversed(created):
        if path.is_dir():
            for child in path.iterdir():
                if child.name.startswith("incomplete.") or ".incomplete" in child.name:
                    shutil.rmtree(child, ignore_errors=True)
            if not any(path.iterdir()):
                path.rmdir()


def _build(name: str, build_dir: pathlib.Path, manual_dir, download: bool):
    created = []
    for path in (*reversed(build_dir.parents), build_dir, build_dir / name):
        if not path.exists():
            created.append(path)
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp_downloads = None
    if download:
        download_dir = build_dir / "downloads"
    else:
        download_dir = tmp_downloads = pathlib.Path(tempfile.mkdtemp(prefix="isomax_tfds_dl_"))
    try:
        builder = tfds.builder(name, data_dir=os.fspath(build_dir))
        printed = io.StringIO()
        # tfds prints its "Downloading and preparing ..." banners: send them to logging (INFO).
        with contextlib.redirect_stdout(printed):
            builder.download_and_prepare(
                download_dir=os.fspath(download_dir),
                download_config=tfds.download.DownloadConfig(
                    manual_dir=os.fspath(manual_dir) if manual_dir is not None else None
                ),
            )
        for line in printed.getvalue().splitlines():
            if line.strip():
                logging.info("tfds: %s", line.strip())
    except BaseException:
        _remove_leftovers(created)
        raise
    finally:
        if tmp_downloads is not None:
            shutil.rmtree(tmp_downloads, ignore_errors=True)
    return builder


def load_builder(
    display_name: str,
    candidates: Sequence[str],
    *,
    data_dir: DataDir = None,
    manual_dir: str | os.PathLike | None = None,
    build_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> tfds.core.DatasetBuilder:
    """Returns a prepared tfds builder for the first candidate found (or buildable).

    Args:
      display_name: the user-facing dataset name, used in error messages.
      candidates: tfds names that provide the data, in order of preference (e.g. ``mnist`` then
        ``isomax_mnist``).
      data_dir: directories searched for prepared data (see module doc).
      manual_dir: folder with the source archives of the OOD builders.
      build_dir: where to build a missing OOD set; default: see :func:`build_target`.
      download: allow tfds to download (connected machines only).

    Raises:
      DataNotFoundError: the data is not available (message says what was searched).
      NotADirectoryError: ``data_dir``, ``$TFDS_DATA_DIR`` or ``build_dir`` is a file.
    """
    dirs = resolve_data_dirs(data_dir)
    target = build_target(dirs, build_dir)
    search = dirs + [target] if target is not None and target not in dirs else dirs
    for name in candidates:
        builder = _prepared(name, search)
        if builder is not None:
            return builder

    hints = []
    for name in candidates:
        cls = OOD_BUILDERS.get(name)
        buildable = download or (cls is not None and cls.find_source(manual_dir) is not None)
        if buildable and target is not None and _is_writable(target):
            return _build(name, target, manual_dir, download)
        if cls is not None and cls.SOURCES:
            hints.append(
                f"put {cls.expected_files(manual_dir)} (manual_dir={manual_dir}) "
                f"[{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}]"
            )
        elif cls is not None:
            hints.append(f"'{name}' is generated; it needs a writable data_dir or build_dir")
        else:
            hints.append(f"prepare tfds '{name}' on a connected machine and copy it into data_dir")
    searched = ", ".join(str(d) for d in search)
    where_to_build = (
        f"builds would go to {target}"
        if target is not None and _is_writable(target)
        else "no writable directory to build into (pass build_dir= or a writable data_dir first)"
    )
    raise DataNotFoundError(
        f"Dataset '{display_name}' (tfds {' or '.join(repr(c) for c in candidates)}) is not "
        f"prepared in any searched data_dir [{searched}] (data_dir argument, else $TFDS_DATA_DIR, "
        f"else ~/tensorflow_datasets) and cannot be built offline; {where_to_build}. To provide "
        f"it: {'; or '.join(hints)}; or pass download=True on a machine with network access."
    )
