"""Values that reach Kubernetes manifests: loading and validation.

Every value is checked against the rule of the field it lands in (DNS-1123 names, GCS bucket
naming rules, container image references, relative data paths, bounded integers) before any
template sees it, and every error is one line naming the values file, the key and what is wrong.
The renderer additionally inserts values only as JSON scalars (see `tools.deploy.manifests`), so
even a value that slipped past these checks could not change the structure of a manifest; these
checks exist so that the user gets a clear message instead of a surprising manifest.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pathlib
import re
from typing import Any

from rec.errors import RecError

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALUES_DIR = ROOT / "k8s" / "values"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PROJECT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_LOCATION = re.compile(r"^[a-z]+-[a-z]+[0-9]+(-[a-z])?$")
_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_REL_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHECKPOINT_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HTTPS_URL = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~%/-]*)?$")
_GIT_REF = re.compile(r"^[A-Za-z0-9._/-]+$")
# Docker reference grammar (distribution/reference), simplified: [host[:port]/]path[:tag][@digest],
# lowercase path components, and a tag or digest is required (an untagged image means :latest).
_IMAGE = re.compile(
    r"^(?:(?P<host>[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


def _describe(value: Any) -> str:
    """repr() keeps hostile values (newlines, quotes) on one line in the error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def _syntax_hint(value: str) -> str:
    if any(c in value for c in "\n\r"):
        return " (contains a line break)"
    bad = sorted({c for c in value if c in ":{}[]#&*!|>'\"%@`,;$\\ \t"})
    if bad:
        return f" (contains {''.join(bad)!r})"
    return ""


def check_dns_label(value: Any, where: str, max_len: int = 63) -> str:
    if not isinstance(value, str) or not _DNS1123_LABEL.match(value) or len(value) > max_len:
        hint = _syntax_hint(value) if isinstance(value, str) else ""
        raise RecError(
            f"{where} = {_describe(value)}: not a DNS-1123 label (lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {max_len} characters){hint}"
        )
    return value


