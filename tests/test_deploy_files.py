"""Checks on deploy/: the files parse, their references resolve, and the commands they run exist."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet.demo.processes import LocalFleet

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load_yaml_documents(path), f"{path} holds no YAML document"


def test_compose_references_resolve() -> None:
    compose_dir = DEPLOY / "compose"
    compose = load_yaml_documents(compose_dir / "compose.yaml")[0]
    build = compose["services"]["orchestrator"]["build"]
    context = (compose_dir / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose_dir / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name} uses undeclared secret {secret}"
        for dependency in service.get("depends_on", []):
            assert dependency in compose["services"], f"{name} depends on unknown service {dependency}"
    secrets_readme = (compose_dir / "secrets" / "README.md").read_text()
    for secret in compose["secrets"].values():
        assert Path(secret["file"]).name in secrets_readme, f"{secret['file']} is not documented"


def test_compose_orchestrator_environment_names_real_settings() -> None:
    compose = load_yaml_documents(DEPLOY / "compose" / "compose.yaml")[0]
    from edgefleet.common.config import env_name
    from edgefleet.orchestrator.config import OrchestratorConfig

    known = {env_name(name) for name in OrchestratorConfig.__dataclass_fields__}
    for name in compose["services"]["orchestrator"]["environment"]:
        assert name in known or not name.startswith("EDGEFLEET_"), f"{name} is not an orchestrator setting"


def test_prometheus_scrapes_the_compose_orchestrator() -> None:
    config = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == ["orchestrator:9464"]


def test_dockerfile_commands_and_sources_exist() -> None:
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+?) \S+$", dockerfile, flags=re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), f"Dockerfile copies missing {item}"
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, flags=re.MULTILINE).group(1))
    assert entrypoint[0] in SCRIPTS
    healthcheck = json.loads(re.search(r"HEALTHCHECK .* CMD (\[.+\])$", dockerfile, flags=re.MULTILINE).group(1))
    assert healthcheck[0] in SCRIPTS
    extras = re.findall(r"'\.\[(\w+)\]'", dockerfile)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras and all(extra in optional for extra in extras)


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    kustomization = load_yaml_documents(DEPLOY / "kubernetes" / "kustomization.yaml")[0]
    objects = {}
    # secret.yaml is not a resource of the kustomization but documents the Secret that it references.
    for resource in [*kustomization["resources"], "secret.yaml"]:
        for document in load_yaml_documents(DEPLOY / "kubernetes" / resource):
            objects[document["kind"]] = document
    return objects


def test_kustomization_leaves_secret_out() -> None:
    """kubectl apply -k would otherwise replace the operator's Secret with secret.yaml's placeholders."""
    kustomization = load_yaml_documents(DEPLOY / "kubernetes" / "kustomization.yaml")[0]
    assert "secret.yaml" not in kustomization["resources"]
    assert "secretGenerator" not in kustomization


def test_kubernetes_references_resolve() -> None:
    objects = kubernetes_objects()
    deployment = objects["Deployment"]
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert objects["Service"]["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    container = template["spec"]["containers"][0]
    port_names = {port["name"] for port in container["ports"]}
    for port in objects["Service"]["spec"]["ports"]:
        assert port["targetPort"] in port_names
    secret_keys = set(objects["Secret"]["stringData"])
    for variable in container["env"]:
        reference = variable.get("valueFrom", {}).get("secretKeyRef")
        if reference:
            assert reference["name"] == objects["Secret"]["metadata"]["name"]
            assert reference["key"] in secret_keys
    for volume in template["spec"]["volumes"]:
        for item in volume.get("secret", {}).get("items", []):
            assert item["key"] in secret_keys, f"volume {volume['name']} mounts missing secret key {item['key']}"
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] in SCRIPTS, f"{probe} runs {command[0]}, which the package does not install"
        ca_file = command[command.index("--ca-cert") + 1]
        assert any(ca_file.startswith(m["mountPath"]) for m in container["volumeMounts"]), f"{ca_file} is not mounted"
    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v
    }
    assert claims == {objects["PersistentVolumeClaim"]["metadata"]["name"]}
    mounted = {m["name"] for m in container["volumeMounts"]}
    assert mounted == {v["name"] for v in template["spec"]["volumes"]}


def test_kubernetes_runs_image_user() -> None:
    # runAsNonRoot can only verify a numeric USER, and the pod must run as the uid that owns the data.
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, flags=re.MULTILINE)
    created = re.search(r"useradd --system --uid (\d+)", dockerfile)
    deployment = load_yaml_documents(DEPLOY / "kubernetes" / "deployment.yaml")[0]
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert user is not None, "the Dockerfile's USER is not numeric uid:gid"
    assert created is not None and created.group(1) == user.group(1)
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user.group(1)), int(user.group(2)))
    assert context["runAsNonRoot"] is True


def test_kubernetes_arguments_are_orchestrator_flags() -> None:
    container = kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    from edgefleet.orchestrator.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([*container["args"], "--help"])
    assert exit_info.value.code == 0
    from edgefleet.common.config import env_name
    from edgefleet.orchestrator.config import OrchestratorConfig

    known = {env_name(name) for name in OrchestratorConfig.__dataclass_fields__}
    for variable in container["env"]:
        assert variable["name"] in known, f"{variable['name']} is not an orchestrator setting"


def test_dockerfile_environment_names_real_settings() -> None:
    from edgefleet.common.config import env_name
    from edgefleet.orchestrator.config import OrchestratorConfig

    known = {env_name(name) for name in OrchestratorConfig.__dataclass_fields__}
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    names = set(re.findall(r"\b(EDGEFLEET_[A-Z_]+)=", dockerfile))
    assert names, "the Dockerfile sets no EDGEFLEET_ variables"
    assert names <= known, f"not orchestrator settings: {sorted(names - known)}"


def test_config_examples_load() -> None:
    from edgefleet.agent.config import AgentConfig
    from edgefleet.common.config import load_config
    from edgefleet.orchestrator.config import OrchestratorConfig

    agent = load_config(AgentConfig, file=DEPLOY / "config" / "agent.toml", environ={})
    orchestrator = load_config(OrchestratorConfig, file=DEPLOY / "config" / "orchestrator.toml", environ={})
    assert agent.cert is not None
    assert orchestrator.operator_listen


def grafana_metric_names() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "edgefleet-fleet.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    return {name for expr in expressions for name in re.findall(r"\b(edgefleet_[a-z_]+)\b", expr)}


@pytest.fixture(scope="module")
def scraped_metric_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    work = tmp_path_factory.mktemp("deploy")
    fleet = LocalFleet(work, secure=False)
    port_file = work / "metrics.port"
    fleet.start_orchestrator(extra_args=("--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(port_file)))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{int(port_file.read_text())}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        healthy = subprocess.run(
            [sys.executable, "-m", "edgefleet.cli.main", "--insecure", "--orchestrator", fleet.address, "health"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.strip() == "SERVING"
        names = set()
        for family in text_string_to_metric_families(text):
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
        yield names
    finally:
        fleet.stop()


def test_grafana_dashboard_uses_exported_metrics(scraped_metric_names: set[str]) -> None:
    missing = grafana_metric_names() - scraped_metric_names
    assert not missing, f"the dashboard queries metrics the orchestrator does not export: {sorted(missing)}"


def test_kubernetes_readiness_follows_database() -> None:
    """Readiness checks a service, which follows the database; liveness checks the whole server."""
    from edgefleet.orchestrator.server import SERVICE_NAMES

    container = kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    readiness = container["readinessProbe"]["exec"]["command"]
    liveness = container["livenessProbe"]["exec"]["command"]
    assert readiness[-2] == "--service"
    assert readiness[-1] in SERVICE_NAMES
    assert "--service" not in liveness


def health_check_hosts() -> set[str]:
    """Return the hosts that the image's HEALTHCHECK and the Kubernetes probes pass to --orchestrator."""
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    match = re.search(r"HEALTHCHECK .* CMD (\[.+\])$", dockerfile, flags=re.MULTILINE)
    assert match is not None, "the Dockerfile has no HEALTHCHECK in exec form"
    healthcheck = json.loads(match.group(1))
    container = kubernetes_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    commands = [healthcheck, *(container[probe]["exec"]["command"] for probe in ("readinessProbe", "livenessProbe"))]
    return {command[command.index("--orchestrator") + 1].rpartition(":")[0] for command in commands}


