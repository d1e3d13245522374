// The relay as operators run it: readiness that follows NATS, metrics that count what flows,
// NATS credentials (and that they never leak), a graceful drain on SIGTERM that loses nothing
// across a rolling restart, and a read-only `stream info`. Real relay processes, real
// nats-servers (never the system one), real WebSockets.

import t, { type Test } from "tap";
import fs from "node:fs";
import path from "node:path";
import { connect, nanos, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { startNatsCluster, startNatsServer, type NatsCluster, type NatsServer, type NatsServerOptions } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type CliResult, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, upgradeStatus, type Frame } from "./helpers/test-controller.js";
import { makeTlsFiles } from "./helpers/tls-certs.js";
import { makeOperatorSetup } from "./helpers/nats-jwt.js";

const STREAM = "UPTRAKIT_PUSH";

// ---- a world per test, torn down completely -----------------------------------------------------

interface Env {
  nats(opts?: NatsServerOptions): Promise<NatsServer>;
  cluster(): Promise<NatsCluster>;
  relay(id: string, natsUrl: string, extra?: string[], o?: { dataDir?: string; env?: Record<string, string> }): Promise<RelayProcess>;
  controller(r: RelayProcess, token?: string): Promise<TestController>;
  jsm(urls: string | string[]): Promise<Awaited<ReturnType<typeof jetstreamManager>>>;
  dir(): string;
}

function setup(tt: Test): Env {
  const servers: Array<NatsServer | NatsCluster> = [];
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  const conns: NatsConnection[] = [];
  const dirs: string[] = [];
  const env: Env = {
    async nats(opts) {
      const s = await startNatsServer(opts);
      servers.push(s);
      return s;
    },
    async cluster() {
      const c = await startNatsCluster(3);
      servers.push(c);
      return c;
    },
    async relay(id, natsUrl, extra = [], o = {}) {
      const r = await startRelay({ instanceId: id, natsUrl, dataDir: o.dataDir ?? env.dir(), args: extra, env: o.env });
      relays.push(r);
      return r;
    },
    async controller(r, token) {
      const c = await TestController.connect(r.wsUrl, { token });
      controllers.push(c);
      return c;
    },
    async jsm(urls) {
      const nc = await connect({ servers: urls, name: "operations-test" });
      conns.push(nc);
      return jetstreamManager(nc);
    },
    dir() {
      const d = tempDir("uptrakit-ops-");
      dirs.push(d);
      return d;
    },
  };
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await Promise.all(conns.map((nc) => nc.close().catch(() => undefined)));
    await Promise.all(servers.map((s) => s.stop()));
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });
  return env;
}

// ---- HTTP endpoints, polled with a bound (nothing else to wait on across processes) -------------

const POLL_MS = 100;
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Metrics = Map<string, number>;

/** /metrics as a map from series (name plus labels, as exposed) to value. */
async function scrape(r: RelayProcess): Promise<Metrics> {
  const res = await fetch(`${r.httpUrl}/metrics`);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
  const m: Metrics = new Map();
  for (const line of (await res.text()).split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

const v = (m: Metrics, name: string): number | undefined => m.get(`uptrakit_relay_${name}`);

/** Polls /metrics until pred holds; resolves with that scrape. */
async function metricsUntil(r: RelayProcess, what: string, pred: (m: Metrics) => boolean, timeoutMs = 10_000): Promise<Metrics> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = await scrape(r);
    if (pred(m)) return m;
    if (Date.now() > deadline) {
      const ours = [...m].filter(([k]) => k.startsWith("uptrakit_relay_") && !k.includes("_bucket"));
      throw new Error(`${r.instanceId}: ${what} not reached within ${timeoutMs} ms; metrics: ${JSON.stringify(ours)}`);
    }
    await pause(POLL_MS);
  }
}

