// JetStream-specific behaviour of JetStreamBus against real nats-server processes (see
// helpers/nats-server.ts): start-up failures, idempotent stream/consumer creation, dedup,
// header mapping, redelivery, outages and server restarts. The behaviour every bus shares is
// in the conformance suite.

import t, { type Test } from "tap";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { connect, nanos, nkeys } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { BusStartError, BusUnavailableError, type BusMessage, type BusSettings, type BusStatus, type InboundMessage } from "../relay/bus/bus.js";
import { JetStreamBus } from "../relay/bus/jetstream.js";
import type { NatsAuth } from "../relay/config.js";
import { createLogger } from "../relay/log.js";
import { Inbox } from "./helpers/inbox.js";
import { makeTlsFiles } from "./helpers/tls-certs.js";
import { makeOperatorSetup } from "./helpers/nats-jwt.js";
import { freePort, startNatsCluster, startNatsServer, type NatsServer } from "./helpers/nats-server.js";

const STREAM = "UPTRAKIT_TEST";

let seqNo = 0;
function message(over: Partial<BusMessage> = {}): BusMessage {
  seqNo++;
  return {
    id: `m-${seqNo}`,
    kind: "DeviceChanged",
    origin: "relay-a",
    publishedAt: new Date().toISOString(),
    payloadJson: JSON.stringify({ n: seqNo }),
    ...over,
  };
}

function newBus(t: Tap, urls: string | string[], over: Partial<BusSettings> & { auth?: NatsAuth; replicas?: number } = {}): JetStreamBus {
  const { auth, replicas, ...settings } = over;
  const instanceId = settings.instanceId ?? "relay-a";
  const bus = new JetStreamBus({
    instanceId,
    stream: STREAM,
    ackWaitMs: 5_000,
    maxDeliver: 3,
    maxInFlight: 64,
    maxAgeMs: 3_600_000,
    inactiveThresholdMs: 7_200_000,
    ...settings,
    urls: Array.isArray(urls) ? urls : [urls],
    replicas: replicas ?? 1,
    auth: auth ?? {},
    logger: createLogger("silent", instanceId),
  });
  t.teardown(() => bus.close());
  return bus;
}

async function server(t: Tap, opts?: Parameters<typeof startNatsServer>[0]): Promise<NatsServer> {
  const s = await startNatsServer(opts);
  t.teardown(() => s.stop());
  return s;
}

/** Starts consuming into an Inbox; the consumption is stopped at teardown. */
function collect(t: Tap, bus: JetStreamBus): Inbox<InboundMessage> {
  const inbox = new Inbox<InboundMessage>();
  const c = bus.consume(inbox.push);
  t.teardown(() => c.stop());
  return inbox;
}

function statuses(t: Tap, bus: JetStreamBus): Inbox<BusStatus> {
  const inbox = new Inbox<BusStatus>();
  t.teardown(bus.onStatus(inbox.push));
  return inbox;
}

type Tap = Test;

async function startError(bus: JetStreamBus): Promise<{ err: unknown; ms: number }> {
  const t0 = Date.now();
  try {
    await bus.start();
  } catch (err) {
    return { err, ms: Date.now() - t0 };
  }
  throw new Error("start() unexpectedly succeeded");
}

// The groups below are independent (each subtest has its own servers): run them side by side.
t.jobs = 5;

// ---- start-up ---------------------------------------------------------------------------------

