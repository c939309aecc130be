"""Verified GCS handoff (rec.storage.handoff) against a real GCS API server on loopback."""

from __future__ import annotations

import base64
import json
import os
import zlib

import pytest

from rec import storage
from rec.errors import RecError
from rec.storage import handoff


def _files_of_run() -> dict[str, bytes]:
    """A run directory as training leaves it: two tags, an unfinished Orbax temp dir, extras."""
    return {
        "checkpoints/rl_last/40/params/manifest.ocdbt": b"ocdbt-manifest-40",
        "checkpoints/rl_last/40/params/d/0001": bytes(range(256)) * 12,
        "checkpoints/rl_last/40/meta/metadata": b'{"step": 40}',
        "checkpoints/rl_last/40/commit_success.txt": b"ok",
        "checkpoints/rl_last/50.orbax-checkpoint-tmp-1700000000/params/x": b"half written",
        "checkpoints/sft_best/12/params/d/0001": b"sft params",
        "tokenizer/tokenizer.json": b'{"model": "bpe"}',
        "tokenizer/tokenizer_config.json": b"{}",
        "config.yaml": b"run:\n  dir: x\n",
        "run_summary.json": b'{"train/steps": 40}',
        "metrics.jsonl": b'{"step": 1}\n',
    }


def _write_run(prefix: str) -> None:
    for rel, data in _files_of_run().items():
        storage.write_bytes(storage.join(prefix, rel), data)


EXPECTED = sorted(
    [
        "checkpoints/rl_last/40/params/manifest.ocdbt",
        "checkpoints/rl_last/40/params/d/0001",
        "checkpoints/rl_last/40/meta/metadata",
        "checkpoints/rl_last/40/commit_success.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "config.yaml",
        "run_summary.json",
    ]
)


def test_crc32c_matches_independent_implementation():
    # CRC32C check value from RFC 3720 (iSCSI): "123456789" -> 0xE3069283.
    assert handoff.crc32c_of_bytes(b"123456789") == base64.b64encode((0xE3069283).to_bytes(4, "big")).decode()
    # and it is not plain CRC32 (zlib), which a wrong library choice would give
    assert (
        handoff.crc32c_of_bytes(b"123456789")
        != base64.b64encode(zlib.crc32(b"123456789").to_bytes(4, "big")).decode()
    )


def test_publish_then_verify_on_gcs(gcs_bucket):
    run = f"gs://{gcs_bucket}/runs/industrial/r1/rl"
    dest = f"gs://{gcs_bucket}/handoff/industrial/r1/rl_last"
    _write_run(run)
    result = handoff.publish(run, dest, "rl_last", progress=False)
    assert result["checkpoint"] == f"{dest}/checkpoints/rl_last/40"
    assert (result["objects"], result["copied"], result["already_present"]) == (
        len(EXPECTED),
        len(EXPECTED),
        0,
    )
    manifest = json.loads(storage.read_text(f"{dest}/MANIFEST.json"))
    assert [o["path"] for o in manifest["objects"]] == EXPECTED
    files = _files_of_run()
    for entry in manifest["objects"]:
        assert entry["size"] == len(files[entry["path"]])
        assert entry["crc32c"] == handoff.crc32c_of_bytes(files[entry["path"]])
    # copies are byte-identical and nothing else was published
    for rel in EXPECTED:
        assert storage.read_bytes(f"{dest}/{rel}") == files[rel]
    assert not storage.exists(f"{dest}/metrics.jsonl")
    assert handoff.verify(dest) == f"{dest}/checkpoints/rl_last/40"


def test_publish_is_idempotent(gcs_bucket):
    run = f"gs://{gcs_bucket}/run"
    dest = f"gs://{gcs_bucket}/handoff"
    _write_run(run)
    handoff.publish(run, dest, "rl_last", progress=False)
    before = storage.read_bytes(f"{dest}/MANIFEST.json")
    again = handoff.publish(run, dest, "rl_last", progress=False)
    assert (again["copied"], again["already_present"]) == (0, len(EXPECTED))
    assert storage.read_bytes(f"{dest}/MANIFEST.json") == before
    handoff.verify(dest)


