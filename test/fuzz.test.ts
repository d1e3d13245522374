// Hostile input on the local WebSocket: random text and binary frames, invalid UTF-8, oversized
// frames, 100k-deep JSON, every field of every frame type with the wrong type, floods, connection
// churn, half-open upgrades and dressed-up credential-bearing kinds. After each: the relay is
// alive, /healthz answers 200, its memory is bounded, a valid publish still works — and nothing
// malformed ever reached the stream (the other controller sees only the valid messages, and the
// stream holds exactly that many).
//
// Not repeated from relay-conformance.test.ts: the basic error code per malformed frame, the
// plain forbidden kinds and their case variants, token/Origin refusal.

import t, { type Test } from "tap";
import net from "node:net";
import { WebSocket } from "ws";
import { startNatsServer } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, upgradeStatus, type Frame } from "./helpers/test-controller.js";
import { RelayClient, type Delivery } from "../controller-stub/client.js";
import { tokenMatches } from "../relay/local-server.js";
import { CREDENTIAL_BEARING_KINDS } from "../relay/kinds.js";
import { rssMb } from "../scripts/lib/fault-harness.js";

const KIND = "FuzzProbe";
const MAX_FRAME = 1_048_576; // the relay's default --max-frame-bytes
const RSS_LIMIT_MB = 300;
const SEED = Number(process.env.FUZZ_SEED ?? Date.now() % 1_000_000);

/** mulberry32: a small seeded PRNG, so a failing run can be replayed with FUZZ_SEED. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
const rnd = prng(SEED);
const randInt = (n: number): number => Math.floor(rnd() * n);
const pick = <T>(xs: readonly T[]): T => xs[randInt(xs.length)]!;

function randomBytes(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = randInt(256);
  return b;
}

/** Random text: JSON punctuation, control characters, BMP and astral characters, JSON-ish starts. */
function randomText(): string {
  const alphabets = [
    '{}[]":,',
    "abcdefghijklmnopqrstuvwxyz0123456789",
    " \t\r\n",
    "\u0000\u0001\u0007\u001b\u007f",
    "äöüß✓€漢字\u200b\u00ad\ufeff",
    "😀🚀",
    "\\/'`$%<>",
  ];
  const starts = ["", "{", '{"type":', '{"type":"publish",', '{"type":"ack","deliveryId":', "[", '"', "null", "-", "1e"];
  let s = pick(starts);
  const len = randInt(300);
  while (s.length < len) s += pick(pick(alphabets).split(""));
  return s;
}

/** Nested arrays `depth` deep: [[[...]]] */
const nestedArray = (depth: number): string => "[".repeat(depth) + "]".repeat(depth);
/** Nested objects `depth` deep: {"a":{"a":...1}} */
const nestedObject = (depth: number): string => '{"a":'.repeat(depth) + "1" + "}".repeat(depth);
const publishRaw = (id: string, payloadJson: string, kind = KIND): string =>
  `{"type":"publish","id":${JSON.stringify(id)},"kind":${JSON.stringify(kind)},"payload":${payloadJson}}`;

/** Receives on the observing relay: acks everything, wakes waiters by id. */
class Inbox {
  readonly got: Delivery[] = [];
  private waiters = new Map<string, () => void>();
  constructor(readonly client: RelayClient) {
    client.onMessage((d) => {
      this.got.push(d);
      this.waiters.get(d.id)?.();
      this.waiters.delete(d.id);
    });
  }
  waitFor(id: string, timeoutMs = 15_000): Promise<Delivery> {
    const have = this.got.find((d) => d.id === id);
    if (have) return Promise.resolve(have);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`observer: no delivery of ${JSON.stringify(id)} within ${timeoutMs} ms`)), timeoutMs);
      this.waiters.set(id, () => {
        clearTimeout(timer);
        resolve(this.got.find((d) => d.id === id)!);
      });
    });
  }
}