t.test("start-up failures say which problem and where", async (t) => {
  t.jobs = 4;

  t.test("nothing listening: cannot reach, at once", async (t) => {
    const url = `nats://127.0.0.1:${await freePort()}`;
    const { err, ms } = await startError(newBus(t, url));
    t.type(err, BusStartError);
    t.match((err as Error).message, /^cannot reach NATS at nats:\/\/127\.0\.0\.1:\d+: /);
    t.ok((err as Error).message.includes(url), "names the URL");
    t.ok(ms < 15_000, `failed after ${ms} ms`);
  });

  t.test("a peer that never answers: cannot reach, after the connect timeout", async (t) => {
    // Accepts TCP but never sends INFO, like a black-holed server.
    const silent = net.createServer(() => undefined);
    await new Promise<void>((r) => silent.listen(0, "127.0.0.1", r));
    t.teardown(() => new Promise<void>((r) => silent.close(() => r())));
    const sockets: net.Socket[] = [];
    silent.on("connection", (s) => sockets.push(s));
    t.teardown(() => sockets.forEach((s) => s.destroy()));
    const url = `nats://127.0.0.1:${(silent.address() as net.AddressInfo).port}`;
    const bus = newBus(t, url);
    const { err, ms } = await startError(bus);
    t.type(err, BusStartError);
    t.ok((err as Error).message.startsWith(`cannot reach NATS at ${url}: `), (err as Error).message);
    t.ok(ms < 7_000, `failed after ${ms} ms`);
    t.equal(bus.status().state, "disconnected");
  });

  t.test("server without -js: JetStream is not enabled", async (t) => {
    const s = await server(t, { jetstream: false });
    const { err, ms } = await startError(newBus(t, s.url));
    t.type(err, BusStartError);
    t.match((err as Error).message, `JetStream is not enabled on the NATS server at ${s.url}`);
    t.ok(ms < 15_000, `failed after ${ms} ms`);
  });

  t.test("wrong credentials are refused; the right ones work", async (t) => {
    const s = await server(t, { args: ["--user", "relay", "--pass", "s3cret"] });
    for (const auth of [{ user: "relay", pass: "wrong" }, {}]) {
      const { err } = await startError(newBus(t, s.url, { auth }));
      t.type(err, BusStartError);
      t.match((err as Error).message, `NATS at ${s.url} refused the credentials: `);
      t.match((err as Error).message, /authorization violation/i);
    }
    const ok = newBus(t, s.url, { auth: { user: "relay", pass: "s3cret" } });
    await ok.start();
    t.equal(ok.status().state, "connected");
  });

  t.test("token and NKey seed file authenticate", async (t) => {
    const user = nkeys.createUser();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-nkey-"));
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const seedFile = path.join(dir, "relay.nk");
    fs.writeFileSync(seedFile, `${new TextDecoder().decode(user.getSeed())}\n`);
    const conf = path.join(dir, "server.conf");
    fs.writeFileSync(conf, `authorization { users = [ { nkey: ${user.getPublicKey()} } ] }\n`);
    const withNkey = await server(t, { args: ["-c", conf] });
    const good = newBus(t, withNkey.url, { auth: { nkeySeedFile: seedFile } });
    await good.start();
    t.equal(good.status().state, "connected", "the seed file's key is accepted");
    const { err } = await startError(newBus(t, withNkey.url, { instanceId: "relay-b" }));
    t.match((err as Error).message, "refused the credentials", "no key: refused");

    const withToken = await server(t, { args: ["--auth", "t0ken"] });
    await newBus(t, withToken.url, { auth: { token: "t0ken" } }).start();
    const bad = await startError(newBus(t, withToken.url, { auth: { token: "nope" } }));
    t.match((bad.err as Error).message, "refused the credentials", "wrong token: refused");
  });

  t.test("TLS with a client certificate: the right files connect; a missing certificate, an untrusted server or a missing file fail clearly", async (t) => {
    const tls = makeTlsFiles();
    t.teardown(() => tls.remove());
    const s = await server(t, { args: tls.serverArgs });
    const good = newBus(t, s.url, { auth: { tlsCa: tls.ca, tlsCert: tls.clientCert, tlsKey: tls.clientKey } });
    await good.start();
    t.equal(good.status().state, "connected", "CA + client certificate + key: connected");
    const got = collect(t, good);
    const m = message({ origin: "relay-b" });
    await good.publish(m);
    (await got.take((x) => x.id === m.id, 5_000, "the message over TLS")).ack();

    const untrusted = await startError(newBus(t, s.url, { instanceId: "relay-b", auth: { tlsCa: tls.otherCa, tlsCert: tls.clientCert, tlsKey: tls.clientKey } }));
    t.type(untrusted.err, BusStartError);
    t.match((untrusted.err as Error).message, `TLS with NATS at ${s.url} failed: `, "another CA: says TLS failed");
    t.match((untrusted.err as Error).message, /--nats-tls-ca/);
    const noCa = await startError(newBus(t, s.url, { instanceId: "relay-c" }));
    t.match((noCa.err as Error).message, `TLS with NATS at ${s.url} failed: `, "no CA at all: says TLS failed");

    const noCert = await startError(newBus(t, s.url, { instanceId: "relay-d", auth: { tlsCa: tls.ca } }));
    t.type(noCert.err, BusStartError);
    t.match((noCert.err as Error).message, `NATS at ${s.url}`);
    t.match((noCert.err as Error).message, /--nats-tls-cert and --nats-tls-key/, "no client certificate: the hint names the options");

    const missing = await startError(newBus(t, s.url, { instanceId: "relay-e", auth: { tlsCa: tls.ca, tlsCert: tls.clientCert, tlsKey: `${tls.dir}/absent.key` } }));
    t.match((missing.err as Error).message, `cannot read the NATS TLS client key ${tls.dir}/absent.key`, "a missing key file is named");
  });

  t.test("a .creds file (operator/JWT mode) authenticates; a user of an unknown account is refused", async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-creds-"));
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
    const op = makeOperatorSetup(dir);
    const s = await server(t, { args: op.serverArgs });
    const good = newBus(t, s.url, { auth: { credsFile: op.creds } });
    await good.start();
    t.equal(good.status().state, "connected", "the creds file's user is accepted, and its account has JetStream");
    for (const auth of [{ credsFile: op.foreignCreds }, {}]) {
      const { err } = await startError(newBus(t, s.url, { instanceId: "relay-b", auth }));
      t.type(err, BusStartError);
      t.match((err as Error).message, `NATS at ${s.url} refused the credentials`, auth.credsFile ? "an unknown account: refused" : "no creds: refused");
    }
  });

  t.test("an unreadable seed file names the file", async (t) => {
    const s = await server(t);
    const { err } = await startError(newBus(t, s.url, { auth: { nkeySeedFile: "does-not-exist.nk" } }));
    t.type(err, BusStartError);
    t.match((err as Error).message, "does-not-exist.nk");
  });
});

