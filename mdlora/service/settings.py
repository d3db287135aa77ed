"""Service settings, read from the environment (prefix ``MDLORA_``) by pydantic-settings.

The deploy files rely on: ``MDLORA_ARTIFACT_DIR``, ``MDLORA_REDIS_URL``, ``MDLORA_REGISTRY``,
``MDLORA_ADMIN_TOKEN``, ``MDLORA_RUNTIME`` and ``MDLORA_UNKNOWN_DOMAIN``; every other field has a
default that suits one replica on a small machine.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("mdlora.service")


def F(description: str, **constraints: Any) -> Any:
    """A documented field (the description shows in ``--help``-like listings and errors)."""
    return Field(description=description, **constraints)


class ServiceSettings(BaseSettings):
    """Everything the scoring service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="MDLORA_", extra="ignore", frozen=True)

    artifact_dir: Annotated[Path, F("artifact directory written by training (manifest.json)")]
    registry: Annotated[
        Literal["local", "redis"],
        F("adapter registry: the artifact directory, or Redis shared by replicas"),
    ] = "local"
    redis_url: Annotated[str, F("Redis of the registry and the feature store")] = (
        "redis://127.0.0.1:6379/0"
    )
    redis_prefix: Annotated[str, F("prefix of every Redis key and channel")] = "mdlora"
    admin_token: Annotated[SecretStr | None, F("bearer token of the /v1 admin API")] = None
    dev_mode: Annotated[bool, F("admin API open WITHOUT a token (development only)")] = False
    runtime: Annotated[Literal["torch", "onnx"], F("scoring runtime")] = "torch"
    device: Annotated[str | None, F("torch device; default cuda when present, else cpu")] = None
    torch_threads: Annotated[int | None, F("intra-op threads of torch and numba", ge=1)] = 1
    routing: Annotated[
        Literal["artifact", "auto", "bag", "fused_down", "gather", "kernel", "mixture", "merged"],
        F("adapter routing: the artifact's, timed at start (auto), or one strategy"),
    ] = "artifact"
    unknown_domain: Annotated[
        Literal["refuse", "backbone"],
        F("unknown domain: refused as not found (naming the known domains), or the backbone alone"),
    ] = "refuse"
    feature_store: Annotated[
        Literal["auto", "redis", "off"],
        F("read missing user/item features from Redis (auto: when registry=redis)"),
    ] = "auto"
    user_id_field: Annotated[str | None, F("column the user id fills (auto-detected)")] = None
    item_id_field: Annotated[str | None, F("column an item id fills (auto-detected)")] = None
    max_items: Annotated[int, F("candidates per request", ge=1)] = 1000
    max_batch_requests: Annotated[int, F("requests in one /predict/batch call", ge=1)] = 64
    max_batch_items: Annotated[int, F("candidates in one /predict/batch call", ge=1)] = 10_000
    max_body_bytes: Annotated[int, F("request body size of /predict", ge=1024)] = 1 << 20
    max_adapter_bytes: Annotated[int, F("adapter weights upload size", ge=1024)] = 64 << 20
    max_adapter_rank: Annotated[int, F("highest adapter rank accepted", ge=1)] = 256
    micro_batch: Annotated[bool, F("score concurrent requests in one model call")] = True
    scorer_thread: Annotated[
        bool | None,
        F("model calls on a worker thread instead of the event loop (see runtime.py); unset: "
          "on a GPU, where a call mostly waits for the device with the interpreter lock free"),
    ] = None  # fmt: skip
    max_batch_rows: Annotated[int, F("rows in one micro-batched model call", ge=1)] = 4096
    reconcile_interval_s: Annotated[
        float, F("how often to check the registry in case a message was missed", gt=0)
    ] = 10.0
    redis_timeout_s: Annotated[float, F("Redis socket timeout", gt=0)] = 0.5
    feature_cache_s: Annotated[float, F("how long feature-store metadata is kept", ge=0)] = 30.0
    # canary rollouts and feedback (service.rollout, service.feedback)
    feedback_ttl_s: Annotated[
        float, F("how long a rollout's answers are remembered for feedback", gt=0)
    ] = 900.0
    feedback_max_requests: Annotated[
        int, F("answers remembered in memory for feedback (oldest forgotten first)", ge=1)
    ] = 20_000
    feedback_window: Annotated[
        int, F("feedback events per domain and version the statistics are computed over", ge=10)
    ] = 10_000
    feedback_max_events: Annotated[int, F("events in one POST /feedback", ge=1)] = 1000
    feedback_max_body_bytes: Annotated[int, F("body size of POST /feedback", ge=1024)] = 256 << 10
    rollout_guard: Annotated[bool, F("abort a canary that does worse than the active version")] = (
        True
    )
    rollout_min_events: Annotated[
        int, F("feedback events each version needs in the window before the guard judges", ge=1)
    ] = 1000
    rollout_logloss_margin: Annotated[
        float, F("relative LogLoss increase of the canary over the active version allowed", ge=0)
    ] = 0.05
    rollout_calibration_margin: Annotated[
        float, F("extra calibration error |predicted/observed - 1| allowed to the canary", ge=0)
    ] = 0.2
    rollout_guard_interval_s: Annotated[
        float, F("least time between two guard checks of one rollout", ge=0)
    ] = 1.0

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if self.admin_token is not None and not self.admin_token.get_secret_value().strip():
            raise ValueError("MDLORA_ADMIN_TOKEN is set but empty; unset it or give a real token")
        return self

    @property
    def use_feature_store(self) -> bool:
        if self.feature_store == "auto":
            return self.registry == "redis"
        return self.feature_store == "redis"


def settings_error_text(exc: ValidationError) -> str:
    """One line per invalid setting, named as its environment variable."""
    lines = []
    for err in exc.errors():
        name = "MDLORA_" + "_".join(str(p) for p in err["loc"][:1]).upper()
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{name}: {err['msg']}{shown}")
    return "invalid settings: " + "; ".join(lines)


# MDLORA_* variables read by other parts (the CLI, compose, scripts), not by the service
OTHER_VARIABLES = frozenset(
    {"MDLORA_DATA_DIR", "MDLORA_PORT", "MDLORA_IMAGE_TAG", "MDLORA_TEST_REDIS_PORT", "MDLORA_URL"}
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``MDLORA_*`` names in ``environ`` that nothing reads, each with a close known name
    (``MDLORA_REGISTY`` would otherwise leave the registry local without a word)."""
    known = {f"MDLORA_{name.upper()}" for name in ServiceSettings.model_fields} | OTHER_VARIABLES
    out = []
    for name in sorted(environ):
        if name.startswith("MDLORA_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            out.append(name + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def load_settings(**values: Any) -> ServiceSettings:
    """``ServiceSettings`` from the environment (and ``values``), or ValueError saying which
    ``MDLORA_*`` variable is wrong. Unknown ``MDLORA_*`` variables are logged as warnings."""
    for name in unknown_variables(os.environ):
        log.warning("unknown setting %s is ignored", name)
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        raise ValueError(settings_error_text(exc)) from None