def test_publish_resumes_after_partial_upload(gcs_bucket):
    """A publish killed before MANIFEST.json: the prefix is not a handoff; a re-run completes it."""
    run = f"gs://{gcs_bucket}/run"
    dest = f"gs://{gcs_bucket}/handoff"
    _write_run(run)
    storage.write_bytes(f"{dest}/config.yaml", _files_of_run()["config.yaml"])  # the part that made it
    with pytest.raises(RecError, match="MANIFEST.json: missing"):
        handoff.verify(dest)
    result = handoff.publish(run, dest, "rl_last", progress=False)
    assert (result["copied"], result["already_present"]) == (len(EXPECTED) - 1, 1)
    handoff.verify(dest)


def test_no_clobber_conflict_refuses_to_overwrite(gcs_bucket):
    run = f"gs://{gcs_bucket}/run"
    dest = f"gs://{gcs_bucket}/handoff"
    _write_run(run)
    storage.write_bytes(f"{dest}/tokenizer/tokenizer.json", b"someone else's tokenizer")
    with pytest.raises(
        RecError, match=r"tokenizer/tokenizer.json: already exists with different content.*refusing"
    ):
        handoff.publish(run, dest, "rl_last", progress=False)
    assert storage.read_bytes(f"{dest}/tokenizer/tokenizer.json") == b"someone else's tokenizer"
    assert not storage.exists(f"{dest}/MANIFEST.json")


def test_gcs_generation_precondition_is_what_stops_the_overwrite(gcs_bucket):
    """The no-clobber write itself (not only the comparison) refuses an existing object."""
    dest = handoff._Prefix(f"gs://{gcs_bucket}/h")
    assert dest.put_bytes_no_clobber("a.txt", b"first") is True
    assert dest.put_bytes_no_clobber("a.txt", b"second") is False
    assert storage.read_bytes(f"gs://{gcs_bucket}/h/a.txt") == b"first"


def test_different_manifest_is_a_conflict(gcs_bucket):
    run = f"gs://{gcs_bucket}/run"
    dest = f"gs://{gcs_bucket}/handoff"
    _write_run(run)
    handoff.publish(run, dest, "rl_last", progress=False)
    # same objects, but described from another run prefix: a different publication
    other = f"gs://{gcs_bucket}/other-run"
    _write_run(other)
    with pytest.raises(RecError, match="MANIFEST.json: already exists and describes a different publication"):
        handoff.publish(other, dest, "rl_last", progress=False)


def test_verify_refuses_tampered_object(gcs_bucket):
    run = f"gs://{gcs_bucket}/run"
    dest = f"gs://{gcs_bucket}/handoff"
    _write_run(run)
    handoff.publish(run, dest, "rl_last", progress=False)
    original = storage.read_bytes(f"{dest}/checkpoints/rl_last/40/params/d/0001")
    tampered = bytes([original[0] ^ 1]) + original[1:]  # same size, one bit flipped
    storage.write_bytes(f"{dest}/checkpoints/rl_last/40/params/d/0001", tampered)
    with pytest.raises(RecError, match=r"params/d/0001: crc32c .* \(changed after publishing\)"):
        handoff.verify(dest)