async function readyz(r: RelayProcess): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${r.httpUrl}/readyz`);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** Polls /readyz every 100 ms until it answers `status`; resolves with that answer and how long it took. */
async function readyzBecomes(r: RelayProcess, status: number, timeoutMs: number): Promise<{ body: Record<string, unknown>; ms: number }> {
  const started = Date.now();
  let last: unknown;
  for (;;) {
    const got = await readyz(r);
    if (got.status === status) return { body: got.body, ms: Date.now() - started };
    last = got;
    if (Date.now() - started > timeoutMs) throw new Error(`${r.instanceId}: /readyz not ${status} within ${timeoutMs} ms; last ${JSON.stringify(last)}`);
    await pause(POLL_MS);
  }
}

interface StreamInfoJson {
  bus: string;
  stream: string;
  messages: number;
  bytes: number;
  firstSeq: number;
  lastSeq: number;
  consumer: { name: string; pending: number; ackPending: number; redelivered: number } | null;
}

async function streamInfo(args: string[]): Promise<StreamInfoJson> {
  const r = await runRelayCli(["stream", "info", "--json", ...args]);
  if (r.code !== 0) throw new Error(`stream info exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as StreamInfoJson;
}

/** Polls `stream info` (another process's view of the bus) until pred holds. */
async function streamInfoUntil(args: string[], what: string, pred: (i: StreamInfoJson) => boolean, timeoutMs = 10_000): Promise<StreamInfoJson> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await streamInfo(args);
    if (pred(info)) return info;
    if (Date.now() > deadline) throw new Error(`stream info: ${what} not reached within ${timeoutMs} ms; last ${JSON.stringify(info)}`);
    await pause(POLL_MS);
  }
}

/** Rejects with `message` unless p settles within ms; leaves no timer behind. */
async function within<T>(p: Promise<T>, ms: number, message: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(message())), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

// ---- readiness ------------------------------------------------------------------------------------

t.test("--readiness strict: /readyz follows the NATS connection; a publish made meanwhile is kept and sent", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  // The old behaviour, now an explicit option (the default, degraded, is test/readiness.test.ts).
  const strict = ["--readiness", "strict"];
  const [ra, rb] = await Promise.all([env.relay("alpha", nats.url, strict), env.relay("bravo", nats.url, strict)]);
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);

  tt.same(await readyz(ra), { status: 200, body: { status: "ready" } }, "ready while connected, with the stream and consumer in place");
  tt.equal((await fetch(`${ra.httpUrl}/healthz`)).status, 200, "/healthz 200");

  await nats.kill();
  const down = await readyzBecomes(ra, 503, 10_000);
  tt.comment(`/readyz went 503 ${down.ms} ms after nats-server died`);
  tt.equal(down.body.status, "not ready");
  tt.match(down.body.reason, /jetstream.*(disconnected|closed)/i, "a short reason names the bus state");
  tt.equal((await readyzBecomes(rb, 503, 10_000)).body.status, "not ready", "bravo too");
  tt.equal((await fetch(`${ra.httpUrl}/healthz`)).status, 200, "/healthz stays 200: the process is alive");
  tt.equal(v(await scrape(ra), "nats_connected"), 0, "nats_connected 0");

  const queued = await ca.publish("VersionCheckCompleted", { while: "down" }, "while-down");
  tt.same(queued, { type: "published", id: "while-down", queued: true }, "accepted into the outbox");
  tt.equal(v(await scrape(ra), "outbox_depth"), 1, "outbox_depth 1");

  await nats.restart();
  const up = await readyzBecomes(ra, 200, 20_000);
  tt.comment(`/readyz back to 200 ${up.ms} ms after nats-server was ready again`);
  tt.same(up.body, { status: "ready" });
  await readyzBecomes(rb, 200, 20_000);
  await metricsUntil(ra, "outbox flushed", (m) => v(m, "outbox_depth") === 0 && v(m, "outbox_flushed_total") === 1);
  tt.equal(v(await scrape(ra), "nats_connected"), 1, "nats_connected 1 again");
  const d = await cb.next((f) => f.type === "deliver" && f.id === "while-down", 20_000);
  cb.ack(d);
  tt.equal(d.origin, "alpha", "the message published during the outage arrives");

  // The consumer deleted under a running relay: not ready until the relay has recreated it.
  const jsm = await env.jsm(nats.url);
  await jsm.consumers.delete(STREAM, "bravo");
  const gone = await readyzBecomes(rb, 503, 10_000);
  tt.match(gone.body.reason, /consumer bravo is missing/, "503 while the consumer is missing, and the reason says so");
  const back = await readyzBecomes(rb, 200, 15_000);
  tt.comment(`ready again ${back.ms} ms later`);
  tt.equal((await jsm.consumers.info(STREAM, "bravo")).name, "bravo", "the consumer was recreated");
  await ca.publish("VersionCheckCompleted", {}, "after-recreate");
  cb.ack(await cb.next((f) => f.type === "deliver" && f.id === "after-recreate", 15_000));
  tt.pass("and deliveries flow again");
});

