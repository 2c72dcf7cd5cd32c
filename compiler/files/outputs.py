"""Where mllmc writes, and how it keeps a user's files safe.

Rules every command follows (README, "What mllmc promises"):
- A directory mllmc writes (an artifact, a preset model) is built in a temporary directory beside
  it, `.OUT.tmp-<pid>-<random>` (holding a `.mllmc-temp` marker while it is staged), and appears
  by one rename when complete. Replacing an existing one is one atomic swap: the old directory is
  renamed aside (`.OUT.old-<pid>-<random>`, marked the same way), the new one renamed in, then
  the old one deleted; "exists without --force" is checked again at that moment, under a lock, so
  two concurrent writers to one OUT cannot both report success without --force.
- `--force` replaces only what mllmc itself wrote there before (`replaceable` says what that is:
  an artifact holding only the files its manifest names; a preset directory with its marker).
  Anything else (a file, the current directory, a user's own directory, the source model or a
  directory holding it) is refused with one line, and nothing is touched. Before any work it is
  also checked that the old output can be removed (its directory and the one holding it are
  writable, nothing in it is immutable).
- A file mllmc writes (a golden, logits, an LC file, a benchmark report, a chart) goes to a
  temporary file beside it, which then takes the target's name: without --force by a hard link
  that fails if anything (a file, a link, even a dangling one) has the name by then; with --force
  by a rename that replaces a file or a symbolic link itself, never the file a link points to.
  A directory is never replaced by a file.
- Temporary directories of writers that died (SIGKILL, power loss) are removed by the next
  write to the same OUT: only those holding mllmc's marker, and never a live process's.
- A name the file system cannot hold (longer than 255 bytes) is one line, before any work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mllmc.runtime.errors import UserError

log = logging.getLogger(__name__)

Replaceable = Callable[[Path], "str | None"]  # None: may be replaced; else why not

# Inside every temporary directory mllmc stages an output in (and an old output it set aside):
# the only directories stale-temp cleanup ever removes.
TEMP_MARKER = ".mllmc-temp"
NAME_MAX = 255  # bytes in one path component (Linux file systems)
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included
_STEM_MAX = 200  # bytes of OUT's name kept in the names of its temporary files and lock


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _kind_of(path: Path) -> str:
    """What the existing non-directory `path` is, for a message: "a file", "a device", ..."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "not a directory"
    for test, name in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a directory"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_names(path: str | os.PathLike) -> None:
    """UserError (one line) if a component of `path` is longer than a file name may be, or the
    whole path longer than a path may be."""
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= PATH_MAX:
        raise UserError(
            f"cannot write {str(path)[:40]}...: the path is {size} bytes, longer than the "
            f"{PATH_MAX - 1} a path may be; choose a shorter one"
        )
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            shown = part if len(part) <= 40 else part[:20] + "..." + part[-12:]
            raise UserError(
                f"cannot write {shown}: the name is {size} bytes, longer than the {NAME_MAX} "
                "a file name may be; choose a shorter one"
            )


def _stem(name: str) -> str:
    """`name`, cut so that the temporary names made from it stay within NAME_MAX."""
    raw = os.fsencode(name)
    return name if len(raw) <= _STEM_MAX else raw[:_STEM_MAX].decode(errors="ignore")


def _beside(out: Path, kind: str) -> str:
    """The name prefix of a temporary `kind` (tmp, old) beside `out`: `.OUT.kind-<pid>-`."""
    return f".{_stem(out.name)}.{kind}-{os.getpid()}-"


def _exists(p: Path) -> bool:
    """Something has the name `p`: a file, a directory, or a symbolic link (even dangling)."""
    return p.is_symlink() or p.exists()


_FS_IOC_GETFLAGS = 0x80086601
_IMMUTABLE_OR_APPEND_ONLY = 0x10 | 0x20


def _immutable(p: Path) -> bool:
    """True if `p` (a file or directory) is immutable or append-only (chattr +i / +a): not even
    root may remove it."""
    try:
        mode = os.lstat(p).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            return False
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        flags = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))
    except OSError:  # a file system without these flags
        return False
    finally:
        os.close(fd)
    return bool(int.from_bytes(flags[:4], sys.byteorder) & _IMMUTABLE_OR_APPEND_ONLY)


def _check_removable(p: Path) -> None:
    """UserError unless `p` (a file, a link, or a directory of files) can be removed: so that
    --force finds out before any work, not after it, that the old output cannot be replaced."""
    if not p.is_symlink() and p.is_dir():
        if _immutable(p) or not os.access(p, os.W_OK | os.X_OK):
            raise UserError(
                f"cannot replace {p}: it is read-only or immutable (its files cannot be removed)"
            )
        entries = list(p.iterdir())
    else:
        entries = [p]
    locked = [e.name for e in entries if not e.is_symlink() and _immutable(e)]
    if locked:
        raise UserError(
            f"cannot replace {p}: {', '.join(sorted(locked)[:3])} is immutable (chattr -i to allow it)"
        )


