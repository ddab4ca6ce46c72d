"""Who may write a journal's database file, and the descriptors this process opens on it (SQLite only).

Ownership. Two runtimes writing one journal would interleave two views of the
same tasks, so a `Journal` owns its database *file* (not a path to it) for its
whole life. On Linux it holds an open-file-description (OFD) lock on one byte of
the database itself, far above the bytes SQLite locks (at 1 GiB): a symlink or a
hard link reaches the same file and is refused too; the lock conflicts between
processes and within one; and unlike SQLite's POSIX locks, it is not dropped
when some other descriptor of the file is closed. Nothing is left on disk by a
clean `close`. Where OFD locks are missing, a flock on a sidecar named after the
resolved path, ``<realpath>.lock``, opened with O_NOFOLLOW (a symlink there is
refused) and left in place when the journal closes.

A reader takes the same lock shared while no runtime owns the journal (`hold_quiet`),
so that it may read the file as immutable and create nothing.

The reverse matters too: closing *any* descriptor of the database drops every
POSIX lock this process holds on it, SQLite's own included. So the descriptors
this module opens on a database (the lock's, a header's) are closed only once no
SQLite connection of ours to the same file is open, and reused meanwhile
(`OpenFiles`, whose one instance is `FILES`: every connection of ours is reported
to it).

Permissions. A journal's files hold payloads and results: a missing database is
created owner-only (0o600, less the umask) before SQLite opens it, and SQLite
gives its ``-wal`` and ``-shm`` files the database's mode. An existing file keeps
its mode.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import threading
from typing import Final

from actorflow.core.errors import JournalError

__all__ = ["FILES", "FileId", "OpenFiles", "Ownership", "Quiet", "file_id", "hold_quiet", "read_header"]

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_HEADER_SIZE: Final = 100


# --- the files of one database, in this process ---------------------------------------------------

FileId = tuple[int, int]
"""A file's identity: (st_dev, st_ino). Every path to it (a symlink, a hard link) has the same."""


class _Handle:
    """A descriptor of ours on a database file, and which file it is."""

    __slots__ = ("fd", "file", "writable")

    def __init__(self, fd: int, file: FileId, writable: bool) -> None:
        self.fd = fd
        self.file = file
        self.writable = writable


class OpenFiles:
    """Descriptors this process opened on journal databases, and the SQLite connections of ours to each.

    Closing *any* descriptor of a file drops every POSIX (fcntl) lock this process holds on that
    file, and SQLite keeps its own locks on the database that way: a reader's SHARED lock, which
    tells another process's connection, when it closes, that the WAL is still in use. So a
    descriptor of ours (the ownership lock's, or one that read a header) is closed only once no
    connection of ours to the same file is open; until then it is kept, and the next one needed
    reuses it, so that they never pile up. (SQLite does the same with its own descriptors.)
    Connections to the file made by other code in this process are out of our sight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[FileId, int] = {}
        self._kept: dict[tuple[FileId, bool], list[int]] = {}

    def open(self, path: str, *, writable: bool, create: bool = False) -> _Handle:
        """A descriptor on `path`: one kept for the same file if there is one, else a new one.

        `create` makes a missing file, owner-only (0o600 less the umask): SQLite gives the
        ``-wal`` and ``-shm`` files it makes the mode of the database. Raises OSError.
        """
        try:
            found = os.stat(path)
        except FileNotFoundError:
            if not create:
                raise
        else:
            with self._lock:
                kept = self._kept.get(((found.st_dev, found.st_ino), writable))
                if kept:
                    return _Handle(kept.pop(), (found.st_dev, found.st_ino), writable)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        info = os.fstat(fd)
        return _Handle(fd, (info.st_dev, info.st_ino), writable)

    def close(self, handle: _Handle) -> None:
        """Close `handle`'s descriptor, or keep it while a connection of ours to its file is open."""
        with self._lock:
            if self._connections.get(handle.file, 0) > 0:
                self._kept.setdefault((handle.file, handle.writable), []).append(handle.fd)
                return
        os.close(handle.fd)

    def connected(self, file: FileId | None) -> None:
        """A connection of ours to `file` was opened (None: a file that is gone, nothing to track)."""
        if file is not None:
            with self._lock:
                self._connections[file] = self._connections.get(file, 0) + 1

    def disconnected(self, file: FileId | None) -> None:
        """A connection of ours to `file` was closed: if it was the last, close the descriptors kept for it."""
        if file is None:
            return
        with self._lock:
            left = self._connections.get(file, 0) - 1
            if left > 0:
                self._connections[file] = left
                return
            self._connections.pop(file, None)
            fds = [fd for writable in (False, True) for fd in self._kept.pop((file, writable), ())]
        for fd in fds:
            os.close(fd)


