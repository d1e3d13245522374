// GET / on the listen address: one self-contained HTML page (no external assets) that refreshes
// itself from GET /status.json. Behind the relay's token when one is set: a request is let in
// with `Authorization: Bearer <token>` or the HttpOnly cookie that `/?token=<token>` sets (then
// redirects to `/`, so the token does not stay in the address bar or the history). The page
// renders every value with textContent, so nothing from the bus (ids, reasons) can inject markup;
// its Content-Security-Policy allows only its own inline script and style, and fetches to itself.

import { createHash } from "node:crypto";
import type http from "node:http";
import { tokenMatches } from "./local-server.js";
import type { StatusSnapshot } from "./status.js";

const COOKIE = "uptrakit_relay_token";
const REFRESH_MS = 2_000;

const STYLE = `
:root{color-scheme:light dark;--bg:#f6f7f9;--card:#fff;--fg:#1d2430;--muted:#667085;--ok:#12805c;--warn:#b54708;--bad:#c0262d;--line:#e4e7ec}
@media (prefers-color-scheme:dark){:root{--bg:#0f1419;--card:#171d25;--fg:#e6e9ee;--muted:#98a2b3;--line:#2a323d}}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.75rem;padding:1rem 1.5rem;border-bottom:1px solid var(--line);background:var(--card)}
h1{font-size:1.15rem;margin:0}h2{font-size:.95rem;margin:0 0 .5rem}.muted{color:var(--muted)}
main{padding:1rem 1.5rem;display:grid;gap:1rem;grid-template-columns:repeat(auto-fit,minmax(320px,1fr))}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.9rem 1rem}
.wide{grid-column:1/-1}.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:.6rem}
.tile{border:1px solid var(--line);border-radius:6px;padding:.5rem .7rem}.tile .v{font-size:1.4rem;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.1rem .55rem;border-radius:999px;font-weight:600;font-size:.8rem;color:#fff;background:var(--muted)}
.ok{background:var(--ok)}.warn{background:var(--warn)}.bad{background:var(--bad)}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}th,td{text-align:left;padding:.3rem .4rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted)}td.n{text-align:right}code{font-size:.85em;word-break:break-all}
form{display:flex;gap:.5rem;margin-top:1rem}input{padding:.4rem;font:inherit;min-width:18rem}button{padding:.4rem .8rem;font:inherit}
`;

const SCRIPT = `
"use strict";
const $ = (s) => document.querySelector(s);
const set = (field, text) => { for (const el of document.querySelectorAll('[data-field="' + field + '"]')) el.textContent = String(text); };
const badge = (field, text, cls) => { const el = $('[data-field="' + field + '"]'); el.textContent = text; el.className = "badge " + cls; };
const ago = (iso) => { if (!iso) return "never"; const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000)); return s < 120 ? s + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago"; };
function rows(tbody, items, cells) {
  const body = $(tbody);
  body.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells(item)) { const td = document.createElement("td"); td.textContent = String(text); if (cls) td.className = cls; tr.append(td); }
    return tr;
  }));
}
async function refresh() {
  let s;
  try {
    const res = await fetch("status.json", { credentials: "same-origin", cache: "no-store" });
    if (!res.ok) throw new Error("HTTP " + res.status);
    s = await res.json();
  } catch (err) {
    badge("page", "relay unreachable: " + err.message, "bad");
    return;
  }
  badge("page", "live", "ok");
  set("instanceId", s.instanceId);
  set("bus", s.bus.name + " · stream " + s.bus.stream);
  set("location", s.bus.location || "—");
  badge("busState", s.bus.state + (s.bus.reason ? ": " + s.bus.reason : ""), s.bus.state === "connected" ? "ok" : "bad");
  badge("readiness", s.readiness.status + (s.readiness.reason ? ": " + s.readiness.reason : ""), s.readiness.status === "ready" ? "ok" : s.readiness.status === "degraded" ? "warn" : "bad");
  set("readinessMode", s.readiness.mode);
  badge("controller", s.controllerConnected ? "connected" : "not connected", s.controllerConnected ? "ok" : "bad");
  set("inFlight", s.inFlight);
  set("outboxDepth", s.outbox.depth);
  set("outboxMax", s.outbox.max);
  set("deadLetterCount", s.deadLetters.count);
  set("deadLetterOldest", s.deadLetters.oldestDeadAt || "—");
  for (const [k, v] of Object.entries(s.counters)) set("counter." + k, v);
  rows("#dead-letters tbody", s.deadLetters.latest, (d) => [[d.deadAt], [d.kind], [d.id], [d.origin], [d.attempts, "n"], [d.reason]]);
  set("peersNote", s.peers ? (s.peers.filter((p) => !p.self).length + " other relays") : ("unknown: " + (s.peersError || "")));
  rows("#peers tbody", s.peers || [], (p) => [[p.name + (p.self ? " (this relay)" : "")], [p.hasConsumer ? ago(p.lastActive) : "no consumer"], [p.published, "n"], [p.pending === undefined ? "-" : p.pending, "n"]]);
  set("generatedAt", s.generatedAt);
}
refresh();
setInterval(refresh, ${REFRESH_MS});
`;

const COUNTER_LABELS: Array<[string, string]> = [
  ["published_total", "published"],
  ["delivered_total", "delivered"],
  ["acked_total", "acked"],
  ["redelivered_total", "redelivered"],
  ["nacked_total", "nacked"],
  ["rejected_total", "rejected"],
  ["ack_timeouts_total", "ack timeouts"],
  ["dead_lettered_total", "dead-lettered"],
  ["unavailable_total", "answered unavailable"],
  ["refused_total", "refused by the bus"],
  ["outbox_flushed_total", "flushed from the outbox"],
  ["echo_filtered_total", "own messages skipped"],
  ["invalid_frames_total", "invalid frames"],
];