def check_output_dir(
    out: str | os.PathLike,
    force: bool,
    replaceable: Replaceable,
    *,
    what: str = "output",
    protected: Sequence[str | os.PathLike] = (),
) -> Path:
    """Check, before any work, that `out` may be written: UserError (one line) if not.

    `protected` directories (the source model) may not be `out`, lie inside it, or hold it."""
    out = Path(out)
    check_names(out)
    resolved = out.resolve()
    for p in protected:
        src = Path(p).resolve()
        if resolved == src or _is_within(resolved, src) or _is_within(src, resolved):
            raise UserError(
                f"refusing to write the {what} to {out}: it is, holds or lies inside the source "
                f"model directory {p}; choose another -o"
            )
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link; give the {what} a path of its own")
    if out.exists():
        if not out.is_dir():
            raise UserError(
                f"{out} exists and is {_kind_of(out)}; mllmc writes the {what} as a directory"
            )
        if not force:
            raise UserError(f"{out} already exists; pass --force to overwrite it")
        if resolved == Path.cwd().resolve() or resolved == Path(resolved.anchor):
            raise UserError(f"refusing to replace {out}: it is the current or the root directory")
        reason = replaceable(out)
        if reason:
            raise UserError(f"refusing to replace {out} with --force: {reason}")
        _check_parent(out)
        _check_removable(out)
    _check_parent(out)
    return out


def check_output_folder(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any work, that mllmc may write new entries into the directory `path`
    (made if missing): not a file, a name the file system can hold, a writable place."""
    p = Path(path)
    check_names(p)
    if p.is_symlink() and not p.is_dir():
        raise UserError(f"{p} is a broken symbolic link; give the {what} another directory")
    if p.exists() and not p.is_dir():
        raise UserError(f"{p} is {_kind_of(p)}; give a directory for the {what}")
    _check_parent(p / "x")
    return p


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory we may write into."""
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link in the way
            raise UserError(f"cannot create {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {path}: {parent} is {_kind_of(parent)}, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {path}: {parent} is not writable")


def _makedirs(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {d}: {_why(e)}") from None


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^.]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


def _mark(d: Path) -> None:
    """Mark `d` as a temporary directory of this process (see TEMP_MARKER)."""
    (d / TEMP_MARKER).write_text(f"{os.getpid()}\n")


def _marked(d: Path) -> bool:
    marker = d / TEMP_MARKER
    return not marker.is_symlink() and marker.is_file()


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove `.OUT.tmp-<pid>-*` / `.OUT.old-<pid>-*` beside `out` that mllmc marked as its own
    (TEMP_MARKER inside) and whose process is gone; anything else of that name is left alone."""
    removed = []
    parent = out.absolute().parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or m["name"] != _stem(out.name) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid) or not _marked(entry):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.warning("removed %s, left by a process (pid %d) that no longer runs", entry, pid)
    return removed


def _lock_dir() -> Path | None:
    """This user's directory of lock files under the system temporary directory (mode 0700),
    or None when it cannot be made or is not this user's own directory."""
    d = Path(tempfile.gettempdir()) / f"mllmc-locks-{os.getuid()}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return d


def lock_path(out: Path) -> Path:
    """The lock file of `out`: in this user's lock directory, named by a hash of `out`'s
    absolute path (its directory's symbolic links resolved), so the user never sees it; beside
    `out` (`.OUT.lock`) where that directory is not usable."""
    target = out.absolute().parent.resolve() / out.name
    d = _lock_dir()
    if d is None:
        return out.absolute().parent / f".{_stem(out.name)}.lock"
    digest = hashlib.sha256(os.fsencode(target)).hexdigest()[:32]
    return d / f"{digest}.lock"


def scratch_directory(prefix: str) -> tempfile.TemporaryDirectory:
    """A marked temporary directory of this process in the system temporary directory,
    `<prefix><pid>-<random>`, removed when it is cleaned up (or the process exits). Those of
    processes that died (SIGKILL) are removed first: only this user's, holding the marker."""
    remove_stale_scratch(prefix)
    try:
        scratch = tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")
        _mark(Path(scratch.name))
    except OSError as e:
        raise UserError(f"cannot make a temporary directory: {_why(e)}") from None
    return scratch


def remove_stale_scratch(prefix: str) -> list[Path]:
    """Remove `<prefix><pid>-*` directories in the system temporary directory that this user
    owns, that hold TEMP_MARKER, and whose process is gone; anything else is left alone."""
    removed: list[Path] = []
    pattern = re.compile(rf"^{re.escape(prefix)}(?P<pid>\d+)-[^/]+$")
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None:
            continue
        try:
            st = os.lstat(entry)
        except OSError:
            continue
        pid = int(m["pid"])
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.getuid()
            or pid == os.getpid()
            or _pid_alive(pid)
            or not _marked(entry)
        ):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.warning("removed %s, left by a process (pid %d) that no longer runs", entry, pid)
    return removed


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive lock for the final swap of `out` (`lock_path`; the file is left in place,
    so that every writer locks the same file)."""
    path = lock_path(out)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise UserError(f"cannot create {path}: {_why(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path, force: bool, replaceable: Replaceable) -> None:
    """Move the complete directory `tmp` to `out`: a rename, or one atomic swap with the old
    `out` (checked again under the lock: exists without --force, replaceable)."""
    with _lock(out):
        if _exists(out):
            if not force:
                raise UserError(f"{out} appeared while this ran; pass --force to overwrite it")
            if out.is_symlink() or not out.is_dir():
                raise UserError(f"refusing to replace {out}: it is not a directory mllmc wrote")
            reason = replaceable(out)
            if reason:
                raise UserError(f"refusing to replace {out} with --force: {reason}")
            aside = out.parent / f"{_beside(out, 'old')}{os.urandom(4).hex()}"
            try:
                os.rename(out, aside)
            except OSError as e:
                raise UserError(f"cannot replace {out}: {_why(e)}") from None
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(aside, out)
                raise
            with contextlib.suppress(OSError):
                _mark(aside)
            shutil.rmtree(aside, ignore_errors=True)
            if aside.exists():
                log.warning("replaced %s, but could not delete the old one, now %s", out, aside)
        else:
            try:
                os.rename(tmp, out)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise UserError(f"{out} appeared while this ran; not replaced") from None
                raise UserError(f"cannot write {out}: {_why(e)}") from None


@contextlib.contextmanager
def staged_directory(
    out: str | os.PathLike, force: bool = False, replaceable: Replaceable | None = None
) -> Iterator[Path]:
    """A temporary directory beside `out`; when the block succeeds it is published to `out`
    (see `publish`), when it fails or is interrupted it is removed. `out` is never seen
    half-written, and a user's directory is never replaced."""
    out = Path(out)
    check_names(out)
    never = replaceable or (lambda _p: "it was not written by mllmc")
    _makedirs(out.absolute().parent)
    remove_stale_temps(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_beside(out, "tmp"), dir=out.absolute().parent))
        _mark(tmp)
    except OSError as e:
        raise UserError(f"cannot write beside {out}: {_why(e)}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it the user's usual mode
    try:
        yield tmp
        (tmp / TEMP_MARKER).unlink(missing_ok=True)
        publish(tmp, out, force, never)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | os.PathLike | None, force: bool, what: str = "output") -> None:
    """Check, before any work, that a file may be written at `path` (None: nothing to check):
    a name the file system can hold, not a directory, nothing there (a link, even a dangling
    one, counts) without --force, something --force can replace, and a place where missing
    parent directories can be made."""
    if path is None:
        return
    p = Path(path)
    check_names(p)
    if p.is_dir() and not p.is_symlink():
        raise UserError(f"{p} is a directory; give a file path for the {what}")
    if _exists(p):
        if not force:
            raise UserError(f"{p} already exists; pass --force to overwrite it")
        if not p.is_symlink() and not p.is_file():
            raise UserError(f"refusing to replace {p}: it is not a regular file")
        _check_removable(p)
    _check_parent(p)