t.test("stream and consumer creation", async (t) => {
  t.jobs = 3;

  t.test("six relays starting at once on a fresh server all succeed", async (t) => {
    const s = await server(t);
    const buses = Array.from({ length: 6 }, (_, i) => newBus(t, s.url, { instanceId: `relay-${i}` }));
    const results = await Promise.allSettled(buses.map((b) => b.start()));
    t.same(results.map((r) => r.status), Array(6).fill("fulfilled"), JSON.stringify(results.filter((r) => r.status === "rejected")));
    const info = await buses[0]!.info();
    t.equal(info.bus, "jetstream");
    t.equal(info.stream, STREAM);
    t.equal(info.consumer?.name, "relay-0");
    const nc = await connect({ servers: s.url });
    t.teardown(() => nc.close());
    const jsm = await jetstreamManager(nc);
    const consumers = await jsm.consumers.list(STREAM).next();
    t.same(consumers.map((c) => c.name).sort(), buses.map((_, i) => `relay-${i}`));
    const cfg = (await jsm.streams.info(STREAM)).config;
    t.same(cfg.subjects, ["uptrakit.push.>"]);
    t.equal(cfg.storage, "file");
    t.equal(cfg.duplicate_window, nanos(120_000));
    t.equal(cfg.max_age, nanos(3_600_000));
  });

  t.test("changed retention updates the stream; changed ack wait updates the consumer", async (t) => {
    const s = await server(t);
    await newBus(t, s.url, { maxAgeMs: 3_600_000, ackWaitMs: 5_000 }).start();
    // Another start of the same instance with new settings: both win, deliver policy stays.
    await newBus(t, s.url, { maxAgeMs: 7_200_000, ackWaitMs: 9_000, maxDeliver: 5 }).start();
    const nc = await connect({ servers: s.url });
    t.teardown(() => nc.close());
    const jsm = await jetstreamManager(nc);
    t.equal((await jsm.streams.info(STREAM)).config.max_age, nanos(7_200_000));
    const ci = await jsm.consumers.info(STREAM, "relay-a");
    t.equal(ci.config.ack_wait, nanos(9_000));
    t.equal(ci.config.max_deliver, 5);
    t.equal(ci.config.deliver_policy, "new");
  });

  t.test("a stream whose subjects overlap ours is a clear start-up error", async (t) => {
    const s = await server(t);
    const nc = await connect({ servers: s.url });
    t.teardown(() => nc.close());
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({ name: "SOMEONE_ELSE", subjects: ["uptrakit.>"] });
    const { err } = await startError(newBus(t, s.url));
    t.type(err, BusStartError);
    t.match((err as Error).message, /overlap/);
    t.match((err as Error).message, STREAM);
  });

  t.test("a same-named stream with other subjects is a clear start-up error", async (t) => {
    const s = await server(t);
    const nc = await connect({ servers: s.url });
    t.teardown(() => nc.close());
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({ name: STREAM, subjects: ["other.>"] });
    const { err } = await startError(newBus(t, s.url));
    t.type(err, BusStartError);
    t.match((err as Error).message, /incompatible configuration: subjects are \[other\.>\]/);
  });
});

