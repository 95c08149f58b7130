"""Listener configuration, read from the environment and validated before anything starts.

A hosting platform sets environment variables; a typo there must stop the process at start with
a message naming the variable, not fail an hour later inside a solve.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ListenerSettings(BaseSettings):
    """Everything `planner listen` needs. Names match the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="PLANNER_", extra="ignore")

    database_url: SecretStr = Field(
        validation_alias=AliasChoices("PLANNER_DATABASE_URL"),
        description="DSN of the engine's own least-privilege role (planner_engine).",
    )
    supabase_url: str = Field(
        validation_alias=AliasChoices("SUPABASE_URL"),
        description="Project URL; Realtime lives at <url>/realtime/v1.",
    )
    service_role_key: SecretStr = Field(
        validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY"),
        description="Service-role API key: hears every run insert and broadcasts progress.",
    )
    worker_id: str = Field(default_factory=_default_worker_id)
    heartbeat_interval_s: float = Field(10.0, gt=0, le=60)
    reconcile_interval_s: float = Field(30.0, gt=0)
    solver_time_limit_s: float = Field(
        120.0, gt=0, description="Upper bound on any run's time limit (runs may ask for less)."
    )
    solver_memory_mb: int = Field(2048, ge=64)
    solver_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    solver_spare: bool = Field(
        True, description="Keep one solver child pre-started so runs skip its ~1.3 s start-up."
    )
    shutdown_grace_s: float = Field(20.0, ge=0)
    progress_interval_s: float = Field(
        0.5, gt=0, description="At most one progress event per this many seconds."
    )
    realtime_stale_after_s: float = Field(
        10.0, gt=0, description="Recreate the Realtime client after this long disconnected."
    )
    health_host: str = "0.0.0.0"
    health_port: int = Field(8080, ge=0, le=65535, description="0 disables the HTTP endpoint.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    log_buffer: int = Field(10_000, ge=100, description="Run log records kept through a DB outage.")

    @field_validator("supabase_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _pg_url(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return v
