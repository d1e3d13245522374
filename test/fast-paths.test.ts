// The shortcuts through nats.js internals (relay/bus/nats-internals.ts) are each checked before
// use: they pass against the installed nats.js, a changed shape turns the one path off with a
// warning naming it (the public API is used instead), and --fast-paths off / UPTRAKIT_RELAY_FAST_PATHS=off
// turns them all off. (The delivery conformance suite runs the relay with them off too:
// the jetstream-public-api backend in test/helpers/relay-backends.ts.)

import { Writable } from "node:stream";
import t, { type Test } from "tap";
import pino from "pino";
import { connect, type MsgHdrs, type NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, jetstream, jetstreamManager, type JsMsg } from "@nats-io/jetstream";
import { ackInfo, publishHeaders, readHeaders, wireCodec } from "../relay/bus/jetstream-wire.js";
import { FAST_PATHS, NatsFastPaths, handEncodedHeaders, type FastPath, type FastPathState, type WireCodec } from "../relay/bus/nats-internals.js";
import type { BusMessage } from "../relay/bus/bus.js";
import { startNatsServer } from "./helpers/nats-server.js";
import { startRelay } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";

const readBlock = (b: Uint8Array): Record<string, string> => ({ ...readHeaders({ headers: undefined }, b) });
const readPublic = (h: MsgHdrs | undefined): Record<string, string> => ({ ...readHeaders({ headers: h }) });

/** A NatsFastPaths whose warnings and state changes are recorded. */
function recorded(enabled = true): { fp: NatsFastPaths; warnings: Array<Record<string, unknown>>; changes: Array<[FastPath, FastPathState]> } {
  const warnings: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString("utf8").split("\n").filter(Boolean)) {
        const l = JSON.parse(line) as Record<string, unknown>;
        if (l.level === 40) warnings.push(l);
      }
      cb();
    },
  });
  const changes: Array<[FastPath, FastPathState]> = [];
  const fp = new NatsFastPaths({ enabled, logger: pino({ level: "debug" }, sink), onState: (p, s) => changes.push([p, s]) });
  return { fp, warnings, changes };
}

/** The server, a connection, and JetStream deliveries carrying the relay's headers. */
async function rig(t: Test): Promise<{ nc: NatsConnection; deliveries(n: number): Promise<JsMsg[]> }> {
  const server = await startNatsServer();
  t.teardown(() => server.stop());
  const nc = await connect({ servers: server.url });
  t.teardown(() => nc.close());
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: "FP", subjects: ["fp.>"] });
  await jsm.consumers.add("FP", { durable_name: "fp", ack_policy: AckPolicy.Explicit });
  const js = jetstream(nc);
  let seq = 0;
  return {
    nc,
    async deliveries(n) {
      for (let i = 0; i < n; i++) {
        const msg: BusMessage = { id: `m-${seq++}`, kind: "Check", origin: "fp-a", publishedAt: new Date().toISOString(), payloadJson: "{}" };
        await js.publish(`fp.${msg.kind}`, msg.payloadJson, { headers: publishHeaders(msg) });
      }
      const c = await js.consumers.get("FP", "fp");
      const out: JsMsg[] = [];
      for await (const m of await c.fetch({ max_messages: n, expires: 5_000 })) {
        out.push(m);
        m.ack();
      }
      return out;
    },
  };
}

t.test("against the installed nats.js every fast path passes its check", async (t) => {
  const { nc, deliveries } = await rig(t);
  const { fp, warnings, changes } = recorded();
  t.same(fp.states(), Object.fromEntries(FAST_PATHS.map((p) => [p, "unchecked"])), "nothing is used before it is checked");
  t.equal(fp.socket(nc), undefined, "no cork before the check");
  await fp.check(nc, wireCodec);
  t.same(fp.states(), { "socket-cork": "on", "header-encode": "on", "header-read": "unchecked", "ack-reply": "unchecked" }, "the connection's paths pass at start-up");
  t.ok(fp.socket(nc), "the socket is handed out");
  const [m] = await deliveries(1);
  t.equal(fp.reply(m!), "", "ack-reply unused until a delivery checked it");
  fp.checkDelivery(m!, readBlock, readPublic, ackInfo);
  t.same(fp.states(), Object.fromEntries(FAST_PATHS.map((p) => [p, "on"])), "the delivery's paths pass on the first delivery");
  t.same(ackInfo(fp.reply(m!)), { deliveryCount: 1, streamSequence: m!.info.streamSequence });
  t.same(readHeaders(m!, fp.headerBlock(m!)), readHeaders(m!), "the raw block reads as the public API");
  t.same(warnings, [], "no warning");
  t.same(changes.filter(([, s]) => s === "on").map(([p]) => p).sort(), [...FAST_PATHS].sort(), "each path reported on");
});

