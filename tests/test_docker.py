"""docker/ agrees with the code: the compose file's ``rdv`` commands parse with the real CLI
parser, its ``RDV_`` variables are settings, Prometheus scrapes the gateway, and the Grafana
dashboard charts the metric names the gateway exposes through the provisioned datasource.

No Docker needed (nor installed in CI). ``promtool`` checks run where it is installed (CI
installs it) and skip visibly elsewhere; one test runs the compose file's create-deployment
step against the suite's real Redis.

Longer than ~400 lines on purpose: compose, Prometheus and Grafana are each checked against
the same parsed files and the same running gateway's metric names, built once here.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml

from gateway.cli.main import build_parser
from gateway.settings import Settings
from models.deployment_store import DeploymentStore
from models.train import CANARY_VERSION, DEMO_DEPLOYMENT, DEMO_MODEL, REAL_VERSION
from rendezvous import names

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DASHBOARD = DASHBOARDS / "rendezvous.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards"

METRICS = frozenset(
    {
        # traffic
        "rdv_requests_total",
        "rdv_in_flight_requests",
        # latency
        "rdv_request_duration_seconds_bucket",
        "rdv_model_latency_seconds_bucket",
        "rdv_queue_wait_seconds_bucket",
        # divergence (per request, from decision records)
        "rdv_divergence_js_distance_bucket",
        "rdv_label_disagreements_total",
        "rdv_compared_rows_total",
        # drift (gauges over the drift window)
        "rdv_drift_score_psi",
        "rdv_drift_score_js_distance",
        "rdv_drift_class_psi",
        "rdv_drift_class_js_distance",
        "rdv_drift_feature_psi",
        "rdv_drift_divergence_mean",
        "rdv_drift_disagreement_ratio",
        "rdv_drift_alert",
        "rdv_drift_events_total",
        # streams
        "rdv_stream_length",
        "rdv_stream_group_pending",
        "rdv_stream_group_lag_seconds",
        "rdv_live_workers",
        # model workers and the log bin (published into Redis, exposed by the gateway)
        "rdv_worker_scored_total",
        "rdv_worker_batches_total",
        "rdv_worker_errors_total",
        "rdv_logbin_records_total",
        "rdv_logbin_bytes_written_total",
    }
)
"""Every metric name the dashboard must chart (a panel each). That the gateway really exposes
them is checked against a running gateway's /metrics in tests/test_observability.py."""

RDV_SUBCOMMAND = {
    "train": "train-demo",
    "gateway": "gateway",
    "worker-real": "worker",
    "worker-canary": "worker",
    "logbin": "logbin",
}
"""The services that run the image's ``rdv`` entrypoint, and the subcommand each runs."""

SERVICES = {*RDV_SUBCOMMAND, "redis", "create-deployment", "prometheus", "grafana"}
ONE_SHOT = {"train", "create-deployment"}
CREATE_DEPLOYMENT_SCRIPT = "create_demo_deployment.py"
ROWS = ["Traffic", "Latency", "Divergence & drift", "Streams & workers"]
METRIC_NAME = re.compile(r"\brdv_[A-Za-z0-9_:]*")
GRAFANA_VARIABLES = {
    "$__rate_interval": "20s",
    "$__interval": "1m",
    "$__range": "1h",
    "$deployment": "breast-cancer",
}
"""What Grafana puts in place of its variables, to check the expressions with promtool."""


# -- loading ---------------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no services"
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"compose.yaml has no service {name!r}"
    return services()[name]


def built_from_dockerfile(svc: dict[str, Any]) -> bool:
    build = svc.get("build")
    if build is None:
        return False
    if isinstance(build, str):
        build = {"context": build}
    path = DOCKER / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    return path.resolve() == DOCKERFILE.resolve()


