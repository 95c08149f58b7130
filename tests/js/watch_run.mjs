// The UI snippet of docs/listener.md, verbatim between the markers (tests/listener/
// test_ui_snippet.py checks that), run by the tests with supabase-js against the local stack.
// Around it, the plumbing a browser app would not need: which supabase-js to load, how the
// client gets the member's token without GoTrue, Node's `ws` transport, and printing.
//
// Usage: node watch_run.mjs <package> <auth> <pattern> <SUPABASE_URL> <SUPABASE_ANON_KEY> <token> <runId>
//   package  the supabase-js to load: `@supabase/supabase-js` (the pinned current release),
//            `supabase-js-on-pinned-realtime` (the release built on the pinned realtime-js), or
//            a path to a supabase-js package folder (the newest release, installed under CI)
//   auth     `session`: a signed-in user's session in the client's storage (Supabase Auth);
//            `accessToken`: createClient's `accessToken` option (third-party auth);
//            `none`: no session (only with old-advice)
//   pattern  `snippet`: the documented watchRun; `same-tick`: the broken pattern (the same
//            channel subscribed in the tick that created the client, no awaited token);
//            `old-advice`: `realtime.setAuth(jwt)` without a session (docs before issue 16)
// Prints one JSON line per event: versions, status, progress, row, done, subscribed (refetchRun),
// problem (CHANNEL_ERROR / TIMED_OUT); same-tick also subscribe, system and the public channel's
// public_subscribe, public_system, public_row.
// Exits 0 after `done`; 2 after 150 s.
import { readFileSync } from 'node:fs'
import { dirname, join, isAbsolute } from 'node:path'
import { createRequire } from 'node:module'
import { pathToFileURL } from 'node:url'
import ws from 'ws'

const [pkg, auth, pattern, SUPABASE_URL, SUPABASE_ANON_KEY, token, runId] = process.argv.slice(2)
const print = (type, payload) => process.stdout.write(JSON.stringify({ type, payload }) + '\n')

// -- which supabase-js, and which realtime-js it runs on -------------------------------------
const here = createRequire(import.meta.url)
const entry = isAbsolute(pkg) ? createRequire(join(pkg, 'package.json')).resolve('.') : here.resolve(pkg)
const packageOf = (file, name) => {
  for (let dir = dirname(file); dir !== dirname(dir); dir = dirname(dir)) {
    try {
      const meta = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'))
      if (meta.name === name) return { dir, version: meta.version }
    } catch { /* no package.json here */ }
  }
  throw new Error(`${name} not found above ${file}`)
}
const supabaseJs = packageOf(entry, '@supabase/supabase-js')
const realtimeJs = packageOf(createRequire(entry).resolve('@supabase/realtime-js'), '@supabase/realtime-js')
print('versions', { supabase_js: supabaseJs.version, realtime_js: realtimeJs.version })
const { createClient } = await import(pathToFileURL(entry).href)

// -- the app's client: the member's token without GoTrue --------------------------------------
function memorySession(jwt) {
  // What supabase.auth keeps after a sign-in: the session, in the client's storage.
  const claims = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url'))
  const session = {
    access_token: jwt, token_type: 'bearer', refresh_token: 'no-gotrue-locally',
    expires_at: claims.exp, expires_in: claims.exp - Math.floor(Date.now() / 1000),
    user: { id: claims.sub, aud: claims.aud, role: claims.role, email: claims.email,
      app_metadata: {}, user_metadata: {}, created_at: new Date(claims.iat * 1000).toISOString() },
  }
  const items = new Map([['planner-ui-auth', JSON.stringify(session)]])
  return {
    storageKey: 'planner-ui-auth', autoRefreshToken: false, detectSessionInUrl: false,
    storage: { getItem: (k) => items.get(k) ?? null, setItem: (k, v) => { items.set(k, v) },
      removeItem: (k) => { items.delete(k) } },
  }
}
const options = { realtime: { transport: ws } } // Node 20 has no global WebSocket
if (auth === 'session') options.auth = memorySession(token)
else if (auth === 'accessToken') options.accessToken = async () => token
else if (auth === 'none') options.auth = { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false }
else throw new Error(`unknown auth ${auth}`)
const supabase = createClient(SUPABASE_URL, SUPABASE_ANON_KEY, options)

