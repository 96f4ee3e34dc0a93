"""The Grafana dashboard and the Prometheus alert rules name only the metrics that exist.

A query over a misspelt metric is not an error in Grafana or Prometheus: it is an empty
panel, an alert that never fires. So every expression is read here and each metric name
it uses is checked against the server's metric names (engine/metrics.py's docstring) and
dcgm-exporter's. When promtool is at hand (Debian: the `prometheus` package), it checks the
rules' syntax too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "epreuve-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"

SERVER_METRICS = {"epreuve_submissions_total", "epreuve_jobs_total", "epreuve_queue_jobs",
                  "epreuve_workers", "epreuve_http_requests_total", "epreuve_nodes",
                  "epreuve_node_heartbeat_age_seconds"}
HISTOGRAMS = {"epreuve_job_runtime_seconds", "epreuve_http_request_duration_seconds"}
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"}
KNOWN = SERVER_METRICS | DCGM | {f"{h}{suffix}" for h in HISTOGRAMS
                                 for suffix in ("_bucket", "_sum", "_count")}
# exported, not graphed: the unix time of each node's last heartbeat
UNGRAPHED = {"epreuve_node_last_heartbeat_seconds"}
LABELS = {"state", "reason", "kind", "challenge", "phase", "route", "method", "status",
          "gpu", "UUID", "Hostname", "le", "node"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a small reader, enough for these files:
    strings, label matchers, ranges and grouping clauses out; what is left and is not
    followed by "(" is a metric)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", "", text)
    text = re.sub(r"\[[^\[\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group() in KEYWORDS:
            continue
        names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    matchers = re.findall(r"\{([^{}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr))
    grouped = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^()]*)\)", expr)
    return {name.strip() for part in matchers for name in re.findall(r"(\w+)\s*[=!]~?", part)} \
        | {name.strip() for part in grouped for name in part.split(",") if name.strip()}


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query":
            queries.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return queries


def test_the_reader_finds_metrics_and_skips_the_rest():
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(epreuve_http_request_duration'
            '_seconds_bucket{route=~"/api.*"}[$__rate_interval]))) / on () group_left '
            'clamp_min(sum(DCGM_FI_DEV_FB_USED offset 5m), 1) > bool 0.5 and misspelt_metric')
    assert metric_names(expr) == {"epreuve_http_request_duration_seconds_bucket",
                                  "DCGM_FI_DEV_FB_USED", "misspelt_metric"}
    assert label_names(expr) == {"le", "route"}


def test_the_dashboard_loads_and_names_only_known_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    used = set()
    for query in dashboard_queries(dashboard):
        names = metric_names(query)
        assert names, query
        assert names <= KNOWN, (query, names - KNOWN)
        assert label_names(query) <= LABELS, (query, label_names(query) - LABELS)
        used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    # every metric the brief lists has a panel
    assert used >= SERVER_METRICS | HISTOGRAMS | DCGM
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("queue", "workers", "failures by reason", "gpu utilisation", "gpu power",
                  "gpu energy", "gpu memory", "latency"):
        assert topic in titles, topic


def _rules() -> dict[str, dict]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    return {rule["alert"]: rule for rule in rules}


def test_the_alerts_parse_and_have_the_three_rules():
    rules = _rules()
    assert set(rules) == {"EpreuveNodeLost", "EpreuveQueueStalled", "EpreuveJobFailureRateHigh"}
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        names = metric_names(rule["expr"])
        assert names and names <= KNOWN | UNGRAPHED, (name, names - KNOWN - UNGRAPHED)
        assert label_names(rule["expr"]) <= LABELS, name


def test_each_alert_watches_what_it_says():
    rules = _rules()
    lost = rules["EpreuveNodeLost"]["expr"]
    assert {"epreuve_workers", "epreuve_node_heartbeat_age_seconds"} <= metric_names(lost)
    stalled = rules["EpreuveQueueStalled"]["expr"]
    assert 'epreuve_queue_jobs{state="queued"}' in stalled and "[15m]" in stalled
    assert "epreuve_jobs_total" in metric_names(stalled)
    failing = rules["EpreuveJobFailureRateHigh"]["expr"]
    assert "[30m]" in failing
    # cancellations are no failure: every read of the job counter leaves them out
    reads = re.findall(r"epreuve_jobs_total\{([^}]*)\}", failing)
    assert reads and all('reason!="CANCELLED"' in r and "cancelled" not in r for r in reads)


def _promtool() -> str:
    """Debian's promtool (package `prometheus`, scripts/bootstrap installs it): skipped on a
    developer's machine without it, a failure in CI (CI must not pass by testing nothing)."""
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("no promtool: CI installs Debian's prometheus package (scripts/bootstrap)")
    pytest.skip("promtool not installed (Debian: apt-get install prometheus)")


def test_promtool_accepts_the_rules():
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 rules found" in result.stdout


def test_each_alert_fires_on_its_story_and_not_on_its_look_alike():
    """deploy/prometheus/alerts.test.yml: promtool's unit tests of the rules (series in,
    alerts out at given times)."""
    result = subprocess.run([_promtool(), "test", "rules", str(ALERT_TESTS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rule_tests_cover_every_alert_firing_and_quiet():
    document = yaml.safe_load(ALERT_TESTS.read_text())
    assert document["rule_files"] == [ALERTS.name]
    checks = [check for test in document["tests"] for check in test["alert_rule_test"]]
    fired = {c["alertname"] for c in checks if c["exp_alerts"]}
    quiet = {c["alertname"] for c in checks if not c["exp_alerts"]}
    assert fired == quiet == set(_rules())
