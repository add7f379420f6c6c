"""The deploy files hold what operators rely on: compose.yaml's safety properties, alert rules
that parse and name only metrics the engine emits, a dashboard that does too. (Docker and
promtool are not available here: the files are read as YAML and JSON, PromQL by promql-parser.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.metric_names import DASHBOARD, series_names

ROOT = Path(__file__).resolve().parents[2]
UIS = {"jaeger", "grafana", "prometheus"}
ENGINE = {"worker", "relay"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_compose_publishes_uis_on_loopback_only() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for port in published(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert all(published(services[ui]) for ui in UIS), "the UIs stay reachable on loopback"
    assert not published(services["postgres"]) and not published(services["redis"])


def test_compose_grafana_has_no_anonymous_access() -> None:
    env = compose()["services"]["grafana"]["environment"]
    assert str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in env


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def test_compose_worker_and_relay_have_healthchecks_grace_and_limits() -> None:
    services = compose()["services"]
    for name in ENGINE:
        service = services[name]
        check = service["healthcheck"]["test"]
        text = " ".join(check)
        assert "/healthz" in text or "/readyz" in text or "health" in check, check
        port = service["environment"]["SAGA_HTTP_PORT"]
        assert f":{port}/" in text or "health" in check, "the healthcheck asks the probe's port"
        limits = service["deploy"]["resources"]["limits"]
        assert limits["cpus"] and limits["memory"], f"{name} has no resource limits"
    # SIGTERM lets running steps finish: far beyond compose's default 10 s.
    assert seconds(services["worker"]["stop_grace_period"]) >= 60
    assert seconds(services["relay"]["stop_grace_period"]) > 10
    for name, service in services.items():
        assert service.get("deploy", {}).get("resources", {}).get("limits"), f"{name}: no limits"


def test_prometheus_loads_the_alert_rules_compose_mounts() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    prometheus = compose()["services"]["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into the prometheus container"
        assert (ROOT / mounts[rule_file]).is_file()


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, read from its syntax tree (a real PromQL parser:
    an expression that does not parse fails the test)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def grafana_exprs(node: Any) -> list[str]:
    """Every query of a dashboard, its Grafana variables replaced by values PromQL accepts."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in grafana_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in grafana_exprs(v)]
    return []


def substitute(expr: str) -> str:
    expr = re.sub(r"\$__(rate_)?interval\b", "5m", expr)
    return re.sub(r"\$\{?\w+(:\w+)?\}?", ".*", expr)


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_parse_and_name_only_emitted_metrics() -> None:
    rules = alert_rules()
    emitted = series_names()
    for rule in rules:
        assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']} names no saga metric"
        assert names <= emitted, f"{rule['alert']} names metrics not emitted: {names - emitted}"
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]


def test_alert_rules_cover_what_an_operator_must_hear_about() -> None:
    named = set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    for metric in (
        "saga_outbox_lag_seconds",  # outbox lag
        "saga_steps_overdue",  # steps waiting past their dispatch timeout
        "saga_compensations_total",  # compensation failures
        "saga_runs_compensation_failed",  # runs stuck in compensation_failed
        "saga_workers",  # worker count
    ):
        assert metric in named, f"no alert on {metric}"


def test_the_dashboard_queries_the_nine_metric_names() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/saga.json").read_text())
    exprs = grafana_exprs(dashboard)
    assert len(exprs) >= 9
    named = set().union(*(metric_names(substitute(e)) for e in exprs))
    assert named <= series_names(), named - series_names()
    bases = {re.sub(r"_(bucket|count|sum)$", "", n) for n in named}
    assert bases == DASHBOARD


def test_metric_names_are_read_from_the_syntax_tree() -> None:
    expr = 'sum by (saga_name) (rate(saga_x_total{saga_step="a"}[5m])) / on(saga_run_state) saga_y'
    assert metric_names(expr) == {"saga_x_total", "saga_y"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(saga_x_total[5m])")
