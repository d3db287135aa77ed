"""Static checks of the deploy stack: Prometheus and Grafana.

Nothing here needs Docker or a cluster (helpers: ``tests/deploy/parsing.py``)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from tests.deploy.parsing import (
    COMPOSE_FILE,
    HISTOGRAMS,
    KNOWN_METRICS,
    PROMETHEUS_CONFIG,
    QUERYABLE_METRICS,
    _argv,
    _container_ports,
    _load_yaml,
    _mounts,
    _promql_metrics,
    _services,
    _walk,
)

# ---------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------


def _prometheus_service() -> dict[str, Any]:
    return _services()["prometheus"]


def _mounted_host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Host path that a bind mount of the service puts at container_path."""
    for kind, source, target in _mounts(service):
        if kind != "bind" or source is None:
            continue
        target = target.rstrip("/")
        if container_path == target:
            return (COMPOSE_FILE.parent / source).resolve()
        if container_path.startswith(target + "/"):
            return (COMPOSE_FILE.parent / source / container_path[len(target) + 1 :]).resolve()
    return None


def test_prometheus_config_is_mounted() -> None:
    service = _prometheus_service()
    flags = [a for a in _argv(service.get("command")) if a.startswith("--config.file=")]
    config_path = flags[-1].split("=", 1)[1] if flags else "/etc/prometheus/prometheus.yml"
    host = _mounted_host_path(service, config_path)
    assert host == PROMETHEUS_CONFIG.resolve(), f"{config_path} in the container is {host}"


def test_prometheus_scrapes_mdlora_on_the_published_port() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    assert isinstance(config, dict)
    mdlora_ports = _container_ports(_services()["mdlora"])
    scraped = []
    for job in config.get("scrape_configs", []):
        for static in job.get("static_configs", []):
            for target in static.get("targets", []):
                host, _, port = str(target).rpartition(":")
                if host == "mdlora":
                    scraped.append((job, int(port)))
    assert scraped, "prometheus.yml does not scrape the mdlora service"
    for job, scraped_port in scraped:
        assert scraped_port in mdlora_ports, (
            f"scrapes mdlora:{scraped_port}, compose exposes {mdlora_ports}"
        )
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert job.get("scheme", "http") == "http"


def test_prometheus_rule_files_exist_are_mounted_and_use_known_metrics() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    service = _prometheus_service()
    flags = [a for a in _argv(service.get("command")) if a.startswith("--config.file=")]
    config_in_container = PurePosixPath(
        flags[-1].split("=", 1)[1] if flags else "/etc/prometheus/prometheus.yml"
    )
    for rule_file in config.get("rule_files", []) or []:
        assert not any(ch in rule_file for ch in "*?["), "list rule files explicitly"
        in_container = config_in_container.parent / rule_file  # relative to the config file
        host = _mounted_host_path(service, str(in_container))
        assert host is not None and host.is_file(), f"rule file {in_container} is not mounted"
        rules = _load_yaml(host)
        exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
        assert exprs, f"{host} has no rules"
        for expr in exprs:
            unknown = _promql_metrics(expr) - QUERYABLE_METRICS
            assert not unknown, f"{host.name}: {expr!r} uses unknown metrics {unknown}"


# ---------------------------------------------------------------------------
# Grafana
# ---------------------------------------------------------------------------


def _grafana_mount(container_path: str) -> Path:
    host = _mounted_host_path(_services()["grafana"], container_path)
    assert host is not None, f"nothing is mounted at {container_path} in the grafana service"
    return host


@lru_cache(maxsize=1)
def _datasource() -> dict[str, Any]:
    provisioning = _grafana_mount("/etc/grafana/provisioning")
    assert provisioning.is_dir()
    datasources = [
        ds
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for ds in (_load_yaml(path) or {}).get("datasources", [])
    ]
    prometheus = [ds for ds in datasources if ds.get("type") == "prometheus"]
    assert len(prometheus) == 1, "provision exactly one Prometheus datasource"
    return prometheus[0]


def _dashboard_files() -> list[Path]:
    provisioning = _grafana_mount("/etc/grafana/provisioning")
    files: list[Path] = []
    for path in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in (_load_yaml(path) or {}).get("providers", []):
            folder = _grafana_mount(provider["options"]["path"])
            assert folder.is_dir(), f"dashboard folder {folder} does not exist"
            files.extend(sorted(folder.glob("*.json")))
    assert files, "no dashboard JSON is provisioned"
    return files


def test_grafana_datasource_points_at_prometheus() -> None:
    ds = _datasource()
    url = urlparse(ds["url"])
    assert url.hostname == "prometheus" and "prometheus" in _services()
    assert url.port == 9090
    assert ds.get("uid"), "give the datasource a fixed uid for the dashboards to use"


def test_grafana_dashboard_queries_only_known_metrics() -> None:
    uid = _datasource()["uid"]
    for path in _dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard.get("title") and dashboard.get("uid")
        exprs: list[str] = []
        for node in _walk(dashboard):
            if not isinstance(node, dict):
                continue
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            datasource = node.get("datasource")
            if isinstance(datasource, dict) and datasource.get("type") == "prometheus":
                assert datasource.get("uid") == uid, f"{path.name}: datasource {datasource}"
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if variable.get("type") == "query":
                exprs.append(query["query"] if isinstance(query, dict) else str(query))
        assert exprs, f"{path.name} has no queries"
        for expr in exprs:
            unknown = _promql_metrics(expr) - QUERYABLE_METRICS
            assert not unknown, f"{path.name}: {expr!r} uses unknown metrics {sorted(unknown)}"
        ids = [
            p["id"]
            for p in _walk(dashboard.get("panels", []))
            if isinstance(p, dict) and "gridPos" in p
        ]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"


def test_grafana_dashboard_covers_the_service() -> None:
    exprs_by_panel: dict[str, list[str]] = {}
    used: set[str] = set()
    for path in _dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in _walk(dashboard.get("panels", [])):
            if isinstance(panel, dict) and "targets" in panel:
                exprs = [t["expr"] for t in panel["targets"] if "expr" in t]
                exprs_by_panel[panel.get("title", "")] = exprs
                for expr in exprs:
                    used |= _promql_metrics(expr)
    base = {
        re.sub(r"_(bucket|sum|count)$", "", m) if m.startswith(tuple(HISTOGRAMS)) else m
        for m in used
    }
    missing = KNOWN_METRICS - base
    assert not missing, f"no panel shows {sorted(missing)}"

    def quantile_by_route(q: str) -> bool:
        pattern = rf"histogram_quantile\(\s*{q}\s*,.*by\s*\([^)]*\broute\b"
        return any(
            re.search(pattern, expr, re.S) for exprs in exprs_by_panel.values() for expr in exprs
        )

    assert quantile_by_route(r"0?\.5"), "no p50 latency by route"
    assert quantile_by_route(r"0?\.99"), "no p99 latency by route"
    items_by_domain = [
        e
        for exprs in exprs_by_panel.values()
        for e in exprs
        if "mdlora_items_scored_total" in e and re.search(r"by\s*\([^)]*\bdomain\b", e)
    ]
    assert items_by_domain, "no items-scored-by-domain panel"