// ---- metrics ----------------------------------------------------------------------------------------

t.test("/metrics counts what flows; /metrics, /healthz and /readyz need no token, /ws does", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  const TOKEN = "ws-token-for-ops-test";
  const [ra, rb] = await Promise.all([
    env.relay("alpha", nats.url, ["--token", TOKEN]),
    env.relay("bravo", nats.url, ["--token", TOKEN, "--nack-delay", "0"]),
  ]);
  tt.equal(await upgradeStatus(ra.wsUrl), 401, "/ws without the token → 401");
  for (const p of ["/metrics", "/healthz", "/readyz"]) tt.equal((await fetch(`${ra.httpUrl}${p}`)).status, 200, `${p} without a token → 200`);
  const fresh = await scrape(rb);
  tt.equal(v(fresh, "controller_connected"), 0, "controller_connected 0 before a controller connects");
  tt.equal(v(fresh, "nats_connected"), 1, "nats_connected 1");

  const [ca, cb] = await Promise.all([env.controller(ra, TOKEN), env.controller(rb, TOKEN)]);
  for (let i = 0; i < 5; i++) tt.same(await ca.publish("VersionCheckCompleted", { i }, `m-${i}`), { type: "published", id: `m-${i}` });
  for (const f of await cb.nextN((f) => f.type === "deliver", 5)) cb.ack(f);

  const b1 = await metricsUntil(rb, "5 acks", (m) => v(m, "acked_total") === 5);
  const a1 = await metricsUntil(ra, "5 echoes filtered", (m) => v(m, "echo_filtered_total") === 5);
  tt.equal(v(a1, "published_total"), 5, "A published_total 5");
  tt.equal(v(a1, "echo_filtered_total"), 5, "A echo_filtered_total 5 (its own messages came back to its consumer)");
  tt.equal(v(a1, "delivered_total"), 0, "A delivered nothing to its controller");
  tt.equal(v(a1, "publish_latency_seconds_count"), 5, "A publish latency observed 5 times");
  tt.ok(v(a1, "publish_latency_seconds_sum")! > 0, "with a positive sum");
  tt.equal(v(a1, "outbox_depth"), 0, "A outbox_depth 0");
  tt.equal(v(b1, "delivered_total"), 5, "B delivered_total 5");
  tt.equal(v(b1, "acked_total"), 5, "B acked_total 5");
  tt.equal(v(b1, "redelivered_total"), 0, "B redelivered_total 0");
  tt.equal(v(b1, "published_total"), 0, "B published_total 0");
  tt.equal(v(b1, "delivery_latency_seconds_count"), 5, "B end-to-end delivery latency observed 5 times");
  for (const [m, who] of [[a1, "A"], [b1, "B"]] as const) {
    tt.equal(v(m, "controller_connected"), 1, `${who} controller_connected 1`);
    tt.equal(v(m, "nats_connected"), 1, `${who} nats_connected 1`);
    tt.equal(v(m, "in_flight"), 0, `${who} in_flight 0`);
  }
  tt.ok(b1.has("process_cpu_user_seconds_total") && b1.has("nodejs_heap_size_used_bytes"), "default process metrics are exported");

  // A nack and its redelivery.
  await ca.publish("VersionCheckCompleted", {}, "nack-me");
  const first = await cb.next((f) => f.type === "deliver" && f.id === "nack-me");
  cb.send({ type: "nack", deliveryId: first.deliveryId, delayMs: 0 });
  cb.ack(await cb.next((f) => f.type === "deliver" && f.id === "nack-me" && f.attempt === 2));
  const b2 = await metricsUntil(rb, "the redelivery acked", (m) => v(m, "acked_total") === 6);
  tt.equal(v(b2, "nacked_total"), 1, "B nacked_total 1");
  tt.equal(v(b2, "redelivered_total"), 1, "B redelivered_total 1");
  tt.equal(v(b2, "delivered_total"), 7, "B delivered_total 7 (6 first attempts + 1 redelivery)");
  tt.equal(v(b2, "delivery_latency_seconds_count"), 6, "latency observed on first attempts only");

  // A reject: a dead letter.
  await ca.publish("VersionCheckCompleted", {}, "reject-me");
  const poison = await cb.next((f) => f.type === "deliver" && f.id === "reject-me");
  cb.send({ type: "reject", deliveryId: poison.deliveryId, reason: "test" });
  const b3 = await metricsUntil(rb, "a dead letter", (m) => v(m, "dead_lettered_total") === 1);
  tt.equal(v(b3, "rejected_total"), 1, "B rejected_total 1");

  // A credential-bearing kind: refused, counted, not published.
  const refused = await ca.publish("TenantRevoked", { apiKey: "x" }, "forbidden");
  tt.equal(refused.code, "forbidden_kind");
  const a2 = await metricsUntil(ra, "the refusal counted", (m) => v(m, "forbidden_kind_total") === 1);
  tt.equal(v(a2, "published_total"), 7, "A published_total 7: the refused one is not counted");

  await cb.close();
  await metricsUntil(rb, "controller gone", (m) => v(m, "controller_connected") === 0);
  tt.pass("B controller_connected 0 after the controller disconnects");
});

