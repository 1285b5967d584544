"""The worker's Settings options: one declaration (the ``Settings`` field) for type, help, env var and default."""

from __future__ import annotations

import os

import pytest
import typer
from typer.testing import CliRunner

from stream_mtl import cli
from stream_mtl.settings import Settings

WORKER_FLAGS = {
    "--topology": "-t",
    "--broker": "-b",
    "--app-id": None,
    "--run-dir": None,
    "--session-timeout": None,
    "--log-level": None,
    "--metrics-port": None,
    "--role": None,
    "--dist-world-size": None,
    "--dist-rank": None,
    "--dist-init-method": None,
}


@pytest.fixture(autouse=True)
def _no_stream_mtl_env(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("STREAM_MTL_")]:
        monkeypatch.delenv(name)


def _worker_settings(monkeypatch, args: list[str]) -> Settings:
    """Run ``stream-mtl worker ARGS`` up to the Settings it builds (no topology, broker or worker started)."""
    import stream_mtl.topology

    built: list[Settings] = []

    def capture(**overrides: object) -> Settings:
        built.append(Settings(**{k: v for k, v in overrides.items() if v is not None}))
        raise typer.Exit(0)

    monkeypatch.setattr(stream_mtl.topology, "load_topology", lambda name: name)
    monkeypatch.setattr(cli, "_settings", capture)
    result = CliRunner().invoke(cli.app, ["worker", "-t", "yeast", *args])
    assert result.exit_code == 0, result.output
    return built[0]


def test_worker_keeps_its_flags() -> None:
    worker = typer.main.get_command(cli.app).commands["worker"]
    flags = {p.opts[0]: (p.opts[1] if len(p.opts) > 1 else None) for p in worker.params if p.name != "help"}
    assert flags == WORKER_FLAGS


def test_flags_reach_settings_and_override_env_vars(monkeypatch) -> None:
    monkeypatch.setenv("STREAM_MTL_DIST_RANK", "0")
    monkeypatch.setenv("STREAM_MTL_ROLE", "trainer")
    monkeypatch.setenv("STREAM_MTL_LOG_LEVEL", "INFO")
    monkeypatch.setenv("STREAM_MTL_COMMIT_INTERVAL", "3")  # not a flag: Settings still reads it
    s = _worker_settings(
        monkeypatch,
        ["-b", "kafka://h:1", "--session-timeout", "2", "--dist-world-size", "2", "--dist-rank", "1", "--run-dir", "r"],
    )
    assert (s.broker, s.session_timeout, s.dist_world_size, s.dist_rank) == ("kafka://h:1", 2.0, 2, 1)
    assert str(s.run_dir) == "r"
    assert (s.role, s.log_level, s.commit_interval) == ("trainer", "INFO", 3.0)  # from the environment
    assert (s.app_id, s.metrics_port, s.dist_init_method) == (None, None, None)  # not given: the field defaults


def test_flags_not_given_leave_the_settings_defaults(monkeypatch) -> None:
    assert _worker_settings(monkeypatch, []) == Settings()


def test_help_comes_from_the_settings_fields() -> None:
    worker = typer.main.get_command(cli.app).commands["worker"]
    for param in worker.params:
        if param.name in Settings.model_fields:
            field = Settings.model_fields[param.name]
            assert param.help == field.description, param.name
            assert param.envvar == f"STREAM_MTL_{param.name.upper()}"
            assert param.default is None  # only a given flag (or its env var) overrides Settings
    result = CliRunner().invoke(cli.app, ["worker", "--help"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert Settings.model_fields["session_timeout"].description in result.output
    assert "STREAM_MTL_DIST_RANK" in result.output
