"""Settings of the local stand-in for a Supabase project.

Everything has a default so that `planner dev up` works on a fresh machine with no
configuration; every value can be overridden with a `PLANNER_DEV_*` environment variable,
which is how the tests run a second, throw-away stack beside the developer's one.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

# The same well-known development secret the Supabase CLI uses for local stacks. It is
# only ever used on loopback; production keys come from the hosted project's settings.
LOCAL_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


class DevSettings(BaseSettings):
    """Where the local stack lives and which ports it uses."""

    model_config = SettingsConfigDict(env_prefix="PLANNER_DEV_", extra="ignore")

    state_dir: Path = Field(
        default=REPO_ROOT / ".devstack",
        description="Ignored project folder holding the cluster, logs and pid files.",
    )
    pg_bindir: Path = Path("/usr/lib/postgresql/15/bin")
    pg_port: int = 54329
    realtime_port: int = 54330
    host: str = "127.0.0.1"
    database: str = "postgres"
    superuser: str = "postgres"
    superuser_password: str = "postgres"
    engine_role: str = "planner_engine"
    engine_password: str = "planner_engine_local"
    jwt_secret: str = LOCAL_JWT_SECRET
    os_user: str = Field(
        default="postgres",
        description="Unprivileged OS user that runs PostgreSQL when we are root.",
    )

    @property
    def pgdata(self) -> Path:
        return self.state_dir / "pgdata"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def dsn(self, database: str | None = None) -> str:
        """Superuser DSN, for tooling and tests."""
        return (
            f"postgresql://{self.superuser}:{self.superuser_password}"
            f"@{self.host}:{self.pg_port}/{database or self.database}"
        )

    def engine_dsn(self, database: str | None = None) -> str:
        """DSN of the listener's own least-privilege login role."""
        return (
            f"postgresql://{self.engine_role}:{self.engine_password}"
            f"@{self.host}:{self.pg_port}/{database or self.database}"
        )

    @property
    def supabase_url(self) -> str:
        return f"http://{self.host}:{self.realtime_port}"
