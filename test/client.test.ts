// Unit test of controller-stub/client.ts (RelayClient) against a tiny fake relay: a `ws`
// WebSocketServer behind an http server that checks the bearer token like the real relay does.

import t from "tap";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { once } from "node:events";
import { WebSocketServer, type WebSocket } from "ws";
import { Inbox } from "./helpers/inbox.js";
import { LEAVE_UNSETTLED, NackError, RejectError, RelayClient, RelayError, type Delivery } from "../controller-stub/client.js";

type Frame = Record<string, unknown> & { type: string };

interface Conn {
  ws: WebSocket;
  auth: string | undefined;
}

class FakeRelay {
  readonly frames = new Inbox<Frame>(3_000);
  readonly conns = new Inbox<Conn>(3_000);
  readonly upgrades = new Inbox<string | undefined>(3_000);
  current: WebSocket | null = null;
  sendReady = true;
  private readonly wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
  private readonly server: http.Server;

  private constructor(readonly token?: string) {
    this.server = http.createServer((_req, res) => {
      res.statusCode = 404;
      res.end();
    });
    this.server.on("upgrade", (req, socket, head) => {
      const auth = req.headers.authorization;
      this.upgrades.push(auth);
      if (this.token !== undefined && auth !== `Bearer ${this.token}`) {
        const body = "missing or invalid bearer token";
        socket.end(
          `HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`,
        );
        return;
      }
      this.wss.handleUpgrade(req, socket, head, (ws) => {
        this.current = ws;
        ws.on("message", (data) => this.frames.push(JSON.parse(data.toString()) as Frame));
        if (this.sendReady) ws.send(JSON.stringify({ type: "ready", instanceId: "relay-a", bus: "sqlite" }));
        this.conns.push({ ws, auth });
      });
    });
  }

  static async start(token?: string): Promise<FakeRelay> {
    const r = new FakeRelay(token);
    r.server.listen(0, "127.0.0.1");
    await once(r.server, "listening");
    return r;
  }

  get url(): string {
    return `ws://127.0.0.1:${(this.server.address() as AddressInfo).port}/ws`;
  }

  send(obj: unknown): void {
    this.current!.send(typeof obj === "string" ? obj : JSON.stringify(obj));
  }

  frame(type: string, extra: (f: Frame) => boolean = () => true, timeoutMs = 3000): Promise<Frame> {
    return this.frames.take((f) => f.type === type && extra(f), timeoutMs, `a ${type} frame`);
  }

  deliver(deliveryId: string, kind = "VersionCheckCompleted", payload: unknown = { service: "api" }, attempt = 1): void {
    this.send({
      type: "deliver",
      deliveryId,
      id: `pub-${deliveryId}`,
      kind,
      origin: "relay-b",
      attempt,
      publishedAt: new Date().toISOString(),
      payload,
    });
  }