const tile = (label: string, field: string, extra = ""): string => `<div class="tile"><div class="muted">${label}</div><div class="v" data-field="${field}">…</div>${extra}</div>`;

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>uptrakit-relay status</title><link rel="icon" href="data:,"><style>${STYLE}</style></head>
<body>
<header><h1>uptrakit-relay <span data-field="instanceId">…</span></h1><span class="muted" data-field="bus"></span>
<span class="badge" data-field="page">loading</span><span class="muted">updated <span data-field="generatedAt">…</span></span></header>
<main>
<section><h2>Connection</h2><table>
<tr><th>bus</th><td><span class="badge" data-field="busState">…</span></td></tr>
<tr><th>server</th><td><code data-field="location">…</code></td></tr>
<tr><th>readiness</th><td><span class="badge" data-field="readiness">…</span> <span class="muted">(--readiness <span data-field="readinessMode"></span>)</span></td></tr>
<tr><th>controller</th><td><span class="badge" data-field="controller">…</span></td></tr>
</table></section>
<section><h2>Now</h2><div class="tiles">
${tile("in flight", "inFlight")}
${tile("outbox", "outboxDepth", `<div class="muted">of <span data-field="outboxMax">…</span></div>`)}
${tile("dead letters", "deadLetterCount", `<div class="muted">oldest <span data-field="deadLetterOldest">…</span></div>`)}
</div></section>
<section><h2>Counters <span class="muted">(since the relay started)</span></h2><table><tbody>
${COUNTER_LABELS.map(([k, label]) => `<tr><th>${label}</th><td class="n" data-field="counter.${k}">…</td></tr>`).join("\n")}
</tbody></table></section>
<section><h2>Peers <span class="muted" data-field="peersNote"></span></h2>
<table id="peers"><thead><tr><th>instance</th><th>last active</th><th>published (retention)</th><th>pending</th></tr></thead><tbody></tbody></table></section>
<section class="wide"><h2>Latest dead letters <span class="muted">(no payloads; <code>uptrakit-relay dlq list</code> for all)</span></h2>
<table id="dead-letters"><thead><tr><th>dead at</th><th>kind</th><th>id</th><th>origin</th><th>attempts</th><th>reason</th></tr></thead><tbody></tbody></table></section>
</main>
<script>${SCRIPT}</script>
</body></html>
`;

const LOGIN = (message: string): string => `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>uptrakit-relay status: token</title><link rel="icon" href="data:,"><style>${STYLE}</style></head>
<body><header><h1>uptrakit-relay</h1></header><main><section class="wide">
<h2>This relay needs its token</h2><p>${message}</p>
<form method="get" action="./"><input type="password" name="token" placeholder="relay token (--token)" autocomplete="current-password" autofocus><button>Show status</button></form>
<p class="muted">Or send <code>Authorization: Bearer &lt;token&gt;</code>.</p>
</section></main></body></html>
`;

const hash = (s: string): string => `'sha256-${createHash("sha256").update(s).digest("base64")}'`;
const CSP = `default-src 'none'; script-src ${hash(SCRIPT)}; style-src ${hash(STYLE)}; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'`;
const HEADERS = { "content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store" };

function cookieToken(req: http.IncomingMessage): string | undefined {
  for (const part of (req.headers.cookie ?? "").split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === COOKIE) {
      try {
        return decodeURIComponent(v.join("="));
      } catch {
        return undefined;
      }
    }
  }
  return undefined;
}

/** Serves / and /status.json; false for any other path. */
export async function serveStatus(
  req: http.IncomingMessage,
  res: http.ServerResponse,
  o: { token?: string; snapshot(): Promise<StatusSnapshot> },
): Promise<boolean> {
  const url = new URL(req.url ?? "/", "http://relay.invalid");
  if (url.pathname !== "/" && url.pathname !== "/status.json") return false;
  const page = url.pathname === "/";
  if (o.token !== undefined) {
    const given = url.searchParams.get("token");
    if (page && given !== null) {
      if (tokenMatches(`Bearer ${given}`, o.token)) {
        res
          .writeHead(303, {
            ...HEADERS,
            location: "./",
            "set-cookie": `${COOKIE}=${encodeURIComponent(given)}; HttpOnly; SameSite=Strict; Path=/`,
          })
          .end();
      } else res.writeHead(401, { ...HEADERS, "content-type": "text/html; charset=utf-8" }).end(LOGIN("That token is wrong."));
      return true;
    }
    const cookie = cookieToken(req);
    const authorized = tokenMatches(req.headers.authorization, o.token) || (cookie !== undefined && tokenMatches(`Bearer ${cookie}`, o.token));
    if (!authorized) {
      if (page) res.writeHead(401, { ...HEADERS, "content-type": "text/html; charset=utf-8" }).end(LOGIN("Enter the relay's token (the value of <code>--token</code> / <code>UPTRAKIT_RELAY_TOKEN</code>)."));
      else res.writeHead(401, { ...HEADERS, "content-type": "application/json" }).end(JSON.stringify({ error: "missing or wrong token" }));
      return true;
    }
  }
  if (page) {
    res.writeHead(200, { ...HEADERS, "content-type": "text/html; charset=utf-8" }).end(req.method === "HEAD" ? undefined : PAGE);
    return true;
  }
  try {
    const body = JSON.stringify(await o.snapshot());
    res.writeHead(200, { ...HEADERS, "content-type": "application/json" }).end(body);
  } catch (err) {
    res.writeHead(500, { ...HEADERS, "content-type": "application/json" }).end(JSON.stringify({ error: (err as Error).message }));
  }
  return true;
}