def write_file(path: str | os.PathLike, data: str | bytes, force: bool = False) -> Path:
    """Write `data` to `path` through a temporary file beside it (checks as above, made again
    at the end): without `force` the file takes its name only if nothing has it by then; with
    `force` it replaces a file or a link (never writing through the link)."""
    p = Path(path)
    check_output_file(p, force)
    _makedirs(p.absolute().parent)
    try:
        fd, name = tempfile.mkstemp(prefix=_beside(p, "tmp"), dir=p.absolute().parent)
    except OSError as e:
        raise UserError(f"cannot write {p}: {_why(e)}") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        _place(tmp, p, force)
    except OSError as e:
        raise UserError(f"cannot write {p}: {_why(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return p


def write_figure(fig: Any, path: str | os.PathLike, force: bool = False) -> Path:
    """Lay out a matplotlib figure and save it as a PNG file at `path`, written as `write_file`
    writes; the figure is closed afterwards, whatever happens."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return write_file(path, buf.getvalue(), force=force)


def _place(tmp: Path, p: Path, force: bool) -> None:
    """Give the complete file `tmp` the name `p` (see `write_file`)."""
    if force:
        if _exists(p) and not p.is_symlink() and not p.is_file():
            raise UserError(f"refusing to replace {p}: it is not a regular file")
        os.replace(tmp, p)  # a link at p is replaced itself
        return
    try:
        os.link(tmp, p)  # fails if anything has the name, a dangling link too
    except FileExistsError:
        raise UserError(f"{p} appeared while this ran; pass --force to overwrite it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        with _lock(p):  # a file system without hard links: check again under the lock
            if _exists(p):
                raise UserError(
                    f"{p} appeared while this ran; pass --force to overwrite it"
                ) from None
            os.rename(tmp, p)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