  async close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    this.wss.close();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** The bit of a tap Test that setup() needs. */
interface Tap {
  teardown(fn: () => unknown): void;
}

async function setup(t: Tap, opts: { token?: string; clientToken?: string; workingIntervalMs?: number; publishTimeoutMs?: number } = {}) {
  const relay = await FakeRelay.start(opts.token);
  const client = new RelayClient({
    url: relay.url,
    token: opts.clientToken ?? opts.token,
    reconnect: { initialDelayMs: 20, maxDelayMs: 200 },
    workingIntervalMs: opts.workingIntervalMs ?? 10_000,
    publishTimeoutMs: opts.publishTimeoutMs ?? 5000,
  });
  t.teardown(async () => {
    await client.close();
    await relay.close();
  });
  return { relay, client };
}

t.test("ready handshake", async (t) => {
  const { relay, client } = await setup(t, { token: "s3cret" });
  const readyEvent = once(client, "ready");
  const ready = await client.connect();
  t.same(ready, { instanceId: "relay-a", bus: "sqlite" });
  t.same((await readyEvent)[0], ready, "'ready' event carries the ready frame");
  t.equal(client.state, "ready");
  const conn = await relay.conns.take();
  t.equal(conn.auth, "Bearer s3cret", "token sent as a bearer header");
  t.same(await client.connect(), ready, "connect() when connected resolves at once");
});

t.test("publish", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();

  const p1 = client.publish("VersionCheckCompleted", { service: "api", version: "1.2.3" }, "id-1");
  const f1 = await relay.frame("publish");
  t.same(f1, { type: "publish", id: "id-1", kind: "VersionCheckCompleted", payload: { service: "api", version: "1.2.3" } });
  relay.send({ type: "published", id: "id-1" });
  t.same(await p1, { id: "id-1", queued: false });

  const p2 = client.publish("CertificateRenewed", { domain: "example.org" }, "id-2");
  await relay.frame("publish", (f) => f.id === "id-2");
  relay.send({ type: "published", id: "id-2", queued: true });
  t.same(await p2, { id: "id-2", queued: true }, "queued flag passed through");

  const p3 = client.publish("TenantRevoked", {}, "id-3");
  await relay.frame("publish", (f) => f.id === "id-3");
  relay.send({ type: "error", id: "id-3", code: "forbidden_kind", message: "carries credentials" });
  const e3 = await p3.then(
    () => null,
    (e: unknown) => e,
  );
  t.ok(e3 instanceof RelayError, "rejects with a RelayError");
  t.match(e3, { code: "forbidden_kind", id: "id-3", message: "carries credentials" });

  // default id is a UUID
  const p4 = client.publish("SoftwareStateUpdated", { state: "running" });
  const f4 = await relay.frame("publish");
  t.match(f4.id, /^[0-9a-f-]{36}$/);
  relay.send({ type: "published", id: f4.id });
  t.equal((await p4).id, f4.id);

  // pre-serialised payload is spliced in as it is
  const p5 = client.publishJson("SoftwareStateUpdated", '{"state":"updating"}', "id-5");
  t.same((await relay.frame("publish", (f) => f.id === "id-5")).payload, { state: "updating" });
  relay.send({ type: "published", id: "id-5" });
  await p5;

  await t.rejects(client.publish("X", undefined, "id-6"), { code: "invalid_payload" }, "undefined payload refused locally");

  // an error frame without a pending id surfaces as an 'error' event
  const errEvent = once(client, "error");
  relay.send({ type: "error", code: "unknown_delivery", message: "no such delivery" });
  t.match((await errEvent)[0], { code: "unknown_delivery" });
});

t.test("publish timeout", async (t) => {
  const { relay, client } = await setup(t, { publishTimeoutMs: 100 });
  await client.connect();
  const p = client.publish("VersionCheckCompleted", {}, "slow");
  await relay.frame("publish");
  await t.rejects(p, { code: "timeout", id: "slow" });
  t.equal(client.pendingPublishes, 0);
});

t.test("handler outcomes: ack, nack, NackError delay, reject, leave unsettled", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  const seen: Delivery[] = [];
  client.onMessage(async (msg) => {
    seen.push(msg);
    const p = msg.payload as { do: string };
    if (p.do === "fail") throw new Error("boom");
    if (p.do === "later") throw new NackError("try later", 1500);
    if (p.do === "reject") throw new RejectError("malformed");
    if (p.do === "manual") return LEAVE_UNSETTLED;
  });

  relay.deliver("d-ok", "VersionCheckCompleted", { do: "ok" });
  t.same(await relay.frame("ack"), { type: "ack", deliveryId: "d-ok" });
  t.match(seen[0], { deliveryId: "d-ok", id: "pub-d-ok", kind: "VersionCheckCompleted", origin: "relay-b", attempt: 1, payload: { do: "ok" } });
  t.type(seen[0]!.publishedAt, "string");

  relay.deliver("d-fail", "VersionCheckCompleted", { do: "fail" });
  t.same(await relay.frame("nack"), { type: "nack", deliveryId: "d-fail" }, "throw → nack without delay");

  relay.deliver("d-later", "VersionCheckCompleted", { do: "later" });
  t.same(await relay.frame("nack"), { type: "nack", deliveryId: "d-later", delayMs: 1500 }, "NackError → nack with delay");

  relay.deliver("d-rej", "VersionCheckCompleted", { do: "reject" });
  t.same(await relay.frame("reject"), { type: "reject", deliveryId: "d-rej", reason: "malformed" }, "RejectError → reject");

  relay.deliver("d-man", "VersionCheckCompleted", { do: "manual" });
  t.ok(await relay.frames.none((f) => f.deliveryId === "d-man", 150), "LEAVE_UNSETTLED sends nothing");
  t.ok(client.nack("d-man", 20), "low-level nack");
  t.same(await relay.frame("nack"), { type: "nack", deliveryId: "d-man", delayMs: 20 });
});

