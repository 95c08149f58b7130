// A line-oriented driver around the pinned @supabase/realtime-js, used by tests/realtime.
//
// Usage: node rt_client.mjs <endpoint> <apikey> [vsn]
//   endpoint: e.g. http://127.0.0.1:PORT/realtime/v1  (what supabase-js derives from SUPABASE_URL)
// Reads one JSON command per line on stdin, writes one JSON event per line on stdout:
//   {"cmd":"channel","name":"room","config":{...},"pg":[{event,schema,table,filter}],
//    "broadcast":["msg"],"presence":true}                    -> {"type":"status",...}
//   {"cmd":"send","name":"room","event":"msg","payload":{...}} -> {"type":"send_result",...}
//   {"cmd":"track","name":"room","payload":{...}} / {"cmd":"untrack","name":"room"}
//   {"cmd":"setAuth","token":"..."} / {"cmd":"unsubscribe","name":"room"} / {"cmd":"exit"}
// Events: status, postgres_changes, broadcast, presence, system, send_result, error.
import { RealtimeClient } from '@supabase/realtime-js'
import ws from 'ws'
import readline from 'node:readline'

const [endpoint, apikey, vsn] = process.argv.slice(2)
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const heartbeatIntervalMs = Number(process.env.RT_HEARTBEAT_MS ?? 5000)
const options = { params: { apikey }, transport: ws, heartbeatIntervalMs }
if (vsn) options.vsn = vsn
const client = new RealtimeClient(endpoint.replace(/^http/, 'ws'), options)
const channels = new Map()

function openChannel(cmd) {
  const ch = client.channel(cmd.name, { config: cmd.config ?? {} })
  for (const pg of cmd.pg ?? []) {
    ch.on('postgres_changes', pg, (payload) => emit({ type: 'postgres_changes', name: cmd.name, payload }))
  }
  for (const event of cmd.broadcast ?? []) {
    ch.on('broadcast', { event }, (payload) => emit({ type: 'broadcast', name: cmd.name, payload }))
  }
  if (cmd.presence) {
    for (const event of ['sync', 'join', 'leave']) {
      ch.on('presence', { event }, (payload) =>
        emit({ type: 'presence', name: cmd.name, event, payload: payload ?? null, state: ch.presenceState() }))
    }
  }
  ch.on('system', {}, (payload) => emit({ type: 'system', name: cmd.name, payload }))
  if (cmd.watchHeartbeat && !client._hbWatched) {
    client._hbWatched = true
    client.onHeartbeat((status) => emit({ type: 'heartbeat', status }))
  }
  channels.set(cmd.name, ch)
  ch.subscribe((status, err) => emit({ type: 'status', name: cmd.name, status, err: err ? String(err.message ?? err) : null }))
}

async function run(cmd) {
  const ch = channels.get(cmd.name)
  switch (cmd.cmd) {
    case 'channel': openChannel(cmd); break
    case 'send': {
      const result = await ch.send({ type: 'broadcast', event: cmd.event, payload: cmd.payload })
      emit({ type: 'send_result', name: cmd.name, id: cmd.id ?? null, result })
      break
    }
    case 'track': emit({ type: 'track_result', name: cmd.name, result: await ch.track(cmd.payload) }); break
    case 'untrack': emit({ type: 'untrack_result', name: cmd.name, result: await ch.untrack() }); break
    case 'setAuth': await client.setAuth(cmd.token); emit({ type: 'auth_set' }); break
    case 'unsubscribe': emit({ type: 'unsubscribed', name: cmd.name, result: await ch.unsubscribe() }); break
    case 'exit': client.disconnect(); process.exit(0)
    default: emit({ type: 'error', message: `unknown command ${cmd.cmd}` })
  }
}

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', (line) => {
  if (!line.trim()) return
  let cmd
  try { cmd = JSON.parse(line) } catch (e) { emit({ type: 'error', message: String(e) }); return }
  run(cmd).catch((e) => emit({ type: 'error', message: String(e?.stack ?? e) }))
})
rl.on('close', () => { client.disconnect(); process.exit(0) })
emit({ type: 'ready', vsn: client.vsn ?? null })