FILES: Final = OpenFiles()


def file_id(path: str) -> FileId | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def read_header(path: str) -> bytes | None:
    """The first 100 bytes of `path` (b"" for an empty file), None if it does not exist.

    Raises JournalError if the file cannot be read or does not start like SQLite.
    """
    try:
        handle = FILES.open(path, writable=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"journal {path!r} cannot be read: {exc.strerror or exc}") from exc
    try:
        header = os.pread(handle.fd, _SQLITE_HEADER_SIZE, 0)
    except OSError as exc:
        raise JournalError(f"journal {path!r} cannot be read: {exc.strerror or exc}") from exc
    finally:
        FILES.close(handle)
    if header and (len(header) < _SQLITE_HEADER_SIZE or not header.startswith(_SQLITE_MAGIC)):
        raise JournalError(
            f"journal {path!r} cannot be used: file is not a database (no SQLite header); "
            "it was left untouched: move it away or pass another path"
        )
    return header


# --- ownership -----------------------------------------------------------------------------------

_OFD_LOCKS = sys.platform == "linux" and hasattr(fcntl, "F_OFD_SETLK") and struct.calcsize("l") == 8
"""Whether ownership is an open-file-description lock on the database itself (64-bit Linux: the
`struct flock` below is packed by hand for its layout); elsewhere, a flock on a sidecar file."""
_LOCK_BYTE: Final = 2**62
"""The byte of the database the ownership lock covers: far above every byte SQLite locks (at 1 GiB)."""
_FLOCK: Final = struct.Struct("hhxxxxqqixxxx")
"""``struct flock`` on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)."""


def _ofd_lock(fd: int, kind: int) -> None:
    """Take (F_WRLCK, F_RDLCK) or release (F_UNLCK) the lock byte, without waiting. Raises OSError."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, _LOCK_BYTE, 1, 0))


def _ofd_holder(fd: int) -> int | None:
    """The kind of lock another open file description holds on the lock byte (F_RDLCK, F_WRLCK), or None."""
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, _LOCK_BYTE, 1, 0))
    except OSError:
        return None
    kind: int = _FLOCK.unpack(answer)[0]
    return None if kind == fcntl.F_UNLCK else kind


_BUSY: Final = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
"""What a lock someone else holds gives."""


class Ownership:
    """How a `Journal` holds its database for writing, for its whole life.

    On Linux, an open-file-description (OFD) lock on one byte of the database file
    itself: it belongs to the file, not to a path, so a symlink or a hard link to an
    owned journal is refused too; it conflicts between processes and within one; and
    being a lock of an open file description, it is not dropped when some other
    descriptor of the file is closed (which drops POSIX locks, SQLite's own). Nothing is
    left on disk. Where OFD locks are missing, a flock on a sidecar named after the
    resolved path (``<realpath>.lock``, opened with O_NOFOLLOW, never deleted).
    """

    def __init__(self, handle: _Handle | None, sidecar: tuple[int, str] | None, file: FileId) -> None:
        self._handle = handle
        self._sidecar = sidecar
        self.file = file
        """The identity of the database file owned."""
        self.sidecar_path = None if sidecar is None else sidecar[1]
        """The sidecar lock file, if ownership is held through one."""

    @classmethod
    def acquire(cls, path: str) -> Ownership:
        """Own `path`'s database file, creating it (owner-only) if it is missing. Raises JournalError."""
        try:
            handle = FILES.open(path, writable=True, create=True)
        except OSError as exc:
            raise JournalError(f"journal {path!r} cannot be opened for writing: {exc.strerror or exc}") from exc
        if _OFD_LOCKS:
            try:
                _ofd_lock(handle.fd, fcntl.F_WRLCK)
            except OSError as exc:
                if exc.errno in _BUSY:
                    holder = _ofd_holder(handle.fd)
                    FILES.close(handle)
                    raise JournalError(_in_use(path, reader=holder == fcntl.F_RDLCK)) from exc
                # The file system cannot lock this way (some network file systems): the sidecar, then.
            else:
                return cls(handle, None, handle.file)
        file = handle.file
        FILES.close(handle)
        return cls(None, _acquire_sidecar(path), file)

    def release(self) -> None:
        """Give up ownership. Unlocked explicitly: a child forked meanwhile shares the open file description."""
        handle, self._handle = self._handle, None
        if handle is not None:
            _release_ofd(handle)
        sidecar, self._sidecar = self._sidecar, None
        if sidecar is not None:
            _release_flock(sidecar[0])

    def check(self, path: str) -> str | None:
        """Why ownership may no longer hold (its sidecar was deleted or replaced), or None."""
        if self._sidecar is None:
            return None  # the lock is on the database file itself, which the caller checks
        fd, lock_path = self._sidecar
        try:
            found = os.lstat(lock_path)
        except OSError:
            found = None
        if found is None or (found.st_dev, found.st_ino) != _fd_id(fd):
            return (
                f"lock file {lock_path!r} of journal {path!r} was deleted or replaced while in use; "
                "another runtime could now open the same journal"
            )
        return None


def _fd_id(fd: int) -> FileId:
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino)


