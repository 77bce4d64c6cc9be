"""The master's Helm chart: lint, render, validate against the Kubernetes 1.33 schemas, and
run what it renders.

No cluster is involved. The real helm binary (``make`` puts it next to the venv's Python)
lints and renders the chart, including its values.schema.json checks;
``kubernetes_validate`` checks every rendered object against the official strict schemas;
the master's own settings loader and command-line parser read the rendered config file and
container command line; and one test starts the rendered command against a throwaway
PostgreSQL and probes it the way the kubelet does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import dataclasses
import http.client
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from master import cli as master_cli
from master.config import MasterConfig
from master.edge.proxy import envoy_binary
from master.weights import endpoints
from platform_common import config as cfg
from platform_network.v1 import registry_pb2, registry_pb2_grpc
from tests.edge.envoy_support import UpstreamServer, raw_request
from tests.helpers import ACTIVE
from tests.helpers import spec as challenge_spec
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "platform-master"
CI_VALUES = CHART / "ci" / "production-values.yaml"
VENV_BIN = Path(sys.executable).parent
HELM = VENV_BIN / "helm"
HELM_VERSION = "v3.17.2"
KUBERNETES_VERSION = "1.33.0"
RELEASE = "platform"
NAMESPACE = "platform-system"

Obj = dict[str, Any]
T = TypeVar("T")

# Settings of the master the chart sets itself, from dedicated values or secrets.
SET_BY_CHART = {
    "listen",
    "metrics_listen",
    "production",
    "image_allowlist",
    "database_url",
    "admin_token",
    "token_key_file",
    "hotkey_file",
    "shim_endpoints_file",
    "edge_listen",
    "edge_authz_address",
    "edge_token_file",
    "edge_tls_cert",
    "edge_tls_key",
}
# Settings the chart deliberately never sets, and why.
NOT_FOR_KUBERNETES = {
    "admin_token_file": "the token comes from a Secret through PLATFORM_ADMIN_TOKEN",
    "ready_file": "readiness is the gRPC health probe",
    "reuse_port": "replicas are pods behind a Service; sharing a port is for masters on one host",
    "hotkey": "the hotkey is a file from an existing Secret (hotkey_file), not an env variable",
    "edge_token": "the edge token is a file from a Secret (edge_token_file), not an env variable",
    "edge_envoy": "in Kubernetes Envoy runs as its own Deployment, not as the master's child",
    "edge_envoy_dir": "only for the local Envoy of --edge-envoy",
    "edge_admin_listen": "only for the local Envoy of --edge-envoy",
    # The chart's Envoy takes them from its own bootstrap values (edge.maxConnections, ...).
    "edge_max_connections": "only for the local Envoy of --edge-envoy",
    "edge_max_heap_bytes": "only for the local Envoy of --edge-envoy",
    "runtime_dir": "only for the local runtime",
    "runtime_images": "only for the local runtime",
    "runtime_keep_on_exit": "only for the local runtime",
}
# There is no Kubernetes runtime: challenges are placed by the `placement` value. The test
# names the setting here so that any further setting still fails it.
NOT_IN_CHART_YET = frozenset({"runtime"})

# One valid value for every key values.schema.json allows under `config`.
EVERY_CONFIG_SETTING: dict[str, Any] = {
    "log_level": "debug",
    "log_format": "text",
    "migrate": False,
    "shutdown_grace": 2.5,
    "bookmark_interval": 15,
    "feed_poll_interval": 0.5,
    "compaction_interval": 600,
    "event_retention": 5_000_000,
    "max_concurrent_rpcs": 1000,
    "metadata_keys": ["docs", "homepage"],
    "chain": "wss://entrypoint-finney.opentensor.ai:443",
    "netuid": 7,
    "mechanism_id": 1,
    "burn_uid": 3,
    "share_policy": "redistribute",
    "epochs": True,
    "epoch_schedule": "tempo",
    "epoch_interval": 30,
    "epoch_lead_blocks": 10,
    "block_time": 12,
    "collect_timeout": 8,
    "vector_lifetime": 720,
    "epoch_retention": 1000,
    "edge_rate_per_hotkey": 300,
    "edge_rate_per_ip": 900,
    "edge_authz_rate_per_ip": 3000,
    "edge_max_body_bytes": 2_097_152,
    "edge_timeout": 60,
    "edge_access_log": "all",
    "edge_trusted_proxies": 1,
    "edge_signature_max_age": 20.0,
}
PLACEMENT = {
    "alpha": {"shim": "alpha-shim.challenges.svc:7000", "public": "alpha.challenges.svc:8000"},
    "beta": "beta-shim.challenges.svc:7000",
}

# Value sets rendered on top of the CI production values.
EXISTING_SECRETS: Obj = {
    "production": False,
    "imageAllowlist": [],
    "image": {"digest": ""},
    "adminToken": {"value": "", "existingSecret": "ops-admin"},
    "database": {"url": "", "existingSecret": "ops-db", "existingSecretKey": "url"},
    "tokenKey": {"value": "", "existingSecret": "ops-token-key"},
    "edgeToken": {"value": "", "existingSecret": "ops-edge", "existingSecretKey": "token"},
    "metrics": {"enabled": False},
    "podDisruptionBudget": {"enabled": False},
    "serviceAccount": {"create": False},
    "lifecycle": {"preStopSleepSeconds": 0},
    "spreadOverNodes": False,
}
EVERYTHING_SET: Obj = {
    "replicaCount": 3,
    "config": EVERY_CONFIG_SETTING,
    "hotkey": {"existingSecret": "master-hotkey", "existingSecretKey": "uri"},
    "placement": PLACEMENT,
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "podAnnotations": {"example.com/team": "subnet"},
    "podLabels": {"example.com/tier": "control-plane"},
    "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
    "serviceAccount": {"annotations": {"example.com/role": "platform-master"}},
    "podDisruptionBudget": {"minAvailable": "50%"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cp"]}]}
                ]
            }
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "master"}},
        }
    ],
    "clusterDomain": "cluster.example",
    "edge": {
        "replicaCount": 3,
        "containerPort": 8443,
        "adminPort": 9902,
        "concurrency": 4,
        "logLevel": "warning",
        "maxConnections": 20000,
        "maxHeapBytes": 1_610_612_736,
        "service": {
            "type": "NodePort",
            "port": 8080,
            "externalTrafficPolicy": "Cluster",
            "annotations": {"example.com/lb": "public"},
        },
        "drain": {"minSeconds": 10, "timeoutSeconds": 90},
        "terminationGracePeriodSeconds": 120,
        "resources": {"requests": {"cpu": "2", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "podDisruptionBudget": {"minAvailable": 1},
        "podAnnotations": {"example.com/team": "edge"},
        "podLabels": {"example.com/tier": "edge"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"example.com/pool": "edge"},
        "tolerations": [{"key": "edge", "operator": "Exists"}],
        "affinity": {"podAntiAffinity": {}},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "edge"}},
            }
        ],
    },
}
EDGE_OFF: Obj = {"edge": {"enabled": False}}
VARIANTS: dict[str, Obj] = {
    "production": {},
    "existing-secrets": EXISTING_SECRETS,
    "everything-set": EVERYTHING_SET,
    "edge-off": EDGE_OFF,
}


_values_files = itertools.count()


@dataclasses.dataclass
class Helm:
    """The helm binary with its cache and config kept inside the test's temporary tree."""

    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        return subprocess.run(
            [str(HELM), *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    def values_file(self, values: Obj) -> Path:
        """Write ``values`` as a values file (JSON is YAML) and return its path."""
        path = self.home / f"values-{next(_values_files)}.yaml"
        path.write_text(json.dumps(values))
        return path

    def template(self, values: Obj) -> subprocess.CompletedProcess[str]:
        return self.run(
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBERNETES_VERSION,
            "-f",
            str(CI_VALUES),
            "-f",
            str(self.values_file(values)),
        )

    def render(self, values: Obj | None = None) -> dict[str, Obj]:
        """The rendered objects by kind, the edge's as ``edge/<kind>`` (the chart renders at
        most one of each kind for the master and one for the edge)."""
        result = self.template(values or {})
        assert result.returncode == 0, result.stderr
        objects: dict[str, Obj] = {}
        for doc in yaml.safe_load_all(result.stdout):
            if doc:
                edge = doc["metadata"]["labels"]["app.kubernetes.io/component"] == "edge"
                key = f"edge/{doc['kind']}" if edge else doc["kind"]
                assert key not in objects, f"two {key} objects"
                objects[key] = doc
        return objects


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if not HELM.is_file():
        pytest.fail(f"{HELM} is missing: build it with `make {HELM.relative_to(ROOT)}`")
    return Helm(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def schema() -> Obj:
    loaded: Obj = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def container(objects: dict[str, Obj]) -> Obj:
    [master] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert master["name"] == "master"
    result: Obj = master
    return result


def pod_spec(objects: dict[str, Obj]) -> Obj:
    spec: Obj = objects["Deployment"]["spec"]["template"]["spec"]
    return spec


def config_file(objects: dict[str, Obj], directory: Path) -> Path:
    """The rendered platform.toml, written where the test can read it."""
    path = directory / "platform.toml"
    path.write_text(objects["ConfigMap"]["data"]["platform.toml"])
    return path


def placement_file(objects: dict[str, Obj], directory: Path) -> Path:
    """The rendered placement.json, written where the test can read it."""
    path = directory / "placement.json"
    path.write_text(objects["ConfigMap"]["data"]["placement.json"])
    return path


def container_env(objects: dict[str, Obj]) -> dict[str, str]:
    """The container's environment as the kubelet builds it from the rendered Secret."""
    made = objects["Secret"]
    secrets = {
        made["metadata"]["name"]: {
            key: base64.b64decode(value).decode() for key, value in made["data"].items()
        }
    }
    env: dict[str, str] = {}
    for item in container(objects)["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def secret_sources(objects: dict[str, Obj], pod: Obj | None = None) -> list[Obj]:
    """The Secrets projected into the key-file volume (of the master's pod by default)."""
    volumes = (pod or pod_spec(objects))["volumes"]
    [volume] = [v for v in volumes if v["name"] == "secrets"]
    return [source["secret"] for source in volume["projected"]["sources"]]


def edge_pod(objects: dict[str, Obj]) -> Obj:
    spec: Obj = objects["edge/Deployment"]["spec"]["template"]["spec"]
    return spec


def edge_containers(objects: dict[str, Obj]) -> tuple[Obj, Obj]:
    """The edge pod's init container (renders the bootstrap) and its Envoy container."""
    pod = edge_pod(objects)
    [bootstrap] = pod["initContainers"]
    [envoy] = pod["containers"]
    assert (bootstrap["name"], envoy["name"]) == ("bootstrap", "envoy")
    return bootstrap, envoy


def edge_secret_sources(objects: dict[str, Obj]) -> list[Obj]:
    return secret_sources(objects, edge_pod(objects))


def key_files(objects: dict[str, Obj], directory: Path) -> dict[str, Path]:
    """The key files the kubelet would mount from the chart's Secret, written to
    ``directory`` (mode 0600); by their path in the container."""
    made = {k: base64.b64decode(v) for k, v in objects["Secret"]["data"].items()}
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "secrets")
    out = {}
    for source in secret_sources(objects):
        assert source["name"] == objects["Secret"]["metadata"]["name"]
        for item in source["items"]:
            path = directory / item["path"]
            path.write_bytes(made[item["key"]])
            path.chmod(0o600)
            out[f"{mount['mountPath']}/{item['path']}"] = path
    return out


def master_args(args: list[str]) -> argparse.Namespace:
    """Parse a container's arguments with the real ``platform`` command-line definition."""
    parser = argparse.ArgumentParser(prog="platform")
    sub = parser.add_subparsers(dest="command", required=True)
    master_cli.register(sub)
    master_cli.register_edge(sub)
    return parser.parse_args(args)


def ci_values() -> Obj:
    loaded: Obj = yaml.safe_load(CI_VALUES.read_text())
    return loaded


# --- the binary and lint ---------------------------------------------------------------


def test_helm_is_the_pinned_release(helm: Helm) -> None:
    result = helm.run("version", "--short")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(HELM_VERSION + "+"), result.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict_passes(helm: Helm, variant: str) -> None:
    result = helm.run(
        "lint",
        "--strict",
        str(CHART),
        "--kube-version",
        KUBERNETES_VERSION,
        "-f",
        str(CI_VALUES),
        "-f",
        str(helm.values_file(VARIANTS[variant])),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


# --- rendering and Kubernetes schemas ----------------------------------------------------


def test_renders_the_expected_objects(helm: Helm) -> None:
    objects = helm.render()
    assert set(objects) == {
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
        "edge/Deployment",
        "edge/PodDisruptionBudget",
        "edge/Service",
    }
    for key, obj in objects.items():
        assert obj["metadata"]["namespace"] == NAMESPACE
        component = "edge" if key.startswith("edge/") else "master"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == component
    assert objects["Deployment"]["spec"]["replicas"] == 2
    assert objects["edge/Deployment"]["spec"]["replicas"] == 2
    # Each Service and budget selects its own pods only.
    for prefix, component in (("", "master"), ("edge/", "edge")):
        labels = objects[f"{prefix}Deployment"]["spec"]["template"]["metadata"]["labels"]
        for kind in ("Service", "PodDisruptionBudget"):
            spec = objects[f"{prefix}{kind}"]["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            assert selector["app.kubernetes.io/component"] == component
            assert selector.items() <= labels.items(), kind


def test_the_edge_can_be_turned_off(helm: Helm) -> None:
    objects = helm.render({**EDGE_OFF, "edgeToken": {"value": ""}})
    assert not [key for key in objects if key.startswith("edge/")]
    assert not [arg for arg in container(objects)["args"] if arg.startswith("--edge")]
    assert "edge-token" not in objects["Secret"]["data"]
    assert all("edge-token" not in str(source) for source in secret_sources(objects))


def test_existing_secrets_make_no_secret(helm: Helm) -> None:
    objects = helm.render(EXISTING_SECRETS)
    assert "Secret" not in objects
    assert "PodDisruptionBudget" not in objects
    assert "ServiceAccount" not in objects
    refs = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container(objects)["env"]
        if "valueFrom" in item
    }
    assert refs == {
        "PLATFORM_ADMIN_TOKEN": {"name": "ops-admin", "key": "admin-token"},
        "PLATFORM_DATABASE_URL": {"name": "ops-db", "key": "url"},
    }
    assert secret_sources(objects) == [
        {"name": "ops-token-key", "items": [{"key": "token-key", "path": "token-key"}]},
        {"name": "ops-edge", "items": [{"key": "token", "path": "edge-token"}]},
    ]
    [edge_source] = edge_secret_sources(objects)
    assert edge_source == {"name": "ops-edge", "items": [{"key": "token", "path": "edge-token"}]}
    assert (
        "checksum/secret"
        not in objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_validates_against_kubernetes_1_33_strict(helm: Helm, variant: str) -> None:
    objects = helm.render(VARIANTS[variant])
    for kind, obj in objects.items():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{kind} does not validate at {path}: {exc.message}")


def test_the_validator_is_strict(helm: Helm) -> None:
    """A field Kubernetes does not know is refused, so the test above proves something."""
    deployment = copy.deepcopy(helm.render()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["path"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- the Deployment ------------------------------------------------------------------------


def test_pod_security(helm: Helm) -> None:
    objects = helm.render()
    pod = pod_spec(objects)
    assert pod["automountServiceAccountToken"] is False
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert pod["enableServiceLinks"] is False
    assert "hostNetwork" not in pod
    assert "hostPID" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    master = container(objects)
    security = master["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}

    mounts = {m["mountPath"]: m for m in master["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/platform"]["readOnly"] is True


def test_image_is_pinned_by_digest(helm: Helm) -> None:
    image = ci_values()["image"]
    master = container(helm.render())
    assert master["image"] == f"{image['repository']}:{image['tag']}@{image['digest']}"


def test_command_line_and_probes(helm: Helm) -> None:
    objects = helm.render()
    master = container(objects)
    assert master["command"] == ["platform"]
    assert master["args"] == [
        "master",
        "--config",
        "/etc/platform/platform.toml",
        "--listen",
        "0.0.0.0:50051",
        "--metrics-listen",
        "0.0.0.0:9464",
        "--production",
        "--token-key-file",
        "/etc/platform-secrets/token-key",
        "--shim-endpoints-file",
        "/etc/platform/placement.json",
        "--edge-listen",
        "0.0.0.0:8080",
        "--edge-authz-address",
        f"platform-platform-master.{NAMESPACE}.svc.cluster.local:50051",
        "--edge-token-file",
        "/etc/platform-secrets/edge-token",
    ]
    ports = {p["name"]: p["containerPort"] for p in master["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9464}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert master[probe]["grpc"] == {"port": 50051, "service": ""}, probe

    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9464"
    service_ports = {p["name"]: p for p in objects["Service"]["spec"]["ports"]}
    assert service_ports["grpc"]["targetPort"] == "grpc"
    assert service_ports["metrics"]["targetPort"] == "metrics"

    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert master["resources"] == defaults["resources"]


def test_the_edge_pod_is_wired_to_the_masters(helm: Helm) -> None:
    """The bootstrap, Envoy and drain command lines (read by the real CLI) agree with each
    other and with the masters' edge flags: one address, one token, one admin port."""
    objects = helm.render()
    bootstrap, envoy = edge_containers(objects)
    pod = edge_pod(objects)
    master = master_args(container(objects)["args"])
    rendered = master_args(bootstrap["args"])
    assert bootstrap["command"] == ["platform"]

    # Envoy reaches the masters' Service (xDS), and the masters send it there for ext_authz.
    service = objects["Service"]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    address = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{grpc_port}"
    assert rendered.xds == address
    assert master.edge_authz_address == address
    listen = next(p for p in envoy["ports"] if p["name"] == "http")
    assert master.edge_listen == f"0.0.0.0:{listen['containerPort']}"

    # Each pod is its own xDS node.
    assert rendered.node_id == "$(POD_NAME)"
    [pod_name] = [e for e in bootstrap["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    # One token: the masters' and the bootstrap's come from the same Secret key.
    mounts = {m["name"]: m["mountPath"] for m in bootstrap["volumeMounts"]}
    assert rendered.edge_token_file == f"{mounts['secrets']}/edge-token"
    token = {"name": objects["Secret"]["metadata"]["name"], "items": [
        {"key": "edge-token", "path": "edge-token"}]}  # fmt: skip
    assert edge_secret_sources(objects) == [token]
    assert token in secret_sources(objects)
    assert master.edge_token_file == "/etc/platform-secrets/edge-token"

    # The bootstrap goes to a memory volume Envoy reads it from, and nothing else does.
    assert Path(rendered.output).parent == Path(mounts["bootstrap"])
    envoy_mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    assert envoy_mounts["bootstrap"]["mountPath"] == mounts["bootstrap"]
    assert envoy_mounts["bootstrap"]["readOnly"] is True
    assert "secrets" not in envoy_mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bootstrap"]["emptyDir"]["medium"] == "Memory"
    envoy_args = envoy["args"]
    assert envoy_args[envoy_args.index("-c") + 1] == rendered.output
    assert "--disable-hot-restart" in envoy_args

    # The preStop drains through the admin address the bootstrap gives Envoy, for as long
    # as Envoy's own drain time, within the pod's grace period.
    drain_command = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert drain_command[0] == "platform"
    drain = master_args(drain_command[1:])
    assert (drain.edge_action, drain.admin) == ("drain", rendered.admin)
    assert rendered.admin.startswith("127.0.0.1:")
    assert envoy_args[envoy_args.index("--drain-time-s") + 1] == str(int(drain.timeout))
    assert envoy_args[envoy_args.index("--drain-strategy") + 1] == "immediate"
    assert pod["terminationGracePeriodSeconds"] > drain.timeout >= drain.min_seconds

    # Limits: the heap budget sits below the container's memory limit.
    assert rendered.max_connections == 50_000
    assert rendered.max_heap_bytes == 768 * 1024 * 1024
    assert envoy["resources"]["limits"]["memory"] == "1Gi"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert envoy[probe]["tcpSocket"] == {"port": "http"}, probe

    # Hardened like the masters.
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == pod_spec(objects)["securityContext"]
    for each in (bootstrap, envoy):
        assert each["securityContext"] == container(objects)["securityContext"], each["name"]

    # The public Service keeps client addresses (per-address rate limits).
    edge_service = objects["edge/Service"]["spec"]
    assert edge_service["type"] == "LoadBalancer"
    assert edge_service["externalTrafficPolicy"] == "Local"
    assert edge_service["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    ]


def test_edge_values_reach_the_edge(helm: Helm) -> None:
    objects = helm.render(EVERYTHING_SET)
    edge = EVERYTHING_SET["edge"]
    bootstrap, envoy = edge_containers(objects)
    rendered = master_args(bootstrap["args"])
    master = master_args(container(objects)["args"])
    assert rendered.xds.endswith(".svc.cluster.example:50051")
    assert master.edge_authz_address == rendered.xds
    assert rendered.admin == f"127.0.0.1:{edge['adminPort']}"
    assert (rendered.max_connections, rendered.max_heap_bytes) == (
        edge["maxConnections"], edge["maxHeapBytes"])  # fmt: skip
    assert master.edge_listen == f"0.0.0.0:{edge['containerPort']}"
    args = envoy["args"]
    assert args[args.index("--concurrency") + 1] == "4"
    assert args[args.index("--log-level") + 1] == "warning"
    drain = master_args(envoy["lifecycle"]["preStop"]["exec"]["command"][1:])
    assert (drain.min_seconds, drain.timeout) == (10, 90)
    pod = edge_pod(objects)
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["nodeSelector"] == edge["nodeSelector"]
    assert pod["topologySpreadConstraints"] == edge["topologySpreadConstraints"]
    spec = objects["edge/Service"]["spec"]
    assert (spec["type"], spec["externalTrafficPolicy"]) == ("NodePort", "Cluster")
    assert objects["edge/PodDisruptionBudget"]["spec"]["minAvailable"] == 1
    assert objects["edge/Deployment"]["spec"]["replicas"] == 3


def test_an_edge_certificate_reaches_envoy_through_the_masters(helm: Helm) -> None:
    """With edge.tls.secretName the Envoy pods mount the Secret and the masters send Envoy
    the paths of its tls.crt and tls.key there; without it, neither."""
    objects = helm.render({"edge": {"tls": {"secretName": "edge-cert"}}})
    master = master_args(container(objects)["args"])
    _, envoy = edge_containers(objects)
    [mount] = [m for m in envoy["volumeMounts"] if m["name"] == "tls"]
    [volume] = [v for v in edge_pod(objects)["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "edge-cert"
    assert mount["readOnly"] is True
    assert master.edge_tls_cert == f"{mount['mountPath']}/tls.crt"
    assert master.edge_tls_key == f"{mount['mountPath']}/tls.key"
    plain = helm.render()
    assert not {"--edge-tls-cert", "--edge-tls-key"} & set(container(plain)["args"])
    assert all(v["name"] != "tls" for v in edge_pod(plain)["volumes"])


def test_metrics_can_be_turned_off(helm: Helm, tmp_path: Path) -> None:
    objects = helm.render({"metrics": {"enabled": False}})
    master = container(objects)
    assert "--metrics-listen=" in master["args"]
    assert [p["name"] for p in master["ports"]] == ["grpc"]
    assert [p["name"] for p in objects["Service"]["spec"]["ports"]] == ["grpc"]
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in annotations
    args = master_args(master["args"])
    args.config = str(config_file(objects, tmp_path))
    loaded = cfg.load(MasterConfig, args, {})
    assert loaded.metrics_listen == ""


def test_termination_grace_covers_the_shutdown(helm: Helm) -> None:
    objects = helm.render()
    pod = pod_spec(objects)
    master = container(objects)
    config = tomllib.loads(objects["ConfigMap"]["data"]["platform.toml"])["master"]
    pre_stop = master["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > config["shutdown_grace"] + pre_stop


def test_changed_settings_roll_the_pods(helm: Helm) -> None:
    def checksums(values: Obj) -> tuple[str, str]:
        annotations = helm.render(values)["Deployment"]["spec"]["template"]["metadata"][
            "annotations"
        ]
        return annotations["checksum/config"], annotations["checksum/secret"]

    config, secret = checksums({})
    assert checksums({"config": {"log_level": "debug"}})[0] != config
    assert checksums({"adminToken": {"value": "another-admin-token-0123456789"}})[1] != secret
    assert checksums({"tokenKey": {"value": "ab" * 32}})[1] != secret
    assert checksums({"edgeToken": {"value": "another-edge-token-0123456789"}})[1] != secret
    # The edge's pods render their bootstrap (with the edge token) at start: they roll too.
    edge_annotations = helm.render({"edgeToken": {"value": "another-edge-token-0123456789"}})[
        "edge/Deployment"
    ]["spec"]["template"]["metadata"]["annotations"]
    assert edge_annotations["checksum/secret"] != secret
    # The placement is re-read by the running master: changing it rolls nothing.
    assert checksums({"placement": PLACEMENT}) == (config, secret)


# --- values.schema.json refusals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        pytest.param({"database": {"url": ""}}, "database.url", id="production-without-database"),
        pytest.param({"imageAllowlist": []}, "imageAllowlist", id="production-empty-allowlist"),
        pytest.param({"image": {"digest": ""}}, "image.digest", id="production-without-digest"),
        pytest.param(
            {"production": False, "database": {"url": ""}},
            "database.url",
            id="any-mode-without-database",
        ),
        pytest.param(
            {"database": {"url": "sqlite+aiosqlite:///platform.db"}},
            "database.url",
            id="sqlite",
        ),
        pytest.param({"adminToken": {"value": "too-short"}}, "adminToken.value", id="short-token"),
        pytest.param({"config": {"shutdown_grac": 3}}, "shutdown_grac", id="unknown-setting"),
        pytest.param({"config": {"listen": "0.0.0.0:1"}}, "listen", id="chart-owned-setting"),
        pytest.param({"config": {"shutdown_grace": 0}}, "config.shutdown_grace", id="zero-grace"),
        pytest.param({"imageAllowlist": ["https://x"]}, "imageAllowlist", id="bad-namespace"),
        pytest.param(
            {"extraEnv": [{"name": "PLATFORM_ADMIN_TOKEN", "value": "x" * 20}]},
            "extraEnv",
            id="secret-in-extra-env",
        ),
        pytest.param(
            {"terminationGracePeriodSeconds": 15},
            "terminationGracePeriodSeconds",
            id="grace-period-too-short",
        ),
        pytest.param({"tokenKey": {"value": ""}}, "tokenKey", id="no-token-key"),
        pytest.param({"tokenKey": {"value": "ab" * 16}}, "tokenKey.value", id="short-token-key"),
        pytest.param(
            {"config": {"chain": "finney"}}, "hotkey.existingSecret", id="chain-without-hotkey"
        ),
        pytest.param(
            {
                "config": {"chain": "finney", "epoch_schedule": "interval"},
                "hotkey": {"existingSecret": "hk"},
            },
            "config.epoch_schedule",
            id="interval-schedule-with-replicas",
        ),
        pytest.param({"config": {"chain": "local+file:/x"}}, "config.chain", id="chain-file"),
        pytest.param({"placement": {"alpha": "nowhere"}}, "placement", id="placement-no-port"),
        pytest.param({"placement": {"Alpha": "a:1"}}, "placement", id="placement-bad-slug"),
        pytest.param({"edgeToken": {"value": ""}}, "edgeToken", id="edge-without-token"),
        pytest.param({"edgeToken": {"value": "short"}}, "edgeToken.value", id="short-edge-token"),
        pytest.param(
            {"extraEnv": [{"name": "PLATFORM_EDGE_TOKEN", "value": "x" * 20}]},
            "extraEnv",
            id="edge-token-in-extra-env",
        ),
        pytest.param(
            {"edge": {"drain": {"minSeconds": 50, "timeoutSeconds": 45}}},
            "edge.drain.minSeconds",
            id="drain-wait-past-its-timeout",
        ),
        pytest.param(
            {"edge": {"terminationGracePeriodSeconds": 45}},
            "edge.terminationGracePeriodSeconds",
            id="edge-grace-shorter-than-drain",
        ),
        pytest.param({"edge": {"maxHeapBytes": 1 << 20}}, "maxHeapBytes", id="tiny-heap-budget"),
        pytest.param({"edge": {"containerPort": 80}}, "containerPort", id="privileged-port"),
        pytest.param(
            {"config": {"edge_timeout": 0}}, "config.edge_timeout", id="edge-timeout-zero"
        ),
    ],
)
def test_refused_values_name_the_field(helm: Helm, values: Obj, field: str) -> None:
    result = helm.template(values)
    assert result.returncode != 0, result.stdout
    assert field in result.stderr, result.stderr


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 1, "config": {"epoch_schedule": "interval"}},
        {"config": {"epoch_schedule": "interval", "epochs": False}},
        {"config": {"epoch_schedule": "tempo"}},
    ],
    ids=["one-master", "not-sealing", "tempo"],
)
def test_epochs_with_a_chain_render(helm: Helm, values: Obj) -> None:
    chain = {"config": {"chain": "finney", **values["config"]}}
    objects = helm.render({**values, **chain, "hotkey": {"existingSecret": "hk"}})
    settings = tomllib.loads(objects["ConfigMap"]["data"]["platform.toml"])["master"]
    assert settings["chain"] == "finney"
    assert settings["epoch_schedule"] == values["config"]["epoch_schedule"]


def test_non_production_needs_no_allowlist_or_digest(helm: Helm) -> None:
    objects = helm.render({"production": False, "imageAllowlist": [], "image": {"digest": ""}})
    master = container(objects)
    assert "--no-production" in master["args"]
    assert "--production" not in master["args"]
    assert "@" not in master["image"]


# --- the rendered settings are the master's ----------------------------------------------


def test_every_master_setting_is_accounted_for(schema: Obj) -> None:
    """A new master setting fails here until the chart decides how to expose it."""
    from_values = set(schema["properties"]["config"]["properties"])
    fields = {f.name for f in dataclasses.fields(MasterConfig)}
    assert from_values <= fields, f"not master settings: {sorted(from_values - fields)}"
    assert not from_values & (SET_BY_CHART | set(NOT_FOR_KUBERNETES))
    missing = fields - from_values - SET_BY_CHART - set(NOT_FOR_KUBERNETES) - NOT_IN_CHART_YET
    assert not missing, f"master settings the chart does not handle: {sorted(missing)}"
    assert set(EVERY_CONFIG_SETTING) == from_values


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_file_loads_as_master_settings(helm: Helm, variant: str, tmp_path: Path) -> None:
    objects = helm.render(VARIANTS[variant])
    text = objects["ConfigMap"]["data"]["platform.toml"]
    parsed = tomllib.loads(text)
    assert set(parsed) == {"master"}
    path = config_file(objects, tmp_path)
    loaded = cfg.load(MasterConfig, environ={"PLATFORM_CONFIG": str(path)})

    values = {**ci_values(), **VARIANTS[variant]}
    assert loaded.image_allowlist == tuple(values["imageAllowlist"])
    for key, value in parsed["master"].items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(loaded, key) == expected, key
    if variant == "everything-set":
        for key, value in EVERY_CONFIG_SETTING.items():
            expected = tuple(value) if isinstance(value, list) else value
            assert getattr(loaded, key) == expected, key


@pytest.mark.parametrize("variant", ["production", "everything-set"])
def test_container_starts_a_valid_master_configuration(
    helm: Helm, variant: str, tmp_path: Path
) -> None:
    """Command line + mounted file + environment, read by the master's own CLI and loader."""
    objects = helm.render(VARIANTS[variant])
    master = container(objects)
    pod = pod_spec(objects)

    args = master_args(master["args"])
    mount = next(
        m for m in master["volumeMounts"] if m["mountPath"] == str(Path(args.config).parent)
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert volume["configMap"]["items"] == [
        {"key": "platform.toml", "path": Path(args.config).name},
        {"key": "placement.json", "path": Path(args.shim_endpoints_file).name},
    ]

    args.config = str(config_file(objects, tmp_path))
    env = container_env(objects)
    settings = {cfg.env_name(f.name) for f in dataclasses.fields(MasterConfig)}
    for name in env:
        assert not name.startswith(cfg.ENV_PREFIX) or name in settings, name

    # The edge token as the kubelet mounts it from the chart's Secret.
    assert args.edge_token_file == "/etc/platform-secrets/edge-token"
    token_file = tmp_path / "edge-token"
    token_file.write_bytes(base64.b64decode(objects["Secret"]["data"]["edge-token"]))
    token_file.chmod(0o600)
    args.edge_token_file = str(token_file)

    loaded = cfg.load(MasterConfig, args, env)
    loaded.check()
    assert loaded.admin_token_value() == ci_values()["adminToken"]["value"]
    assert loaded.edge_token_value() == ci_values()["edgeToken"]["value"]
    assert loaded.database_url == ci_values()["database"]["url"]
    assert loaded.production is True
    assert loaded.listen == "0.0.0.0:50051"
    assert loaded.metrics_listen == "0.0.0.0:9464"


def test_key_files_and_placement_are_mounted_where_the_master_reads_them(
    helm: Helm, tmp_path: Path
) -> None:
    objects = helm.render(EVERYTHING_SET)
    master = container(objects)
    args = master_args(master["args"])
    mounts = {m["name"]: m["mountPath"] for m in master["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}

    # The token key from the chart's Secret, the hotkey from the operators' own.
    assert volumes["secrets"]["projected"]["defaultMode"] == 0o440
    assert secret_sources(objects) == [
        {
            "name": objects["Secret"]["metadata"]["name"],
            "items": [{"key": "token-key", "path": "token-key"}],
        },
        {"name": "master-hotkey", "items": [{"key": "uri", "path": "hotkey"}]},
        {
            "name": objects["Secret"]["metadata"]["name"],
            "items": [{"key": "edge-token", "path": "edge-token"}],
        },
    ]
    assert args.token_key_file == f"{mounts['secrets']}/token-key"
    assert args.hotkey_file == f"{mounts['secrets']}/hotkey"
    token_key = base64.b64decode(objects["Secret"]["data"]["token-key"]).decode()
    assert token_key == ci_values()["tokenKey"]["value"]

    # The placement, in the config volume, as the master parses it.
    assert args.shim_endpoints_file == f"{mounts['config']}/placement.json"
    items = volumes["config"]["configMap"]["items"]
    assert {"key": "placement.json", "path": "placement.json"} in items
    placements = endpoints.parse(placement_file(objects, tmp_path).read_text())
    assert placements == {
        "alpha": endpoints.Placement(
            shim="alpha-shim.challenges.svc:7000", public="alpha.challenges.svc:8000"
        ),
        "beta": endpoints.Placement(shim="beta-shim.challenges.svc:7000"),
    }
    # Without placements the file is an empty object: no challenge placed.
    assert endpoints.parse(placement_file(helm.render(), tmp_path).read_text()) == {}


def readme_sets() -> list[list[str]]:
    """The ``--set`` arguments of each ``helm install`` / ``helm upgrade`` in the chart's
    README, in order (placeholders replaced by valid values)."""
    text = (CHART / "README.md").read_text().replace("\\\n", " ")
    text = text.replace("<digest of that tag>", "0" * 64)
    commands = []
    for line in text.splitlines():
        if line.startswith(("helm install ", "helm upgrade ")):
            words = shlex.split(line, comments=True)
            commands.append([w for i, w in enumerate(words) if i and words[i - 1] == "--set"])
    return commands


def test_readme_commands_render(helm: Helm) -> None:
    """The README's install renders on its own (every required value is in it), and its
    upgrade on top of it turns epochs on."""
    install, upgrade = readme_sets()
    rendered = []
    for sets in (install, install + upgrade):
        args = [arg for value in sets for arg in ("--set", value)]
        result = helm.run(
            "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version",
            KUBERNETES_VERSION, *args,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        rendered.append(result.stdout)
    assert "--hotkey-file" not in rendered[0]
    assert "--hotkey-file" in rendered[1]
    assert 'chain = "finney"' in rendered[1]


# --- the rendered command, run --------------------------------------------------------------


@pytest.fixture
def challenge() -> Iterator[UpstreamServer]:
    """A challenge's public API on loopback (the rendered placement points at it)."""
    upstream = UpstreamServer().start()
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def rendered_master(
    helm: Helm, postgres_server: PostgresServer, challenge: UpstreamServer, tmp_path: Path
) -> tuple[list[str], dict[str, str], dict[str, Obj]]:
    """The master's command, environment and pod spec as rendered for a fresh database."""
    database = f"helm_{os.getpid()}_{time.monotonic_ns()}"
    url = run_async(postgres_server.create_database(database))
    grpc_port = free_port()
    values = {
        "database": {"url": url},
        "containerPorts": {"grpc": grpc_port, "metrics": free_port()},
        "service": {"port": grpc_port},
        "edge": {
            "containerPort": free_port(),
            "adminPort": free_port(),
            "drain": {"minSeconds": 1, "timeoutSeconds": 20},
        },
        "placement": {"alpha": {"shim": "127.0.0.1:9", "public": f"127.0.0.1:{challenge.port}"}},
    }
    objects = helm.render(values)
    master = container(objects)
    assert master["command"] == ["platform"]
    files = {
        "/etc/platform/platform.toml": config_file(objects, tmp_path),
        "/etc/platform/placement.json": placement_file(objects, tmp_path),
        **key_files(objects, tmp_path),
    }
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        **container_env(objects),
    }
    return [str(VENV_BIN / "platform"), *localized(master["args"], files)], env, objects


def localized(args: list[str], files: dict[str, Path], **env: str) -> list[str]:
    """A container's arguments as run here: mounted files where the test wrote them, every
    address (0.0.0.0, the masters' Service name) on loopback, ``$(VAR)`` expanded."""
    service = f"{RELEASE}-platform-master.{NAMESPACE}.svc.cluster.local:"
    out = []
    for arg in args:
        if arg in files:
            out.append(str(files[arg]))
            continue
        local = arg.replace("0.0.0.0:", "127.0.0.1:").replace(service, "127.0.0.1:")
        for name, value in env.items():
            local = local.replace(f"$({name})", value)
        out.append(local)
    return out


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on its own loop in a worker thread, away from the tests' session loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _health(address: str) -> int:
    async def check() -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return int(reply.status)

    return run_async(check())


@pytest.mark.postgres
@pytest.mark.process
def test_rendered_command_serves_and_stops_in_time(
    rendered_master: tuple[list[str], dict[str, str], dict[str, Obj]], tmp_path: Path
) -> None:
    command, env, objects = rendered_master
    master = container(objects)
    grpc_port = master["startupProbe"]["grpc"]["port"]
    metrics_port = next(p["containerPort"] for p in master["ports"] if p["name"] == "metrics")
    log = tmp_path / "master.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=stderr, stderr=stderr)
    try:
        # What the kubelet's startup probe does: grpc.health.v1.Health/Check, service "".
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"master exited:\n{log.read_text()}"
            try:
                if _health(f"127.0.0.1:{grpc_port}") == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, f"never SERVING:\n{log.read_text()}"
            time.sleep(0.1)

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"platform_grpc_requests_total" in r.read()

        # After the preStop sleep the kubelet sends SIGTERM and waits for the rest of the
        # grace period.
        budget = (
            pod_spec(objects)["terminationGracePeriodSeconds"]
            - master["lifecycle"]["preStop"]["sleep"]["seconds"]
        )
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=budget) == 0, log.read_text()
        assert time.monotonic() - started < budget
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for(
    check: Callable[[], bool], what: str, processes: list[subprocess.Popen[bytes]], log: Path
) -> None:
    deadline = time.monotonic() + 60
    while not check():
        for proc in processes:
            assert proc.poll() is None, f"process {proc.pid} exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{what} never happened:\n{log.read_text()}"
        time.sleep(0.1)


def _accepts(port: int) -> bool:
    """What the edge's TCP probes do."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


async def _activate(address: str, token: str, slug: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    # The production values allow only pinned images of ghcr.io/example-challenges/.
    image = f"ghcr.io/example-challenges/{slug}:1.0.0@sha256:{'0' * 64}"
    challenge = challenge_spec(
        slug, 0.5, image=image, routes=registry_pb2.PublicRoutes(public_port=80)
    )
    async with grpc.aio.insecure_channel(address) as channel:
        registry = registry_pb2_grpc.RegistryStub(channel)
        await registry.CreateChallenge(
            registry_pb2.CreateChallengeRequest(challenge=challenge), metadata=metadata, timeout=10
        )
        await registry.SetChallengeStatus(
            registry_pb2.SetChallengeStatusRequest(slug=slug, status=ACTIVE),
            metadata=metadata,
            timeout=10,
        )


@pytest.mark.postgres
@pytest.mark.process
def test_rendered_edge_serves_through_the_rendered_master_and_drains(
    rendered_master: tuple[list[str], dict[str, str], dict[str, Obj]],
    challenge: UpstreamServer,
    tmp_path: Path,
) -> None:
    """The edge pod's commands, run as rendered: the init container writes the bootstrap,
    Envoy gets its routes from the rendered master, serves a challenge and refuses its
    internal routes; on deletion the preStop drain tells kept-alive clients to leave and
    returns, and SIGTERM stops Envoy within the grace period."""
    command, env, objects = rendered_master
    bootstrap, envoy = edge_containers(objects)
    files = {
        **key_files(objects, tmp_path),
        "/etc/envoy/bootstrap.yaml": tmp_path / "envoy" / "bootstrap.yaml",
    }
    files["/etc/envoy/bootstrap.yaml"].parent.mkdir()
    edge_port = next(p["containerPort"] for p in envoy["ports"] if p["name"] == "http")
    grpc_port = container(objects)["startupProbe"]["grpc"]["port"]
    log = tmp_path / "processes.log"
    processes: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as output:
        master = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=output, stderr=output)
    processes.append(master)
    try:
        # The init container, then Envoy, as the kubelet runs them.
        rendered = subprocess.run(
            [str(VENV_BIN / "platform"), *localized(bootstrap["args"], files, POD_NAME="edge-0")],
            env={"PATH": env["PATH"], "HOME": str(tmp_path)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert rendered.returncode == 0, rendered.stderr
        written = files["/etc/envoy/bootstrap.yaml"]
        assert written.stat().st_mode & 0o777 == 0o600
        assert 'id: "edge-0"' in written.read_text()
        with log.open("ab") as output:
            proxy = subprocess.Popen(
                [envoy_binary(), *localized(envoy["args"], files)], stdout=output, stderr=output
            )
        processes.append(proxy)
        _wait_for(lambda: _accepts(edge_port), "Envoy's listener", processes, log)

        run_async(_activate(f"127.0.0.1:{grpc_port}", ci_values()["adminToken"]["value"], "alpha"))

        def served() -> bool:
            return raw_request(edge_port, "/challenges/alpha/hello").status == 200

        _wait_for(served, "the challenge's route", processes, log)
        assert challenge.paths()[-1] == "/hello"
        internal = raw_request(edge_port, "/challenges/alpha/internal/v1/get_weights")
        assert internal.status == 403
        assert challenge.paths()[-1] == "/hello"

        # A kept-alive client, then the pod's deletion: the preStop hook.
        client = http.client.HTTPConnection("127.0.0.1", edge_port, timeout=10)
        client.request("GET", "/challenges/alpha/before")
        before = client.getresponse()
        before.read()
        assert before.status == 200
        assert before.getheader("connection") != "close"
        hook = envoy["lifecycle"]["preStop"]["exec"]["command"]
        drained = subprocess.run(
            [str(VENV_BIN / hook[0]), *hook[1:]],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.startswith("drained: no request in flight"), drained.stdout
        client.request("GET", "/challenges/alpha/during")
        during = client.getresponse()
        during.read()
        assert during.status == 200
        assert during.getheader("connection") == "close"
        client.close()

        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        budget = edge_pod(objects)["terminationGracePeriodSeconds"]
        proxy.wait(timeout=budget)
        assert time.monotonic() - started < budget
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
