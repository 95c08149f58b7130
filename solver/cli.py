"""`planner solve|validate|generate-instance` (filled in by the solver issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the solver's commands to the root `planner` app."""
