"""Verified handoff of a trained checkpoint from a run directory to the eval job.

`publish(run_prefix, handoff_prefix, tag)` copies, from a run directory (local or gs://):

    checkpoints/<tag>/<step>/**   the newest finalised step of the tag (an Orbax tree: many objects)
    tokenizer/**                  the tokenizer the model was trained with
    config.yaml                   the run's resolved config
    run_summary.json              the run's figures (when the run wrote one)

to the handoff prefix, which therefore has the shape of a run directory (`rec eval
model.path=<handoff> model.checkpoint=<tag>` loads it). Every object is written no-clobber
(GCS: generation precondition 0; local: a hard link that fails when the name exists) and its
CRC32C and size are checked against the source after the write. `MANIFEST.json`, listing every
object with its size and CRC32C, is written last: a prefix without it is not (yet) a handoff.

Re-running publish is idempotent: objects that already exist with the same size and checksum are
left alone, and an identical MANIFEST.json is accepted. An object or manifest that exists with
different content is a conflict and publish refuses to overwrite it.

`verify(handoff_prefix)` reads MANIFEST.json and checks that the prefix holds exactly the listed
objects with the listed sizes and checksums; it returns the checkpoint path inside the handoff and
refuses (RecError) on a missing manifest, a missing, changed or unlisted object.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import posixpath
import re
import sys

from rec import storage
from rec.errors import RecError

MANIFEST = "MANIFEST.json"
FORMAT = 1
COMMIT_MARKER = "commit_success.txt"  # Orbax's marker for a finalised step where rename is not atomic (GCS)
_CHUNK = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    path: str  # relative to the prefix, "/"-separated
    size: int
    crc32c: str  # base64 of the big-endian CRC32C, as GCS reports it


def crc32c_of_bytes(data: bytes) -> str:
    import google_crc32c  # noqa: PLC0415

    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")


def crc32c_of_file(path: str) -> str:
    import google_crc32c  # noqa: PLC0415

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# A prefix: a local directory or a gs:// prefix, seen as {relative path: ObjectInfo}


class _Prefix:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.gcs = storage.is_gcs(self.url)
        if self.gcs:
            self.bucket_name, name = storage.split_gcs(self.url)
            self.name = name.rstrip("/")

    def full(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _blob_name(self, rel: str) -> str:
        return f"{self.name}/{rel}" if self.name else rel

    def _bucket(self):
        return storage.gcs_client().bucket(self.bucket_name)

    def list(self, sub: str = "") -> dict[str, ObjectInfo]:
        """Every object under `sub` (relative to the prefix), with size and CRC32C."""
        out: dict[str, ObjectInfo] = {}
        if self.gcs:
            base = self._blob_name(sub).rstrip("/") + "/" if (sub or self.name) else ""
            strip = len(self.name) + 1 if self.name else 0
            for blob in storage.gcs_client().list_blobs(self.bucket_name, prefix=base):
                if blob.name.endswith("/"):  # folder placeholder objects carry no data
                    continue
                rel = blob.name[strip:]
                out[rel] = ObjectInfo(rel, int(blob.size or 0), blob.crc32c or "")
            return out
        root = os.path.join(self.url, *sub.split("/")) if sub else self.url
        if not os.path.isdir(root):
            return out
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                if filename.startswith(".tmp-"):  # our own in-flight temporaries
                    continue
                path = os.path.join(dirpath, filename)
                rel = os.path.relpath(path, self.url).replace(os.sep, "/")
                out[rel] = ObjectInfo(rel, os.path.getsize(path), crc32c_of_file(path))
        return dict(sorted(out.items()))

    def info(self, rel: str) -> ObjectInfo | None:
        if self.gcs:
            blob = self._bucket().get_blob(self._blob_name(rel))
            return None if blob is None else ObjectInfo(rel, int(blob.size or 0), blob.crc32c or "")
        path = os.path.join(self.url, *rel.split("/"))
        if not os.path.isfile(path):
            return None
        return ObjectInfo(rel, os.path.getsize(path), crc32c_of_file(path))

    def read(self, rel: str) -> bytes | None:
        if self.gcs:
            blob = self._bucket().get_blob(self._blob_name(rel))
            return None if blob is None else blob.download_as_bytes()
        path = os.path.join(self.url, *rel.split("/"))
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def subdirs(self, sub: str) -> list[str]:
        try:
            return storage.listdir(self.full(sub)) if (self.gcs or os.path.isdir(self.full(sub))) else []
        except RecError:
            return []

    # -- no-clobber writes: return True if written, False if the name already existed ------------

    def put_bytes_no_clobber(self, rel: str, data: bytes) -> bool:
        if self.gcs:
            from google.api_core import exceptions as gexc  # noqa: PLC0415

            blob = self._bucket().blob(self._blob_name(rel))
            try:
                blob.upload_from_string(data, if_generation_match=0, checksum="crc32c")
            except gexc.PreconditionFailed:
                return False
            return True
        tmp = storage.write_temp_file(os.path.dirname(self.full(rel)), data)
        return self._link_no_clobber(tmp, self.full(rel))

    def put_from_no_clobber(self, source: _Prefix, src_rel: str, rel: str) -> bool:
        """Copy one object from `source` (server-side between GCS prefixes)."""
        if self.gcs:
            from google.api_core import exceptions as gexc  # noqa: PLC0415

            dest = self._bucket().blob(self._blob_name(rel))
            try:
                if source.gcs:
                    src_blob = source._bucket().blob(source._blob_name(src_rel))
                    token, _, _ = dest.rewrite(src_blob, if_generation_match=0)
                    while token is not None:  # large objects are rewritten in several calls
                        token, _, _ = dest.rewrite(src_blob, token=token, if_generation_match=0)
                else:
                    dest.upload_from_filename(source.full(src_rel), if_generation_match=0, checksum="crc32c")
            except gexc.PreconditionFailed:
                return False
            return True
        directory = os.path.dirname(self.full(rel))
        if not source.gcs:
            return self._link_no_clobber(storage.write_temp_file(directory, source=source.full(src_rel)), self.full(rel))
        tmp = storage.write_temp_file(directory)
        try:
            source._bucket().blob(source._blob_name(src_rel)).download_to_filename(tmp, checksum="crc32c")
        except BaseException:
            os.unlink(tmp)
            raise
        return self._link_no_clobber(tmp, self.full(rel))

    @staticmethod
    def _link_no_clobber(tmp: str, dest: str) -> bool:
        # link() is atomic and fails if `dest` exists: a local no-clobber write.
        try:
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------
# Publish


def _nested(outer: _Prefix, inner: _Prefix) -> bool:
    """Whether `inner` is `outer` or lies inside it (local paths compared resolved)."""
    if outer.gcs != inner.gcs:
        return False
    a, b = (outer.url, inner.url) if outer.gcs else (os.path.realpath(outer.url), os.path.realpath(inner.url))
    return b == a or b.startswith(a.rstrip("/") + "/")


def choose_step(run: _Prefix, tag: str, step: int | None = None) -> int:
    """The newest finalised step under checkpoints/<tag>/ (numeric directory names), or `step`
    after checking that it is finalised.

    Finalised: on local disk Orbax renames a finished step into place, so every numeric directory
    is one (unless some steps carry commit markers, then only those). On gs:// Orbax writes the
    step in place and adds commit_success.txt last, so a step without it may be half written,
    unless the source is itself a verified handoff (its MANIFEST.json lists every object)."""
    where = run.full(f"checkpoints/{tag}")
    names = run.subdirs(f"checkpoints/{tag}")
    steps = sorted(int(n) for n in names if re.fullmatch(r"[0-9]+", n))
    if not steps:
        have = ", ".join(run.subdirs("checkpoints")) or "none"
        raise RecError(f"{where}: no finalised checkpoint step (tags present: {have})")
    committed = [s for s in steps if run.info(f"checkpoints/{tag}/{s}/{COMMIT_MARKER}") is not None]
    if committed:
        finalised = committed
    elif not run.gcs or run.info(MANIFEST) is not None:
        finalised = steps
    else:
        finalised = []
    if step is None:
        if not finalised:
            raise RecError(
                f"{where}: no finalised checkpoint step: step(s) {', '.join(map(str, steps))} have no "
                f"{COMMIT_MARKER} (the save is still running or was interrupted)"
            )
        return finalised[-1]
    if step not in finalised:
        state = "is not finalised (no " + COMMIT_MARKER + ")" if step in steps else "does not exist"
        shown = ", ".join(map(str, finalised)) or "none"
        raise RecError(f"{where}/{step}: {state}; finalised steps: {shown}")
    return step


def _source_objects(run: _Prefix, tag: str, step: int) -> dict[str, ObjectInfo]:
    objects: dict[str, ObjectInfo] = {}
    checkpoint = run.list(f"checkpoints/{tag}/{step}")
    if not checkpoint:
        raise RecError(f"{run.full(f'checkpoints/{tag}/{step}')}: empty or missing")
    objects.update(checkpoint)
    tokenizer = run.list("tokenizer")
    if not tokenizer:
        raise RecError(f"{run.full('tokenizer')}/: missing (the eval job needs the run's tokenizer)")
    objects.update(tokenizer)
    for rel, required in (("config.yaml", True), ("run_summary.json", False)):
        info = run.info(rel)
        if info is None and required:
            raise RecError(f"{run.full(rel)}: missing")
        if info is not None:
            objects[rel] = info
    if MANIFEST in objects:
        raise RecError(f"{run.full(MANIFEST)}: a run directory may not contain {MANIFEST}")
    return dict(sorted(objects.items()))


def manifest_bytes(run_prefix: str, tag: str, step: int, objects: dict[str, ObjectInfo]) -> bytes:
    """Deterministic manifest text (no timestamps), so a re-run produces identical bytes."""
    doc = {
        "format": FORMAT,
        "source": run_prefix.rstrip("/"),
        "tag": tag,
        "step": step,
        "checkpoint": f"checkpoints/{tag}/{step}",
        "objects": [{"path": o.path, "size": o.size, "crc32c": o.crc32c} for o in objects.values()],
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")


def publish(
    run_prefix: str, handoff_prefix: str, tag: str, step: int | None = None, progress: bool = True
) -> dict:
    """Copy a run's checkpoint tag and artifacts to `handoff_prefix`, then write MANIFEST.json.
    Returns {"checkpoint", "objects", "copied", "already_present"}."""
    from tqdm import tqdm  # noqa: PLC0415

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", tag or ""):
        raise RecError(f"--tag {tag!r}: not a checkpoint tag (e.g. rl_last)")
    run, dest = _Prefix(run_prefix), _Prefix(handoff_prefix)
    if _nested(run, dest) or _nested(dest, run):
        raise RecError(
            f"{handoff_prefix}: the handoff prefix and the run directory {run_prefix} must not contain "
            "one another"
        )
    if run.info(MANIFEST) is not None:
        verify(run.url)  # re-publishing a handoff: only a complete one
    step = choose_step(run, tag, step)
    objects = _source_objects(run, tag, step)
    # One spelling per source, so a re-run with another spelling of the same directory is idempotent.
    body = manifest_bytes(run.url if run.gcs else os.path.realpath(run.url), tag, step, objects)
    existing = dest.read(MANIFEST)
    if existing is not None and existing != body:
        # Checked before anything is copied: a refused publish must leave the handoff as it was.
        raise RecError(
            f"{dest.full(MANIFEST)}: already exists and describes a different publication; "
            "refusing to overwrite: publish to a new prefix"
        )
    copied = present = 0
    bar = tqdm(
        objects.values(), desc=f"publish {tag}/{step}", unit="obj", file=sys.stderr, disable=not progress
    )
    for src in bar:
        # Look first (a re-run skips what is there), then write with the no-clobber precondition,
        # which still guards against a concurrent writer between the look and the write.
        written = dest.info(src.path) is None and dest.put_from_no_clobber(run, src.path, src.path)
        got = dest.info(src.path)
        if got is None or (got.size, got.crc32c) != (src.size, src.crc32c):
            found = "missing" if got is None else f"size {got.size}, crc32c {got.crc32c}"
            if written:
                raise RecError(
                    f"{dest.full(src.path)}: copy does not match its source ({found} vs size {src.size}, "
                    f"crc32c {src.crc32c}); re-run publish"
                )
            raise RecError(
                f"{dest.full(src.path)}: already exists with different content ({found}; source has size "
                f"{src.size}, crc32c {src.crc32c}); refusing to overwrite: publish to a new prefix"
            )
        copied += written
        present += not written
    if not dest.put_bytes_no_clobber(MANIFEST, body) and dest.read(MANIFEST) != body:
        raise RecError(
            f"{dest.full(MANIFEST)}: already exists and describes a different publication; "
            "refusing to overwrite: publish to a new prefix"
        )
    return {
        "checkpoint": dest.full(f"checkpoints/{tag}/{step}"),
        "objects": len(objects),
        "copied": copied,
        "already_present": present,
    }


# ---------------------------------------------------------------------------------------------
# Verify


def read_manifest(handoff_prefix: str) -> dict:
    dest = _Prefix(handoff_prefix)
    where = dest.full(MANIFEST)
    data = dest.read(MANIFEST)
    if data is None:
        raise RecError(
            f"{where}: missing: {handoff_prefix} is not a published handoff (or its upload did not "
            "finish); run `rec handoff publish` (make upload)"
        )
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RecError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RecError(f"{where}: unknown format (expected format {FORMAT})")
    objects = doc.get("objects")
    checkpoint = doc.get("checkpoint")
    if (
        not isinstance(objects, list)
        or not isinstance(checkpoint, str)
        or not checkpoint.startswith("checkpoints/")
    ):
        raise RecError(f"{where}: missing 'objects' list or 'checkpoint' path")
    for i, entry in enumerate(objects):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("crc32c"), str)
            or entry["path"] == MANIFEST
            or entry["path"].startswith("/")
            or ".." in entry["path"].split("/")
        ):
            raise RecError(f"{where}: objects[{i}] is not a {{path, size, crc32c}} entry inside the prefix")
    if not any(e["path"].startswith(checkpoint + "/") for e in objects):
        raise RecError(f"{where}: lists no object under its checkpoint {checkpoint}")
    return doc


def verify(handoff_prefix: str) -> str:
    """Check the handoff against its MANIFEST.json; return the verified checkpoint's path."""
    doc = read_manifest(handoff_prefix)
    dest = _Prefix(handoff_prefix)
    actual = dest.list()
    actual.pop(MANIFEST, None)
    problems = []
    listed = set()
    for entry in doc["objects"]:
        rel = entry["path"]
        listed.add(rel)
        got = actual.get(rel)
        if got is None:
            problems.append(f"{dest.full(rel)}: listed in {MANIFEST} but missing")
        elif got.size != entry["size"]:
            problems.append(f"{dest.full(rel)}: size {got.size} != {entry['size']} in {MANIFEST}")
        elif got.crc32c != entry["crc32c"]:
            problems.append(
                f"{dest.full(rel)}: crc32c {got.crc32c} != {entry['crc32c']} in {MANIFEST} (changed after publishing)"
            )
    for rel in sorted(set(actual) - listed):
        problems.append(f"{dest.full(rel)}: not listed in {MANIFEST} (added after publishing)")
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise RecError(f"handoff does not verify, refusing to use it: {problems[0]}{more}")
    return dest.full(doc["checkpoint"])


def manifest_path(handoff_prefix: str) -> str:
    return (
        posixpath.join(handoff_prefix.rstrip("/"), MANIFEST)
        if storage.is_gcs(handoff_prefix)
        else os.path.join(handoff_prefix, MANIFEST)
    )
