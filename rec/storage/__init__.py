"""Paths that may be local or gs://: read, write (atomically), list, check.

Every artifact a run writes goes through `write_bytes`/`write_text`, which never leave a
half-written file behind: locally they write a temporary file in the same directory and rename it;
on GCS an object upload is atomic by itself. google-cloud-storage is imported only for gs:// paths.
The verified handoff (no-clobber uploads, CRC32C, MANIFEST.json) lives in `rec.storage.handoff`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator

from rec.errors import RecError


def is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def split_gcs(path: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    rest = path[len("gs://") :]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise RecError(f"{path}: not a gs://bucket/path URL")
    return bucket, name


_CLIENT = None


def gcs_client():
    """A google.cloud.storage Client (honours STORAGE_EMULATOR_HOST for tests)."""
    global _CLIENT
    if _CLIENT is None:
        try:
            from google.cloud import storage as gcs  # noqa: PLC0415 (optional dependency)
        except ImportError:  # pragma: no cover - depends on the environment
            raise RecError("gs:// paths need google-cloud-storage: pip install 'rec[gcs]'") from None
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            from google.auth.credentials import AnonymousCredentials

            _CLIENT = gcs.Client(project=os.environ.get("GCS_PROJECT", "test"), credentials=AnonymousCredentials())
        else:
            _CLIENT = gcs.Client()
    return _CLIENT


def reset_client() -> None:
    """Forget the cached client (tests that start a new emulator)."""
    global _CLIENT
    _CLIENT = None


def _blob(path: str):
    bucket, name = split_gcs(path)
    return gcs_client().bucket(bucket).blob(name)


def exists(path: str) -> bool:
    if is_gcs(path):
        if _blob(path).exists():
            return True
        bucket, name = split_gcs(path)
        prefix = name.rstrip("/") + "/"
        return any(True for _ in gcs_client().list_blobs(bucket, prefix=prefix, max_results=1))
    return os.path.exists(path)


def isdir(path: str) -> bool:
    if is_gcs(path):
        bucket, name = split_gcs(path)
        prefix = name.rstrip("/") + "/"
        return any(True for _ in gcs_client().list_blobs(bucket, prefix=prefix, max_results=1))
    return os.path.isdir(path)


def read_bytes(path: str) -> bytes:
    if is_gcs(path):
        blob = _blob(path)
        if not blob.exists():
            raise RecError(f"{path}: not found")
        return blob.download_as_bytes()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RecError(f"{path}: not found") from None
    except IsADirectoryError:
        raise RecError(f"{path}: is a directory, expected a file") from None


def read_text(path: str) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_json(path: str):
    """Parse a JSON file; invalid JSON is a RecError naming `path:line`."""
    import json

    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise RecError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file atomically (no partial file is ever visible under `path`, even after a
    crash: the data is on disk before the rename)."""
    if is_gcs(path):
        _blob(path).upload_from_string(data)
        return
    tmp = write_temp_file(os.path.dirname(os.path.abspath(path)), data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_temp_file(directory: str, data: bytes | None = None, source: str | None = None) -> str:
    """A new temporary file in `directory` (created if needed) holding `data` or a copy of the
    local file `source`, flushed to disk and with the mode a plain new file would get; the caller
    renames or links it into place. Nothing is left behind when writing fails."""
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if source is not None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 8 * 1024 * 1024)
            elif data is not None:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp creates 0600, unreadable to a job running as another uid
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    # Read, not set-and-restore: os.umask(0) would briefly apply to files other threads create
    # (Orbax's async checkpoint writer among them).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the classic way, with a common default meanwhile
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
    """Append (metrics.jsonl). On GCS objects are immutable, so this rewrites the object."""
    if is_gcs(path):
        old = read_bytes(path) if exists(path) else b""
        write_bytes(path, old + text.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def listdir(path: str) -> list[str]:
    """Names directly under a directory/prefix (files and sub-directories), sorted."""
    if is_gcs(path):
        bucket, name = split_gcs(path)
        prefix = name.rstrip("/") + "/" if name else ""
        it = gcs_client().list_blobs(bucket, prefix=prefix, delimiter="/")
        names = [b.name[len(prefix) :] for b in it]
        names += [p[len(prefix) :].rstrip("/") for p in it.prefixes]
        return sorted(n for n in names if n)
    if not os.path.isdir(path):
        raise RecError(f"{path}: not a directory")
    return sorted(os.listdir(path))


def check_output_dir(path: str, key: str) -> None:
    """Fail early, with one line naming `key`, when the local directory `path` could not be created
    or written: before a model loads or a run starts, not after. Creates nothing; gs:// passes."""
    if is_gcs(path):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise RecError(f"{key} {path}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RecError(f"{key} {path}: {probe} is not writable")


def refuse_foreign_output(path: str, flag: str, is_ours, what: str) -> None:
    """An output directory must be new, empty, or an earlier output of the same command
    (`is_ours(path)`): writing into anything else would silently mix or replace someone's files
    (a real dataset, a model)."""
    if isdir(path) and listdir(path) and not is_ours(path):
        raise RecError(
            f"{flag} {path}: not empty and not an earlier {what}; refusing to write into it (choose a "
            "new directory)"
        )


def makedirs(path: str) -> None:
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local directory/file holding `path` for the `with` block. A gs:// prefix is downloaded to
    a temporary directory that is removed afterwards (a model copy left behind per load would fill
    a pod's disk); local paths pass through untouched."""
    if not is_gcs(path):
        yield path
        return
    bucket, name = split_gcs(path)
    target = tempfile.mkdtemp(prefix="rec-gcs-")
    try:
        prefix = name.rstrip("/")
        blobs = list(gcs_client().list_blobs(bucket, prefix=prefix + "/"))
        if not blobs:  # a single object
            out = os.path.join(target, posixpath.basename(prefix))
            write_bytes(out, read_bytes(path))
            yield out
            return
        for blob in blobs:
            rel = blob.name[len(prefix) + 1 :]
            if not rel or rel.endswith("/"):
                continue
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            blob.download_to_filename(dest)
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)