def check_dns_subdomain(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DNS1123_SUBDOMAIN.match(value) or len(value) > 253:
        hint = _syntax_hint(value) if isinstance(value, str) else ""
        raise RecError(
            f"{where} = {_describe(value)}: not a DNS-1123 name (lowercase letters, digits, '-', '.'){hint}"
        )
    return value


def check_bucket(value: Any, where: str) -> str:
    """GCS bucket naming rules (cloud.google.com/storage/docs/buckets#naming)."""
    problem = ""
    if not isinstance(value, str):
        problem = "not a string"
    elif value.startswith("gs://"):
        problem = "give the bucket name without gs://"
    elif not _BUCKET_CHARS.match(value):
        problem = (
            "use lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
        problem += _syntax_hint(value)
    elif len(value) < 3 or (len(value) > 63 and "." not in value) or len(value) > 222:
        problem = "3-63 characters (up to 222 with dots, each dot-separated part at most 63)"
    elif any(len(part) > 63 or not part for part in value.split(".")):
        problem = "each dot-separated part must be 1-63 characters"
    elif value.startswith("goog") or "google" in value or "g00gle" in value:
        problem = "names may not start with 'goog' or contain 'google'"
    else:
        try:
            ipaddress.ip_address(value)
            problem = "names may not be IP addresses"
        except ValueError:
            pass
    if problem:
        raise RecError(f"{where} = {_describe(value)}: not a valid GCS bucket name: {problem}")
    return value


def check_image(value: Any, where: str) -> str:
    match = _IMAGE.match(value) if isinstance(value, str) else None
    if not match:
        hint = _syntax_hint(value) if isinstance(value, str) else ""
        raise RecError(
            f"{where} = {_describe(value)}: not a container image reference "
            f"(registry/path:tag or registry/path@sha256:digest){hint}"
        )
    if not match.group("tag") and not match.group("digest"):
        raise RecError(
            f"{where} = {_describe(value)}: give a tag or digest (an untagged image means :latest)"
        )
    if match.group("tag") == "latest" and not match.group("digest"):
        raise RecError(
            f"{where} = {_describe(value)}: ':latest' is not reproducible; use a version tag or digest"
        )
    return value


def check_rel_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _REL_PATH.match(value) or ".." in value.split("/"):
        hint = _syntax_hint(value) if isinstance(value, str) else ""
        raise RecError(
            f"{where} = {_describe(value)}: expected a relative path of letters, digits, '.', '_', '-' "
            f"and '/' (no '..', no leading '/'){hint}"
        )
    return value


def check_config_path(value: Any, where: str) -> str:
    check_rel_path(value, where)
    if not value.startswith("configs/") or not value.endswith(".yaml"):
        raise RecError(
            f"{where} = {_describe(value)}: expected configs/<stage>/<name>.yaml (a file in the image)"
        )
    return value


def check_int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecError(f"{where} = {_describe(value)}: expected an integer in [{low}, {high}]")
    return value


def check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RecError(f"{where} = {_describe(value)}: expected true or false")
    return value


def check_env_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecError(f"{where}: expected a mapping of NAME: value")
    out = {}
    for name, val in value.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise RecError(f"{where}: {_describe(name)} is not an environment variable name")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise RecError(f"{where}.{name} = {_describe(val)}: expected a string (quote numbers)")
        text = str(val)
        if any(ord(c) < 32 for c in text):
            raise RecError(
                f"{where}.{name} = {_describe(val)}: control characters (line breaks) are not allowed"
            )
        if "{{" in text:  # these values are also embedded in Argo Workflows, which expand {{...}}
            raise RecError(
                f"{where}.{name} = {_describe(val)}: '{{{{' is Argo template syntax and is not allowed"
            )
        out[name] = text
    return dict(sorted(out.items()))


def check_tag(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _CHECKPOINT_TAG.match(value) or len(value) > 63:
        raise RecError(f"{where} = {_describe(value)}: expected a checkpoint tag such as rl_last")
    return value


def check_url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HTTPS_URL.match(value):
        raise RecError(f"{where} = {_describe(value)}: expected an https:// repository URL")
    return value


def check_git_ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _GIT_REF.match(value):
        raise RecError(f"{where} = {_describe(value)}: expected a branch, tag or commit")
    return value


def check_location(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _LOCATION.match(value):
        raise RecError(
            f"{where} = {_describe(value)}: expected a GCP region or zone such as us-east5 or us-east5-b"
        )
    return value


def check_project(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _PROJECT_ID.match(value):
        raise RecError(
            f"{where} = {_describe(value)}: not a GCP project id (6-30 lowercase letters, digits, '-', starting with a letter)"
        )
    return value


def check_kube_context(value: Any, where: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9_.:@/-]{1,253}$", value):
        raise RecError(f"{where} = {_describe(value)}: not a kubeconfig context name")
    return value


def check_run(value: Any, where: str) -> str:
    """Run names end up in JobSet names (at most 47 characters with the stage/dataset prefix)."""
    return check_dns_label(value, where, max_len=20)


@dataclasses.dataclass(frozen=True)
class EnvValues:
    project: str
    location: str
    cluster: str
    kube_context: str
    namespace: str
    bucket: str
    data_bucket: str
    image: str
    service_account: str
    workflow_service_account: str
    wandb_secret: str
    run: str
    max_restarts: int
    ttl_seconds_after_finished: int
    termination_grace_period_seconds: int
    tpu_run_as_root: bool
    privileged: bool
    fuse_host_network_pod_ksa: bool
    tpu_host_network: bool
    tpu_host_network_node_identity: bool
    priority_class: str
    kueue_queue: str
    argocd_namespace: str
    repo_url: str
    target_revision: str
    extra_env: dict
    name: str = "dev"  # the values file's stem

    @property
    def context(self) -> str:
        return self.kube_context or f"gke_{self.project}_{self.location}_{self.cluster}"


@dataclasses.dataclass(frozen=True)
class DatasetValues:
    name: str
    data_dir: str
    base_model: str
    sft_config: str
    rl_config: str
    eval_config: str
    handoff_tag: str
    eval_split: str


@dataclasses.dataclass(frozen=True)
class GrpoValues:
    name: str
    data_dir: str
    base_model: str
    config: str


_ENV_RULES = {
    "project": check_project,
    "location": check_location,
    "cluster": lambda v, w: check_dns_label(v, w, max_len=40),
    "kube_context": check_kube_context,
    "namespace": check_dns_label,
    "bucket": check_bucket,
    "data_bucket": lambda v, w: "" if v in ("", None) else check_bucket(v, w),
    "image": check_image,
    "service_account": check_dns_subdomain,
    "workflow_service_account": check_dns_subdomain,
    "wandb_secret": check_dns_subdomain,
    "run": check_run,
    "max_restarts": lambda v, w: check_int(v, w, 0, 10),
    "ttl_seconds_after_finished": lambda v, w: check_int(v, w, 3600, 90 * 86400),
    "termination_grace_period_seconds": lambda v, w: check_int(v, w, 30, 3600),
    "tpu_run_as_root": check_bool,
    "privileged": check_bool,
    "fuse_host_network_pod_ksa": check_bool,
    "tpu_host_network": check_bool,
    "tpu_host_network_node_identity": check_bool,
    "priority_class": lambda v, w: "" if v in ("", None) else check_dns_subdomain(v, w),
    "kueue_queue": lambda v, w: "" if v in ("", None) else check_dns_subdomain(v, w),
    "argocd_namespace": check_dns_label,
    "repo_url": check_url,
    "target_revision": check_git_ref,
    "extra_env": check_env_map,
}

_DATASET_RULES = {
    "name": lambda v, w: check_dns_label(v, w, max_len=16),
    "data_dir": check_rel_path,
    "base_model": check_rel_path,
    "sft_config": check_config_path,
    "rl_config": check_config_path,
    "eval_config": check_config_path,
    "handoff_tag": check_tag,
    "eval_split": lambda v, w: _choice(v, w, ("test", "valid")),
}

_GRPO_RULES = {
    "name": lambda v, w: check_dns_label(v, w, max_len=16),
    "data_dir": check_rel_path,
    "base_model": check_rel_path,
    "config": check_config_path,
}


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise RecError(f"{where} = {_describe(value)}: expected one of {', '.join(choices)}")
    return value


def read_text(path: pathlib.Path, where: str | None = None) -> str:
    """A file as UTF-8 text; an unreadable or non-UTF-8 file is a one-line RecError naming it."""
    where = where or _rel(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecError(f"{where}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def _read_mapping(path: pathlib.Path) -> dict:
    import yaml  # noqa: PLC0415 (deployment-only dependency)

    where = _rel(path)
    if not path.is_file():
        raise RecError(f"{where}: values file not found")
    text = read_text(path, where)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RecError(f"{where}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecError(f"{where}: expected a mapping of keys to values")
    return data


def validate_mapping(data: dict, rules: dict, source: str) -> dict:
    """Check every key of `data` with its rule; unknown and missing keys are errors."""
    unknown = sorted(set(map(str, data)) - set(rules))
    if unknown:
        raise RecError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(rules))})")
    missing = [k for k in rules if k not in data]
    if missing:
        raise RecError(f"{source}: missing key '{missing[0]}'")
    return {key: rule(data[key], f"{source}: '{key}'") for key, rule in rules.items()}


def _values_file(kind: str, name: str, where: str, values_dir: pathlib.Path) -> pathlib.Path:
    # The name is a DNS label before it becomes part of a path: no traversal, no odd characters.
    check_dns_label(name, where)
    return values_dir / kind / f"{name}.yaml"


def load_env(name: str, values_dir: pathlib.Path = VALUES_DIR) -> EnvValues:
    path = _values_file("env", name, "--env", values_dir)
    checked = validate_mapping(_read_mapping(path), _ENV_RULES, _rel(path))
    if checked["tpu_host_network"] and not checked["tpu_host_network_node_identity"]:
        raise RecError(
            f"{_rel(path)}: 'tpu_host_network' = true: with host networking Workload Identity does not "
            "reach the rec container, whose own gs:// reads and writes then use the node's service account; "
            "keep it false for one slice, or grant that account the bucket on purpose and set "
            "'tpu_host_network_node_identity: true' (docs/DEPLOY.md, identity)"
        )
    return EnvValues(**checked, name=name)


def load_dataset(
    name: str, values_dir: pathlib.Path = VALUES_DIR, config_root: pathlib.Path | None = None
) -> DatasetValues:
    """The dataset's values, with its run configs loaded from `config_root` (default: this checkout)."""
    path = _values_file("dataset", name, "--dataset", values_dir)
    checked = validate_mapping(_read_mapping(path), _DATASET_RULES, _rel(path))
    if checked["name"] != name:
        raise RecError(f"{_rel(path)}: 'name' = {checked['name']!r} must equal the file name {name!r}")
    ds = DatasetValues(**checked)
    check_dataset_configs(ds, _rel(path), CONFIG_ROOT if config_root is None else config_root)
    return ds


def load_grpo(
    name: str = "gsm8k", values_dir: pathlib.Path = VALUES_DIR, config_root: pathlib.Path | None = None
) -> GrpoValues:
    path = _values_file("grpo", name, "grpo values", values_dir)
    checked = validate_mapping(_read_mapping(path), _GRPO_RULES, _rel(path))
    grpo = GrpoValues(**checked)
    root = CONFIG_ROOT if config_root is None else config_root
    load_run_config(grpo.config, f"{_rel(path)}: 'config'", root)
    return grpo


# ---------------------------------------------------------------------------------------------
# Run configs named by the values (configs/<stage>/<name>.yaml, relative to the checkout, which is
# the image's working directory): each must exist and load with rec.config.load_config.

CONFIG_ROOT = ROOT
# The upload step publishes from the RL run directory (`rec handoff publish --run <rl run dir>`), which
# holds rl_last always and rl_best only when the RL config sets rl.best_metric (rec/train/rl.py).
RL_TAG_LAST = "rl_last"
RL_TAG_BEST = "rl_best"
# Sections `rec eval` never reads: a config that sets one of them is a training (sft/rl/grpo) config.
TRAINING_SECTIONS = ("train", "checkpoint", "rl", "grpo")


def load_run_config(rel: str, where: str, root: pathlib.Path):
    """rec.config.load_config of `root/rel`; every problem is one RecError line starting with `where`."""
    from rec.config import load_config  # noqa: PLC0415

    check_config_path(rel, where)  # configs/<stage>/<name>.yaml inside the checkout, nothing else
    path = root / rel
    if not path.is_file():
        raise RecError(
            f"{where} = {rel!r}: no such file in this checkout (the image is built from it, so the "
            f"pod would not find it either)"
        )
    try:
        return load_config(str(path))
    except RecError as exc:
        message = str(exc).removeprefix(f"{path}: ").replace(str(path), rel)
        raise RecError(f"{where} = {rel!r}: {message}") from None


def config_sections(rel: str, root: pathlib.Path) -> list[str]:
    """Top-level sections a (loadable) run config sets."""
    import yaml  # noqa: PLC0415

    data = yaml.safe_load(read_text(root / rel)) or {}
    return [str(k) for k in data] if isinstance(data, dict) else []


def eval_config_problem(rel: str, root: pathlib.Path) -> str:
    """'' if `rel` reads as an eval config, else what is wrong (it sets sections `rec eval` ignores)."""
    training = [s for s in TRAINING_SECTIONS if s in config_sections(rel, root)]
    if not training:
        return ""
    stage = "rl" if "rl" in training else "grpo" if "grpo" in training else "sft"
    return (
        f"sets {', '.join(training)}, which `rec eval` never reads: this is a {stage} (training) "
        f"config, not an eval config (e.g. configs/eval/<name>.yaml)"
    )


def handoff_tags(rl_cfg) -> list[str]:
    """Checkpoint tags the RL run directory will hold for this RL config."""
    return [RL_TAG_LAST] + ([RL_TAG_BEST] if rl_cfg.rl.best_metric else [])


def handoff_tag_problem(tag: str, rl_cfg, rl_config: str) -> str:
    tags = handoff_tags(rl_cfg)
    if tag in tags:
        return ""
    if tag == RL_TAG_BEST:
        return f"the RL run writes rl_best only when rl.best_metric is set, and {rl_config} does not set it (use rl_last)"
    return (
        f"not a tag the RL run produces (the upload step publishes from the RL run directory, which "
        f"holds {' and '.join(tags)})"
    )


def check_dataset_configs(ds: DatasetValues, source: str, root: pathlib.Path) -> None:
    """Load every run config the dataset names; check the eval config's stage and the handoff tag."""
    load_run_config(ds.sft_config, f"{source}: 'sft_config'", root)
    rl_cfg = load_run_config(ds.rl_config, f"{source}: 'rl_config'", root)
    load_run_config(ds.eval_config, f"{source}: 'eval_config'", root)
    problem = eval_config_problem(ds.eval_config, root)
    if problem:
        raise RecError(f"{source}: 'eval_config' = {ds.eval_config!r}: {problem}")
    problem = handoff_tag_problem(ds.handoff_tag, rl_cfg, ds.rl_config)
    if problem:
        raise RecError(f"{source}: 'handoff_tag' = {ds.handoff_tag!r}: {problem}")


def list_datasets(values_dir: pathlib.Path = VALUES_DIR) -> list[str]:
    return sorted(p.stem for p in (values_dir / "dataset").glob("*.yaml"))


def _rel(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# GRPO rollout fast-path switches, rendered into the GRPO pod's environment (see rollout_flag).
ROLLOUT_VARS = ("ROLLOUT_FAST_GENERATE", "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION")


def rollout_flag(name: str, environ: dict) -> str:
    """GRPO rollout fast paths: "1" unless the render's environment sets the variable to 0/false/off."""
    value = str(environ.get(name, "")).strip().lower()
    if value in ("0", "false", "no", "off"):
        return "0"
    if value in ("", "1", "true", "yes", "on"):
        return "1"
    raise RecError(f"environment {name}={environ.get(name)!r}: expected 1 or 0")