// -- what the UI does with the events ---------------------------------------------------------
const showPhase = (phase, position) => print('status', { phase, position })
const showProgress = (fraction, gap) => print('progress', { fraction, gap })
const showOutcome = (status, payload) => { print('done', { status, payload }); setTimeout(() => process.exit(0), 100) }
const showRow = (row) => print('row', { status: row.status, id: row.id ?? null })
const refetchRun = (id) => print('subscribed', { id })
const showConnectionProblem = (status, err) => print('problem', { status, error: err ? String(err.message ?? err) : null })

// ---- snippet (docs/listener.md) -------------------------------------------------------------
async function watchRun(supabase, runId) {
  // 1. The user's token first. supabase-js hands Realtime a token *callback*; realtime-js
  //    2.100.0+ builds a channel's join payload before that callback resolves, so a channel
  //    subscribed in the same tick as createClient (or sign-in) joins without the token.
  await supabase.realtime.setAuth() // no argument: asks supabase-js for the signed-in user's token

  // 2. Then subscribe: private channel, members of the run's organisation only.
  const channel = supabase.channel(`planner_run:${runId}`, { config: { private: true } })
  channel
    .on('broadcast', { event: 'status' }, ({ payload }) => showPhase(payload.phase, payload.position))
    .on('broadcast', { event: 'progress' }, ({ payload }) => showProgress(payload.elapsed_ms / payload.time_limit_ms, payload.gap))
    .on('broadcast', { event: 'done' }, ({ payload }) => showOutcome(payload.status, payload))
    .on('postgres_changes',
        { event: 'UPDATE', schema: 'public', table: 'allocation_planner_runs', filter: `id=eq.${runId}` },
        ({ new: row }) => showRow(row))
    .subscribe(async (status, err) => {
      if (status === 'SUBSCRIBED') {
        refetchRun(runId) // events sent while (re)joining are lost: re-read the row
      } else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') {
        // 3. Re-authorise after a lost connection: realtime-js rejoins by itself, with the
        //    token it holds; hand it the current one (refreshed meanwhile?) before it does.
        await supabase.realtime.setAuth()
        showConnectionProblem(status, err)
      }
    })
  return channel
}
// ---- end of snippet -------------------------------------------------------------------------

if (pattern === 'snippet') {
  await watchRun(supabase, runId)
} else if (pattern === 'same-tick') {
  // The broken pattern, in the tick that created the client: no awaited token.
  supabase.channel(`planner_run:${runId}`, { config: { private: true } })
    .on('broadcast', { event: 'progress' }, ({ payload }) => showProgress(payload.elapsed_ms / payload.time_limit_ms, payload.gap))
    .on('broadcast', { event: 'done' }, ({ payload }) => showOutcome(payload.status, payload))
    .on('postgres_changes',
        { event: 'UPDATE', schema: 'public', table: 'allocation_planner_runs', filter: `id=eq.${runId}` },
        ({ new: row }) => showRow(row))
    .on('system', {}, (payload) => print('system', payload))
    .subscribe((status, err) => {
      print('subscribe', { status, error: err ? String(err.message ?? err) : null })
      if (status === 'SUBSCRIBED') refetchRun(runId)
    })
  // The same subscription on a public channel (what a UI watching only its rows would write).
  supabase.channel(`runs-of-${runId}`)
    .on('postgres_changes',
        { event: 'UPDATE', schema: 'public', table: 'allocation_planner_runs', filter: `id=eq.${runId}` },
        ({ new: row, errors }) => print('public_row', { status: row.status ?? null, errors: errors ?? null }))
    .on('system', {}, (payload) => print('public_system', payload))
    .subscribe((status) => print('public_subscribe', { status }))
} else if (pattern === 'old-advice') {
  // What this page advised before issue 16: no session, the user's JWT given to setAuth.
  await supabase.realtime.setAuth(token)
  supabase.channel(`planner_run:${runId}`, { config: { private: true } })
    .on('broadcast', { event: 'done' }, ({ payload }) => showOutcome(payload.status, payload))
    .subscribe((status, err) => {
      print('subscribe', { status, error: err ? String(err.message ?? err) : null })
      if (status === 'SUBSCRIBED') refetchRun(runId)
    })
} else {
  throw new Error(`unknown pattern ${pattern}`)
}

setTimeout(() => { print('timeout', {}); process.exit(2) }, 150000)