def pki_init_hosts(text: str) -> list[list[str]]:
    """Return the --host values of each `edgefleet pki init` command in text."""
    recipes = []
    for match in re.finditer(r"edgefleet pki init ([^`\n]+)", text):
        words = shlex.split(match.group(1))
        hosts = []
        for option, value in zip(words[::2], words[1::2], strict=False):
            if option == "--host":
                hosts.append(value)
            elif option != "--dir":
                break
        recipes.append(hosts)
    return recipes


@pytest.mark.parametrize(
    "path",
    ["container/Dockerfile", "compose/compose.yaml", "kubernetes/secret.yaml"],
)
def test_pki_recipe_names_health_check_host(path: str, tmp_path: Path) -> None:
    """The server certificate from a deploy file's `pki init` command must name the host that the health
    checks dial. Otherwise the CLI rejects the TLS handshake, and every health check and probe fails."""
    from cryptography import x509

    from edgefleet.cli.main import main

    recipes = pki_init_hosts((DEPLOY / path).read_text())
    assert recipes, f"{path} shows no `edgefleet pki init` command"
    for number, hosts in enumerate(recipes):
        directory = tmp_path / str(number)
        assert main(["pki", "init", "--dir", str(directory), *(f"--host={host}" for host in hosts)]) == 0
        certificate = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
        named = {*names.get_values_for_type(x509.DNSName), *addresses}
        missing = health_check_hosts() - named
        assert not missing, f"{path}: `pki init {' '.join(hosts)}` writes a certificate without {sorted(missing)}"


def test_config_example_serves_scraped_metrics_port() -> None:
    """The systemd path (deploy/config) must serve /metrics on the port that deploy/prometheus scrapes."""
    from edgefleet.common.config import load_config
    from edgefleet.orchestrator.config import OrchestratorConfig, parse_listen_address

    orchestrator = load_config(OrchestratorConfig, file=DEPLOY / "config" / "orchestrator.toml", environ={})
    config = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert orchestrator.metrics_listen, "orchestrator.toml does not set metrics_listen, so nothing serves /metrics"
    port = parse_listen_address(orchestrator.metrics_listen, "metrics_listen", allow_empty_host=True).port
    assert {int(target.rpartition(":")[2]) for target in targets} == {port}
