"""A local Supabase Realtime server for the development stack, the demo and the tests.

Supabase's own server (Elixir/Phoenix) cannot be built on the project's machines, so this
package speaks the same wire protocol (Phoenix channels, serializers vsn 1.0.0 and 2.0.0)
with the parts of Realtime the product uses: `postgres_changes` from a wal2json slot,
authorised per subscriber under RLS; broadcast (WebSocket and REST) with private channels
authorised by the policies on `realtime.messages`; and presence.

Module layout:
    serializer  frames <-> `Message` for vsn 1.0.0 (JSON objects) and 2.0.0 (arrays + binary)
    auth        HS256 JWT checks with Supabase's error wording
    values      wal2json values -> the JSON `to_jsonb` would give; typed filter comparisons
    filters     parsing and evaluation of `postgres_changes` filter strings
    replication wal2json logical replication stream in a background thread
    database    asyncpg pool: catalog metadata, RLS visibility, realtime.messages policies
    changes     postgres_changes subscriptions and dispatch (payloads exactly as Supabase's)
    hub         broadcast fan-out and presence per topic
    socket      one WebSocket connection: Phoenix channel semantics
    app         aiohttp application: WebSocket routes, REST broadcast, /healthz, lifecycle
    __main__    command line (`python -m devstack.realtime ...`)

Nothing outside `devstack` may import this package; the listener talks to it only over
the network, exactly as it talks to hosted Supabase.
"""
