// Faults under load on a single nats-server: the server restarts, a relay is SIGKILLed and comes
// back, a controller drops with deliveries in flight, and a controller acks slowly behind a large
// backlog. In each, every acknowledged message must reach every other controller.

import t, { type Test } from "tap";
import type { WebSocket } from "ws";
import { freePort, startNatsServer, type NatsServer } from "./helpers/nats-server.js";
import { startRelay, type RelayProcess } from "./helpers/relay-process.js";
import { LEAVE_UNSETTLED } from "../controller-stub/client.js";
import { Ledger, LoadController, rssMb, startControllers, type LedgerCounts } from "../scripts/lib/fault-harness.js";

const RATE = 40; // per controller, messages a second
/** Short ack wait: deliveries a killed relay had in flight come back in seconds, not 30. */
const RELAY_ARGS = ["--ack-wait", "5s"];

interface Env {
  server: NatsServer;
  relays: Map<string, RelayProcess>;
  start(id: string, extra?: string[]): Promise<RelayProcess>;
  /** SIGKILL, then start again with the same instance id, data dir and port. */
  restart(id: string, extra?: string[]): Promise<RelayProcess>;
}

async function setup(t: Test): Promise<Env> {
  const server = await startNatsServer();
  const relays = new Map<string, RelayProcess>();
  const env: Env = {
    server,
    relays,
    async start(id, extra = []) {
      const r = await startRelay({ instanceId: id, natsUrl: server.url, port: await freePort(), args: [...RELAY_ARGS, ...extra] });
      relays.set(id, r);
      return r;
    },
    async restart(id, extra = []) {
      const old = relays.get(id)!;
      const r = await startRelay({ instanceId: id, natsUrl: server.url, port: old.port, dataDir: old.dataDir, args: [...RELAY_ARGS, ...extra] });
      relays.set(id, r);
      return r;
    },
  };
  t.teardown(async () => {
    await Promise.all([...relays.values()].map((r) => r.stop("SIGKILL")));
    await server.stop();
  });
  return env;
}

function report(t: Test, ledger: Ledger, label: string): void {
  t.comment(`${label}:\n${ledger.summary()}`);
}

function assertNoLoss(t: Test, counts: LedgerCounts, drained: boolean, missing: unknown): void {
  t.ok(drained, `every acknowledged message reached every other controller; missing: ${JSON.stringify(missing)}`);
  t.equal(counts.lost, 0, "lost = 0");
  t.equal(counts.echoes, 0, "no echoes");
  t.equal(counts.foreign, 0, "no unknown messages");
  if (counts.duplicates > 0) t.comment(`duplicates (at-least-once, not a failure): ${counts.duplicates}`);
}

t.test("nats-server restarts during load", async (t) => {
  const started = Date.now();
  const env = await setup(t);
  const relays = await Promise.all(["s-alpha", "s-bravo", "s-charlie"].map((id) => env.start(id)));
  const { ledger, controllers } = await startControllers(relays.map((r) => ({ instanceId: r.instanceId, wsUrl: r.wsUrl })), { rate: RATE });
  t.teardown(() => Promise.all(controllers.map((c) => c.close())));
  for (const c of controllers) c.startPublishing();
  t.ok(await ledger.waitAcked(150, 20_000), "publishing before the restart");

  const before = ledger.counts();
  await env.server.restart(); // SIGTERM, then the same port and store
  t.comment(`nats-server restarted after ${before.acked} acknowledged publishes`);
  t.ok(await ledger.waitAcked(200, 30_000), "publishing goes on after the restart");
  for (const c of controllers) c.stopPublishing();
  await Promise.all(controllers.map((c) => c.settled()));
  const drain = await ledger.waitDrained(60_000);
  report(t, ledger, "server restart");
  assertNoLoss(t, drain.counts, drain.drained, drain.missing);
  t.ok(drain.counts.queued > 0, `publishes made while the server was down were queued in the outbox (${drain.counts.queued})`);
  for (const r of relays) t.equal(r.proc.exitCode, null, `${r.instanceId} rode out the restart`);
  t.comment(`took ${Date.now() - started} ms`);
});

