"""Listener configuration, read from the environment and validated before anything starts.

A hosting platform sets environment variables; a typo there must stop the process at start with
a message naming the variable, not fail an hour later inside a solve.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.cpus import usable_cpus

#: The port of Supabase's pooler (Supavisor) in transaction mode.
TRANSACTION_POOLER_PORT = 6543


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
        validation_alias=AliasChoices("SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY"),
        description="Secret API key (sb_secret_...) or the legacy service_role JWT, for the "
                    "Realtime subscription that hears every run insert (progress is broadcast "
                    "by the database). SUPABASE_SECRET_KEY wins when both are set.",
    )
    database_pooler: Literal["auto", "direct", "session", "transaction"] = Field(
        "auto",
        description="What PLANNER_DATABASE_URL points at. `transaction` (a transaction-mode "
                    "pooler: Supavisor on port 6543, PgBouncer pool_mode=transaction) turns "
                    "asyncpg's prepared-statement cache off; `auto` assumes it for port 6543.",
    )
    worker_id: str = Field(default_factory=_default_worker_id)
    heartbeat_interval_s: float = Field(10.0, gt=0, le=60)
    reconcile_interval_s: float = Field(30.0, gt=0)
    solver_time_limit_s: Any = Field(
        None, description="Gone: each run's time cap is decided by the database "
                          "(planner_engine.limits, `planner limits set`); set, it stops the "
                          "listener at start with one line saying so.",
    )
    solver_memory_mb: int = Field(2048, ge=64)
    solver_workers: int = Field(
        default_factory=usable_cpus, ge=1,
        description="CP-SAT workers; default: the CPUs the cgroup quota and affinity allow.",
    )
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
    health_port: int = Field(
        8080, ge=0, le=65535, validation_alias=AliasChoices("PLANNER_HEALTH_PORT", "PORT"),
        description="0 disables the HTTP endpoint; $PORT (set by container platforms) is used "
                    "when PLANNER_HEALTH_PORT is not.",
    )
    self_check_interval_s: float = Field(
        60.0, gt=0, description="How often the engine role's self-check is repeated.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    log_buffer: int = Field(10_000, ge=100, description="Run log records kept through a DB outage.")

    @field_validator("solver_time_limit_s", mode="before")
    @classmethod
    def _time_limit_is_gone(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(
                "no longer read: each run's time cap is in the database now (max_time_limit_s "
                "in planner_engine.limits: `planner limits set --tier default "
                "max_time_limit_s=N`); unset the variable")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.strip().upper() if isinstance(v, str) else v

    @field_validator("database_pooler", mode="before")
    @classmethod
    def _lower_pooler(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

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

    @property
    def transaction_pooler(self) -> bool:
        """Does the database URL lead to a transaction-mode pooler (no prepared statements)?"""
        if self.database_pooler != "auto":
            return self.database_pooler == "transaction"
        try:
            port = urlsplit(self.database_url.get_secret_value()).port
        except ValueError:
            return False
        return port == TRANSACTION_POOLER_PORT


def env_name(field: str) -> str:
    """The environment variable(s) that set `field`, as an operator types them."""
    info = ListenerSettings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        names = [str(c) for c in info.validation_alias.choices]
        return " or ".join(names)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    prefix = ListenerSettings.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def _aliases() -> dict[str, str]:
    found: dict[str, str] = {}
    for field, info in ListenerSettings.model_fields.items():
        if isinstance(info.validation_alias, AliasChoices):
            found |= {str(c): field for c in info.validation_alias.choices}
    return found


_ALIASES = _aliases()


def summarise_errors(exc: ValidationError) -> str:
    """One line for every problem in the environment, each named by its variable."""
    problems: list[str] = []
    for err in exc.errors():
        loc = str(err["loc"][0]) if err["loc"] else ""
        name = env_name(_ALIASES.get(loc, loc))
        if err["type"] == "missing":
            problems.append(f"{name} is not set")
            continue
        shown = "" if "URL" in name or "KEY" in name else f" (got {err.get('input')!r})"
        msg = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}: {msg}{shown}")
    return "; ".join(problems)
