// The JetStream bus encodes and reads its message headers by hand (a hot path: see the comment on
// readHeaders in relay/bus/jetstream-wire.ts). These tests pin that to nats.js's own behaviour, and
// check that the nats.js internals the fast reader relies on are still there.

import t from "tap";
import { connect, headers } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, AckPolicy, type JsMsg } from "@nats-io/jetstream";
import { JetStreamBus } from "../relay/bus/jetstream.js";
import { ackInfo, parseSubject, readHeaders, subjectFor, wireCodec } from "../relay/bus/jetstream-wire.js";
import { NatsFastPaths } from "../relay/bus/nats-internals.js";
import { createLogger } from "../relay/log.js";
import { startNatsServer } from "./helpers/nats-server.js";

const STREAM = "UPTRAKIT_PUSH";
const KEYS = { origin: "Uptrakit-Origin", id: "Uptrakit-Id", kind: "Uptrakit-Kind", publishedAt: "Uptrakit-Published-At", msgId: "Nats-Msg-Id" } as const;

t.test("hand-made headers read back exactly as nats.js reads them", async (t) => {
  const server = await startNatsServer();
  t.teardown(() => server.stop());
  const bus = new JetStreamBus({
    instanceId: "hdr-a",
    stream: STREAM,
    ackWaitMs: 30_000,
    maxDeliver: 3,
    maxInFlight: 64,
    maxAgeMs: 3_600_000,
    inactiveThresholdMs: 7_200_000,
    urls: [server.url],
    replicas: 1,
    auth: {},
    logger: createLogger("silent", "hdr-a"),
  });
  t.teardown(() => bus.close());
  await bus.start();

  const nc = await connect({ servers: server.url });
  t.teardown(() => nc.close());
  const jsm = await jetstreamManager(nc);
  await jsm.consumers.add(STREAM, { durable_name: "hdr-check", ack_policy: AckPolicy.Explicit });
  const js = jetstream(nc);

  // Through the bus (hand-encoded headers), including ids that need percent-encoding.
  const ids = ["plain-1", "with space", "ünïcødé/ä?#", "line\nbreak", "x".repeat(128)];
  for (const id of ids) await bus.publish({ id, kind: "Check", origin: "hdr-a", publishedAt: new Date().toISOString(), payloadJson: '{"a":1}' });
  // Foreign publishers: generic headers, odd spacing, duplicates, missing ones, none at all.
  const h1 = headers();
  h1.set("Uptrakit-Origin", "  spaced  ");
  h1.append("Uptrakit-Origin", "second");
  h1.set("Uptrakit-Kind", "Foreign");
  h1.set("X-Other", "a: b: c");
  await js.publish("uptrakit.push.spaced.Foreign", "{}", { headers: h1, msgID: "foreign-1" });
  await js.publish("uptrakit.push.bare.Bare", "{}");
  const h2 = headers();
  h2.set("uptrakit-origin", "wrong-case-is-another-key");
  await js.publish("uptrakit.push.case.Case", "{}", { headers: h2 });

  const consumer = await js.consumers.get(STREAM, "hdr-check");
  const msgs: JsMsg[] = [];
  const iter = await consumer.fetch({ max_messages: ids.length + 3, expires: 5_000 });
  for await (const m of iter) {
    msgs.push(m);
    m.ack();
  }
  t.equal(msgs.length, ids.length + 3, "every message came back");

  // The internals the fast reader relies on (relay/bus/nats-internals.ts), checked as the bus checks them.
  const fp = new NatsFastPaths({ enabled: true, logger: createLogger("silent", "hdr-check") });
  await fp.check(nc, wireCodec);
  fp.checkDelivery(msgs[0]!, (b) => ({ ...readHeaders({ headers: undefined }, b) }), (h) => ({ ...readHeaders({ headers: h }) }), ackInfo);
  t.same(fp.states(), { "socket-cork": "on", "header-encode": "on", "header-read": "on", "ack-reply": "on" }, "every fast path passes its check");
  for (const m of msgs) {
    const block = fp.headerBlock(m);
    t.ok(block instanceof Uint8Array, "the raw header block is there");
    t.same(ackInfo(fp.reply(m)), { deliveryCount: m.info.deliveryCount, streamSequence: m.info.streamSequence }, "ackInfo agrees with m.info");
    const fast = readHeaders(m, block);
    const h = m.headers;
    for (const [field, key] of Object.entries(KEYS)) {
      t.equal(fast[field as keyof typeof KEYS], h ? h.get(key) : "", `${m.subject} #${m.seq}: ${key} as nats.js reads it`);
    }
  }
  const ours = msgs.slice(0, ids.length);
  t.same(
    msgs.map((m) => readHeaders(m).duplicated),
    [...ids.map(() => ""), "Uptrakit-Origin", "", ""],
    "a relay header given twice is reported (the first value still wins, as nats.js's get() has it)",
  );
  t.same([...new Set(ours.map((m) => m.subject))], ["uptrakit.push.hdr-a.Check"], "published on uptrakit.push.<origin>.<kind>");
  t.same(
    ours.map((m) => decodeURIComponent(readHeaders(m).id)),
    ids,
    "ids travel exactly",
  );
  t.same(
    ours.map((m) => readHeaders(m).msgId),
    ids.map((id) => `hdr-a:${encodeURIComponent(id)}`),
    "Nats-Msg-Id is origin:id, as before",
  );
});

t.test("ackInfo reads both ack subject layouts and refuses others", async (t) => {
  t.same(ackInfo("$JS.ACK.S.C.2.17.5.1700000000000000000.0"), { deliveryCount: 2, streamSequence: 17 });
  t.same(ackInfo("$JS.ACK.dom.ACCHASH.S.C.3.42.9.1700000000000000000.4.rnd"), { deliveryCount: 3, streamSequence: 42 });
  t.same(ackInfo("$JS.ACK._..S.C.1.7.7.1700000000000000000.0"), { deliveryCount: 1, streamSequence: 7 });
  t.equal(ackInfo("_INBOX.abc.def"), undefined);
  t.equal(ackInfo("$JS.ACK.S.C.x.17.5.1.0"), undefined);
  t.equal(ackInfo("$JS.ACK.S.C.2.17"), undefined);
});

t.test("subjects: uptrakit.push.<origin>.<kind>, built and parsed in one place", async (t) => {
  t.equal(subjectFor("relay-a", "VersionCheckCompleted"), "uptrakit.push.relay-a.VersionCheckCompleted");
  t.same(parseSubject("uptrakit.push.relay-a.VersionCheckCompleted"), { origin: "relay-a", kind: "VersionCheckCompleted" });
  t.same(parseSubject(subjectFor("a_B-9", "K")), { origin: "a_B-9", kind: "K" }, "round trip");
  for (const bad of [
    "uptrakit.push.VersionCheckCompleted", // the old layout: no origin
    "uptrakit.push.a.b.c",
    "uptrakit.push..K",
    "uptrakit.push.a.",
    "uptrakit.push.",
    "uptrakit.pushed.a.K",
    "other.push.a.K",
    "",
  ])
    t.equal(parseSubject(bad), undefined, `${JSON.stringify(bad)} is not a relay subject`);
});
