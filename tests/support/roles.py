"""Act as PostgREST would: see `devstack.postgrest.acting_as` (shared with the demo)."""

from devstack.postgrest import acting_as

__all__ = ["acting_as"]