// ---- publish and consume ------------------------------------------------------------------------

t.test("publish and consume", async (t) => {
  t.jobs = 4;

  t.test("a retried publish is stored once", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    await bus.start();
    const m = message();
    t.same(await bus.publish(m), { duplicate: false });
    t.same(await bus.publish({ ...m, publishedAt: new Date().toISOString() }), { duplicate: true });
    // The same id from another origin is a different message.
    t.same(await bus.publish({ ...m, origin: "relay-b" }), { duplicate: false });
    const info = await bus.info();
    t.equal(info.messages, 2);
    t.equal(info.lastSeq, 2);
  });

  t.test("many concurrent publishes", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    await bus.start();
    const results = await Promise.all(Array.from({ length: 200 }, () => bus.publish(message())));
    t.equal(results.filter((r) => !r.duplicate).length, 200);
    t.equal((await bus.info()).messages, 200);
  });

  t.test("roundtrip maps every field, from every origin", async (t) => {
    const s = await server(t);
    const a = newBus(t, s.url, { instanceId: "relay-a" });
    const b = newBus(t, s.url, { instanceId: "relay-b" });
    await Promise.all([a.start(), b.start()]);
    const got = collect(t, b);
    const sent = message({ id: " odd id: ünï\r\n%41 ", kind: "TicketUpdated", payloadJson: '{"x":[1,"ü"]}' });
    await a.publish(sent);
    const m = await got.take();
    t.same(
      { id: m.id, kind: m.kind, origin: m.origin, publishedAt: m.publishedAt, payloadJson: m.payloadJson },
      sent,
    );
    t.equal(m.attempt, 1);
    t.equal(m.seq, 1);
    m.ack();
    // b's own publishes come back too: echo filtering is the relay's job.
    const own = message({ origin: "relay-b" });
    await b.publish(own);
    const back = await got.take();
    t.equal(back.id, own.id);
    t.equal(back.origin, "relay-b");
    t.equal(back.seq, 2);
    back.ack();
  });

  t.test("a message published by a foreign client shows its headers as they came (none) and its subject", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    await bus.start();
    const got = collect(t, bus);
    const nc = await connect({ servers: s.url });
    t.teardown(() => nc.close());
    const js = (await jetstreamManager(nc)).jetstream();
    await js.publish("uptrakit.push.someone.Foreign", '{"a":1}');
    const m = await got.take();
    // No fallbacks: the relay's inbound policy refuses a message without headers for what it is.
    t.same([m.id, m.kind, m.origin, m.publishedAt], ["", "", "", ""], "absent headers read as empty");
    t.equal(m.subject, "uptrakit.push.someone.Foreign");
    t.equal(m.payloadJson, '{"a":1}');
    t.equal(m.payloadUtf8, true);
    t.equal(m.seq, 1);
    m.ack();
  });

  t.test("nak redelivers no sooner than asked, as attempt 2", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    await bus.start();
    const got = collect(t, bus);
    await bus.publish(message());
    const first = await got.take();
    t.equal(first.attempt, 1);
    const t0 = Date.now();
    first.nak(400);
    const second = await got.take();
    t.ok(Date.now() - t0 >= 350, `redelivered after ${Date.now() - t0} ms`);
    t.equal(second.attempt, 2);
    t.equal(second.seq, first.seq);
    t.equal(second.id, first.id);
    second.ack();
    t.ok(await got.none(() => true, 300), "acked: not redelivered");
    const info = await bus.info();
    t.equal(info.consumer?.ackPending, 0);
    t.equal(info.consumer?.redelivered, 0);
  });

  t.test("after maxDeliver the server stops redelivering; term() stops it at once", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url, { maxDeliver: 2, ackWaitMs: 500 });
    await bus.start();
    const got = collect(t, bus);
    const m = message();
    await bus.publish(m);
    const a1 = await got.take();
    a1.nak(0);
    const a2 = await got.take();
    t.equal(a2.attempt, 2);
    a2.nak(0);
    t.ok(await got.none(() => true, 1_200), "no third delivery (over two ack waits)");

    const other = message();
    await bus.publish(other);
    const o1 = await got.take((x) => x.id === other.id);
    o1.term();
    t.ok(await got.none(() => true, 1_200), "terminated: not redelivered");
  });

  t.test("working() holds a slow message past its ack wait", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url, { ackWaitMs: 400 });
    await bus.start();
    const got = collect(t, bus);
    await bus.publish(message());
    const m = await got.take();
    const timer = setInterval(() => m.working(), 150);
    t.ok(await got.none(() => true, 900), "not redelivered while working");
    clearInterval(timer);
    m.ack();
  });

  t.test("backpressure: at most maxInFlight unsettled deliveries", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url, { maxInFlight: 3, ackWaitMs: 30_000 });
    await bus.start();
    const got = collect(t, bus);
    await Promise.all(Array.from({ length: 6 }, () => bus.publish(message())));
    const held = [await got.take(), await got.take(), await got.take()];
    t.ok(await got.none(() => true, 400), "the fourth waits");
    held[0]!.ack();
    const fourth = await got.take();
    t.equal(fourth.seq, 4);
  });
});