t.test("a relay SIGKILLed during load comes back with the same id and data dir; nothing acknowledged is lost", async (t) => {
  const started = Date.now();
  const env = await setup(t);
  const relays = await Promise.all(["k-alpha", "k-bravo", "k-charlie"].map((id) => env.start(id)));
  const { ledger, controllers } = await startControllers(relays.map((r) => ({ instanceId: r.instanceId, wsUrl: r.wsUrl })), { rate: RATE });
  t.teardown(() => Promise.all(controllers.map((c) => c.close())));
  const bravo = controllers[1]!;
  let readies = 0;
  bravo.client.on("ready", () => readies++);
  for (const c of controllers) c.startPublishing();
  t.ok(await ledger.waitAcked(150, 20_000), "publishing before the kill");

  const victim = env.relays.get("k-bravo")!;
  const metricsBefore = await (await fetch(`${victim.httpUrl}/metrics`)).text();
  victim.proc.kill("SIGKILL");
  await victim.exited;
  t.comment(`SIGKILLed k-bravo after ${ledger.ackedCount} acknowledged publishes (in flight then: ${/uptrakit_relay_in_flight (\d+)/.exec(metricsBefore)?.[1]})`);
  // The others keep publishing while bravo is gone; bravo's controller keeps retrying its own.
  t.ok(await ledger.waitAcked(80, 20_000), "the other controllers are acknowledged while bravo is down");
  const reconnected = new Promise<void>((resolve) => bravo.client.once("ready", () => resolve()));
  await env.restart("k-bravo");
  await reconnected;
  t.ok(readies >= 1, "bravo's RelayClient reconnected by itself");
  t.ok(await ledger.waitAcked(150, 30_000), "publishing goes on after the restart");
  for (const c of controllers) c.stopPublishing();
  await Promise.all(controllers.map((c) => c.settled()));
  const drain = await ledger.waitDrained(60_000);
  report(t, ledger, "relay SIGKILL");
  assertNoLoss(t, drain.counts, drain.drained, drain.missing);
  t.ok(drain.counts.deliveredPerPeer["k-bravo"]! > 0, "bravo received messages after its restart");
  t.comment(`took ${Date.now() - started} ms`);
});

t.test("publishes queued in the outbox survive a SIGKILL of their relay", async (t) => {
  const started = Date.now();
  const env = await setup(t);
  const relays = await Promise.all(["q-alpha", "q-bravo"].map((id) => env.start(id)));
  const { ledger, controllers } = await startControllers(relays.map((r) => ({ instanceId: r.instanceId, wsUrl: r.wsUrl })), { rate: RATE });
  t.teardown(() => Promise.all(controllers.map((c) => c.close())));
  for (const c of controllers) c.startPublishing();
  t.ok(await ledger.waitAcked(60, 20_000), "publishing with NATS up");

  await env.server.kill("SIGTERM"); // NATS away: publishes go to the outboxes
  t.ok(await ledger.waitFor(() => ledger.queuedCount >= 60, 20_000), "publishes are acknowledged as queued while NATS is down");
  const victim = env.relays.get("q-alpha")!;
  victim.proc.kill("SIGKILL"); // with its outbox full of acknowledged messages
  await victim.exited;
  const queuedAtKill = ledger.queuedCount;
  t.comment(`SIGKILLed q-alpha with NATS down; ${queuedAtKill} publishes had been acknowledged as queued`);

  await env.server.restart();
  await env.restart("q-alpha");
  t.ok(await ledger.waitAcked(100, 30_000), "publishing goes on with NATS and q-alpha back");
  for (const c of controllers) c.stopPublishing();
  await Promise.all(controllers.map((c) => c.settled()));
  const drain = await ledger.waitDrained(60_000);
  report(t, ledger, "outbox across SIGKILL");
  assertNoLoss(t, drain.counts, drain.drained, drain.missing);
  t.ok(drain.counts.queued >= queuedAtKill, "every queued acknowledgement was honoured");
  t.comment(`took ${Date.now() - started} ms`);
});

t.test("a controller that drops with deliveries in flight gets them again in its next session", async (t) => {
  const started = Date.now();
  const env = await setup(t);
  const [ra, rb] = await Promise.all([env.start("d-alpha"), env.start("d-bravo", ["--max-in-flight", "64"])]);
  const ledger = new Ledger(["d-alpha", "d-bravo"]);
  const sender = new LoadController({ peer: { instanceId: ra!.instanceId, wsUrl: ra!.wsUrl }, ledger, rate: 100 });
  let hold = true;
  const held = new Set<string>();
  const firstSession = new Set<string>();
  const secondSession = new Set<string>();
  const receiver = new LoadController({
    peer: { instanceId: rb!.instanceId, wsUrl: rb!.wsUrl },
    ledger,
    rate: 1,
    onDeliver: (d) => {
      if (hold) {
        held.add(d.id);
        firstSession.add(d.id);
        return LEAVE_UNSETTLED; // never answered in this session
      }
      secondSession.add(d.id);
      return undefined; // ack
    },
  });
  t.teardown(() => Promise.all([sender.close(), receiver.close()]));
  await Promise.all([sender.connect(), receiver.connect()]);
  sender.startPublishing();
  t.ok(await ledger.waitFor(() => held.size >= 64, 20_000), "the receiver holds a full window of 64 unacked deliveries");
  const heldNow = [...held];

  // Drop the socket without a close handshake (a crash or a network cut), publishing going on.
  const ws = (receiver.client as unknown as { ws: WebSocket | null }).ws;
  const readyAgain = new Promise<void>((resolve) => receiver.client.once("ready", () => resolve()));
  hold = false;
  ws!.terminate();
  await readyAgain;
  t.pass("the receiver's RelayClient reconnected");
  t.ok(
    await ledger.waitFor(() => heldNow.every((id) => secondSession.has(id)), 20_000),
    `all ${heldNow.length} deliveries left unacked by the dropped session came to the next one`,
  );
  t.ok(await ledger.waitAcked(100, 20_000), "publishing continued");
  sender.stopPublishing();
  await sender.settled();
  const drain = await ledger.waitDrained(30_000);
  report(t, ledger, "controller drop");
  assertNoLoss(t, drain.counts, drain.drained, drain.missing);
  t.ok(drain.counts.duplicates >= heldNow.length, `the held deliveries were delivered again (${drain.counts.duplicates} repeats)`);
  const dl = await fetch(`${rb!.httpUrl}/metrics`).then((r) => r.text());
  t.match(dl, /uptrakit_relay_dead_lettered_total 0\b/, "nothing was dead-lettered for being away");
  t.comment(`took ${Date.now() - started} ms`);
});