/** Sends frames and waits for `n` more error frames (the relay answers each bad frame with exactly one). */
async function sendAll(c: TestController, frames: Array<string | Buffer>, binary = false, timeoutMs = 30_000): Promise<Frame[]> {
  const from = c.frames.length;
  for (const f of frames) c.send(f, binary);
  const answers = (): Frame[] => c.frames.slice(from).filter((f) => f.type === "error" || f.type === "published");
  const deadline = Date.now() + timeoutMs;
  while (answers().length < frames.length) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`only ${answers().length} answers to ${frames.length} frames within ${timeoutMs} ms`);
    await c.next((f) => f.type === "error" || f.type === "published", left, c.frames.length);
  }
  return answers();
}

t.test("hostile input on the local WebSocket", async (t) => {
  t.comment(`seed ${SEED} (replay with FUZZ_SEED=${SEED})`);
  const started = Date.now();
  const server = await startNatsServer();
  const [target, observer] = await Promise.all([
    startRelay({ instanceId: "fuzz-target", natsUrl: server.url }),
    startRelay({ instanceId: "fuzz-observer", natsUrl: server.url }),
  ]);
  const controllers: TestController[] = [];
  const obsClient = new RelayClient({ url: observer.wsUrl, reconnect: false });
  const inbox = new Inbox(obsClient);
  await obsClient.connect();
  t.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await obsClient.close();
    await Promise.all([target.stop("SIGKILL"), observer.stop("SIGKILL")]);
    await server.stop();
  });

  /** Every id the target's controllers got `published` for: the only things the stream may hold. */
  const validIds: string[] = [];
  const rss: Array<[string, number | undefined]> = [];
  let k = 0;

  const connect = async (): Promise<TestController> => {
    const c = await TestController.connect(target.wsUrl);
    controllers.push(c);
    return c;
  };

  /** After each fuzz step: alive, healthy, bounded, and a valid publish goes through end to end. */
  const checkpoint = async (tt: Test, name: string): Promise<TestController> => {
    tt.equal(target.proc.exitCode, null, `${name}: the relay process is alive`);
    tt.equal(target.proc.signalCode, null, `${name}: not killed by a signal`);
    tt.equal((await fetch(`${target.httpUrl}/healthz`)).status, 200, `${name}: /healthz is 200`);
    const mb = await rssMb(target.proc.pid);
    rss.push([name, mb]);
    tt.ok(mb !== undefined && mb < RSS_LIMIT_MB, `${name}: RSS ${mb} MB < ${RSS_LIMIT_MB} MB`);
    const c = await connect();
    const id = `valid-${++k}`;
    tt.same(await c.publish(KIND, { k, after: name }, id), { type: "published", id }, `${name}: a valid publish still works`);
    validIds.push(id);
    tt.match(await inbox.waitFor(id), { id, kind: KIND, origin: "fuzz-target", payload: { k, after: name } }, `${name}: and reaches the other controller`);
    return c;
  };

  await checkpoint(t, "start");

  await t.test("random text and binary frames", async (tt) => {
    const c = await connect();
    const texts = Array.from({ length: 2_000 }, randomText);
    const answers = await sendAll(c, texts);
    tt.equal(answers.length, texts.length, "one answer per random text frame");
    tt.same([...new Set(answers.map((f) => f.type))], ["error"], "every one an error");
    const codes = new Set(answers.map((f) => f.code));
    tt.ok([...codes].every((x) => x === "invalid_frame" || x === "unknown_delivery"), `codes: ${[...codes].join(", ")}`);

    const blobs = Array.from({ length: 300 }, () => randomBytes(randInt(2_000)));
    const binAnswers = await sendAll(c, blobs, true);
    tt.equal(binAnswers.length, blobs.length, "one answer per binary frame");
    tt.ok(binAnswers.every((f) => f.code === "invalid_frame" && /binary/.test(f.message)), "binary frames are refused as such");
    tt.equal(c.closeCode, undefined, "the connection stays open");
    await checkpoint(tt, "random frames");
  });

  await t.test("invalid UTF-8 in text frames closes that connection with 1007, nothing else", async (tt) => {
    const variants: Array<[string, Buffer]> = [
      ["0xff", Buffer.from([0xff])],
      ["bad continuation", Buffer.from([0x7b, 0xc3, 0x28, 0x7d])],
      ["overlong NUL", Buffer.from([0xc0, 0x80])],
      ["encoded surrogate", Buffer.from([0xed, 0xa0, 0x80])],
      ["above U+10FFFF", Buffer.from([0xf4, 0x90, 0x80, 0x80])],
      ["truncated inside a publish", Buffer.concat([Buffer.from('{"type":"publish","id":"u1","kind":"FuzzProbe","payload":"'), Buffer.from([0xe2, 0x82]), Buffer.from('"}')])],
      ["random bytes", Buffer.concat([Buffer.from([0xff, 0xfe]), randomBytes(64)])],
    ];
    for (const [name, bytes] of variants) {
      const c = await connect();
      c.send(bytes, false); // a text frame holding these bytes as they are
      await c.closed();
      tt.equal(c.closeCode, 1007, `${name}: closed with 1007`);
    }
    // Random bytes as text frames: valid UTF-8 by chance gets an error frame, the rest 1007.
    const strict = new TextDecoder("utf-8", { fatal: true });
    const seen = { error: 0, closed1007: 0 };
    let c = await connect();
    for (let i = 0; i < 60; i++) {
      const bytes = randomBytes(1 + randInt(i % 2 ? 8 : 256));
      let valid = true;
      try {
        strict.decode(bytes);
      } catch {
        valid = false;
      }
      const from = c.frames.length;
      c.send(bytes, false);
      if (valid) {
        await c.next((f) => f.type === "error", 5_000, from);
        seen.error++;
      } else {
        await c.closed();
        if (c.closeCode !== 1007) tt.fail(`random invalid UTF-8 closed with ${c.closeCode}, not 1007`);
        seen.closed1007++;
        c = await connect();
      }
    }
    tt.comment(`60 random byte strings as text frames: ${JSON.stringify(seen)}`);
    tt.equal(seen.error + seen.closed1007, 60, "each answered (valid UTF-8) or closed with 1007 (invalid)");
    await checkpoint(tt, "invalid UTF-8");
  });

  await t.test("oversized frames: frame_too_large up to 8x the limit, close 1009 beyond", async (tt) => {
    const c = await connect();
    const justOver = publishRaw("big-1", JSON.stringify("x".repeat(MAX_FRAME)));
    const nearHard = publishRaw("big-2", JSON.stringify("y".repeat(MAX_FRAME * 8 - 1024)));
    const [a1, a2] = await sendAll(c, [justOver, nearHard]);
    tt.match(a1, { type: "error", code: "frame_too_large", id: "big-1" }, `${justOver.length} bytes → frame_too_large naming the id`);
    tt.match(a2, { type: "error", code: "frame_too_large", id: "big-2" }, `${nearHard.length} bytes → frame_too_large`);
    // Several near-hard-limit frames in a row: each is buffered, refused and dropped.
    const burst = await sendAll(c, Array.from({ length: 6 }, (_, i) => publishRaw(`big-b${i}`, JSON.stringify("z".repeat(MAX_FRAME * 7)))));
    tt.ok(burst.every((f) => f.code === "frame_too_large"), "six 7 MiB frames refused");
    tt.equal(c.closeCode, undefined, "the connection survives frames under 8x the limit");
    const rssAfterBig = await rssMb(target.proc.pid);
    tt.comment(`RSS after ~50 MiB of refused frames: ${rssAfterBig} MB`);

    const hard = publishRaw("big-3", JSON.stringify("w".repeat(MAX_FRAME * 8 + 16)));
    c.send(hard);
    await c.closed();
    tt.equal(c.closeCode, 1009, `${hard.length} bytes (over 8x) → close 1009`);
    await checkpoint(tt, "oversized frames");
  });

  await t.test("deeply nested JSON: refused, never a stack overflow", async (tt) => {
    const c = await connect();
    const cases: Array<[string, string, Record<string, unknown>]> = [
      ["payload: 100k nested arrays", publishRaw("deep-arr", nestedArray(100_000)), { code: "invalid_frame", id: "deep-arr" }],
      ["payload: 100k nested objects", publishRaw("deep-obj", nestedObject(100_000)), { code: "invalid_frame", id: "deep-obj" }],
      ["payload: 65 levels", publishRaw("deep-65", nestedArray(65)), { code: "invalid_frame", id: "deep-65" }],
      ["whole frame: 100k nested arrays", nestedArray(100_000), { code: "invalid_frame" }],
      ["id: 100k nested arrays", `{"type":"publish","id":${nestedArray(100_000)},"kind":"${KIND}","payload":1}`, { code: "invalid_frame" }],
      ["kind: 100k nested objects", `{"type":"publish","id":"deep-kind","kind":${nestedObject(100_000)},"payload":1}`, { code: "invalid_frame", id: "deep-kind" }],
      ["ignored field of an ack: 100k nested arrays", `{"type":"ack","deliveryId":"nope","junk":${nestedArray(100_000)}}`, { code: "unknown_delivery" }],
      ["nack delayMs: 100k nested objects", `{"type":"nack","deliveryId":"nope","delayMs":${nestedObject(100_000)}}`, { code: "invalid_frame" }],
    ];
    const answers = await sendAll(c, cases.map(([, f]) => f));
    cases.forEach(([name, , want], i) => tt.match(answers[i], { type: "error", ...want }, name));
    // Exactly the limit is fine: 64 levels are a valid payload and travel as they are.
    const at64 = await c.publish(KIND, JSON.parse(nestedArray(64)), "deep-64");
    tt.same(at64, { type: "published", id: "deep-64" }, "64 levels are accepted");
    validIds.push("deep-64");
    tt.same((await inbox.waitFor("deep-64")).payload, JSON.parse(nestedArray(64)), "and delivered intact");
    tt.notMatch(target.stderr(), /RangeError|Maximum call stack/, "no stack overflow anywhere");
    await checkpoint(tt, "deep nesting");
  });

  await t.test("wrong types in every field of every frame type", async (tt) => {
    const c = await connect();
    // Values wrong for any field, then per field the values that are wrong for it in particular.
    const notString: unknown[] = [null, true, false, 0, -1, 1.5, 1e308, -1e308, [], {}, [1, "a"], { a: 1 }, { toString: "x" }];
    const badStringId = ["", "x".repeat(129), "x".repeat(10_000)];
    const badKinds = ["", "1abc", "_a", "a.b", "a b", "a*", ">", "*", "a>", "A".repeat(65), "Ä", "a-b", "a\u0000", "\ta", "FuzzProbe\n"];
    const badDelay = [null, true, false, -1, 1.5, 1e308, -1e308, "", "100", [], {}, [100], 86_400_001];
    const badReason = [null, true, false, 0, 1.5, [], {}, ["r"], { reason: "r" }];
    const badType = [...notString, "", "Publish", "PUBLISH", " publish", "publish ", "publish\u0000", "subscribe", "deliver", "ready", "published", "error"];
    const bases: Record<string, Record<string, unknown>> = {
      publish: { type: "publish", id: "wt", kind: KIND, payload: { ok: true } },
      ack: { type: "ack", deliveryId: "wt-nope" },
      working: { type: "working", deliveryId: "wt-nope" },
      nack: { type: "nack", deliveryId: "wt-nope", delayMs: 10 },
      reject: { type: "reject", deliveryId: "wt-nope", reason: "r" },
    };
    const wrong: Record<string, unknown[]> = {
      type: badType,
      id: [...notString, ...badStringId, "\ud800", "a\udc00b"],
      kind: [...notString, ...badKinds],
      deliveryId: [...notString, ...badStringId],
      delayMs: badDelay,
      reason: badReason,
    };
    const required: Record<string, string[]> = {
      publish: ["type", "id", "kind", "payload"],
      ack: ["type", "deliveryId"],
      working: ["type", "deliveryId"],
      nack: ["type", "deliveryId"],
      reject: ["type", "deliveryId"],
    };
    const cases: Array<[string, string]> = [];
    for (const [type, base] of Object.entries(bases)) {
      for (const field of Object.keys(base)) {
        for (const v of wrong[field] ?? []) cases.push([`${type}.${field} = ${JSON.stringify(v)?.slice(0, 40)}`, JSON.stringify({ ...base, [field]: v })]);
        if (required[type]!.includes(field)) {
          const { [field]: _dropped, ...rest } = base;
          cases.push([`${type} without ${field}`, JSON.stringify(rest)]);
        }
      }
      // The payload of a publish may be any JSON value but not nested past the limit.
      if (type === "publish") cases.push(["publish.payload 65 deep", publishRaw("wt", nestedArray(65))]);
    }
    // Prototype-shaped keys are plain data: nothing is polluted, nothing is published.
    cases.push(['{"__proto__": publish fields}', '{"__proto__":{"type":"publish","id":"proto","kind":"FuzzProbe","payload":1}}']);
    cases.push(['{"constructor": {"prototype": ...}}', '{"constructor":{"prototype":{"type":"publish"}},"type":"nope"}']);
    const answers = await sendAll(c, cases.map(([, f]) => f));
    tt.equal(answers.length, cases.length, `${cases.length} wrong-typed frames, as many answers`);
    const notRefused = cases
      .map(([name], i) => [name, answers[i]!] as const)
      .filter(([, a]) => a.type !== "error" || a.code !== "invalid_frame")
      .map(([name, a]) => `${name} → ${JSON.stringify(a)}`);
    tt.same(notRefused, [], "every one is refused with invalid_frame");
    // The same prototype keys on a valid ack frame are ignored: the ack itself is what is answered.
    const [protoAck] = await sendAll(c, ['{"type":"ack","deliveryId":"wt-nope","__proto__":{"type":"publish","id":"p2","kind":"FuzzProbe","payload":1}}']);
    tt.match(protoAck, { type: "error", code: "unknown_delivery" }, "__proto__ on an ack changes nothing");
    await checkpoint(tt, "wrong types");
  });

  await t.test("odd but valid ids travel exactly; ids with lone surrogates are refused", async (tt) => {
    const c = await connect();
    const odd = ["a\r\nb", "%41%zz%", "ü✓😀漢字", "\u0000", " ", "a:b", "x".repeat(128), '"quoted"', "back\\slash", "Nats-Msg-Id: forged"];
    for (const id of odd) {
      tt.same(await c.publish(KIND, { odd: true }, id), { type: "published", id }, `${JSON.stringify(id).slice(0, 30)} published`);
      validIds.push(id);
    }
    for (const id of odd) tt.equal((await inbox.waitFor(id)).id, id, `${JSON.stringify(id).slice(0, 30)} delivered with the same id`);
    for (const raw of ['"\\ud800"', '"x\\udc00y"', '"\\udbff"', '"ok\\ud83d"']) {
      const answer = (await sendAll(c, [`{"type":"publish","id":${raw},"kind":"${KIND}","payload":1}`]))[0]!;
      tt.match(answer, { type: "error", code: "invalid_frame" }, `id ${raw} refused as invalid, not 'unavailable' for ever`);
    }
    await checkpoint(tt, "odd ids");
  });

  await t.test("a flood: 20,000 invalid frames, then a valid one", async (tt) => {
    const c = await connect();
    const N = 20_000;
    const junk = ["{", "[]", '{"type":7}', '{"type":"ack"}', '{"type":"publish","id":""}', '{"type":"nack","deliveryId":"x","delayMs":-1}'];
    const from = c.frames.length;
    const t0 = Date.now();
    for (let i = 0; i < N; i++) c.send(junk[i % junk.length]!);
    const answer = await c.publish(KIND, { after: "flood" }, "after-flood");
    const ms = Date.now() - t0;
    tt.same(answer, { type: "published", id: "after-flood" }, "the valid publish after the flood is accepted");
    validIds.push("after-flood");
    const errors = c.frames.slice(from).filter((f) => f.type === "error");
    tt.equal(errors.length, N, `all ${N} invalid frames answered before it, in order`);
    tt.comment(`${N} invalid frames + 1 valid answered in ${ms} ms (${Math.round((N / ms) * 1000)} frames/s)`);
    await inbox.waitFor("after-flood");
    const m = await fetch(`${target.httpUrl}/metrics`).then((r) => r.text());
    tt.ok(Number(/^uptrakit_relay_invalid_frames_total (\d+)/m.exec(m)?.[1]) >= N, "counted as invalid frames");
    await checkpoint(tt, "flood");
  });

  await t.test("a peer that floods junk and never reads its answers cannot grow the relay's memory", async (tt) => {
    const metric = async (): Promise<number> =>
      Number(/^uptrakit_relay_invalid_frames_total (\d+)/m.exec(await fetch(`${target.httpUrl}/metrics`).then((r) => r.text()))?.[1]);
    const before = await metric();
    const ws = new WebSocket(target.wsUrl, { perMessageDeflate: false });
    await new Promise((resolve, reject) => ws.once("open", resolve).once("error", reject));
    (ws as unknown as { _socket: net.Socket })._socket.pause(); // never read a single answer
    // Each 7-byte junk frame earns a ~75-byte error frame. Push until our own send buffer backs
    // up (the relay stopped reading) or 300k frames (~2 MiB sent, ~22 MiB of answers) went out.
    // (Without backpressure the relay answered all 300k into its memory: RSS near 300 MB.)
    const LIMIT = 300_000;
    let sent = 0;
    const t0 = Date.now();
    await new Promise<void>((resolve) => {
      const pump = (): void => {
        while (sent < LIMIT && ws.bufferedAmount < 2 * 1024 * 1024) {
          ws.send("{");
          sent++;
          if (sent % 20_000 === 0) return void setImmediate(pump); // let the socket write
        }
        if (sent >= LIMIT || Date.now() - t0 > 15_000) return resolve();
        setTimeout(pump, 20); // backed up: see whether the relay reads more
      };
      pump();
    });
    // Let the relay work through whatever it accepted; its counter stops moving once it paused.
    let answered = await metric();
    for (let i = 0; i < 20; i++) {
      await new Promise((r) => setTimeout(r, 100)); // sampling a counter of another process
      const now = await metric();
      if (now === answered) break;
      answered = now;
    }
    const mb = await rssMb(target.proc.pid);
    tt.comment(`sent ${sent} junk frames without reading; the relay answered ${answered - before} of them; RSS ${mb} MB; our send buffer ${ws.bufferedAmount} bytes`);
    tt.ok(mb !== undefined && mb < RSS_LIMIT_MB, `relay RSS bounded (${mb} MB < ${RSS_LIMIT_MB} MB)`);
    tt.ok(answered - before < sent, "the relay stopped reading from the peer that does not read");
    // Once the peer reads, the relay reads again: every junk frame is answered, then a valid publish.
    let errors = 0;
    const published = new Promise<Frame>((resolve) =>
      ws.on("message", (data) => {
        const f = JSON.parse(data.toString()) as Frame;
        if (f.type === "error") errors++;
        else if (f.type === "published") resolve(f);
      }),
    );
    ws.send(publishRaw("after-backpressure", '{"ok":true}'));
    (ws as unknown as { _socket: net.Socket })._socket.resume();
    let timer: NodeJS.Timeout | undefined;
    const answer = await Promise.race([published, new Promise((r) => (timer = setTimeout(r, 60_000, "timeout")))]);
    clearTimeout(timer);
    tt.same(answer, { type: "published", id: "after-backpressure" }, "reading again resumes the relay: the publish queued behind the junk is accepted");
    validIds.push("after-backpressure");
    tt.equal(errors, sent, `and each of the ${sent} junk frames was answered, none dropped`);
    ws.terminate();
    await inbox.waitFor("after-backpressure");
    await checkpoint(tt, "flood without reading");
  });

  await t.test("rapid connect/disconnect, 500 times", async (tt) => {
    const TOTAL = 500;
    const CONCURRENCY = 10;
    const outcomes: Record<string, number> = {};
    const once = (i: number): Promise<void> =>
      new Promise((resolve) => {
        const ws = new WebSocket(target.wsUrl, { perMessageDeflate: false });
        const mode = i % 4; // 0-1: close after open, 2: terminate after open, 3: terminate mid-upgrade
        const done = (what: string): void => {
          outcomes[what] = (outcomes[what] ?? 0) + 1;
          resolve();
        };
        ws.on("error", () => undefined);
        ws.once("close", (code) => done(`closed ${code}`));
        ws.once("open", () => {
          if (mode === 2) ws.terminate();
          else if (mode !== 3) ws.close(1000);
        });
        if (mode === 3) setImmediate(() => ws.terminate());
      });
    const t0 = Date.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        while (next < TOTAL) await once(next++);
      }),
    );
    tt.comment(`${TOTAL} connections in ${Date.now() - t0} ms: ${JSON.stringify(outcomes)}`);
    tt.equal(Object.values(outcomes).reduce((a, b) => a + b, 0), TOTAL, "every connection ended");
    const c = await checkpoint(tt, "connection churn");
    // The other direction too: after the churn the relay still pulls for its (latest) controller.
    const back = await obsClient.publish(KIND, { to: "target" }, "from-observer");
    tt.same(back, { id: "from-observer", queued: false }, "the observer publishes");
    const d = await c.next((f) => f.type === "deliver" && f.id === "from-observer", 15_000);
    c.ack(d);
    tt.pass("and the target's controller receives it after 500 connections came and went");
  });

  await t.test("200 half-open upgrades held open do not block new connections", async (tt) => {
    const sockets: net.Socket[] = [];
    tt.teardown(() => sockets.forEach((s) => s.destroy()));
    const partial = `GET /ws HTTP/1.1\r\nHost: 127.0.0.1:${target.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Ver`;
    await Promise.all(
      Array.from(
        { length: 200 },
        () =>
          new Promise<void>((resolve, reject) => {
            const s = net.connect(target.port, "127.0.0.1", () => s.write(partial, () => resolve()));
            s.on("error", reject);
            sockets.push(s);
          }),
      ),
    );
    tt.equal(sockets.filter((s) => !s.destroyed).length, 200, "200 half-open upgrades are being held");
    await checkpoint(tt, "200 half-open upgrades");
    tt.equal(sockets.filter((s) => !s.destroyed && s.readyState === "open").length, 200, "and still are (headersTimeout cuts them later, 10 s)");
  });

  await t.test("credential-bearing kinds are refused however dressed up", async (tt) => {
    const c = await connect();
    const secret = "fuzz-secret-do-not-ship";
    const dressings: Array<(k: string) => string> = [
      (k) => k.toLowerCase(),
      (k) => k.toUpperCase(),
      (k) => ` ${k} `,
      (k) => `\t${k}\n`,
      (k) => k.replace(/([a-z])([A-Z])/g, "$1.$2"), // Tenant.Revoked
      (k) => k.replace(/([a-z])([A-Z])/g, "$1_$2"), // Tenant_Revoked
      (k) => k.replace(/([a-z])([A-Z])/g, "$1-$2"),
      (k) => k.replace(/([a-z])([A-Z])/g, "$1 $2"),
      (k) => `${k}.>`,
      (k) => `${k}.*`,
      (k) => `${k}*`,
      (k) => `uptrakit.push.${k}`,
      (k) => `${k}\u0000`,
      (k) => `${k}\u200b`, // zero-width space
      (k) => k.split("").join("\u00ad"), // soft hyphens
      (k) => k.replace("e", "\u0435"), // Cyrillic е
      (k) => k.replace("a", "\u0430"), // Cyrillic а
      (k) => [...k].map((ch) => String.fromCharCode(ch.charCodeAt(0) + 0xfee0)).join(""), // fullwidth
      (k) => k.replace("T", "\u0422"), // Cyrillic Т
      (k) => `${k.slice(0, 3)}\u0301${k.slice(3)}`, // a combining accent
    ];
    const kinds = [...CREDENTIAL_BEARING_KINDS.flatMap((k) => dressings.map((d) => d(k))), "*", ">", "uptrakit.push.>", "", " "];
    const codes: Record<string, number> = {};
    const accepted: string[] = [];
    let n = 0;
    for (const kind of kinds) {
      const r = await c.publish(kind, { apiKey: secret }, `cred-${n++}`);
      if (r.type !== "error") accepted.push(kind);
      else codes[r.code] = (codes[r.code] ?? 0) + 1;
    }
    tt.same(accepted, [], `all ${kinds.length} dressed-up kinds refused (${JSON.stringify(codes)})`);
    // Those that fold to a credential-bearing name are named as such, not merely malformed.
    for (const kind of ["tenantrevoked", "TENANT_REVOKED", "Tenant.Revoked", "TenantRevoked.>", " TenantAssignments ", "Tenant-Config-Updated", "TenantRevoked*"]) {
      const r = await c.publish(kind, { apiKey: secret });
      tt.equal(r.code, "forbidden_kind", `${JSON.stringify(kind)} → forbidden_kind`);
    }
    tt.notMatch(JSON.stringify(target.logs) + target.stderr(), secret, "no payload of theirs in the logs");
    await checkpoint(tt, "dressed-up kinds");
  });

  // ---- nothing malformed reached the stream ----
  const delivered = inbox.got.map((d) => d.id);
  t.same([...new Set(delivered)].sort(), [...new Set(validIds)].sort(), `the other controller received exactly the ${validIds.length} valid messages`);
  t.same([...new Set(inbox.got.map((d) => d.kind))], [KIND], `every delivered kind is ${KIND}`);
  const info = await runRelayCli(["stream", "info", "--json", "--instance-id", "fuzz-inspector", "--data-dir", tempDir(), "--nats-url", server.url]);
  t.equal(info.code, 0, info.stderr);
  // + 1: the observer's own "from-observer", sent towards the target.
  t.equal(JSON.parse(info.stdout).messages, validIds.length + 1, "the stream holds exactly the valid messages");
  t.comment(`RSS (MB) after each step: ${rss.map(([n, mb]) => `${n}=${mb}`).join(", ")}`);
  t.comment(`took ${Date.now() - started} ms`);
});

