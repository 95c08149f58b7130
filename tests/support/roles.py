"""Act as PostgREST would: see `listener.roles.acting_as` (shared with the demo)."""

from listener.roles import acting_as

__all__ = ["acting_as"]