// ---- NATS credentials -------------------------------------------------------------------------------

/** Output of a process that must not contain any of the secrets. */
function assertNoSecrets(tt: Test, what: string, text: string, secrets: string[]): void {
  for (const s of secrets) tt.notOk(text.includes(s), `${what}: the secret ${s.slice(0, 3)}… is not in the output`);
}

t.test("NATS token auth: flag and env var work, a wrong token fails start-up clearly, the token is never logged", async (tt) => {
  const env = setup(tt);
  const TOKEN = "nats-tok-7d1f0c5a9e";
  const WRONG = "wrong-tok-3b8e21";
  const nats = await env.nats({ args: ["--auth", TOKEN] });

  const byFlag = await env.relay("tok-flag", nats.url, ["--nats-token", TOKEN, "--log-level", "trace"]);
  const byEnv = await env.relay("tok-env", nats.url, [], { env: { UPTRAKIT_NATS_TOKEN: TOKEN } });
  tt.equal((await readyz(byFlag)).status, 200, "--nats-token: connected and ready");
  tt.equal((await readyz(byEnv)).status, 200, "UPTRAKIT_NATS_TOKEN: connected and ready");
  // Some traffic, so that trace-level logging has had its chance to leak.
  const [c1, c2] = await Promise.all([env.controller(byFlag), env.controller(byEnv)]);
  await c2.publish("VersionCheckCompleted", {}, "auth-check");
  c1.ack(await c1.next((f) => f.type === "deliver"));

  const wrong = await runRelayCli(["run", "--instance-id", "tok-wrong", "--data-dir", env.dir(), "--listen", "127.0.0.1:0", "--nats-url", nats.url, "--nats-token", WRONG]);
  tt.not(wrong.code, 0, `a wrong token: exit ${wrong.code}`);
  tt.match(wrong.stderr, /cannot start: .*refused the credentials.*authorization/i, "the reason is clear");
  const none = await runRelayCli(["run", "--instance-id", "tok-none", "--data-dir", env.dir(), "--listen", "127.0.0.1:0", "--nats-url", nats.url]);
  tt.not(none.code, 0, "no token: does not start");
  tt.match(none.stderr, /refused the credentials/i);
  const info = await runRelayCli(["status", "--instance-id", "tok-flag", "--nats-url", nats.url], { env: { UPTRAKIT_NATS_TOKEN: TOKEN } });
  tt.equal(info.code, 0, `status connects with the same options: ${info.stderr}`);
  tt.match(info.stdout, /consumer: +tok-flag:/);

  await Promise.all([c1.close(), c2.close()]);
  tt.equal(await byFlag.stop("SIGTERM"), 0);
  tt.equal(await byEnv.stop("SIGTERM"), 0);
  tt.ok(byFlag.logs.some((l) => Number(l.level) < 30), `trace logging was on (${byFlag.logs.length} lines, some below info)`);
  assertNoSecrets(tt, "--nats-token relay's logs", JSON.stringify(byFlag.logs) + byFlag.stderr(), [TOKEN]);
  assertNoSecrets(tt, "env token relay's logs", JSON.stringify(byEnv.logs) + byEnv.stderr(), [TOKEN]);
  assertNoSecrets(tt, "the failed start", wrong.stdout + wrong.stderr, [WRONG, TOKEN]);
  assertNoSecrets(tt, "status", info.stdout + info.stderr, [TOKEN]);
});

