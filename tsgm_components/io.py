"""Atomic output writing: nothing half-written, nothing the user had is overwritten silently."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import nibabel as nib
import numpy as np

from tsgm_components.errors import TsgmInputError

logger = logging.getLogger(__name__)


def check_can_write(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return ``path`` as a Path; raise ``FileExistsError`` if it exists and ``overwrite`` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: output already exists (pass overwrite=True to replace it)")
    return path


def check_writable(path: str | os.PathLike, needed_bytes: int = 0) -> Path:
    """Before the expensive work: ``path`` (to be created) can be written and its file system has ``needed_bytes``
    free. Probes by creating and removing a file in the nearest existing folder above it (permissions, read-only
    mounts, ACLs); raises ``OSError`` naming the path otherwise. Returns ``path`` as a Path."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot create the output below {folder}: it is not a folder", str(path))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.tsgm-probe-"):
            pass
    except OSError as error:
        raise PermissionError(error.errno, f"cannot write the output here ({folder}: {error.strerror})", str(path)) from error
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OSError(errno.ENOSPC, f"only {free / 1e6:.0f} MB free at {folder}; the outputs need about {needed_bytes / 1e6:.0f} MB", str(path))
    return path


def check_not_over_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> Path:
    """Return ``output`` as a Path; raise TsgmInputError if writing it could replace or delete an input.

    An output that is an input, or a folder holding one, would be replaced as a whole with ``overwrite=True``
    (:func:`atomic_dir` swaps whole folders); one inside an input folder would change what the user gave.
    Paths are compared after resolving symlinks; ``None`` inputs are ignored.
    """
    output = Path(output)
    resolved = output.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if resolved == source or resolved in source.parents:
            raise TsgmInputError(output, f"output would replace the input {item}: choose another output path (inputs are never modified)")
        if source.is_dir() and source in resolved.parents:
            raise TsgmInputError(output, f"output is inside the input folder {item}: choose a path outside it (inputs are never modified)")
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _permissions_as_umask_says(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600 files and 0700 folders; give the output the mode a plain ``open``/``mkdir``
    would have given it, so colleagues, viewers and servers can read what the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _temporary_stem(path: Path) -> str:
    """Start of the names of ``path``'s temporaries on this host; the writer's pid follows (``<stem><pid>-...``), so
    that a later run can tell those of a killed run (pid gone on this host) from those of a run still writing."""
    return f".{path.name}.tsgm-{socket.gethostname()}-"


def _temporary_prefix(path: Path) -> str:
    return f"{_temporary_stem(path)}{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove (and log) the temporaries next to ``path`` left by killed runs on this host; return them."""
    stem = _temporary_stem(path)
    stale = []
    if not path.parent.is_dir():
        return stale
    for entry in path.parent.iterdir():
        if not entry.name.startswith(stem):
            continue
        pid = entry.name[len(stem) :].split("-", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        logger.warning("%s: removing a temporary left by a killed run (pid %s): %s", path, pid, entry)
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        stale.append(entry)
    return stale


def _appeared_meanwhile(path: Path) -> FileExistsError:
    return FileExistsError(
        f"{path}: output appeared while this run was writing it (another run writing the same "
        "output?); kept it and discarded this run's (pass overwrite=True to replace it)"
    )


def _link_without_replacing(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` atomically unless ``path`` exists by then (two runs writing the same output must not
    silently replace each other): a hard link fails on an existing name, where a rename would replace it."""
    try:
        os.link(tmp, path)
    except FileExistsError as error:
        raise _appeared_meanwhile(path) from error
    except OSError:  # a file system without hard links: check, then rename (a small window remains)
        if path.exists():
            raise _appeared_meanwhile(path)
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` (atomic on POSIX).

    On any exception the temporary file is removed and ``path`` is left as it was. Without ``overwrite``, a ``path``
    that another run created meanwhile is kept and this run's result discarded (FileExistsError), never replaced.
    The temporary name keeps the suffixes of ``path`` (``.nii.gz``, ``.npy``...) so writers
    that dispatch on the extension behave. The result gets the mode the umask gives new files (not mkstemp's 0600).
    """
    path = check_can_write(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _permissions_as_umask_says(tmp_path, directory=False)
        if overwrite:
            os.replace(tmp_path, path)
        else:
            _link_without_replacing(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` as a whole.

    Used for multi-file outputs (a prepared dataset, one subject's detection results): a crash
    leaves either the old directory or the complete new one, never a mix. The folder gets the mode the umask gives
    new folders (not mkdtemp's 0700).
    """
    path = check_can_write(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _permissions_as_umask_says(tmp, directory=True)
        if path.exists() and not overwrite:
            raise _appeared_meanwhile(path)
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, backup / path.name)
            os.replace(tmp, path)
            shutil.rmtree(backup)
        else:
            try:
                os.rename(tmp, path)  # refuses a non-empty folder that appeared since the check above
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise _appeared_meanwhile(path) from error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_json(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_nifti_like(array: np.ndarray, reference: nib.Nifti1Image, path: str | os.PathLike, overwrite: bool = False, dtype=np.float32) -> None:
    """Save ``array`` (same shape as ``reference``) with the reference's affine and header, atomically.

    The header (qform/sform codes, pixdim, orientation) is copied so the output overlays the input
    exactly in any viewer; only the data type changes to ``dtype``.
    """
    if tuple(array.shape) != tuple(reference.shape):
        raise ValueError(f"{path}: array shape {array.shape} does not match the reference shape {reference.shape}")
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header["scl_slope"], header["scl_inter"] = np.nan, np.nan  # data is stored unscaled
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), reference.affine, header)
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(image, str(tmp))