def runs_rdv(svc: dict[str, Any]) -> bool:
    """Built from docker/Dockerfile (ENTRYPOINT rdv) without another entrypoint, or any
    service whose entrypoint is rdv."""
    entrypoint = svc.get("entrypoint")
    if entrypoint is not None:
        return list_form(entrypoint) == ["rdv"]
    return built_from_dockerfile(svc)


def list_form(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return {k: v for k, _, v in (str(item).partition("=") for item in env)}
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    """Service name -> condition (``service_started`` for the short form)."""
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def bind_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to docker/) of the service's bind mounts."""
    mounts = {}
    for volume in svc.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def parse_rdv(name: str, argv: list[str]) -> argparse.Namespace:
    """The service's command through the real ``rdv`` parser; a clear failure if it errs."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(
            f"service {name!r}: `rdv {shlex.join(argv)}` does not parse with "
            f"gateway.cli.main.build_parser() (exit {exc.code}): {err.getvalue().strip()}"
        )


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuation lines joined."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    for panel in doc.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def charts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(doc) if p.get("type") != "row"]


def exprs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    return [
        (f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}", t["expr"])
        for p in charts(doc)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def provisioned_datasource() -> dict[str, Any]:
    sources = [
        ds
        for f in sorted(DATASOURCES.glob("*.y*ml"))
        for ds in (yaml.safe_load(f.read_text()) or {}).get("datasources", [])
    ]
    prometheus = [ds for ds in sources if ds.get("type") == "prometheus"]
    assert len(prometheus) == 1, f"want one provisioned Prometheus datasource, got {prometheus}"
    return prometheus[0]


# -- compose: services and rdv commands ---------------------------------------------------------


def test_compose_has_every_service() -> None:
    missing = SERVICES - set(services())
    assert not missing, f"compose.yaml lacks services {sorted(missing)}"
    assert service("redis")["image"].startswith("redis:7")
    assert service("prometheus")["image"].startswith("prom/prometheus")
    assert service("grafana")["image"].startswith("grafana/grafana")


def test_rdv_services_are_the_expected_ones() -> None:
    rdv = {name for name, svc in services().items() if runs_rdv(svc)}
    assert rdv == set(RDV_SUBCOMMAND), f"services running rdv: {sorted(rdv)}"
    for name in (*RDV_SUBCOMMAND, "create-deployment"):
        assert built_from_dockerfile(service(name)), f"{name} is not built from docker/Dockerfile"


def test_every_rdv_command_parses_with_the_cli_parser() -> None:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    subcommands = set(sub.choices)
    for name, svc in services().items():
        if not runs_rdv(svc):
            continue
        command = svc.get("command")
        assert isinstance(command, list), f"service {name!r}: give `command` in list form"
        args = parse_rdv(name, [str(c) for c in command])
        assert args.command in subcommands, f"service {name!r}: no subcommand {args.command!r}"
        assert args.command == RDV_SUBCOMMAND[name], (
            f"service {name!r} runs `rdv {args.command}`, want `rdv {RDV_SUBCOMMAND[name]}`"
        )
        assert callable(args.func)


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "--deployment", DEMO_DEPLOYMENT, "--rloe", names.REAL],
        ["worker", "--deployment", DEMO_DEPLOYMENT, "--roles", "canry"],
        ["wroker", "--deployment", DEMO_DEPLOYMENT, "--role", names.REAL],
    ],
)
def test_a_typo_in_a_command_fails_the_parse_check(argv: list[str]) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"service 'worker-real'.*does not parse"):
        parse_rdv("worker-real", argv)


def test_one_worker_per_role_of_the_demo_deployment() -> None:
    roles: dict[str, str] = {}
    for name, svc in services().items():
        if runs_rdv(svc) and RDV_SUBCOMMAND.get(name) == "worker":
            args = parse_rdv(name, list_form(svc["command"]))
            assert args.deployment == DEMO_DEPLOYMENT, f"{name}: deployment {args.deployment}"
            assert name == f"worker-{args.role}", f"{name} serves role {args.role}"
            assert args.consumer, f"{name}: give a stable --consumer"
            roles[args.role] = args.consumer
    assert set(roles) == {names.REAL, names.CANARY}, f"worker roles: {sorted(roles)}"
    logbin = parse_rdv("logbin", list_form(service("logbin")["command"]))
    assert logbin.consumer, "logbin: give a stable --consumer"


def test_start_order() -> None:
    redis_health = service("redis").get("healthcheck", {}).get("test")
    assert redis_health and "ping" in list_form(redis_health), "redis needs a ping healthcheck"
    assert "--appendonly" in list_form(service("redis")["command"])
    for name in ONE_SHOT:
        assert str(service(name).get("restart", "no")) == "no", f"{name} is one-shot"

    def completed_before(name: str) -> set[str]:
        """Services that must complete successfully, transitively, before ``name`` starts."""
        out: set[str] = set()
        for dep, condition in depends_on(service(name)).items():
            if condition == "service_completed_successfully":
                out.add(dep)
            out |= completed_before(dep)
        return out

    for name, svc in services().items():
        if not built_from_dockerfile(svc) or name == "train":
            continue
        assert "train" in completed_before(name), f"{name} does not wait for train to complete"
        deps = depends_on(svc)
        assert deps.get("redis") == "service_healthy", f"{name} does not wait for healthy redis"
        if name not in ONE_SHOT:
            assert "create-deployment" in completed_before(name), (
                f"{name} does not wait for the demo deployment"
            )
    # Compose stops dependents first: as `rdv serve`, the gateway stops before the workers
    # (which answer its in-flight requests) and the log bin after them.
    workers = [name for name, sub in RDV_SUBCOMMAND.items() if sub == "worker"]
    for worker in workers:
        assert worker in depends_on(service("gateway")), f"gateway must depend on {worker}"
        assert "logbin" in depends_on(service(worker)), f"{worker} must depend on logbin"


def test_gateway_service() -> None:
    gateway = service("gateway")
    args = parse_rdv("gateway", list_form(gateway["command"]))
    assert args.host == "0.0.0.0"
    published = {str(p).rsplit(":", 1)[-1] for p in gateway.get("ports", [])}
    assert str(args.port) in published, f"port {args.port} not published: {gateway['ports']}"
    env = environment(gateway)
    assert env.get("RDV_GATEWAY_PROCESSES") == "2"
    assert env.get("RDV_ADMIN_TOKEN"), "the demo gateway needs an admin token (with a default)"
    probe = " ".join(list_form(gateway["healthcheck"]["test"]))
    assert "python" in probe, "the slim image has no curl: probe with python"
    url = re.search(r"http://[^'\" ]+", probe)
    assert url, f"no URL in the gateway healthcheck: {probe}"
    assert urlsplit(url.group()).port == args.port
    assert urlsplit(url.group()).path in {"/healthz", "/readyz"}


def test_rdv_services_reach_redis_by_service_name() -> None:
    for name, svc in services().items():
        if not built_from_dockerfile(svc):
            continue
        url = environment(svc).get("RDV_REDIS_URL")
        assert url, f"{name}: RDV_REDIS_URL is not set"
        parts = urlsplit(url)
        assert parts.scheme == "redis" and parts.hostname == "redis" and parts.port == 6379
        assert environment(svc).get("RDV_DATA_DIR") == "/data"
        assert any(str(v).endswith(":/data") for v in svc.get("volumes", [])), (
            f"{name}: mount the shared data volume at /data"
        )


def test_every_rdv_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    unknown = {
        f"{name}: {var}"
        for name, svc in services().items()
        for var in environment(svc)
        if var.startswith("RDV_") and var.removeprefix("RDV_").lower() not in fields
    }
    # ... and in interpolations (${RDV_...}) and comments, which the parsed file hides.
    unknown |= {
        f"compose.yaml text: {var}"
        for var in re.findall(r"\bRDV_[A-Z0-9_]+", COMPOSE.read_text())
        if var.removeprefix("RDV_").lower() not in fields
    }
    assert not unknown, f"not fields of gateway.settings.Settings: {sorted(unknown)}"


def test_bind_mounts_exist() -> None:
    for name, svc in services().items():
        for target, source in bind_mounts(svc).items():
            assert (DOCKER / source).exists(), f"{name}: {source} (-> {target}) does not exist"


# -- the create-deployment step -----------------------------------------------------------------


def test_create_deployment_step_runs_the_script_the_image_holds() -> None:
    svc = service("create-deployment")
    entrypoint = list_form(svc["entrypoint"])
    assert entrypoint[0] == "python" and len(entrypoint) == 2, entrypoint
    in_image = PurePosixPath(entrypoint[1])
    assert in_image.name == CREATE_DEPLOYMENT_SCRIPT
    assert (DOCKER / CREATE_DEPLOYMENT_SCRIPT).is_file()
    copies = [rest.split() for ins, rest in dockerfile_instructions() if ins == "COPY"]
    assert [f"docker/{CREATE_DEPLOYMENT_SCRIPT}", str(in_image)] in copies, (
        f"docker/Dockerfile does not COPY docker/{CREATE_DEPLOYMENT_SCRIPT} to {in_image}"
    )


def load_create_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "create_demo_deployment", DOCKER / CREATE_DEPLOYMENT_SCRIPT
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_create_deployment_script_creates_the_demo_deployment_once(
    r: redis.Redis, redis_url: str, demo_data_dir: Path
) -> None:
    script = load_create_script()
    settings = Settings(redis_url=redis_url, data_dir=demo_data_dir)
    assert script.ensure_demo_deployment(settings) is True
    assert script.ensure_demo_deployment(settings) is False  # `compose up` again: no change
    dep = DeploymentStore(r).get(DEMO_DEPLOYMENT)
    assert dep.revision == 1
    assert {role: (ref.name, ref.version) for role, ref in dep.roles.items()} == {
        names.REAL: (DEMO_MODEL, REAL_VERSION),
        names.CANARY: (DEMO_MODEL, CANARY_VERSION),
    }
    groups = {g["name"].decode() for g in r.xinfo_groups(names.input_stream(DEMO_DEPLOYMENT))}
    assert {names.model_group(names.REAL), names.model_group(names.CANARY)} <= groups


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    arg_defaults = dict(
        rest.split("=", 1) for ins, rest in instructions if ins == "ARG" and "=" in rest
    )
    bases = [rest.split()[0] for ins, rest in instructions if ins == "FROM"]
    images = [re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults.get(m[1], ""), b) for b in bases]
    assert re.fullmatch(r"python:3\.1[1-9]-slim", images[-1]), f"final base: {images[-1]}"
    final_stage = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]

    def last(name: str) -> str:
        found = [rest for ins, rest in final_stage if ins == name]
        assert found, f"the final stage has no {name}"
        return found[-1]

    assert json.loads(last("ENTRYPOINT")) == ["rdv"]
    assert last("USER").split(":")[0] not in {"root", "0"}
    assert "8000" in last("EXPOSE").split()
    env = dict(
        item.split("=", 1)
        for ins, rest in final_stage
        if ins == "ENV"
        for item in shlex.split(rest)
        if "=" in item
    )
    assert env.get("RDV_DATA_DIR") == "/data"
    assert env.get("RDV_HOST") == "0.0.0.0"
    for var in (v for v in env if v.startswith("RDV_")):
        assert var.removeprefix("RDV_").lower() in Settings.model_fields, var
    installs = [rest for ins, rest in instructions if ins == "RUN" and "pip install" in rest]
    assert installs and all("--no-cache-dir" in rest for rest in installs), installs
    assert any(re.search(r"pip install --no-cache-dir \.(\s|$)", rest) for rest in installs)


def test_dockerfile_copies_exist_and_pass_the_ignore_file() -> None:
    ignore = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for ins, rest in dockerfile_instructions():
        if ins != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            top = source if source in allowed else source.split("/")[0]
            assert top in allowed, f"COPY {source}: excluded by {DOCKERIGNORE.name}"


# -- Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert targets, "no scrape targets"
    gateway_port = parse_rdv("gateway", list_form(service("gateway")["command"])).port
    assert targets == [f"gateway:{gateway_port}"], targets
    job = config["scrape_configs"][0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"].get("scrape_interval")) == "5s"
    prometheus = service("prometheus")
    assert bind_mounts(prometheus).get("/etc/prometheus/prometheus.yml") == (
        "./prometheus/prometheus.yml"
    )
    assert "--config.file=/etc/prometheus/prometheus.yml" in list_form(prometheus["command"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    done = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_alerting_rules() -> None:
    rules = DOCKER / "prometheus" / "rules.yml"
    done = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "/etc/prometheus/rules.yml" in PROMETHEUS_CONFIG.read_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_the_alerting_rules_fire_when_they_should_and_not_before() -> None:
    """promtool's unit tests of the rules (a first skip, a later one, a role whose workers
    died); found by hand: a skip of a role that had none before went unseen."""
    done = subprocess.run(["promtool", "test", "rules", "rules_test.yml"], capture_output=True,
                          text=True, check=False, cwd=DOCKER / "prometheus")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- Grafana ------------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    ds = provisioned_datasource()
    assert ds.get("uid") == "prometheus"
    url = urlsplit(ds["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert "9090:9090" in [str(p) for p in service("prometheus").get("ports", [])]
    grafana = service("grafana")
    mounts = bind_mounts(grafana)
    assert mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning"
    providers = [
        p
        for f in sorted(DASHBOARD_PROVIDERS.glob("*.y*ml"))
        for p in (yaml.safe_load(f.read_text()) or {}).get("providers", [])
    ]
    assert len(providers) == 1, providers
    path = providers[0]["options"]["path"]
    assert mounts.get(path) == "./grafana/dashboards", f"{path} is not ./grafana/dashboards"
    env = environment(grafana)
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home == f"{path}/{DASHBOARD.name}"


def test_dashboard_structure() -> None:
    doc = dashboard()
    uids = [json.loads(f.read_text()).get("uid") for f in sorted(DASHBOARDS.glob("*.json"))]
    assert doc.get("uid") == "rendezvous" and uids.count("rendezvous") == 1, uids
    assert 36 <= doc["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    rows = [p["title"] for p in panels(doc) if p.get("type") == "row"]
    assert rows == ROWS, rows
    for p in panels(doc):
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]
    (variable,) = [v for v in doc["templating"]["list"] if v["name"] == "deployment"]
    query = variable["query"]
    query = query.get("query") if isinstance(query, dict) else query
    # every deployment with a role (idle ones too), never the "_unknown" of refused names
    assert query == "label_values(rdv_live_workers, deployment)", query
    assert variable["datasource"]["uid"] == provisioned_datasource()["uid"]


def test_every_panel_queries_rdv_metrics_through_the_provisioned_datasource() -> None:
    doc = dashboard()
    uid = provisioned_datasource()["uid"]
    assert charts(doc), "no panels"
    for p in charts(doc):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert (p.get("datasource") or {}).get("uid") == uid, f"{where}: datasource"
        targets = p.get("targets") or []
        assert any("rdv_" in t.get("expr", "") for t in targets), f"{where}: no rdv_ expr"
        for t in targets:
            assert (t.get("datasource") or p["datasource"]).get("uid") == uid, where


def test_dashboard_metrics_are_the_exposed_names() -> None:
    used: set[str] = set()
    for where, expr in exprs(dashboard()):
        found = set(METRIC_NAME.findall(expr))
        unknown = found - METRICS
        assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {expr}"
        used |= found
    assert used == METRICS, f"metrics with no panel: {sorted(METRICS - used)}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    rules = []
    for i, (where, expr) in enumerate(exprs(dashboard())):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
