"""Atomic file writes (a crash or kill never leaves a half-written file behind) that honour the umask, and
the checks of output paths that the commands run before any long work."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

# Extensions save_image writes (PIL's format names); anything else is refused before the work starts.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP"}


def has_ext(path: str, ext: str) -> bool:
    """Whether ``path`` ends in the extension ``ext`` (".safetensors"), in any case, as the output checks read
    it (check_output_file): a file written as M.SAFETENSORS is read back as one."""
    return os.path.splitext(path)[1].lower() == ext


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: read by setting (not thread-safe, hence the fallback only)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode open() would give a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode os.makedirs would give a new folder: 0777 less the umask (0755 under umask 022)."""
    return 0o777 & ~umask()


def _sync_file(path: str) -> None:
    """Give ``path`` the mode a plain open() would and flush it to disk."""
    with open(path, "rb+") as f:
        os.fchmod(f.fileno(), file_mode())
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the same folder; on success fsync it and rename it onto ``path``.

    mkstemp creates the temporary file 0600 whatever the umask; it is given the mode a plain open() would
    have given it (0644 under umask 022), so the renamed file looks like any other file the user writes.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    try:
        yield tmp
        _sync_file(tmp)  # (the mode again after the writer: safetensors' save_file replaces the file with a 0600 one)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lock_folder(folder: str | os.PathLike, *, wait: bool) -> int | None:
    """An exclusive POSIX lock (flock) on ``folder`` itself, so no lock file is left behind: the open
    descriptor, which the caller closes to release the lock, or None where no lock can be taken (not POSIX,
    a folder that cannot be opened for reading, a file system without flock); the caller then goes on
    unlocked. ``wait=False`` raises BlockingIOError at once while another process holds the lock."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def output_set(files: list[str], folder: str | None = None) -> Iterator[tuple[list[str], str | None]]:
    """Write several outputs as one: yields a temporary path for each of ``files`` (in its folder, same
    extension) and, for ``folder``, a temporary folder to write its files into (inside ``folder`` where it
    exists, so on its file system; beside it where it does not). On success every file is flushed to disk
    first, and only then renamed into place, all of them; on an error or an interrupt before that, every
    temporary is removed and no output is touched."""
    import shutil

    tmps: list[str] = []
    stage = None
    existed = folder is not None and os.path.isdir(folder)
    try:
        for path in files:
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
            os.close(fd)
            tmps.append(tmp)
        if folder is not None:
            base = folder if existed else os.path.dirname(os.path.abspath(folder))
            os.makedirs(base, exist_ok=True)
            stage = tempfile.mkdtemp(prefix=".tmp-", dir=base)
        yield tmps, stage
        staged = [os.path.join(stage, n) for n in sorted(os.listdir(stage))] if stage else []
        for p in tmps + staged:  # 1. everything whole on disk
            _sync_file(p)
        for tmp, path in zip(tmps, files):  # 2. renames only
            os.replace(tmp, path)
        if stage is not None:
            if existed:
                for p in staged:
                    os.replace(p, os.path.join(folder, os.path.basename(p)))
            else:
                os.chmod(stage, dir_mode())  # mkdtemp makes it 0700 whatever the umask
                os.rename(stage, folder)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if stage is not None and os.path.exists(stage):
            shutil.rmtree(stage, ignore_errors=True)


def save_image(img, path: str | os.PathLike) -> None:
    """Save a PIL image atomically (format from the extension, one of IMAGE_FORMATS)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"{os.fspath(path)!r}: expected an image file name ending in "
                         f"{', '.join(IMAGE_FORMATS)}")
    with atomic_path(path) as tmp:
        img.save(tmp, format=IMAGE_FORMATS[ext])


def _probe_folder(folder: str, flag: str) -> None:
    """Raise ValueError naming ``flag`` unless a file can be created in ``folder`` (or in the nearest
    existing folder above it, where the missing ones would be made). A real file is created and removed:
    os.access says yes to root and on read-only mounts alike."""
    folder = os.path.abspath(folder)
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}: {probe!r} is a file, so the folder {folder!r} cannot be made")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-probe-", dir=probe)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write in the folder {probe!r} ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(tmp)


def check_output_file(path: str, flag: str, exts: tuple[str, ...] | None = None) -> None:
    """Before the work: ``path`` can be written as a file (not a folder, folder writable, known type)."""
    if not path:
        raise ValueError(f"{flag}: expected a file name, got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a folder; expected a file name")
    if exts is not None and os.path.splitext(path)[1].lower() not in exts:
        raise ValueError(f"{flag}: expected a file name ending in {', '.join(exts)}, got {path!r}")
    _probe_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_output_dir(path: str, flag: str) -> None:
    """Before the work: ``path`` is (or can be made) a folder that can be written."""
    if not path:
        raise ValueError(f"{flag}: expected a folder name, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a file; expected a folder")
    _probe_folder(path, flag)


def read_npz_or_npy(path: str, flag: str):
    """np.load of a .npz (as an open NpzFile) or .npy file without pickles, with one clear error for a file
    that is neither (numpy's own advice for that case, allow_pickle=True, would execute the file)."""
    import zipfile

    import numpy as np

    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path!r} ({exc.strerror or exc})") from exc
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06") or head == b"\x93NUMPY"):
        raise ValueError(f"{flag}: {path!r} is not a .npz or .npy file (truncated, corrupt or another format)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{flag}: {path!r} is a truncated or corrupt .npz/.npy file ({exc})") from exc