// ---- outages ------------------------------------------------------------------------------------

t.test("outages", async (t) => {
  t.jobs = 3;

  t.test("publish while the server is down fails fast with BusUnavailableError", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    await bus.start();
    const st = statuses(t, bus);
    await s.kill("SIGTERM");
    const down = await st.take((x) => x.state === "disconnected");
    t.ok(down.reason, `reason: ${down.reason}`);
    const t0 = Date.now();
    await t.rejects(bus.publish(message()), BusUnavailableError);
    t.ok(Date.now() - t0 < 500, `failed after ${Date.now() - t0} ms`);
  });

  t.test("server restart mid-consume: reconnects and delivery resumes", async (t) => {
    const s = await server(t);
    const a = newBus(t, s.url, { instanceId: "relay-a" });
    const b = newBus(t, s.url, { instanceId: "relay-b" });
    await Promise.all([a.start(), b.start()]);
    const st = statuses(t, b);
    const sa = statuses(t, a);
    const got = collect(t, b);
    const before = message();
    await a.publish(before);
    (await got.take()).ack();

    await s.restart();
    t.equal((await st.take((x) => x.state === "disconnected")).state, "disconnected");
    await st.take((x) => x.state === "connected", 10_000, "reconnect");
    t.equal(b.status().state, "connected");
    // The publisher reconnects on its own schedule: wait for it too.
    await sa.take((x) => x.state === "connected", 10_000, "publisher reconnect");
    const after = message();
    await a.publish(after);
    const m = await got.take((x) => x.id === after.id, 10_000, "message after restart");
    t.equal(m.attempt, 1);
    m.ack();
  });

  t.test("a deleted consumer is recreated and delivery resumes", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    await bus.start();
    const got = collect(t, bus);
    await bus.publish(message());
    (await got.take()).ack();
    const nc = await connect({ servers: s.url });
    t.teardown(() => nc.close());
    const jsm = await jetstreamManager(nc);
    const st = statuses(t, bus);
    await jsm.consumers.delete(STREAM, "relay-a");
    // The bus reports itself not connected while it recreates the consumer (publishes would go to
    // the outbox), then connected again: wait for those events, not for the consumer to show up
    // on the server, which happens a moment before the bus knows it.
    const gone = await st.take((x) => x.state === "disconnected", 10_000, "the bus noticing the deletion");
    t.match(gone.reason, /missing/);
    await st.take((x) => x.state === "connected", 10_000, "the bus recreating its consumer");
    t.ok(await jsm.consumers.info(STREAM, "relay-a"), "the consumer exists again");
    const m = message();
    await bus.publish(m);
    const back = await got.take((x) => x.id === m.id, 10_000, "message after recreate");
    back.ack();
  });

  t.test("close() is clean and idempotent, and status says closed", async (t) => {
    const s = await server(t);
    const bus = newBus(t, s.url);
    t.equal(bus.status().state, "disconnected");
    await bus.start();
    t.equal(bus.status().state, "connected");
    const c = bus.consume(() => undefined);
    await bus.close();
    await bus.close();
    await c.stop();
    t.equal(bus.status().state, "closed");
    await t.rejects(bus.publish(message()), BusUnavailableError);
  });
});