t.test("a nats.js of another shape: each fast path that does not match is disabled with a warning naming it", async (t) => {
  const { nc, deliveries } = await rig(t);
  const warnedFor = (w: Array<Record<string, unknown>>): unknown[] => w.map((l) => l.fastPath);

  t.test("no socket where nats.js kept it", async (t) => {
    const { fp, warnings } = recorded();
    // The connection as a nats.js that moved its transport: everything else works as before.
    const moved = new Proxy(nc, {
      get: (target, key) => {
        if (key === "protocol") return {};
        const v = Reflect.get(target, key, target) as unknown;
        return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    await fp.check(moved, wireCodec);
    t.equal(fp.states()["socket-cork"], "disabled");
    t.equal(fp.socket(nc), undefined, "no cork: nats.js writes as it always does");
    t.same(warnedFor(warnings), ["socket-cork"]);
    t.match(String(warnings[0]!.msg), /socket-cork.*public API/);
    t.equal(fp.states()["header-encode"], "on", "the other paths are unaffected");
  });

  t.test("hand-encoded bytes that differ from nats.js's encoding", async (t) => {
    const { fp, warnings } = recorded();
    // As if nats.js had changed its header encoding: ours no longer equals its own.
    const codec: WireCodec = {
      ...wireCodec,
      encode: (fast) => (fast ? handEncodedHeaders(Buffer.from("NATS/1.0\r\nUptrakit-Origin:fast-path-check\r\n\r\n")) : wireCodec.encode(false)),
    };
    await fp.check(nc, codec);
    t.equal(fp.states()["header-encode"], "disabled");
    t.equal(fp.encodedHeaders(Buffer.from("x")), undefined, "publishes take nats.js's headers()");
    t.same(warnedFor(warnings), ["header-encode"]);
    t.match(String(warnings[0]!.reason), /bytes differ/);
  });

  t.test("a raw header block that parses differently", async (t) => {
    const { fp, warnings } = recorded();
    await fp.check(nc, { ...wireCodec, parseBlock: (b) => ({ ...wireCodec.parseBlock(b), origin: "someone else" }) });
    t.equal(fp.states()["header-read"], "disabled");
    t.same(warnedFor(warnings), ["header-read"]);
    const [m] = await deliveries(1);
    fp.checkDelivery(m!, readBlock, readPublic, ackInfo);
    t.equal(fp.headerBlock(m!), undefined, "deliveries are read through m.headers");
    t.equal(fp.states()["header-read"], "disabled", "stays disabled");
  });

  t.test("a JsMsg without the internals", async (t) => {
    const { fp, warnings } = recorded();
    await fp.check(nc, wireCodec);
    const [m] = await deliveries(1);
    // A JsMsg of a nats.js that renamed its wrapped message and its reply getter.
    const other = Object.create(m!, { msg: { value: {} }, reply: { value: undefined } }) as JsMsg;
    fp.checkDelivery(other, readBlock, readPublic, ackInfo);
    t.same(fp.states(), { "socket-cork": "on", "header-encode": "on", "header-read": "disabled", "ack-reply": "disabled" });
    t.same(warnedFor(warnings).sort(), ["ack-reply", "header-read"]);
    t.equal(fp.reply(m!), "", "settles go through JsMsg.ack() and friends");
    t.equal(fp.headerBlock(m!), undefined);
  });

  t.test("a reply subject that disagrees with JsMsg.info", async (t) => {
    const { fp, warnings } = recorded();
    const [m] = await deliveries(1);
    // As if JsMsg.reply were no longer the ack subject nats.js's own info is read from.
    const info = { ...m!.info, streamSequence: m!.info.streamSequence + 1 };
    fp.checkDelivery(Object.create(m!, { info: { value: info } }) as JsMsg, readBlock, readPublic, ackInfo);
    t.equal(fp.states()["ack-reply"], "disabled");
    t.same(warnedFor(warnings), ["ack-reply"]);
  });
});

t.test("forced off: nothing is checked or used", async (t) => {
  const { nc, deliveries } = await rig(t);
  const { fp, warnings } = recorded(false);
  await fp.check(nc, wireCodec);
  const [m] = await deliveries(1);
  fp.checkDelivery(m!, readBlock, readPublic, ackInfo);
  t.same(fp.states(), Object.fromEntries(FAST_PATHS.map((p) => [p, "off"])));
  t.equal(fp.socket(nc), undefined);
  t.equal(fp.encodedHeaders(Buffer.from("x")), undefined);
  t.equal(fp.headerBlock(m!), undefined);
  t.equal(fp.reply(m!), "");
  t.same(warnings, [], "off is a choice, not a warning");
});

/** Each path's uptrakit_relay_fast_paths state with value 1, from /metrics. */
async function fastPathMetric(httpUrl: string): Promise<Record<string, string>> {
  const text = await (await fetch(`${httpUrl}/metrics`)).text();
  const out: Record<string, string> = {};
  for (const m of text.matchAll(/^uptrakit_relay_fast_paths\{path="([^"]+)",state="([^"]+)"\} 1$/gm)) out[m[1]!] = m[2]!;
  return out;
}

t.test("a relay reports its fast paths in uptrakit_relay_fast_paths; UPTRAKIT_RELAY_FAST_PATHS=off turns them off", async (t) => {
  const server = await startNatsServer();
  t.teardown(() => server.stop());
  const on = await startRelay({ instanceId: "fp-on", args: ["--nats-url", server.url] });
  t.teardown(() => on.stop("SIGKILL"));
  const off = await startRelay({ instanceId: "fp-off", args: ["--nats-url", server.url], env: { UPTRAKIT_RELAY_FAST_PATHS: "off" } });
  t.teardown(() => off.stop("SIGKILL"));
  const [con, coff] = await Promise.all([TestController.connect(on.wsUrl), TestController.connect(off.wsUrl)]);
  t.teardown(() => Promise.all([con.close(), coff.close()]));
  // One delivery each way: the checks that wait for a first delivery have run.
  await con.publish("FastPathCheck", { n: 1 }, "from-on");
  coff.ack(await coff.next((f) => f.type === "deliver" && f.id === "from-on"));
  await coff.publish("FastPathCheck", { n: 2 }, "from-off");
  con.ack(await con.next((f) => f.type === "deliver" && f.id === "from-off"));
  t.same(await fastPathMetric(on.httpUrl), Object.fromEntries(FAST_PATHS.map((p) => [p, "on"])), "default: every path checked and on");
  t.same(await fastPathMetric(off.httpUrl), Object.fromEntries(FAST_PATHS.map((p) => [p, "off"])), "forced off");
  t.same(on.logs.filter((l) => l.fastPath !== undefined), [], "no fast path warning");
});
