// The UI snippet from docs/listener.md, verbatim apart from the Node plumbing (argv, ws
// transport, printing): tests/listener/test_end_to_end.py runs it against a real run.
//
// Usage: node watch_run.mjs <SUPABASE_URL> <SUPABASE_ANON_KEY> <userAccessToken> <runId>
// Prints one JSON line per event; exits 0 after the `done` broadcast.
import { RealtimeClient } from '@supabase/realtime-js'
import ws from 'ws'

const [SUPABASE_URL, SUPABASE_ANON_KEY, userAccessToken, runId] = process.argv.slice(2)
const print = (type, payload) => process.stdout.write(JSON.stringify({ type, payload }) + '\n')
const showPhase = (phase, position) => print('status', { phase, position })
const showProgress = (fraction, gap) => print('progress', { fraction, gap })
const showOutcome = (status, payload) => { print('done', { status, payload }); setTimeout(() => process.exit(0), 100) }
const showRow = (row) => print('row', { status: row.status })
const refetchRun = (id) => print('subscribed', { id })

// ---- snippet (docs/listener.md) -------------------------------------------------------------
const client = new RealtimeClient(`${SUPABASE_URL}/realtime/v1`, {
  params: { apikey: SUPABASE_ANON_KEY },
  transport: ws, // Node 20 has no global WebSocket; browsers omit this line
})
client.setAuth(userAccessToken)              // private channels authorise the user's JWT

const channel = client.channel(`planner_run:${runId}`, { config: { private: true } })
channel
  .on('broadcast', { event: 'status' }, ({ payload }) => showPhase(payload.phase, payload.position))
  .on('broadcast', { event: 'progress' }, ({ payload }) => showProgress(payload.elapsed_ms / payload.time_limit_ms, payload.gap))
  .on('broadcast', { event: 'done' }, ({ payload }) => showOutcome(payload.status, payload))
  .on('postgres_changes',
      { event: 'UPDATE', schema: 'public', table: 'allocation_planner_runs', filter: `id=eq.${runId}` },
      ({ new: row }) => showRow(row))
  .subscribe((status) => { if (status === 'SUBSCRIBED') refetchRun(runId) })
// ---- end of snippet -------------------------------------------------------------------------

setTimeout(() => { print('timeout', {}); process.exit(2) }, 120000)
