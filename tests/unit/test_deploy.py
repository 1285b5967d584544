"""docker-compose.yml (no Docker engine here): it parses, Kafka runs in KRaft mode, and every stream_mtl
command in it is a real CLI command with real options; Prometheus scrapes the port the workers serve."""

from __future__ import annotations

from pathlib import Path

import typer.main
import yaml

from stream_mtl.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_kafka_runs_in_kraft_mode_without_zookeeper() -> None:
    env = SERVICES["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@kafka:")
    assert len(env["CLUSTER_ID"]) == 22  # a base64url UUID
    assert not any("zookeeper" in name for name in SERVICES)
    assert "healthcheck" in SERVICES["kafka"]


def test_every_stream_mtl_command_parses_with_the_real_cli() -> None:
    cli = typer.main.get_command(app)
    seen = set()
    roles = {}
    for name, svc in SERVICES.items():
        if svc.get("image") != "stream-mtl:latest":
            continue
        sub, *args = svc["command"]
        cmd = cli.commands[sub]  # KeyError: not a stream-mtl command
        ctx = cmd.make_context(sub, list(args))  # raises on an unknown option or a missing argument
        seen.add(sub)
        if sub == "worker":
            roles[name] = ctx.params["role"]
        if sub != "webhook-receiver":
            assert svc["environment"]["STREAM_MTL_BROKER"] == "kafka://kafka:9092", name
    assert seen == {"worker", "produce", "webhook-receiver"}
    assert roles == {"ingest": "ingest", "trainer": "trainer"}  # the worker roles, one service each


def test_prometheus_scrapes_the_workers_and_alerts_go_to_the_receiver() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    sd = prom["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["ingest", "trainer"]
    receiver = SERVICES["webhook-receiver"]["command"]
    port = receiver[receiver.index("--port") + 1]
    for role in ("ingest", "trainer"):
        worker = SERVICES[role]["environment"]
        assert sd["port"] == int(worker["STREAM_MTL_METRICS_PORT"])
        assert worker["STREAM_MTL_METRICS_HOST"] == "0.0.0.0"
        assert f"http://webhook-receiver:{port}/" in worker["STREAM_MTL_WEBHOOK_URLS"]
        secret = SERVICES["webhook-receiver"]["environment"]["STREAM_MTL_WEBHOOK_SECRET"]
        assert worker["STREAM_MTL_WEBHOOK_SECRET"] == secret
    assert (ROOT / "Dockerfile").exists()


def test_the_keda_manifests_scale_each_role_on_the_lag_its_workers_export() -> None:
    from stream_mtl.prometheus import Exporter

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s-worker.yaml").read_text()))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    cli = typer.main.get_command(app).commands["worker"]
    ex = Exporter("drift", "ingest")
    ex.update({"lag": {"drift.events": 5}})
    exported = ex.render().decode()
    assert 'stream_mtl_consumer_lag{app="drift",role="ingest",topic="drift.events"} 5.0' in exported
    roles = set()
    for so in scaled:
        deployment = deployments[so["spec"]["scaleTargetRef"]["name"]]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert container["args"][0] == "worker"
        role = cli.make_context("worker", list(container["args"][1:])).params["role"]
        roles.add(role)
        trigger = so["spec"]["triggers"][0]
        # the query sums the metric the exporter defines, for this deployment's role
        assert trigger["type"] == "prometheus"
        assert f'stream_mtl_consumer_lag{{app="drift", role="{role}"}}' in trigger["metadata"]["query"]
        assert container["ports"][0]["containerPort"] == int(env["STREAM_MTL_METRICS_PORT"])
    assert roles == {"ingest", "trainer"}