def test_verify_refuses_missing_extra_and_resized_objects(gcs_bucket):
    run = f"gs://{gcs_bucket}/run"
    dest = f"gs://{gcs_bucket}/handoff"
    _write_run(run)
    handoff.publish(run, dest, "rl_last", progress=False)
    storage.write_bytes(f"{dest}/checkpoints/rl_last/40/params/extra", b"x")
    with pytest.raises(RecError, match="params/extra: not listed in MANIFEST.json"):
        handoff.verify(dest)
    storage.gcs_client().bucket(gcs_bucket).blob("handoff/checkpoints/rl_last/40/params/extra").delete()
    storage.write_bytes(f"{dest}/config.yaml", b"longer config than before\n")
    with pytest.raises(RecError, match=r"config.yaml: size \d+ != \d+"):
        handoff.verify(dest)
    storage.gcs_client().bucket(gcs_bucket).blob("handoff/config.yaml").delete()
    with pytest.raises(RecError, match="config.yaml: listed in MANIFEST.json but missing"):
        handoff.verify(dest)


def test_verify_refuses_missing_or_broken_manifest(gcs_bucket):
    dest = f"gs://{gcs_bucket}/handoff"
    storage.write_bytes(f"{dest}/checkpoints/rl_last/1/x", b"x")
    with pytest.raises(RecError, match=r"handoff/MANIFEST.json: missing"):
        handoff.verify(dest)
    storage.write_bytes(f"{dest}/MANIFEST.json", b"{not json")
    with pytest.raises(RecError, match="not valid JSON"):
        handoff.verify(dest)


def test_publish_errors_name_what_is_missing(gcs_bucket):
    run = f"gs://{gcs_bucket}/run"
    storage.write_bytes(f"{run}/checkpoints/sft_best/3/x", b"x")
    with pytest.raises(
        RecError, match=r"checkpoints/rl_last: no finalised checkpoint step \(tags present: sft_best\)"
    ):
        handoff.publish(run, f"gs://{gcs_bucket}/h", "rl_last", progress=False)
    # on gs:// Orbax writes a step in place and its commit marker last: without it, not finalised
    with pytest.raises(RecError, match=r"sft_best: no finalised checkpoint step: step\(s\) 3 have no commit_success"):
        handoff.publish(run, f"gs://{gcs_bucket}/h", "sft_best", progress=False)
    with pytest.raises(RecError, match=r"sft_best/3: is not finalised \(no commit_success.txt\); finalised steps: none"):
        handoff.publish(run, f"gs://{gcs_bucket}/h", "sft_best", step=3, progress=False)
    storage.write_bytes(f"{run}/checkpoints/sft_best/3/commit_success.txt", b"ok")
    with pytest.raises(RecError, match=r"sft_best/4: does not exist; finalised steps: 3"):
        handoff.publish(run, f"gs://{gcs_bucket}/h", "sft_best", step=4, progress=False)
    with pytest.raises(RecError, match="tokenizer/: missing"):
        handoff.publish(run, f"gs://{gcs_bucket}/h", "sft_best", progress=False)
    assert not storage.exists(f"gs://{gcs_bucket}/h")  # the refused publishes wrote nothing
    with pytest.raises(RecError, match="must not contain one another"):
        handoff.publish(run, f"{run}/handoff", "sft_best", progress=False)
    with pytest.raises(RecError, match="must not contain one another"):
        handoff.publish(run, f"gs://{gcs_bucket}", "sft_best", progress=False)


def test_step_choice_prefers_committed_steps(tmp_path):
    run = tmp_path / "run"
    for rel in (
        "checkpoints/t/7/commit_success.txt",
        "checkpoints/t/7/a",
        "checkpoints/t/9/a",
        "checkpoints/t/10.orbax-checkpoint-tmp-5/a",
    ):
        storage.write_bytes(str(run / rel), b"x")
    # step 9 has no commit marker while step 7 has one: 9 was not finalised
    assert handoff.choose_step(handoff._Prefix(str(run)), "t") == 7
    storage.write_bytes(str(run / "checkpoints/t/9/commit_success.txt"), b"x")
    assert handoff.choose_step(handoff._Prefix(str(run)), "t") == 9