// ---- cluster ------------------------------------------------------------------------------------

t.test("cluster: the stream leader dies", async (t) => {
  const cluster = await startNatsCluster(3);
  t.teardown(() => cluster.stop());
  const a = newBus(t, cluster.urls, { instanceId: "relay-a", replicas: 3 });
  await a.start();
  let leader: string | undefined;
  while (!(leader = await cluster.streamLeader(STREAM))) await new Promise((r) => setTimeout(r, 50));
  // b talks only to the survivors: it must find the new leader without a reconnect to help it.
  const survivors = cluster.nodes.filter((n) => n.name !== leader);
  const b = newBus(t, survivors.map((n) => n.url), { instanceId: "relay-b", replicas: 3 });
  await b.start();
  const got = collect(t, b);
  const before = message();
  await a.publish(before);
  (await got.take((x) => x.id === before.id)).ack();

  const killedAt = Date.now();
  await cluster.nodes.find((n) => n.name === leader)!.kill("SIGKILL");
  // During the election a publish is BusUnavailableError (never anything else); then it works.
  const after = message();
  let unavailable = 0;
  for (;;) {
    try {
      await a.publish(after);
      break;
    } catch (err) {
      if (!(err instanceof BusUnavailableError)) throw err;
      unavailable++;
      await new Promise((r) => setTimeout(r, 100)); // retry cadence, as the relay's outbox would
    }
  }
  t.ok(unavailable > 0, `${unavailable} publishes were refused as unavailable during the election`);
  t.ok(Date.now() - killedAt < 15_000, `publishing resumed after ${Date.now() - killedAt} ms`);
  const m = await got.take((x) => x.id === after.id, 20_000, "delivery after the election");
  // Without watching the leader-election advisories this took 30-45 s (missed heartbeats).
  t.ok(Date.now() - killedAt < 20_000, `delivery resumed after ${Date.now() - killedAt} ms`);
  t.equal(m.attempt, 1);
  m.ack();
  t.not(await cluster.streamLeader(STREAM), leader, "a new leader was elected");
});
