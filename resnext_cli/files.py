"""Writing files so that nothing a user has is lost or half-written: every write goes to a
temporary file beside its target and is renamed over it; folders are made with clear errors."""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from filelock import SoftFileLock, Timeout

from resnext_cli.errors import EXIT_FAILED, UserError


class _ErrorKeepingFile:
    """A binary file that remembers the first OSError its writes raised.

    torch.save's zip writer swallows the OSError of a failed write (a full disk, say) and
    raises a bare RuntimeError ("unexpected pos ...") instead; this keeps the real reason."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:  # flush, tell, fileno...: the file's own
        return getattr(self.handle, name)


def atomic_write(path: Path, write: Any) -> None:
    """Write through `write(fileobj)` into a temporary file beside `path`, then rename over it."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"Cannot write {path}: {exc.strerror or exc}.", EXIT_FAILED) from None
    target = None
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files, which would hide results from others
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            target = _ErrorKeepingFile(handle)
            write(target)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(target, "error", None) or exc  # the write's own OSError, if it hid one
        if isinstance(reason, OSError):
            raise UserError(
                f"Cannot write {path}: {reason.strerror or reason}{free_space(path.parent)}. "
                "The previous file, if any, is unchanged.",
                EXIT_FAILED,
            ) from None
        raise


def free_space(folder: Path) -> str:
    """' (N MB free there)', so that a full disk reads as one; '' where it cannot be told."""
    try:
        return f" ({shutil.disk_usage(folder).free / 1e6:,.0f} MB free there)"
    except OSError:
        return ""


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8, with a file name's undecodable bytes escaped: Python reads byte 0xE9 of a non-UTF-8
    name as the lone surrogate U+DCE9, which UTF-8 cannot encode; it is written as the six
    characters `\\udce9`, which JSON and YAML strings read back as the same name (lossless), and
    which CSV and HTML show as they are. Nothing else is changed (UTF-8 encodes every other
    character)."""
    atomic_write(path, lambda handle: handle.write(escaped_utf8(text)))


def escaped_utf8(text: str) -> bytes:
    """`text` in UTF-8, lone surrogates (undecodable bytes of file names) as `\\udcXX` escapes."""
    return text.encode("utf-8", errors="backslashreplace")


def printable(text: str) -> str:
    """`text` as UTF-8 can carry it: a file name whose bytes are not UTF-8 (Python keeps them as
    lone surrogates, which no UTF-8 file or terminal takes) gets those bytes as `\\xNN` escapes.
    Valid text comes back unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the file name's own bytes
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def make_folder(path: Path) -> None:
    """The folder and its parents, or a clear error (a file in the way, no permission...)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; a folder is needed there.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"Cannot create the folder {path}: {exc.strerror or exc}.") from None


def next_free_folder(root: Path, stem: str, what: str, too_many: str) -> Path:
    """ROOT/STEM, ROOT/STEM2, ...: the first that does not exist, created here (so two processes
    never get the same one). `what` names it in an error; `too_many` is the error past 99,999."""
    make_folder(root)
    for i in range(1, 100_000):
        folder = root / (stem if i == 1 else f"{stem}{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"Cannot create the {what} {folder}: {exc.strerror}.") from None
    raise UserError(too_many)


def atomic_write_csv(path: Path, rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV written by `atomic_write_csv`, as one dict per row (values as written)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """One writer at a time: hold `lock_path` while writing `what`; a second writer is refused
    (exit 2) with the holder's pid, host and start time. Re-entrant within one process.

    filelock's soft lock writes the holder's pid and host into the file and takes over a lock
    whose process has died on this host (a stale lock after a crash or SIGKILL); the file goes
    when the holder releases it."""
    # one lock object per file in this process (is_singleton): a writer that already holds it,
    # train writing its end-of-run report say, takes it again instead of refusing itself
    lock = SoftFileLock(str(Path(lock_path).resolve()), timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{what} is being written by another resnext process ({lock_holder(lock_path)}). "
            f"Wait for it to finish, or write elsewhere. If no such process exists (it ran on "
            f"another machine), delete {lock_path}.",
        ) from None
    except OSError as exc:
        raise UserError(f"Cannot lock {what} ({lock_path}): {exc.strerror or exc}.") from None
    try:
        yield
    finally:
        lock.release()


def lock_holder(lock_path: Path) -> str:
    """'pid N on host H since T', read from a lock file (filelock writes pid and host first)."""
    try:
        lines = lock_path.read_text(encoding="utf-8", errors="replace").splitlines()
        since = datetime.datetime.fromtimestamp(lock_path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    except OSError:
        return "holder unknown"
    pid = lines[0].strip() if lines else "?"
    host = lines[1].strip() if len(lines) > 1 else "?"
    return f"pid {pid} on host {host} since {since}"


def lock_state(lock_path: Path) -> str:
    """`none` (no lock file), `held`, or `stale`: the pid it names is gone on this host (the
    process was killed with SIGKILL, crashed, or the machine went down), so the next writer takes
    the lock over. A lock taken on another host cannot be checked from here and reads as held."""
    try:
        pid, host = lock_path.read_text(encoding="utf-8", errors="replace").splitlines()[:2]
        pid_number = int(pid)
    except FileNotFoundError:
        return "none"
    except (OSError, ValueError):  # unreadable, or still being written: assume its holder lives
        return "held"
    here = socket.gethostname()  # filelock writes the host name, plus a pid-namespace mark in containers
    if host != here and not host.startswith(f"{here}?pidns-"):
        return "held"
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return "stale"
    except OSError:  # PermissionError: alive, another user's
        pass
    return "held"
