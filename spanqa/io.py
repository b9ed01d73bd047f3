"""Every file spanqa reads from the user or writes for them goes through here.

Reading: a failure becomes one SpanqaError line that names the file (`read_text`, `read_json`).
Writing: atomically, so that a reader (or a crash) never sees half a file or half a directory:
`atomic_file` / `write_text` / `write_json` write a temporary sibling and rename it over the target;
`atomic_dir` builds a directory beside its target and swaps it in whole. Everything is created with
the modes the umask allows (0644 files and 0755 directories under umask 022): `tempfile`'s 0600/0700
would hide a model or an eval file from the rest of a group on a shared cluster.

Temporaries are named `.NAME.tmp-HOST-PID-RANDOM`: one left behind by a killed writer is removed by
the next writer on the same host once that pid is gone. A temporary of another host is never judged
(on a shared file system its writer may be alive).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import shutil
import socket
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from spanqa.errors import SpanqaError

FILE_MODE = 0o666  # before the umask
DIR_MODE = 0o777


# ------------------------------------------------------------------------------------------ errors


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------- reading


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's UTF-8 text; `what` names it in the error ("data file", "predictions file")."""
    return _decode(Path(path), _read_bytes(Path(path), what))


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """OS errors inside become one SpanqaError line naming the file and what it was meant to be."""
    try:
        yield
    except FileNotFoundError:
        raise SpanqaError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise SpanqaError(f"{path}: is a directory, not a {what}") from None
    except OSError as err:
        raise SpanqaError(f"{path}: cannot read {what} ({err.strerror})") from None


def _read_bytes(path: Path, what: str) -> bytes:
    with _reading(path, what):
        return path.read_bytes()


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpanqaError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


GZIP_MAGIC = b"\x1f\x8b"


def read_data_text(path: str | Path, what: str = "data file") -> str:
    """The file's UTF-8 text, decompressed first when it is gzip: told by its first two bytes, not by
    its name (MRQA's files are .jsonl.gz; a renamed or plain copy reads the same)."""
    path = Path(path)
    data = _read_bytes(path, what)
    if data.startswith(GZIP_MAGIC):
        data = _gunzip(path, data)
    return _decode(path, data)