t.test("NATS user/password: flags and env vars work, a wrong password fails start-up clearly, never printed", async (tt) => {
  const env = setup(tt);
  const PASS = "pw-5c0a77e2d4";
  const WRONG = "pw-wrong-91ab3";
  const nats = await env.nats({ args: ["--user", "relay", "--pass", PASS] });

  const byFlag = await env.relay("up-flag", nats.url, ["--nats-user", "relay", "--nats-pass", PASS, "--log-level", "debug"]);
  const byEnv = await env.relay("up-env", nats.url, [], { env: { UPTRAKIT_NATS_USER: "relay", UPTRAKIT_NATS_PASS: PASS } });
  tt.equal((await readyz(byFlag)).status, 200, "--nats-user/--nats-pass: ready");
  tt.equal((await readyz(byEnv)).status, 200, "UPTRAKIT_NATS_USER/UPTRAKIT_NATS_PASS: ready");

  const wrong = await runRelayCli(["run", "--instance-id", "up-wrong", "--data-dir", env.dir(), "--listen", "127.0.0.1:0", "--nats-url", nats.url, "--nats-user", "relay", "--nats-pass", WRONG]);
  tt.not(wrong.code, 0, `a wrong password: exit ${wrong.code}`);
  tt.match(wrong.stderr, /refused the credentials.*authorization/i, "the reason is clear");
  const wrongInfo = await runRelayCli(["stream", "info", "--nats-url", nats.url], { env: { UPTRAKIT_NATS_USER: "relay", UPTRAKIT_NATS_PASS: WRONG } });
  tt.not(wrongInfo.code, 0, "stream info with a wrong password fails too");
  tt.match(wrongInfo.stderr, /refused the credentials/i);
  // Credentials in the URL are taken out of it (test/secrets.test.ts): a wrong one is reported without being echoed.
  const inUrl = await runRelayCli(["run", "--data-dir", env.dir(), "--listen", "127.0.0.1:0", "--nats-url", `nats://relay:${WRONG}@127.0.0.1:${nats.port}`]);
  tt.not(inUrl.code, 0, "a wrong password in --nats-url: does not start");
  tt.match(inUrl.stderr, /refused the credentials/);

  tt.equal(await byFlag.stop("SIGTERM"), 0);
  tt.equal(await byEnv.stop("SIGTERM"), 0);
  assertNoSecrets(tt, "--nats-pass relay's logs", JSON.stringify(byFlag.logs) + byFlag.stderr(), [PASS]);
  assertNoSecrets(tt, "env password relay's logs", JSON.stringify(byEnv.logs) + byEnv.stderr(), [PASS]);
  assertNoSecrets(tt, "the failed start", wrong.stdout + wrong.stderr, [WRONG, PASS]);
  assertNoSecrets(tt, "the failed stream info", wrongInfo.stdout + wrongInfo.stderr, [WRONG, PASS]);
  assertNoSecrets(tt, "the refused URL", inUrl.stdout + inUrl.stderr, [WRONG, PASS]);
});

