"""Where mllmc writes, and how it keeps a user's files safe.

Rules every command follows (README, "What mllmc promises"):
- A directory mllmc writes (an artifact, a preset model) is built in a temporary directory beside
  it, `.OUT.tmp-<pid>-<random>`, and appears by one rename when complete. Replacing an existing
  one is one atomic swap: the old directory is renamed aside, the new one renamed in, then the
  old one deleted; "exists without --force" is checked again at that moment, under a lock, so two
  concurrent writers to one OUT cannot both report success without --force.
- `--force` replaces only what mllmc itself wrote there before (`replaceable` says what that is:
  an artifact with its manifest and no unexpected files; a preset directory with its marker).
  Anything else (a file, the current directory, a user's own directory, the source model or a
  directory holding it) is refused with one line, and nothing is touched.
- A file mllmc writes (a golden, logits, an LC file, a benchmark report) goes to a temporary
  file and is renamed over the target; an existing file is replaced only with --force, and a
  directory never.
- Temporary directories of compiles that died (SIGKILL, power loss) are removed by the next
  write to the same OUT, checked by the owning pid: never a live process's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mllmc.runtime.errors import UserError

log = logging.getLogger(__name__)

Replaceable = Callable[[Path], "str | None"]  # None: may be replaced; else why not


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


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
            raise UserError(f"{out} exists and is a file; mllmc writes the {what} as a directory")
        if not force:
            raise UserError(f"{out} already exists; pass --force to overwrite it")
        if resolved == Path.cwd().resolve() or resolved == Path(resolved.anchor):
            raise UserError(f"refusing to replace {out}: it is the current or the root directory")
        reason = replaceable(out)
        if reason:
            raise UserError(f"refusing to replace {out} with --force: {reason}")
    _check_parent(out)
    return out


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory we may write into."""
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link in the way
            raise UserError(f"cannot create {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {path}: {parent} is a file, not a directory")
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
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove `.OUT.tmp-<pid>-*` / `.OUT.old-<pid>-*` beside `out` whose process is gone."""
    removed = []
    parent = out.absolute().parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or m["name"] != out.name or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.warning("removed %s, left by a process (pid %d) that no longer runs", entry, pid)
    return removed


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive lock for the final swap of `out` (a lock file beside it, left in place)."""
    path = out.absolute().parent / f".{out.name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
        if out.exists() or out.is_symlink():
            if not force:
                raise UserError(f"{out} appeared while this ran; pass --force to overwrite it")
            if out.is_symlink() or not out.is_dir():
                raise UserError(f"refusing to replace {out}: it is not a directory mllmc wrote")
            reason = replaceable(out)
            if reason:
                raise UserError(f"refusing to replace {out} with --force: {reason}")
            aside = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(aside, out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise UserError(f"{out} appeared while this ran; not replaced") from None
                raise


@contextlib.contextmanager
def staged_directory(
    out: str | os.PathLike, force: bool = False, replaceable: Replaceable | None = None
) -> Iterator[Path]:
    """A temporary directory beside `out`; when the block succeeds it is published to `out`
    (see `publish`), when it fails or is interrupted it is removed. `out` is never seen
    half-written, and a user's directory is never replaced."""
    out = Path(out)
    never = replaceable or (lambda _p: "it was not written by mllmc")
    _makedirs(out.absolute().parent)
    remove_stale_temps(out)
    try:
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.absolute().parent)
        )
    except OSError as e:
        raise UserError(f"cannot write beside {out}: {_why(e)}") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it the user's usual mode
    try:
        yield tmp
        publish(tmp, out, force, never)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | os.PathLike | None, force: bool, what: str = "output") -> None:
    """Check, before any work, that a file may be written at `path` (None: nothing to check):
    not a directory, not an existing file without --force, and a place where missing parent
    directories can be made."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p} is a directory; give a file path for the {what}")
    if p.exists() and not force:
        raise UserError(f"{p} already exists; pass --force to overwrite it")
    _check_parent(p)


def write_file(path: str | os.PathLike, data: str | bytes, force: bool = False) -> Path:
    """Write `data` to `path` through a temporary file and one rename (checks as above)."""
    p = Path(path)
    check_output_file(p, force)
    _makedirs(p.absolute().parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-{os.getpid()}-", dir=p.absolute().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
