"""Safe writes: atomic files, atomic folder swaps, clean-up after killed runs, paths kept inside a folder.

Every layer writes through these helpers (the registry, checkpoints, caches, the store, pulls), so the
rules live here once:

* a file is written to a temp sibling and renamed over the target: readers see the old or the new bytes,
  never half of them; the target's mode is kept and a symlinked target is written through its link;
* a folder is built in a temp sibling and swapped in with one ``renameat2(RENAME_EXCHANGE)`` where the OS
  has it (Linux): at every instant the target path holds the old or the new folder. Elsewhere the swap
  takes two renames, and :func:`recover` puts the old folder back if a run died between them;
* temp names carry the writer's pid (``.NAME.borahub-tmp.PID.XXXX``); a later write removes those of
  dead processes, so killed runs leave nothing behind for long;
* :func:`inside` resolves a relative path from a file or a manifest and refuses one that leaves its folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP, OLD = "borahub-tmp", "borahub-old"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


class UnsafePath(ValueError):
    """A path from a file, a manifest or a request that would leave its folder."""


def check_relative(rel: str, what: str = "path") -> str:
    """``rel`` itself, or UnsafePath when it is not a plain relative path: absolute, empty, hidden, ``..``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise UnsafePath(f"{what} {rel!r} is not a relative path")
    parts = rel.split("/")
    if rel.startswith("/") or os.path.isabs(rel) or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise UnsafePath(f"{what} {rel!r} is not a plain relative path inside its folder")
    return rel


def inside(root: str | Path, rel: str, what: str = "path") -> Path:
    """``root / rel`` resolved, or UnsafePath when ``rel`` is not a plain relative path (check_relative) or
    leaves ``root`` through a symlink."""
    check_relative(rel, what)
    path = (Path(root) / rel).resolve()
    if not is_within(path, root):
        raise UnsafePath(f"{what} {rel!r} leads outside {Path(root).resolve()}")
    return path


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True when ``path`` (resolved) is ``folder`` or lies below it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


# -- temp names and clean-up -------------------------------------------------------------------------
def _temp_prefix(target: Path, kind: str = TMP) -> str:
    return f".{target.name}.{kind}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(target: str | Path) -> None:
    """Finish what killed writers of ``target`` left: put an old folder back if the target is missing
    (a two-rename swap died between its renames), then remove temp siblings of dead processes."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.({TMP}|{OLD})\.(\d+)\.")
    with contextlib.suppress(OSError):
        for entry in sorted(parent.iterdir()):
            m = pattern.match(entry.name)
            pid = int(m.group(2)) if m else 0
            if not m or pid == os.getpid() or _alive(pid):
                continue  # not ours, or its writer is still at work
            if m.group(1) == OLD and not target.exists() and not target.is_symlink():
                os.replace(entry, target)
            else:
                _remove(entry)


# -- files -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer (``save_file(..., tmp)``); renamed over ``path`` when the
    block ends without error, removed otherwise. A symlinked ``path`` is replaced at its link's target;
    an existing file keeps its permission bits, a new one gets the umask's."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old or the new file, never half."""
    atomic_write_bytes(path, text.encode("utf-8"))


# -- folders -----------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staged: str | Path, target: str | Path, keep_old: str | Path | None = None) -> None:
    """Move the finished folder ``staged`` (on the file system of ``target``) to ``target``, replacing what
    is there; the target path holds the old or the new folder at every instant (or, without an atomic
    exchange, :func:`recover` restores the old one). The old folder is removed, or moved to ``keep_old``
    (a free path on the same file system) for the caller to restore or remove."""
    staged, target = Path(staged), Path(target)
    if not target.exists():
        os.replace(staged, target)
        return
    if _exchange(staged, target):  # staged now holds the old folder
        if keep_old is not None:
            os.replace(staged, keep_old)
        else:
            _remove(staged)
        return
    old = target.parent / (_temp_prefix(target, OLD) + "x")
    os.replace(target, old)
    os.replace(staged, target)
    if keep_old is not None:
        os.replace(old, keep_old)
    else:
        _remove(old)


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """A fresh temp folder beside ``target`` to build into; swapped in with :func:`replace_dir` when the
    block ends without error, removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        _remove(tmp)


def temp_dir_beside(target: str | Path) -> Path:
    """A temp folder beside ``target`` (same file system) that :func:`recover` removes once its writer
    is dead; the caller removes it when done."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))


def write_dir(target: str | Path, build: Callable[[Path], None]) -> None:
    """Build a folder with ``build(tmp)`` and swap it in atomically (see :func:`staged_dir`)."""
    with staged_dir(target) as tmp:
        build(tmp)