t.test("a slow controller behind a 5,000-message backlog: bounded relay memory, nothing lost", async (t) => {
  const started = Date.now();
  const env = await setup(t);
  const BACKLOG = 5_000;
  const MAX_IN_FLIGHT = 64;
  const [ra, rb] = await Promise.all([env.start("b-alpha"), env.start("b-bravo", ["--max-in-flight", String(MAX_IN_FLIGHT)])]);
  const ledger = new Ledger(["b-alpha", "b-bravo"]);
  const sender = new LoadController({ peer: { instanceId: ra!.instanceId, wsUrl: ra!.wsUrl }, ledger, rate: 1, padBytes: 1024 });
  // The slow controller: acks are released by a pacer, at most one every 1 ms, none while held.
  const waiting: Array<() => void> = [];
  let paced = false;
  const pacer = setInterval(() => {
    if (!paced) return;
    for (let i = 0; i < 4 && waiting.length > 0; i++) waiting.shift()!();
  }, 4);
  const receiver = new LoadController({
    peer: { instanceId: rb!.instanceId, wsUrl: rb!.wsUrl },
    ledger,
    rate: 1,
    onDeliver: () => new Promise<void>((resolve) => waiting.push(resolve)),
  });
  t.teardown(async () => {
    clearInterval(pacer);
    await Promise.all([sender.close(), receiver.close()]);
  });
  await Promise.all([sender.connect(), receiver.connect()]);

  const samples: Array<{ rss?: number; inFlight: number }> = [];
  const sample = async (): Promise<void> => {
    const m = await fetch(`${rb!.httpUrl}/metrics`).then((r) => r.text());
    samples.push({ rss: await rssMb(rb!.proc.pid), inFlight: Number(/^uptrakit_relay_in_flight (\d+)/m.exec(m)?.[1] ?? NaN) });
  };
  const sampler = setInterval(() => void sample(), 250);
  t.teardown(() => clearInterval(sampler));

  const rssBefore = await rssMb(rb!.proc.pid);
  sender.burst(BACKLOG);
  t.ok(await ledger.waitFor(() => ledger.ackedCount === BACKLOG, 60_000), `all ${BACKLOG} publishes acknowledged`);
  t.ok(await ledger.waitFor(() => waiting.length >= MAX_IN_FLIGHT, 10_000), "the receiver holds a full window");
  await sample();
  const held = ledger.deliveredTo("b-bravo");
  t.ok(held <= MAX_IN_FLIGHT, `with no acks, the relay handed over no more than the window (${held})`);

  paced = true; // now drain, slowly
  const drain = await ledger.waitDrained(90_000);
  clearInterval(sampler);
  await sample();
  report(t, ledger, "slow controller");
  assertNoLoss(t, drain.counts, drain.drained, drain.missing);
  const rssPeak = Math.max(...samples.map((s) => s.rss ?? 0));
  const inFlightPeak = Math.max(...samples.map((s) => s.inFlight));
  t.comment(`b-bravo RSS: before ${rssBefore} MB, peak ${rssPeak} MB over ${samples.length} samples; b-alpha RSS ${await rssMb(ra!.proc.pid)} MB`);
  t.comment(`drained the backlog in ${drain.ms} ms`);
  t.ok(rssPeak < 300, `relay RSS stays bounded (${rssPeak} MB < 300 MB)`);
  t.ok(inFlightPeak <= MAX_IN_FLIGHT, `in-flight deliveries never exceeded --max-in-flight (peak ${inFlightPeak})`);
  t.comment(`took ${Date.now() - started} ms`);
});