t.test("synchronous handler and a throwing sync handler", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  client.onMessage((msg) => {
    if (msg.attempt > 1) throw new RejectError();
  });
  relay.deliver("s1");
  t.same(await relay.frame("ack"), { type: "ack", deliveryId: "s1" });
  relay.deliver("s2", "VersionCheckCompleted", {}, 2);
  t.same(await relay.frame("reject"), { type: "reject", deliveryId: "s2", reason: "rejected" });
});

t.test("deliveries before onMessage are kept until a handler is set", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  relay.deliver("early");
  t.ok(await relay.frames.none(() => true, 100), "nothing sent without a handler");
  client.onMessage(() => {});
  t.same(await relay.frame("ack"), { type: "ack", deliveryId: "early" });
});

t.test("long handler sends working frames until it settles", async (t) => {
  const { relay, client } = await setup(t, { workingIntervalMs: 40 });
  await client.connect();
  let finish!: () => void;
  const done = new Promise<void>((r) => (finish = r));
  client.onMessage(() => done);
  relay.deliver("long");
  t.same(await relay.frame("working"), { type: "working", deliveryId: "long" });
  t.same(await relay.frame("working"), { type: "working", deliveryId: "long" }, "and again");
  finish();
  t.same(await relay.frame("ack"), { type: "ack", deliveryId: "long" });
  // drain working frames that raced with the ack, then check none follow
  while (relay.frames.size > 0) await relay.frames.take();
  t.ok(await relay.frames.none((f) => f.type === "working", 150), "no working after settle");
});

t.test("reconnects after a drop; publish made while disconnected goes through", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  const first = await relay.conns.take();

  // A publish on the wire when the socket drops is rejected: the caller may retry with the same id.
  const inflight = t.rejects(client.publish("VersionCheckCompleted", {}, "lost"), { code: "disconnected", id: "lost" });
  await relay.frame("publish", (f) => f.id === "lost");
  const disconnected = once(client, "disconnected");
  first.ws.terminate();

  // Made while disconnected (from the 'disconnected' listener): waits for the reconnect.
  const readyAgain = once(client, "ready");
  const { p } = await new Promise<{ p: Promise<unknown> }>((resolve) =>
    client.once("disconnected", () => {
      t.equal(client.state, "waiting", "not ready while disconnected");
      resolve({ p: client.publish("CertificateRenewed", { domain: "example.org" }, "after") });
    }),
  );
  t.match((await disconnected)[0], { code: 1006 });
  await inflight;
  await relay.conns.take();
  await readyAgain;
  const f = await relay.frame("publish", (x) => x.id === "after");
  t.equal(f.kind, "CertificateRenewed");
  relay.send({ type: "published", id: "after" });
  t.same(await p, { id: "after", queued: false });
  t.equal(client.state, "ready");

  // retry with the same id after the drop
  const retry = client.publish("VersionCheckCompleted", {}, "lost");
  await relay.frame("publish", (x) => x.id === "lost");
  relay.send({ type: "published", id: "lost" });
  t.same(await retry, { id: "lost", queued: false });
});

