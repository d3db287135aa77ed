"""``mdlora serve`` / ``publish-features`` wiring, and serve_artifact in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer
from typer.testing import CliRunner

from mdlora.cli.service import register
from tests.service.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_commands_are_registered_with_their_options() -> None:
    runner = CliRunner()
    serve = runner.invoke(cli(), ["serve", "--help"])
    publish = runner.invoke(cli(), ["publish-features", "--help"])
    assert serve.exit_code == 0 and "--host" in serve.output and "--port" in serve.output
    assert publish.exit_code == 0 and "--artifact" in publish.output and "--data" in publish.output


def test_serve_refuses_a_directory_that_is_not_an_artifact(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["serve", "--artifact", str(tmp_path)])
    assert result.exit_code != 0
    assert "manifest.json" in result.output


def test_serve_stops_on_a_broken_artifact_with_one_line(tmp_path: Path) -> None:
    """A truncated weight file or an edited encoder: ``error: ...`` naming the file, exit 2,
    before any server starts (not uvicorn's startup traceback); a bad port likewise."""
    import shutil

    from tests.service.demo import build_demo_artifact

    art = build_demo_artifact(tmp_path / "a", method="mlora", division="age")
    broken = tmp_path / "broken"
    shutil.copytree(art, broken)
    weights = (broken / "backbone.safetensors").read_bytes()
    (broken / "backbone.safetensors").write_bytes(weights[: len(weights) // 2])
    result = CliRunner().invoke(cli(), ["serve", "--artifact", str(broken)])
    assert result.exit_code == 2, result.output
    assert "backbone.safetensors: checksum does not match" in result.output
    assert "Traceback" not in result.output
    shutil.rmtree(broken)
    shutil.copytree(art, broken)
    (broken / "encoder.json").write_text("[]")
    result = CliRunner().invoke(cli(), ["serve", "--artifact", str(broken)])
    assert result.exit_code == 2 and "encoder.json: checksum" in result.output, result.output
    result = CliRunner().invoke(cli(), ["serve", "--artifact", str(art), "--port", "99999"])
    assert result.exit_code == 2 and "65535" in result.output, result.output


def test_serve_artifact_answers_over_http(demo_artifacts: dict[str, Path]) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDLORA_")}
    code = (
        "from pathlib import Path; from mdlora.cli.service import serve_artifact; "
        f"serve_artifact(Path({str(demo_artifacts['mlora'])!r}), '127.0.0.1', {port})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        r = httpx.post(url + "/predict", json={"domain": "25", "item_ids": [3, 6]}, timeout=10)
        assert r.status_code == 200 and len(r.json()["scores"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_publish_features_user_errors_are_one_line(
    demo_artifacts: dict[str, Path], tmp_path: Path
) -> None:
    art = str(demo_artifacts["multilora"])
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "other.csv").write_text("uid,item\n1,2\n")
    cases = {
        "not found": (["--artifact", art, "--data", str(tmp_path / "nope.csv")], "not found"),
        "empty": (["--artifact", art, "--data", str(tmp_path / "empty.csv")], "is empty"),
        "no id column": (
            ["--artifact", art, "--data", str(tmp_path / "other.csv")], "no 'user_id'"
        ),
        "not an artifact": (["--artifact", str(tmp_path), "--data", "x.csv"], "not an mdlora"),
        "redis down": (
            ["--artifact", art, "--data", str(tmp_path / "other.csv"), "--user-field", "uid",
             "--item-field", "item", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
            "cannot reach or write Redis",
        ),
        "not a redis url": (
            ["--artifact", art, "--data", str(tmp_path / "other.csv"), "--user-field", "uid",
             "--item-field", "item", "--redis-url", "foo://bar"],
            "--redis-url foo://bar",
        ),
    }  # fmt: skip
    for what, (args, needle) in cases.items():
        result = CliRunner().invoke(cli(), ["publish-features", *args])
        assert result.exit_code == 2, (what, result.output)
        assert needle in result.output and "Traceback" not in result.output, (what, result.output)


def test_serve_names_an_invalid_setting_by_its_variable(demo_artifacts: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        cli(),
        ["serve", "--artifact", str(demo_artifacts["mlora"])],
        env={"MDLORA_RUNTIME": "tensorrt", "MDLORA_MAX_ITEMS": "0"},
    )
    assert result.exit_code == 2, result.output
    assert "MDLORA_RUNTIME" in result.output and "'tensorrt'" in result.output
    assert "MDLORA_MAX_ITEMS" in result.output and "Traceback" not in result.output


def test_unknown_mdlora_variables_are_named_with_the_close_one() -> None:
    from mdlora.service.settings import unknown_variables

    env = {"MDLORA_REGISTY": "redis", "MDLORA_RUNTIME": "onnx", "MDLORA_DATA_DIR": "d", "X": "1"}
    assert unknown_variables(env) == ["MDLORA_REGISTY (did you mean MDLORA_REGISTRY?)"]