def test_local_publish_verify_and_tamper(tmp_path):
    run, dest = str(tmp_path / "run"), str(tmp_path / "handoff")
    _write_run(run)
    assert handoff.publish(run, dest, "rl_last", progress=False)["copied"] == len(EXPECTED)
    assert handoff.publish(run, dest, "rl_last", progress=False)["already_present"] == len(EXPECTED)
    assert handoff.verify(dest) == os.path.join(dest, "checkpoints/rl_last/40")
    with open(os.path.join(dest, "tokenizer/tokenizer.json"), "r+b") as f:
        f.write(b"[")
    with pytest.raises(RecError, match="tokenizer.json: crc32c"):
        handoff.verify(dest)


def test_refused_publish_leaves_the_existing_handoff_intact(tmp_path, monkeypatch):
    """A second publication into a used prefix is refused before anything is copied, so the first
    handoff still verifies; the same publication under another spelling of the run is a re-run."""
    run, dest = tmp_path / "run", tmp_path / "handoff"
    _write_run(str(run))
    handoff.publish(str(run), str(dest), "rl_last", progress=False)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    with pytest.raises(RecError, match="MANIFEST.json: already exists and describes a different publication"):
        handoff.publish(str(run), str(dest), "sft_best", progress=False)
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert handoff.verify(str(dest)).endswith("checkpoints/rl_last/40")
    monkeypatch.chdir(tmp_path)
    again = handoff.publish("./run/", str(dest), "rl_last", progress=False)
    assert again["already_present"] == len(EXPECTED)
    # a handoff inside the run (spelled relatively), or a run inside the handoff: refused
    with pytest.raises(RecError, match="must not contain one another"):
        handoff.publish(str(run), "run/../run/h", "rl_last", progress=False)
    with pytest.raises(RecError, match="must not contain one another"):
        handoff.publish(str(run), str(tmp_path), "rl_last", progress=False)


def test_handoff_files_are_readable_by_other_users(tmp_path):
    """An eval job may run as another uid on a shared filesystem: the copies get the usual
    umask-based mode, not the private mode of a temporary file."""
    run, dest = tmp_path / "run", tmp_path / "handoff"
    _write_run(str(run))
    old = os.umask(0o022)
    try:
        handoff.publish(str(run), str(dest), "rl_last", progress=False)
    finally:
        os.umask(old)
    modes = {oct(p.stat().st_mode & 0o777) for p in dest.rglob("*") if p.is_file()}
    assert modes == {"0o644"}


def test_gcs_to_local_and_cli(gcs_bucket, tmp_path, capsys):
    from rec.cli import main

    run = f"gs://{gcs_bucket}/run"
    _write_run(run)
    dest = str(tmp_path / "local-handoff")
    assert main(["handoff", "publish", "--run", run, "--to", dest, "--tag", "rl_last", "--no-progress"]) == 0
    assert main(["handoff", "verify", dest]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join("local-handoff", "checkpoints/rl_last/40"))
    os.remove(os.path.join(dest, "MANIFEST.json"))
    assert main(["handoff", "verify", dest]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "MANIFEST.json: missing" in err and err.count("\n") == 1


def test_failed_writes_leave_no_temporary_file(tmp_path):
    """A write that fails midway (here: the file-size limit, as a full disk would) raises and leaves
    neither the target nor a temporary file. Run in a child process: the limit is process-wide."""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from rec import storage\n"
        "from rec.storage import handoff\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "root = sys.argv[1]\n"
        "src = root + '/src'\n"
        "failed = 0\n"
        "for write in (lambda: storage.write_bytes(root + '/a/file', b'0123456789'),\n"
        "              lambda: handoff._Prefix(root + '/h').put_bytes_no_clobber('x/y', b'0123456789'),\n"
        "              lambda: handoff._Prefix(root + '/h').put_from_no_clobber(handoff._Prefix(root), 'src', 'z')):\n"
        "    try:\n"
        "        write()\n"
        "    except OSError:\n"
        "        failed += 1\n"
        "print(failed)\n"
    )
    (tmp_path / "src").write_bytes(b"0123456789")  # written here, without the limit
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["src"]
