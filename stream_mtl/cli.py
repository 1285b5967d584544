"""The ``stream-mtl`` command: worker, produce, demo, broker, report, webhook-receiver, check."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Optional, TypeVar, Union, get_args, get_origin

import typer

from stream_mtl.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Streaming online multi-task learning on Kafka.")

TopologyOpt = Annotated[str, typer.Option("--topology", "-t", help="topology name (topologies/<name>), folder or file")]
BrokerOpt = Annotated[
    Optional[str], typer.Option("--broker", "-b", envvar="STREAM_MTL_BROKER", help="kafka://host:port")
]


_Command = TypeVar("_Command", bound=Callable[..., Any])


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def settings_options(*names: str, **short: str) -> Callable[[_Command], _Command]:
    """Replace a command's ``**overrides`` with one ``--name`` option per ``Settings`` field in *names*.

    Type, help (the field's description), env var and the default shown all come from the field; *short*
    adds a short flag (``broker="-b"``). The options default to None, so ``_settings`` drops those not
    given and ``Settings`` keeps its own default or environment value.
    """

    def decorate(command: _Command) -> _Command:
        sig = inspect.signature(command, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for name in names:
            field = Settings.model_fields[name]
            tp = field.annotation
            if get_origin(tp) in (Union, UnionType):  # X | None: X
                (tp,) = (arg for arg in get_args(tp) if arg is not type(None))
            decls = [f"--{name.replace('_', '-')}", *([short[name]] if name in short else [])]
            default = field.get_default(call_default_factory=True)
            option = typer.Option(
                *decls,
                envvar=Settings.model_config["env_prefix"] + name.upper(),
                help=field.description,
                show_default=False if default is None else str(default),
            )
            params.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[tp], option]
                )
            )
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]  # what typer reads
        return command

    return decorate


@app.command()
@settings_options(
    "broker",
    "app_id",
    "run_dir",
    "session_timeout",
    "log_level",
    "metrics_port",
    "role",
    "dist_world_size",
    "dist_rank",
    "dist_init_method",
    broker="-b",
)
def worker(topology: TopologyOpt, **overrides: object) -> None:
    """Run a long-lived worker of a topology (Ctrl-C / SIGTERM stops it cleanly)."""
    import faust

    from stream_mtl.app import build_app
    from stream_mtl.topics import TopicNames, create_topics
    from stream_mtl.topology import load_topology

    topo = load_topology(topology)
    settings = _settings(**overrides)
    # SIGTERM before Faust installs its own handlers (imports, topics, the trainer process): a clean exit 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(create_topics(settings.bootstrap, TopicNames(topo, settings.app_id).all()))
    pipeline = build_app(topo, settings)
    try:
        faust.Worker(pipeline.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    finally:
        # a worker stopped before its services started (mid-join) never ran their on_stop: without this, the
        # interpreter's exit waited forever for the trainer process (which ignores SIGTERM)
        pipeline.close()


@app.command()
def produce(
    topology: TopologyOpt,
    broker: BrokerOpt = None,
    app_id: Annotated[Optional[str], typer.Option(help="topic prefix (default: topology name)")] = None,
    malformed: Annotated[int, typer.Option(help="malformed records to mix in")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="send at most this many events")] = None,
) -> None:
    """Replay the topology's data set onto its source topic."""
    from stream_mtl.produce import produce_events
    from stream_mtl.topics import TopicNames, create_topics
    from stream_mtl.topology import load_producer, load_topology

    topo = load_topology(topology)
    settings = _settings(broker=broker, app_id=app_id)
    names = TopicNames(topo, settings.app_id)
    asyncio.run(create_topics(settings.bootstrap, names.all()))
    t0 = time.time()
    rep = asyncio.run(
        produce_events(settings.bootstrap, names, load_producer(topology)(), malformed=malformed, limit=limit)
    )
    typer.echo(
        f"sent {rep.events} events + {rep.malformed} malformed + {rep.labels} late labels "
        f"to {', '.join(names.sources)} in {time.time() - t0:.2f}s"
    )


@app.command()
def demo(
    topology: TopologyOpt = "yeast",
    broker: BrokerOpt = None,
    malformed: Annotated[int, typer.Option(help="malformed records to mix in (they go to the DLQ)")] = 5,
    run_dir: Annotated[Path, typer.Option(help="where metrics.json and report.md go")] = Path("runs/latest"),
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 600.0,
    limit: Annotated[Optional[int], typer.Option(help="replay at most this many events")] = None,
) -> None:
    """Run the job end to end: embedded broker (unless --broker), a worker, the producer, a report."""
    from stream_mtl.demo import run_demo

    run_demo(topology, broker=broker, malformed=malformed, run_dir=run_dir, timeout=timeout, limit=limit)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (with metrics.jsonl), e.g. runs/latest")],
) -> None:
    """Write <run_dir>/report.html: per-task metrics with drift markers, batch shares, loss weights."""
    from stream_mtl.run_report import write_report

    typer.echo(f"report: {write_report(run_dir)}")


@app.command("webhook-receiver")
def webhook_receiver(
    secret_env: Annotated[str, typer.Option(help="environment variable with the secret(s), comma-separated")] = (
        "STREAM_MTL_WEBHOOK_SECRET"
    ),
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8787,
) -> None:
    """Receive, verify and print alerts (bad signatures, old timestamps and replays are refused)."""
    import os

    import orjson
    from aiohttp import web

    from stream_mtl.receiver import make_receiver

    secrets = [s.strip() for s in os.environ.get(secret_env, "").split(",") if s.strip()]
    if not secrets:
        raise typer.BadParameter(f"${secret_env} holds no secret", param_hint="--secret-env")

    def show(webhook_id: str, payload: object) -> None:
        typer.echo(orjson.dumps({"webhook-id": webhook_id, "alert": payload}).decode())

    typer.echo(f"listening on http://{host}:{port}/ (secrets from ${secret_env})", err=True)
    web.run_app(make_receiver(secrets, show), host=host, port=port, print=None)


@app.command()
def broker(port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0: a free one)")] = 0) -> None:
    """Run the embedded Tansu broker in the foreground (memory storage, loopback only)."""
    from stream_mtl.broker import EmbeddedBroker

    with EmbeddedBroker(port=port or None) as b:
        typer.echo(f"broker on {b.url} (STREAM_MTL_BROKER={b.url}); Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@app.command()
def check(
    path: Annotated[str, typer.Argument(help="topology name (topologies/<name>), folder or file")],
    events: Annotated[int, typer.Option(help="sample size: the first N events of its producer (else synthetic)")] = 300,
    seed: Annotated[int, typer.Option(help="seed of the model and of synthetic events")] = 0,
) -> None:
    """Validate a topology, run every task's checks and the shared-trunk diagnostics on sample data."""
    import torch

    from stream_mtl.testing import run_check

    torch.set_num_threads(1)  # tiny models: one thread is faster and leaves the machine to others
    raise typer.Exit(run_check(path, events, seed))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app()