t.test("401 on connect: clear rejection, no retry", async (t) => {
  const { relay, client } = await setup(t, { token: "right", clientToken: "" });
  const err = await client.connect().then(
    () => null,
    (e: unknown) => e,
  );
  t.ok(err instanceof RelayError);
  t.match(err, { code: "unauthorized", status: 401 });
  t.match((err as Error).message, /401/);
  t.match((err as Error).message, /no token was given/);
  await relay.upgrades.take();
  t.ok(await relay.upgrades.none(() => true, 250), "no reconnect after a failed first attempt");
  t.equal(client.state, "idle");

  const wrong = new RelayClient({ url: relay.url, token: "wrong" });
  t.teardown(() => wrong.close());
  await t.rejects(wrong.connect(), { code: "unauthorized", message: /token was not accepted/ });
});

t.test("connection refused: clear rejection", async (t) => {
  const relay = await FakeRelay.start();
  const url = relay.url;
  await relay.close();
  const client = new RelayClient({ url });
  t.teardown(() => client.close());
  await t.rejects(client.connect(), { code: "connect_failed", message: /cannot connect to relay/ });
});

t.test("4001 superseded: event, no reconnect", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  const conn = await relay.conns.take();
  const pending = client.publish("VersionCheckCompleted", {}, "p-sup");
  await relay.frame("publish");
  const superseded = once(client, "superseded");
  conn.ws.close(4001, "superseded");
  await superseded;
  await t.rejects(pending, { code: "superseded", id: "p-sup" });
  t.equal(client.state, "superseded");
  await relay.upgrades.take();
  t.ok(await relay.upgrades.none(() => true, 300), "no reconnect attempt");
  await t.rejects(client.publish("VersionCheckCompleted", {}), { code: "superseded" });
});

t.test("close() rejects pending publishes and closes with 1000", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  const conn = await relay.conns.take();
  const closed = once(conn.ws, "close");
  const p = client.publish("VersionCheckCompleted", {}, "never-answered");
  await relay.frame("publish");
  const rejected = t.rejects(p, { code: "closed", id: "never-answered" });
  await client.close();
  await rejected;
  const [code] = (await closed) as [number, Buffer];
  t.equal(code, 1000);
  t.equal(client.state, "closed");
  await relay.upgrades.take(); // the first connection's
  t.ok(await relay.upgrades.none(() => true, 200), "no reconnect after close()");
  await t.rejects(client.publish("VersionCheckCompleted", {}), { code: "closed" });
});

t.test("publish before connect waits for ready; close() rejects it too", async (t) => {
  const { relay, client } = await setup(t);
  const early = client.publish("VersionCheckCompleted", { a: 1 }, "early");
  await client.connect();
  await relay.frame("publish", (f) => f.id === "early");
  relay.send({ type: "published", id: "early" });
  t.same(await early, { id: "early", queued: false });

  // relay without ready: pending publish stays unsent, close() rejects it
  relay.sendReady = false;
  relay.current!.terminate();
  await relay.conns.take();
  await relay.conns.take();
  const waiting = client.publish("VersionCheckCompleted", {}, "stuck");
  t.ok(await relay.frames.none((f) => f.id === "stuck", 100), "not sent before ready");
  const r = t.rejects(waiting, { code: "closed" });
  await client.close();
  await r;
});

t.test("many concurrent publishes all resolve", async (t) => {
  const { relay, client } = await setup(t);
  await client.connect();
  relay.current!.on("message", (data) => {
    const f = JSON.parse(data.toString()) as Frame;
    if (f.type === "publish") relay.send(`{"type":"published","id":${JSON.stringify(f.id)}}`);
  });
  const n = 2000;
  const results = await Promise.all(Array.from({ length: n }, (_, i) => client.publish("VersionCheckCompleted", { i }, `bulk-${i}`)));
  t.equal(results.length, n);
  t.ok(results.every((r, i) => r.id === `bulk-${i}` && !r.queued));
  t.equal(client.pendingPublishes, 0);
});
