"""The real image: built with buildah (no daemon, chroot isolation) and run through its ENTRYPOINT.

The base is the official python:3.12-slim-bookworm where a registry answers; where none does (CI),
image/debian-base.sh makes one from Debian packages with debootstrap. Behind a TLS-intercepting
proxy, a containers.conf bind-mounts the host's CA bundle read-only into every RUN step, so pip
trusts the proxy during the build and nothing of it is baked into the image.

Slow (a few minutes: the dependency layer is ~2 GB), and one xdist group: the image is built once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
OFFICIAL_BASE = "docker.io/library/python:3.12-slim-bookworm"
LOCAL_BASE = "localhost/rec-test-base:bookworm"
TAG = "localhost/rec:image-test"
HOST_CA = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")
ENTRYPOINT_PATH = "/usr/local/bin/rec-entrypoint"

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("image-build")]


def _run(cmd, timeout=900, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _image_exists(name: str) -> bool:
    return _run(["buildah", "inspect", "--type", "image", name], check=False, timeout=60).returncode == 0


def _base_image(env: dict) -> str:
    """The official slim base if it can be pulled within a minute, else a debootstrapped one."""
    try:
        pulled = _run(["buildah", "pull", "--retry", "0", OFFICIAL_BASE], check=False, timeout=90, env=env)
        if pulled.returncode == 0:
            return OFFICIAL_BASE
    except subprocess.TimeoutExpired:
        pass
    if not _image_exists(LOCAL_BASE):
        _run(["bash", str(ROOT / "image" / "debian-base.sh"), LOCAL_BASE], timeout=900, env=env)
    return LOCAL_BASE


def _build_env(tmp: pathlib.Path) -> dict:
    env = {**os.environ, "ENGINE": "buildah", "IMAGE": TAG}
    if HOST_CA.is_file():  # trust what the host trusts (a proxy's CA) in RUN steps, read-only
        conf = tmp / "containers.conf"
        conf.write_text(f'[containers]\nvolumes = ["{HOST_CA}:{HOST_CA}:ro"]\n')
        env["CONTAINERS_CONF"] = str(conf)
    return env


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("building with buildah --isolation chroot needs root")
    missing = [tool for tool in ("buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install buildah debootstrap; .ci/run does)")
    tmp = tmp_path_factory.mktemp("image")
    env = _build_env(tmp)
    env["BASE_IMAGE"] = _base_image(env)
    start = time.monotonic()
    _run(["bash", str(ROOT / "image" / "build.sh")], timeout=1800, env=env)
    print(f"image built in {time.monotonic() - start:.0f} s on {env['BASE_IMAGE']}")
    return {"tag": TAG, "env": env, "tmp": tmp}


@pytest.fixture(scope="module")
def container(image):
    """A working container of the image, its root filesystem mounted on the host."""
    name = _run(["buildah", "from", "--pull=never", image["tag"]]).stdout.strip()
    rootfs = pathlib.Path(_run(["buildah", "mount", name]).stdout.strip())
    yield {"name": name, "rootfs": rootfs}
    _run(["buildah", "umount", name], check=False)
    _run(["buildah", "rm", name], check=False)


def _config(tag: str) -> dict:
    return json.loads(_run(["buildah", "inspect", "--type", "image", tag]).stdout)


def _entrypoint(tag: str) -> list[str]:
    return list(_config(tag)["OCIv1"]["config"]["Entrypoint"])


def _in_image(container, image, uid: int, *args, timeout=900, popen=False, **kwargs):
    """Run `args` through the image's real ENTRYPOINT as `uid`, in its working directory."""
    cmd = ["buildah", "run", "--isolation", "chroot", "--user", f"{uid}:{uid}", "--env", "JAX_PLATFORMS=cpu",
           container["name"], "--", *_entrypoint(image["tag"]), *args]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    return _run(cmd, timeout=timeout, check=False, **kwargs)


def test_image_config_and_layers(image):
    config = _config(image["tag"])["OCIv1"]
    assert config["config"]["Entrypoint"] == [ENTRYPOINT_PATH]
    assert config["config"]["Cmd"] == ["rec", "--help"]
    assert config["config"]["User"] == "1000:1000" and config["config"]["WorkingDir"] == "/work"
    history = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
    deps = [i for i, h in enumerate(history) if "python3 -m venv /opt/rec" in h]
    code = [i for i, h in enumerate(history) if "/tmp/rec-src[tpu,gcs,wandb]" in h]
    assert len(deps) == 1 and len(code) == 1 and deps[0] < code[0], history
    env = " ".join(config["config"].get("Env") or [])
    for word in ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIALS"):
        assert word not in env.upper(), env


