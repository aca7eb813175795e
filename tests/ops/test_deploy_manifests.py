"""The deployment files say what operators rely on: probes, non-root, secrets, persistence."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


DOCS = _documents()


def _one(kind: str, name: str = "falgate") -> dict[str, Any]:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _gateway_container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_every_manifest_parses_and_is_namespaced() -> None:
    assert {d["kind"] for d in DOCS} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
    }
    for doc in DOCS:
        assert doc.get("apiVersion"), doc["__file__"]
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"].get("namespace") == "falgate", doc["__file__"]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _one_kustomization()
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def _one_kustomization() -> dict[str, Any]:
    found = [d for d in DOCS if d["kind"] == "Kustomization"]
    assert len(found) == 1
    return found[0]


def test_probes_point_at_health_routes() -> None:
    container = _gateway_container()
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_gateway_runs_non_root_with_resources() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = _gateway_container()
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][section])
    # A read-only root needs somewhere to write: the data dir and /tmp are volumes.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/falgate", "/tmp"} <= mounts


def test_shutdown_grace_fits_in_termination_grace() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    config = _one("ConfigMap", "falgate-config")["data"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + int(config["FALGATE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > budget


def test_secret_keys_used_by_workloads_exist() -> None:
    secret = _one("Secret", "falgate-secrets")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    used = set()
    for doc in DOCS:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "falgate-secrets"
                    used.add(ref["key"])
    assert {"fal-key", "admin-token", "redis-url"} <= used
    assert used <= keys
    env_names = {e["name"] for e in _gateway_container()["env"]}
    assert {"FALGATE_FAL_KEY", "FALGATE_ADMIN_TOKEN", "FALGATE_REDIS_URL"} <= env_names
    # More than one replica: they must share one ledger archive, not a SQLite file each.
    assert _one("Deployment", "falgate")["spec"]["replicas"] > 1
    assert "FALGATE_LEDGER_DATABASE_URL" in env_names
    # Secrets stay out of the ConfigMap.
    config = _one("ConfigMap", "falgate-config")["data"]
    assert not {"FALGATE_FAL_KEY", "FAL_KEY", "FALGATE_ADMIN_TOKEN"} & set(config)
    assert _gateway_container()["envFrom"] == [{"configMapRef": {"name": "falgate-config"}}]


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert _one("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert _one("Service")["spec"]["ports"][0]["targetPort"] == "http"
    pdb = _one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "falgate",
    }
    assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_bundled_redis_persists_with_aof() -> None:
    redis = _one("StatefulSet", "falgate-redis")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["readinessProbe"] and container["livenessProbe"]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_has_healthchecks_and_persistent_redis() -> None:
    services = _compose()["services"]
    assert set(services) == {"gateway", "redis"}
    redis, gateway = services["redis"], services["gateway"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "healthcheck" in redis and "healthcheck" in gateway
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    env = gateway["environment"]
    assert env["FALGATE_REDIS_URL"] == "redis://redis:6379/0"
    assert env["FAL_KEY"] == "${FAL_KEY:-}"  # sandbox unless the operator sets a key
    assert env["FALGATE_ADMIN_TOKEN"].startswith("${FALGATE_ADMIN_TOKEN")
    assert env["FALGATE_HOST"] == "0.0.0.0"


def test_compose_file_is_valid_for_docker_compose() -> None:
    # Never skipped: `python3 dev.py test` installs docker-compose (Debian's) when it is missing.
    assert shutil.which("docker-compose"), "docker-compose is missing: run `python3 dev.py test`"
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_runs_unprivileged_with_a_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    stages = [rest for ins, rest in instructions if ins == "FROM"]
    assert len(stages) >= 2 and all(s.startswith("python:3.11-slim") for s in stages)
    final = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    healthcheck = " ".join(rest for ins, rest in final if ins == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "urllib" in healthcheck
    assert ("CMD", '["falgate", "serve"]') in final
    env = " ".join(rest for ins, rest in final if ins == "ENV")
    assert re.search(r"FALGATE_HOST=0\.0\.0\.0", env)
    build = " ".join(rest for ins, rest in instructions if ins == "RUN")
    assert "pip install ." in build
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "tests"} <= set(ignored)