def _gunzip(path: Path, data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except EOFError:
        raise SpanqaError(f"{path}: truncated gzip: the compressed stream ends early (cut short?)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise SpanqaError(f"{path}: not a valid gzip file ({first_line(err)})") from None


def peek_text(path: str | Path, limit: int = 1 << 16, what: str = "data file") -> str:
    """Up to `limit` bytes from the start of the file (decompressed when it is gzip) as text, for
    telling formats apart; nothing is checked here (a full read reports a broken file)."""
    path = Path(path)
    with _reading(path, what), open(path, "rb") as f:
        head = f.read(limit)
        if head.startswith(GZIP_MAGIC):
            f.seek(0)
            head = _gunzip_head(f, limit)
    return head.decode("utf-8", errors="replace")


def _gunzip_head(f: IO[bytes], limit: int) -> bytes:
    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        return stream.decompress(f.read(limit), limit)
    except zlib.error:
        return b""  # not readable as gzip: the full read says why


def parse_json(text: str, source: str) -> Any:
    """A JSON document; a text cut short is told apart from one that is not JSON at all."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        # an unterminated string or an error at the very end means the file was cut short
        cut_short = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
        kind = "truncated JSON" if cut_short else "not valid JSON"
        raise SpanqaError(f"{source}: {kind}: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise SpanqaError(f"{source}: JSON nested too deeply to read") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The file's JSON document (see `parse_json`)."""
    return parse_json(read_text(path, what), str(path))


# ----------------------------------------------------------------------------------------- writing


def temporary_name(target: Path, kind: str = "tmp") -> Path:
    """A sibling of `target` that names its writer: `.NAME.KIND-HOST-PID-RANDOM`."""
    host = socket.gethostname().replace("-", "_") or "host"
    return target.parent / f".{target.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_abandoned(target: Path) -> list[Path]:
    """Delete temporaries of `target` whose writer ran on this host and is gone (SIGKILL skips
    cleanup). Those of other hosts are left alone: their writers may be alive."""
    host = socket.gethostname().replace("-", "_") or "host"
    removed = []
    if not target.parent.is_dir():
        return removed
    for tmp in target.parent.glob(f".{target.name}.*-*-*-*"):
        parts = tmp.name.rsplit("-", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """A file object whose content replaces `path` only when the block ends without an error."""
    path = Path(path)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def writing(flag: str, target: str | Path) -> Iterator[None]:
    """An OSError inside the block (no space, a read-only file system, a file where a directory must
    be) becomes one line naming `flag`, the path and the reason."""
    try:
        yield
    except OSError as err:
        where = err.filename or target
        raise SpanqaError(f"{flag}: cannot write {where}: {err.strerror or first_line(err)}") from None


def check_writable_dir(directory: str | Path, flag: str) -> None:
    """Fail before long work when `directory` could not be made and written: its nearest existing
    ancestor must be a directory that takes a file (tried with a probe; nothing is left behind)."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SpanqaError(f"{flag}: {directory}: {existing} is a file, not a directory")
    probe = temporary_name(existing / "write-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        where = "" if existing == directory else f" ({existing}, where it would be made)"
        raise SpanqaError(f"{flag}: cannot write {directory}{where}: {err.strerror}") from None


def write_json(path: str | Path, content: Any, indent: int | None = 2) -> Path:
    """Strict JSON (NaN and infinity refused: other readers cannot parse them), UTF-8 kept as is."""
    return write_text(path, json.dumps(content, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, keep_theirs: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh directory to fill; at the end of the block it replaces `out_dir` whole (an existing
    one is swapped out only once the new one is complete). On an error nothing changes.

    `keep_theirs(out_dir)`: for contents determined by their inputs (window stores), where several
    writers may build the same directory at once. When what is at `out_dir` as this writer finishes
    passes it (another writer's complete copy), that copy stays and this one is dropped: swapping it
    would pull it from under readers that opened it already."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out_dir)
    tmp = temporary_name(out_dir)
    os.mkdir(tmp, DIR_MODE)
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        # looked at last, just before the rename: the window for another writer's to land between is short
        if keep_theirs is not None and out_dir.is_dir() and keep_theirs(out_dir):
            return
        replace_dir(tmp, out_dir)
    except OSError as err:  # their rename landed between the look above and this one (Errno 39)
        lost_race = err.errno in (errno.ENOTEMPTY, errno.EEXIST) and out_dir.is_dir()
        if not (keep_theirs is not None and lost_race and keep_theirs(out_dir)):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give everything under `path` the modes the umask allows: some writers (safetensors) create
    0600 files whatever the umask says."""
    mask = current_umask()
    for root, _, files in os.walk(path):
        os.chmod(root, DIR_MODE & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE & ~mask)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory `tmp` to `out_dir`; an existing `out_dir` is renamed aside first
    (rename cannot replace a non-empty directory) and deleted after."""
    old = None
    if out_dir.exists():
        old = temporary_name(out_dir, "old")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_crc32(path: str | Path, chunk: int = 8 << 20) -> int:
    """CRC-32 of a file's bytes: catches truncation and corruption (not tampering) at GB/s."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            crc = zlib.crc32(block, crc)
    return crc


def fsync_tree(path: Path) -> None:
    """fsync every file under `path` and the directories themselves: a rename after this never
    publishes files whose data is still only in the page cache."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -------------------------------------------------------------------------------- models and tokenizers


def looks_like_local_path(name: str) -> bool:
    """A hub name is `name` or `org/name`; anything else (absolute, ./, ~, deeper) must be a directory."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection, unless HF_HUB_OFFLINE is set."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def check_hub_name(name: str, flag: str) -> None:
    """A hub name that is neither in the local cache nor reachable fails at once (transformers would
    retry for a minute before its own error), saying how to pass a local directory."""
    from huggingface_hub import try_to_load_from_cache

    files = ("config.json", "tokenizer_config.json")
    cached = any(isinstance(try_to_load_from_cache(name, f), str) for f in files)
    if cached or hub_reachable():
        return
    raise SpanqaError(
        f"{flag}: {name!r} is not in the local Hugging Face cache and the hub cannot be reached: give the "
        "path of a local model directory instead (one written by save_pretrained, e.g. ./spanbert-base-cased)"
    )


def load_tokenizer(name_or_path: str | Path, flag: str = "--tokenizer") -> Any:
    """A fast (Rust) Hugging Face tokenizer; SpanqaError naming `flag` when it cannot be loaded or is
    not fast (character offsets need the tokenizer.json backend)."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    local = looks_like_local_path(name)
    if local and not Path(name).expanduser().is_dir():
        raise SpanqaError(f"{flag}: {name}: no such directory")
    if not local:
        check_hub_name(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # transformers raises OSError, ValueError, hub errors, ...
        raise SpanqaError(f"{flag}: cannot load a tokenizer from {name!r}: {first_line(err)}") from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SpanqaError(
            f"{flag}: {name!r} is not a fast tokenizer (character offsets need a tokenizer.json backend)"
        )
    return tokenizer
