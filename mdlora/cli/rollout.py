"""``mdlora rollout start|status|promote|abort``: the rollout admin API from a shell.

Talks HTTP to a running service (``--url``, default ``$MDLORA_URL`` or
``http://127.0.0.1:8000``) with the admin token (``--token``, default ``$MDLORA_ADMIN_TOKEN``).
Prints the rollout's status as JSON (stdout) and a one-line summary (stderr); an error answer
exits with status 2 and its ``detail``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn

import typer

DEFAULT_URL = "http://127.0.0.1:8000"

rollout_app = typer.Typer(
    help="Canary rollouts of a domain's adapter on a running service (see "
         "mdlora/service/README.md).",
    no_args_is_help=True,
)

URL = typer.Option(None, "--url", help=f"service URL (default: $MDLORA_URL or {DEFAULT_URL})")
TOKEN = typer.Option(None, "--token", help="admin token (default: $MDLORA_ADMIN_TOKEN)")
DIVISION = typer.Option(None, "--division", help="the domain's division (default: primary)")


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _call(method: str, url: str | None, token: str | None, path: str, **kw: Any) -> dict[str, Any]:
    import httpx

    base = (url or os.environ.get("MDLORA_URL") or DEFAULT_URL).rstrip("/")
    token = token or os.environ.get("MDLORA_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.request(method, base + path, headers=headers, timeout=60, **kw)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {base}: {exc}")
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text[:500]}
    if r.status_code >= 400:
        _fail(f"{r.status_code}: {body.get('detail', body) if isinstance(body, dict) else body}")
    return dict(body)


def _path(domain: str, division: str | None, suffix: str = "") -> str:
    from urllib.parse import quote

    parts = [division, domain] if division else [domain]
    return "/v1/rollouts/" + "/".join(quote(p, safe="") for p in parts) + suffix


def _show(status: dict[str, Any]) -> None:
    typer.echo(json.dumps(status, indent=2))
    g = status.get
    line = (
        f"{g('division')}/{g('domain')}: v{g('version')} {g('state')} at {g('percent')}% "
        f"(active v{g('active_version')})"
    )
    if status.get("reason"):
        line += f"; {status.get('decided_by')}: {status['reason']}"
    typer.secho(line, err=True, fg=typer.colors.GREEN)


@rollout_app.command("start")
def start(
    domain: str = typer.Argument(..., help="the domain"),
    percent: float = typer.Option(..., "--percent", min=0, max=100, help="share of users, 0-100"),
    version: int | None = typer.Option(None, "--version", help="a registered version"),
    package: Path | None = typer.Option(
        None, "--package", help="an adapter package directory to register as the canary"
    ),
    division: str | None = DIVISION,
    url: str | None = URL,
    token: str | None = TOKEN,
) -> None:
    """Start a canary (a registered --version, or a --package registered as the canary), or
    change a running rollout's share."""
    from mdlora.formats.files import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    )

    if (version is None) == (package is None):
        _fail("give exactly one of --version (registered) or --package (to register)")
    if package is not None:
        files = [package / ADAPTER_CONFIG, package / ADAPTER_WEIGHTS]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            _fail(f"{package} is not an adapter package (missing {missing})")
        try:  # checked here, before the upload: a refused start must start nothing
            named = json.loads(files[0].read_bytes())
        except ValueError as exc:
            _fail(f"{files[0]} is not valid JSON ({exc})")
        if not isinstance(named, dict):
            _fail(f"{files[0]} is not an adapter config (a JSON object)")
        if named.get("domain") != domain:
            _fail(f"the package is for domain {named.get('domain')!r}, not {domain!r}")
        if division is not None and named.get("division") != division:
            _fail(f"the package is for division {named.get('division')!r}, not {division!r}")
        added = _call(
            "POST",
            url,
            token,
            "/v1/adapters",
            files={
                "adapter_config": (ADAPTER_CONFIG, files[0].read_bytes()),
                "adapter_model": (ADAPTER_WEIGHTS, files[1].read_bytes()),
            },
            data={"canary_percent": str(percent)},
        )
        division = division or str(added["division"])
        _show(_call("GET", url, token, _path(domain, division)))
        return
    body = {"version": version, "percent": percent}
    _show(_call("POST", url, token, _path(domain, division), json=body))


@rollout_app.command("status")
def status(
    domain: str = typer.Argument(..., help="the domain"),
    division: str | None = DIVISION,
    url: str | None = URL,
    token: str | None = TOKEN,
) -> None:
    """A rollout's state, its versions' feedback statistics and the guard's settings."""
    _show(_call("GET", url, token, _path(domain, division)))


def _decide(decision: str, domain: str, division: str | None, reason: str | None, *a: Any) -> None:
    body = {"reason": reason} if reason else None
    _show(_call("POST", a[0], a[1], _path(domain, division, f"/{decision}"), json=body))


@rollout_app.command("promote")
def promote(
    domain: str = typer.Argument(..., help="the domain"),
    reason: str | None = typer.Option(None, "--reason", help="kept in the rollout's status"),
    division: str | None = DIVISION,
    url: str | None = URL,
    token: str | None = TOKEN,
) -> None:
    """The canary becomes the domain's active version for every user."""
    _decide("promote", domain, division, reason, url, token)


@rollout_app.command("abort")
def abort(
    domain: str = typer.Argument(..., help="the domain"),
    reason: str | None = typer.Option(None, "--reason", help="kept in the rollout's status"),
    division: str | None = DIVISION,
    url: str | None = URL,
    token: str | None = TOKEN,
) -> None:
    """Every user back on the domain's active version."""
    _decide("abort", domain, division, reason, url, token)