t.test("NATS TLS with a client certificate: flags and env vars work, stream info too; an untrusted server fails start-up clearly", async (tt) => {
  const env = setup(tt);
  const tls = makeTlsFiles();
  tt.teardown(() => tls.remove());
  const nats = await env.nats({ args: tls.serverArgs });
  const tlsUrl = nats.url.replace(/^nats:/, "tls:");
  const files = ["--nats-tls-ca", tls.ca, "--nats-tls-cert", tls.clientCert, "--nats-tls-key", tls.clientKey];

  const byFlag = await env.relay("tls-flag", tlsUrl, files);
  const byEnv = await env.relay("tls-env", nats.url, [], {
    env: { UPTRAKIT_NATS_TLS_CA: tls.ca, UPTRAKIT_NATS_TLS_CERT: tls.clientCert, UPTRAKIT_NATS_TLS_KEY: tls.clientKey },
  });
  tt.equal((await readyz(byFlag)).status, 200, "--nats-tls-ca/--nats-tls-cert/--nats-tls-key: ready");
  tt.equal((await readyz(byEnv)).status, 200, "UPTRAKIT_NATS_TLS_CA/_CERT/_KEY: ready");
  const [c1, c2] = await Promise.all([env.controller(byFlag), env.controller(byEnv)]);
  await c2.publish("CertificateRenewed", {}, "over-tls");
  tt.match(await c1.next((f) => f.type === "deliver"), { id: "over-tls", origin: "tls-env" }, "a message crossed over TLS");

  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "tls-flag", "--nats-url", tlsUrl, ...files]);
  tt.equal(info.code, 0, `stream info connects with the same options: ${info.stderr}`);
  tt.equal(JSON.parse(info.stdout).consumer?.name, "tls-flag");

  const untrusted = await runRelayCli(["run", "--instance-id", "tls-bad", "--data-dir", env.dir(), "--listen", "127.0.0.1:0", "--nats-url", tlsUrl,
    "--nats-tls-ca", tls.otherCa, "--nats-tls-cert", tls.clientCert, "--nats-tls-key", tls.clientKey]);
  tt.not(untrusted.code, 0, `a server certificate from another CA: exit ${untrusted.code}`);
  tt.match(untrusted.stderr, /cannot start: TLS with NATS at .* failed: .*--nats-tls-ca/, "the reason is clear");
  await Promise.all([c1.close(), c2.close()]);
});

t.test("NATS .creds file: flag and env var work, stream info too, a user of an unknown account fails clearly, the seed is never logged", async (tt) => {
  const env = setup(tt);
  const op = makeOperatorSetup(env.dir());
  const nats = await env.nats({ args: op.serverArgs });
  const byFlag = await env.relay("creds-flag", nats.url, ["--nats-creds", op.creds, "--log-level", "trace"]);
  const byEnv = await env.relay("creds-env", nats.url, [], { env: { UPTRAKIT_NATS_CREDS: op.creds } });
  tt.equal((await readyz(byFlag)).status, 200, "--nats-creds: ready");
  tt.equal((await readyz(byEnv)).status, 200, "UPTRAKIT_NATS_CREDS: ready");
  const [c1, c2] = await Promise.all([env.controller(byFlag), env.controller(byEnv)]);
  await c2.publish("VersionCheckCompleted", {}, "with-creds");
  tt.match(await c1.next((f) => f.type === "deliver"), { id: "with-creds", origin: "creds-env" }, "a message crossed");
  const info = await runRelayCli(["status", "--instance-id", "creds-flag", "--nats-url", nats.url, "--nats-creds", op.creds]);
  tt.equal(info.code, 0, `status connects with the same options: ${info.stderr}`);
  tt.match(info.stdout, /consumer: +creds-flag:/);

  const foreign = await runRelayCli(["run", "--instance-id", "creds-bad", "--data-dir", env.dir(), "--listen", "127.0.0.1:0", "--nats-url", nats.url, "--nats-creds", op.foreignCreds]);
  tt.not(foreign.code, 0, `a user of an unknown account: exit ${foreign.code}`);
  tt.match(foreign.stderr, /cannot start: .*refused the credentials/i, "the reason is clear");

  await Promise.all([c1.close(), c2.close()]);
  tt.equal(await byFlag.stop("SIGTERM"), 0);
  tt.equal(await byEnv.stop("SIGTERM"), 0);
  assertNoSecrets(tt, "--nats-creds relay's logs", JSON.stringify(byFlag.logs) + byFlag.stderr(), [op.seed]);
  assertNoSecrets(tt, "env creds relay's logs", JSON.stringify(byEnv.logs) + byEnv.stderr(), [op.seed]);
  assertNoSecrets(tt, "status", info.stdout + info.stderr, [op.seed]);
});

// ---- graceful drain -----------------------------------------------------------------------------------