def test_code_edit_rebuilds_only_the_code_layers(image):
    """--layers: the dependency layer is reused when only the code changes."""
    context = image["tmp"] / "context"
    _run(["bash", str(ROOT / "image" / "build.sh"), "--context-only", str(context)])
    with open(context / "rec" / "__init__.py", "a") as f:
        f.write("# edited by the image test\n")
    edited = f"{TAG}-edited"
    _run(["buildah", "bud", "--layers", "--isolation", "chroot", "--pull=never", "-f", str(context / "image" / "Dockerfile"),
          "--build-arg", f"BASE_IMAGE={image['env']['BASE_IMAGE']}", "-t", edited, str(context)],
         timeout=900, env=image["env"])
    try:
        before = _config(image["tag"])["OCIv1"]["rootfs"]["diff_ids"]
        after = _config(edited)["OCIv1"]["rootfs"]["diff_ids"]
        base_layers = len(_config(image["env"]["BASE_IMAGE"])["OCIv1"]["rootfs"]["diff_ids"])
        # base + requirements copy + the venv: shared; the code layers differ
        assert before[: base_layers + 2] == after[: base_layers + 2]
        assert before != after
    finally:
        _run(["buildah", "rmi", edited], check=False)


def test_no_credentials_and_no_leftovers_in_the_image(container):
    root = container["rootfs"]
    for rel in ("app", "tmp/rec-src", "tmp/requirements-tpu.txt", "etc/pip.conf", "root/.netrc", "root/.pypirc",
                "home/rec/.netrc", "home/rec/.config/pip/pip.conf", "root/.docker/config.json",
                "home/rec/.config/gcloud"):
        assert not (root / rel).exists(), rel
    assert not list((root / "opt" / "rec").glob("lib/python3*/site-packages/rec/../build"))
    assert not list(root.glob("opt/rec/lib/python3*/site-packages/*.egg-link"))
    for top in ("etc", "root", "home", "work", "usr/local/bin"):
        for path in (root / top).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1_000_000:
                data = path.read_bytes()
                assert b"PRIVATE KEY-----" not in data, path
    # the package carries its configs (the manifests name configs/<stage>/<name>.yaml)
    assert list(root.glob("opt/rec/lib/python3*/site-packages/rec/configs/sft/industrial-v6e16.yaml"))


@pytest.mark.parametrize("uid", [1000, 0])
def test_help_demo_and_config_error_through_the_entrypoint(image, container, uid):
    result = _in_image(container, image, uid, "rec", "--help", timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: rec"), result.stdout + result.stderr

    out = f"runs/demo-{uid}"
    result = _in_image(container, image, uid, "rec", "demo", "--quick", "--out", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = container["rootfs"] / "work" / out / "report.html"
    assert report.is_file() and report.stat().st_uid == uid

    result = _in_image(container, image, uid, "rec", "sft", "--config", "configs/tiny/sft.yaml", "train.nosuch=1",
                       timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().startswith("error: ") and "nosuch" in result.stderr, result.stderr


def _entrypoint_pid(root_pid: int, marker: str) -> int | None:
    """The entrypoint process under `buildah run` (same PID namespace with chroot isolation)."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # python3 /usr/local/bin/rec-entrypoint ..., not buildah-chroot-exec (which has the same argv[1])
        if (len(argv) > 2 and b"buildah" not in argv[0] and argv[1].decode() == ENTRYPOINT_PATH
                and marker.encode() in b" ".join(argv)):
            return int(proc.name)
    return None


@pytest.mark.parametrize("uid", [1000, 0])
def test_sigterm_during_sft_saves_a_checkpoint_and_exits_143(image, container, uid):
    work = container["rootfs"] / "work"
    data = f"runs/sigterm-data-{uid}"
    assert _in_image(container, image, uid, "rec", "data", "synth", "--out", data, "--users", "60", "--items", "24",
                     timeout=300).returncode == 0
    assert _in_image(container, image, uid, "rec", "tokenizer", "build", "--dataset", data, "--out", f"{data}/tokenizer",
                     timeout=300).returncode == 0, "tokenizer"
    run = f"runs/sigterm-sft-{uid}"
    proc = _in_image(container, image, uid, "rec", "sft", "--config", "configs/tiny/sft.yaml", f"run.dir={run}",
                     f"data.dir={data}", f"model.tokenizer={data}/tokenizer", "run.progress=false", "train.steps=100000",
                     "checkpoint.every_steps=100000", popen=True)
    try:
        deadline = time.monotonic() + 600
        metrics = work / run / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        pid = _entrypoint_pid(proc.pid, run)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        status = proc.wait(timeout=300)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 143, output[-3000:]
    assert "stopped by SIGTERM at step" in output, output[-3000:]
    saved = [p.name for p in (work / run / "checkpoints" / "sft_last").iterdir() if p.name.isdigit()]
    assert saved and (work / run).stat().st_uid == uid, output[-3000:]
    assert not (work / run / "COMPLETED.json").exists()  # stopped, not finished