def _in_use(path: str, *, reader: bool) -> str:
    if reader:
        return (
            f"journal {path!r} is in use by a reader that keeps it unchanged while it reads "
            "(Journal.open_readonly, actorflow inspect); open it again once that reader is closed"
        )
    return (
        f"journal {path!r} is in use by another runtime (through this path or another to the same file); "
        "close that runtime first, or read the journal with Journal.open_readonly()"
    )


def _sidecar_path(path: str) -> str:
    """The sidecar lock of the fallback: named after the resolved path, so a symlink finds the same one."""
    return f"{os.path.realpath(path)}.lock"


def _open_sidecar(path: str, lock_path: str, flags: int) -> int:
    try:
        return os.open(lock_path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JournalError(
                f"journal {path!r} cannot be locked: lock file {lock_path!r} is a symbolic link, which is never "
                "followed; remove it"
            ) from exc
        raise


def _acquire_sidecar(path: str) -> tuple[int, str]:
    """Take the exclusive, non-blocking flock on the sidecar lock file; its descriptor and path."""
    lock_path = _sidecar_path(path)
    try:
        fd = _open_sidecar(path, lock_path, os.O_RDWR | os.O_CREAT)
    except PermissionError:
        try:  # flock works on a read-only descriptor too, e.g. a lock file another user created
            fd = _open_sidecar(path, lock_path, os.O_RDONLY)
        except OSError as exc:
            raise JournalError(f"journal {path!r} cannot be opened: lock file {lock_path!r}: {exc.strerror}") from exc
    except OSError as exc:
        raise JournalError(f"journal {path!r} cannot be opened: lock file {lock_path!r}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            raise JournalError(_in_use(path, reader=False)) from exc
        raise JournalError(f"journal {path!r} cannot be locked ({lock_path!r}): {exc.strerror}") from exc
    return fd, lock_path


def _release_ofd(handle: _Handle) -> None:
    # Unlock explicitly before closing (or keeping) the descriptor: a child forked meanwhile shares
    # this open file description, and would otherwise keep the lock.
    try:
        _ofd_lock(handle.fd, fcntl.F_UNLCK)
    finally:
        FILES.close(handle)


def _release_flock(fd: int) -> None:
    # Unlock explicitly before closing: a child forked meanwhile shares this open file
    # description, and closing our descriptor alone would leave the lock held by the child.
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Quiet:
    """A reader's shared lock while no runtime owns the journal: no `Journal` can take it meanwhile."""

    def __init__(self, handle: _Handle | None, sidecar_fd: int | None) -> None:
        self._handle = handle
        self._sidecar_fd = sidecar_fd

    def release(self) -> None:
        """Give up the shared lock."""
        handle, self._handle = self._handle, None
        if handle is not None:
            _release_ofd(handle)
        fd, self._sidecar_fd = self._sidecar_fd, None
        if fd is not None:
            _release_flock(fd)


def hold_quiet(path: str) -> Quiet | None:
    """A shared lock on the journal if no runtime owns `path` and no WAL is left over; else None.

    While it is held, no `Journal` can take its exclusive lock, so the file cannot change and may be
    read as immutable. Nothing is created here: with the sidecar fallback, a reader without a lock
    file falls back to ``mode=ro``.
    """
    real = os.path.realpath(path)
    if os.path.exists(f"{real}-wal") or os.path.exists(f"{real}-shm"):
        return None
    quiet = _quiet_ofd(path) if _OFD_LOCKS else None
    if quiet is None and not _OFD_LOCKS:
        quiet = _quiet_sidecar(path)
    if quiet is not None and os.path.exists(f"{real}-wal"):  # a runtime opened it between the check and the lock
        quiet.release()
        return None
    return quiet


def _quiet_ofd(path: str) -> Quiet | None:
    try:
        handle = FILES.open(path, writable=False)
    except OSError:
        return None
    try:
        _ofd_lock(handle.fd, fcntl.F_RDLCK)
    except OSError:
        FILES.close(handle)
        return None
    return Quiet(handle, None)


def _quiet_sidecar(path: str) -> Quiet | None:
    try:
        fd = os.open(_sidecar_path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return Quiet(None, fd)
