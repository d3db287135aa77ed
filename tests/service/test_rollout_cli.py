"""``mdlora rollout start|status|promote|abort`` against a live server (HTTP, bearer token)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer
from typer.testing import CliRunner

from mdlora.cli.service import register
from mdlora.formats.adapter_package import adapter_package_bytes
from mdlora.service.app import create_app
from mdlora.service.settings import ServiceSettings
from tests.service.helpers import ADMIN_TOKEN, TOKEN, get_json, live_server
from tests.service.test_canary import DIV, DOM, variant


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_an_operator_runs_a_rollout_from_the_command_line(
    make_artifact: Callable[[str], Path], tmp_path: Path
) -> None:
    art = make_artifact("mlora")
    package = tmp_path / "pkg"
    package.mkdir()
    config, weights = adapter_package_bytes(variant(art, "good"))
    (package / "adapter_config.json").write_bytes(config)
    (package / "adapter_model.safetensors").write_bytes(weights)
    run = CliRunner().invoke
    app = create_app(ServiceSettings(artifact_dir=art, admin_token=ADMIN_TOKEN))
    with live_server(app) as url:
        auth = ["--url", url, "--token", TOKEN]
        # a package for another domain or division is refused before anything is uploaded
        for args in (["other"], [DOM, "--division", "nope"]):
            refused = run(cli(), ["rollout", "start", *args, "--package", str(package),
                                  "--percent", "15", *auth])  # fmt: skip
            assert refused.exit_code == 2 and "the package is for" in refused.output
        versions = get_json(
            url, f"/v1/adapters/{DIV}/{DOM}", headers={"Authorization": f"Bearer {TOKEN}"}
        )["versions"]
        assert len(versions) == 1, versions  # nothing registered, no canary started
        started = run(cli(), ["rollout", "start", DOM, "--package", str(package),
                              "--percent", "15", *auth])  # fmt: skip
        assert started.exit_code == 0, started.output
        assert json.loads(started.stdout)["state"] == "running"
        assert json.loads(started.stdout)["percent"] == 15
        changed = run(cli(), ["rollout", "start", DOM, "--version", "2", "--percent", "40",
                              "--division", DIV, *auth])  # fmt: skip
        assert changed.exit_code == 0 and json.loads(changed.stdout)["percent"] == 40
        shown = run(cli(), ["rollout", "status", DOM, *auth])
        assert shown.exit_code == 0 and "feedback" in json.loads(shown.stdout)
        wrong = run(cli(), ["rollout", "status", DOM, "--url", url, "--token", "nope"])
        assert wrong.exit_code == 2 and "401" in wrong.output
        neither = run(cli(), ["rollout", "start", DOM, "--percent", "5", *auth])
        assert neither.exit_code == 2
        done = run(cli(), ["rollout", "promote", DOM, "--reason", "looks good", *auth])
        assert done.exit_code == 0, done.output
        body = json.loads(done.stdout)
        assert body["state"] == "promoted" and body["reason"] == "looks good"
        listed = get_json(
            url, f"/v1/adapters/{DIV}/{DOM}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert listed["active_version"] == 2
        again = run(cli(), ["rollout", "abort", DOM, *auth])
        assert again.exit_code == 2 and "no running rollout" in again.output