t.test("a non-loopback bind without a token logs a loud warning", async (t) => {
  const server = await startNatsServer();
  const relays: RelayProcess[] = [];
  t.teardown(async () => {
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await server.stop();
  });
  // Only bound, never sent to: every request below goes to 127.0.0.1 or nowhere.
  const [open, tokened, loop] = await Promise.all([
    startRelay({ instanceId: "bind-open", natsUrl: server.url, args: ["--listen", "0.0.0.0:0"] }),
    startRelay({ instanceId: "bind-token", natsUrl: server.url, args: ["--listen", "0.0.0.0:0", "--token", "t0ken"] }),
    startRelay({ instanceId: "bind-loop", natsUrl: server.url, args: ["--listen", "127.0.0.2:0"] }),
  ]);
  relays.push(open!, tokened!, loop!);
  const warning = (r: RelayProcess) => r.logs.find((l) => l.level === 40 && /NON-LOOPBACK ADDRESS WITHOUT A TOKEN/.test(String(l.msg)));
  t.match(warning(open!), { listen: /^0\.0\.0\.0:\d+$/ }, "0.0.0.0 without a token: warned, naming the address");
  t.equal(warning(tokened!), undefined, "0.0.0.0 with a token: no warning");
  t.equal(warning(loop!), undefined, "127.0.0.2 (loopback): no warning");
});