t.test("SIGTERM during a burst of deliveries: drains, exits 0, closes with 1000, and nothing is lost", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  const dataB = env.dir();
  // An ack wait above what the slow controller needs, a drain timeout below it: some in-flight
  // deliveries are acked during the drain, the rest are handed back.
  const bArgs = ["--ack-wait", "5000", "--drain-timeout", "1000"];
  const ra = await env.relay("alpha", nats.url);
  const rb = await env.relay("bravo", nats.url, bArgs, { dataDir: dataB });
  const ca = await env.controller(ra);
  const cb1 = await env.controller(rb);

  const published: string[] = [];
  const publish = async (from: number, to: number): Promise<void> => {
    for (let i = from; i < to; i++) {
      const r = await ca.publish("SoftwareStateUpdated", { i }, `burst-${i}`);
      if (r.type !== "published" || r.queued) throw new Error(`publish burst-${i}: ${JSON.stringify(r)}`);
      published.push(r.id as string);
    }
  };

  // Controller B, first session: handles one delivery at a time, 50-200 ms each, then acks.
  const acked1 = new Set<string>();
  let reachedEight!: () => void;
  const eightAcked = new Promise<void>((resolve) => (reachedEight = resolve));
  const queue: Frame[] = [];
  let working: Promise<void> = Promise.resolve();
  const work = async (): Promise<void> => {
    while (queue.length > 0 && cb1.closeCode === undefined) {
      const f = queue.shift()!;
      await pause(50 + Math.floor(Math.random() * 150)); // the controller's work on it
      if (cb1.closeCode !== undefined) return;
      cb1.ack(f);
      acked1.add(f.id as string);
      if (acked1.size === 8) reachedEight();
    }
  };
  cb1.onFrame((f) => {
    if (f.type !== "deliver") return;
    queue.push(f);
    if (queue.length === 1) working = working.then(work);
  });

  await publish(0, 30);
  await eightAcked;
  const inFlight = cb1.deliveries().length - acked1.size;
  tt.ok(inFlight > 0, `${inFlight} deliveries in flight when SIGTERM is sent`);
  const stopping = rb.stop("SIGTERM");
  await publish(30, 45); // the rest of the burst arrives while bravo drains and is away
  tt.equal(await stopping, 0, "relay B exits 0");
  await cb1.closed();
  await working;
  tt.equal(cb1.closeCode, 1000, "controller B's socket closed with 1000");
  tt.ok(rb.logs.some((l) => l.msg === "draining"), "it drained");
  const released = rb.logs.find((l) => typeof l.released === "number");
  tt.comment(`first session acked ${acked1.size}; ${released ? `${String(released.released)} handed back at the drain timeout` : "none handed back"}`);

  // The same instance again (same id, same data dir), with a controller that acks everything.
  const rb2 = await env.relay("bravo", nats.url, bArgs, { dataDir: dataB });
  const cb2 = await env.controller(rb2);
  const acked2 = new Set<string>();
  const restartedAt = Date.now();
  let allAcked!: () => void;
  const everything = new Promise<void>((resolve) => (allAcked = resolve));
  const missing = (): string[] => published.filter((id) => !acked1.has(id) && !acked2.has(id));
  cb2.onFrame((f) => {
    if (f.type !== "deliver") return;
    cb2.ack(f);
    acked2.add(f.id as string);
    if (missing().length === 0) allAcked();
  });
  await within(everything, 20_000, () => `not everything acked within 20 s; missing ${missing().join(", ")}`);
  // A message the server sent just as bravo stopped pulling is dropped on the wire and comes back
  // only after the ack wait (5 s here): late, not lost.
  tt.comment(`second session acked ${acked2.size} in ${Date.now() - restartedAt} ms`);

  const lost = missing();
  tt.equal(published.length, 45, "45 published by A");
  tt.same(lost, [], "lost = 0: every message published by A was acked by some session of controller B");
  const dups = published.filter((id) => acked1.has(id) && acked2.has(id));
  tt.comment(`duplicates (acked in both sessions, at-least-once): ${dups.length}${dups.length ? ` (${dups.join(", ")})` : ""}`);
  tt.same(cb2.deliveries().filter((f) => f.origin !== "alpha"), [], "no echoes, nothing foreign");

  const info = await streamInfoUntil(["--instance-id", "bravo", "--nats-url", nats.url], "consumer settled", (i) => i.consumer?.ackPending === 0 && i.consumer.pending === 0);
  tt.match(info, { messages: 45, consumer: { name: "bravo", pending: 0, ackPending: 0 } }, "the bus agrees: nothing pending for bravo");
  const dlq = await runRelayCli(["dlq", "list", "--json", "--data-dir", dataB]);
  tt.same(JSON.parse(dlq.stdout), [], "nothing was dead-lettered");
});

// ---- stream info -------------------------------------------------------------------------------------