t.test("token comparison: only the exact bearer token opens the socket", async (t) => {
  const server = await startNatsServer();
  const token = "s3cret-T0ken-value";
  const r = await startRelay({ instanceId: "tok", natsUrl: server.url, args: ["--token", token] });
  t.teardown(async () => {
    await r.stop("SIGKILL");
    await server.stop();
  });
  const refused: Array<[string, string]> = [
    ["a prefix", `Bearer ${token.slice(0, -1)}`],
    ["one character more", `Bearer ${token}x`],
    ["same length, last char differs", `Bearer ${token.slice(0, -1)}f`],
    ["lowercase scheme", `bearer ${token}`],
    ["two spaces", `Bearer  ${token}`],
    ["empty token", "Bearer "],
    ["Basic scheme", `Basic ${Buffer.from(`u:${token}`).toString("base64")}`],
    ["case of the token", `Bearer ${token.toUpperCase()}`],
  ];
  // (A trailing space is not in the list: HTTP parsing strips it from the header value.)
  for (const [name, header] of refused) t.equal(await upgradeStatus(r.wsUrl, { authorization: header }), 401, `${name} → 401`);
  t.equal(await upgradeStatus(r.wsUrl, { authorization: `Bearer ${token}` }), 101, "the exact token → 101");
  // The comparison itself (timingSafeEqual on SHA-256 digests): same answers, any length.
  t.equal(tokenMatches(`Bearer ${token}`, token), true);
  t.equal(tokenMatches(undefined, token), false);
  t.equal(tokenMatches("Bearer ", ""), false, "an empty configured token never matches an empty one");
  t.equal(tokenMatches(`Bearer ${"x".repeat(100_000)}`, token), false, "a huge header is just wrong");
});