t.test("stream info reads the stream and this instance's consumer, and changes nothing", async (tt) => {
  const env = setup(tt);
  const nats = await env.nats();
  // A retention other than the default: a `stream info` without --max-age must not reset it.
  const [ra, rb] = await Promise.all([env.relay("alpha", nats.url, ["--max-age", "1h"]), env.relay("bravo", nats.url, ["--max-age", "1h"])]);
  const [ca, cb] = await Promise.all([env.controller(ra), env.controller(rb)]);
  for (const id of ["s-1", "s-2", "s-3"]) await ca.publish("VersionCheckCompleted", { id }, id);
  const got = await cb.nextN((f) => f.type === "deliver", 3);
  cb.ack(got[0]!); // two stay unacked

  const jsm = await env.jsm(nats.url);
  const before = (await jsm.streams.info(STREAM)).config;
  tt.equal(before.max_age, nanos(3_600_000), "the relays made the stream with 1 h retention");

  const natsArgs = ["--nats-url", nats.url];
  const bravo = await streamInfoUntil(["--instance-id", "bravo", ...natsArgs], "two awaiting ack", (i) => i.consumer?.ackPending === 2);
  tt.match(bravo, { bus: "jetstream", stream: STREAM, messages: 3, lastSeq: 3, consumer: { name: "bravo", pending: 0, ackPending: 2, redelivered: 0 } }, "bravo: 3 messages, all delivered, 2 awaiting ack");
  tt.ok(bravo.bytes > 0, "bytes counted");
  const alpha = await streamInfo(["--instance-id", "alpha", ...natsArgs]);
  tt.match(alpha.consumer, { name: "alpha", pending: 0, ackPending: 0 }, "alpha: its own three were filtered and acked");

  const look = await streamInfo(["--instance-id", "inspector", ...natsArgs]);
  tt.equal(look.consumer, null, "an instance without a consumer gets null");
  tt.equal(look.messages, 3);
  const again = await runRelayCli(["status", "--instance-id", "inspector", ...natsArgs]);
  tt.equal(again.code, 0, again.stderr);
  tt.match(again.stdout, /consumer: +none for instance inspector/, "looking twice still finds no consumer: the first look created none");
  const text = await runRelayCli(["status", "--instance-id", "bravo", ...natsArgs]);
  tt.match(text.stdout, /messages: +3 /);
  tt.match(text.stdout, /consumer: +bravo: 0 pending, 2 awaiting ack, 0 redelivered/, "the text form");

  const consumers: string[] = [];
  for await (const c of jsm.consumers.list(STREAM)) consumers.push(c.name);
  tt.same(consumers.sort(), ["alpha", "bravo"], "stream info created no consumer");
  tt.same((await jsm.streams.info(STREAM)).config, before, "the stream's configuration is unchanged (retention, replicas, everything)");

  const missing = await runRelayCli(["stream", "info", "--stream", "NO_SUCH_STREAM", ...natsArgs]);
  tt.not(missing.code, 0, "a missing stream is an error");
  tt.match(missing.stderr, /stream NO_SUCH_STREAM does not exist/);
  await tt.rejects(jsm.streams.info("NO_SUCH_STREAM"), /stream not found/i, "and it was not created");

  // The embedded bus: a missing file is reported, not created.
  const dir = env.dir();
  const noFile: CliResult = await runRelayCli(["stream", "info", "--data-dir", dir]);
  tt.not(noFile.code, 0, "no bus file: an error");
  tt.match(noFile.stderr, /bus\.db: it does not exist/);
  tt.notOk(fs.existsSync(path.join(dir, "bus.db")), "and no file was created");
});

t.test("stream info against a cluster keeps the stream's 3 replicas", async (tt) => {
  const env = setup(tt);
  const cluster = await env.cluster();
  const urls = cluster.urls.join(",");
  await env.relay("alpha", urls, ["--replicas", "3"]);
  const jsm = await env.jsm(cluster.urls);
  tt.equal((await jsm.streams.info(STREAM)).config.num_replicas, 3, "the relay made a 3-replica stream");
  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "alpha", "--nats-url", urls]); // no --replicas: the default is 1
  tt.equal(info.code, 0, info.stderr);
  tt.match(JSON.parse(info.stdout), { stream: STREAM, consumer: { name: "alpha" } });
  tt.equal((await jsm.streams.info(STREAM)).config.num_replicas, 3, "still 3 replicas after stream info without --replicas");
});
