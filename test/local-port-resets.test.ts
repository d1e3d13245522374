// The local port under TCP resets at every stage of a connection: before, during and after a
// refused upgrade (wrong token, wrong path, foreign Origin, a malformed request, a failed
// WebSocket handshake), during and after an accepted upgrade, and in the middle of a WebSocket
// frame. Hundreds of them, from a local process that needs no credentials, while a real controller session keeps publishing and
// receiving: the relay stays up, that session is never disconnected and every publish is answered
// `published`. A refused connection is closed for good, not left half-open.
//
// Three relays on one real nats-server: `victim` (with a token, and the controller under watch),
// `feeder` (its peer: the other end of the controller's traffic) and `open` (takes the accepted
// upgrades; each supersedes the previous session there, which is why they cannot go to `victim`
// without disconnecting the controller they must not disturb).

import t from "tap";
import fs from "node:fs";
import net from "node:net";
import { startNatsServer } from "./helpers/nats-server.js";
import { startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, type Frame } from "./helpers/test-controller.js";

const TOKEN = "reset-test-token-4d1e";
const KIND = "ResetProbe";
/** How many attacks of each kind; the total printed below is what the relay withstood. */
const PER_STAGE = 25;
/** Refused requests cut short by the client's FIN, per refusal reason. */
const HALF_CLOSED = 8;
/** Attacks in flight at once, and attacks between two checkpoints of the controller's traffic. */
const CONCURRENCY = 10;
const BATCH = 40;

// ---- raw HTTP and WebSocket bytes ------------------------------------------------------------------

interface RequestShape {
  path?: string;
  token?: string;
  origin?: string;
  /** Sec-WebSocket-Version; anything but 13 fails the WebSocket handshake itself (ws answers 400). */
  version?: string;
}

function upgradeRequest(port: number, r: RequestShape): string {
  return [
    `GET ${r.path ?? "/ws"} HTTP/1.1`,
    `Host: 127.0.0.1:${port}`,
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    `Sec-WebSocket-Version: ${r.version ?? "13"}`,
    ...(r.token ? [`Authorization: Bearer ${r.token}`] : []),
    ...(r.origin ? [`Origin: ${r.origin}`] : []),
    "",
    "",
  ].join("\r\n");
}

/** A request the HTTP parser rejects (a header line without a colon): Node's clientError path. */
const malformedRequest = (port: number): string => `GET /ws HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nthis is not a header\r\n\r\n`;

/** The start of a masked text frame announcing `len` payload bytes (client frames are masked). */
function frameHeader(len: number): Buffer {
  const mask = Buffer.from([1, 2, 3, 4]);
  if (len < 126) return Buffer.concat([Buffer.from([0x81, 0x80 | len]), mask]);
  const ext = Buffer.alloc(2);
  ext.writeUInt16BE(len);
  return Buffer.concat([Buffer.from([0x81, 0x80 | 126]), ext, mask]);
}

/** What is written after the 101 before the reset: always an incomplete frame. */
const MID_FRAME_CUTS: Array<() => Buffer> = [
  () => frameHeader(300).subarray(0, 1), // one byte of the header
  () => frameHeader(300).subarray(0, 3), // half the extended length
  () => frameHeader(300).subarray(0, 6), // part of the mask
  () => Buffer.concat([frameHeader(300), Buffer.alloc(150, 0x20)]), // half the payload
];

// ---- one attack: a raw socket that ends in a TCP reset --------------------------------------------

type When = "mid-request" | "half-closed" | "after-request" | "on-response" | "after-101";

interface Attack {
  name: string;
  port: number;
  bytes: string;
  when: When;
  /** after-101 only: written once the 101 has arrived, then the reset. */
  tail?: () => Buffer;
}

/** Runs one attack; resolves when the socket is gone (a refused connection, a reset, anything). */
function runAttack(a: Attack): Promise<void> {
  return new Promise((resolve) => {
    const s = net.connect(a.port, "127.0.0.1");
    s.on("error", () => undefined); // our own reset, or the relay's: both are the point
    s.once("close", () => resolve());
    const reset = (): void => void s.resetAndDestroy();
    s.once("connect", () => {
      if (a.when === "mid-request") {
        // Somewhere inside the request head: the parser is still waiting for the rest.
        const cut = 1 + Math.floor(Math.random() * (a.bytes.length - 5));
        s.write(a.bytes.slice(0, cut), reset);
      } else if (a.when === "half-closed") {
        // Part of the request, then our FIN (a half-open connection from the relay's side): the
        // relay answers the incomplete request, and the reset lands on that answer.
        const cut = 1 + Math.floor(Math.random() * (a.bytes.length - 5));
        s.on("data", reset);
        s.end(a.bytes.slice(0, cut));
      } else if (a.when === "after-request") {
        s.write(a.bytes, reset); // the relay answers into a connection that is already reset
      } else {
        s.write(a.bytes);
        let got = "";
        s.on("data", (chunk: Buffer) => {
          got += chunk.toString("latin1");
          if (a.when === "on-response") return reset();
          if (!got.includes("\r\n\r\n")) return;
          if (!got.startsWith("HTTP/1.1 101")) return reset();
          s.write(a.tail!(), reset);
        });
      }
    });
  });
}

async function runAll(attacks: Attack[]): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < attacks.length) await runAttack(attacks[next++]!);
    }),
  );
}

function shuffle<T>(xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

/**
 * A refused upgrade whose client keeps its own side open after the answer: the relay must close the
 * connection completely. Once it has, a byte sent to it is answered with a reset, which the next
 * write reports (EPIPE); a relay that only half-closed it takes byte after byte and holds the
 * connection for as long as the peer likes.
 */
function refusedAndHeldOpen(port: number, r: RequestShape, boundMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true });
    let status = "";
    let probe: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      clearInterval(probe);
      s.destroy();
      reject(new Error(`the relay kept a refused connection (${status}) half-open for ${boundMs} ms after answering`));
    }, boundMs);
    const done = (): void => {
      clearTimeout(timer);
      clearInterval(probe);
      resolve(status);
    };
    s.on("data", (c: Buffer) => (status ||= c.toString("latin1").split("\r\n")[0]!));
    // The relay's FIN: keep our side open and keep talking until the relay's reset is reported.
    s.once("end", () => (probe = setInterval(() => s.write("x"), 20)));
    s.once("error", done);
    s.once("close", done);
    s.once("connect", () => s.write(upgradeRequest(port, r)));
  });
}

// ---- the test --------------------------------------------------------------------------------------

t.test("TCP resets at every stage of the local port never crash the relay nor disturb its controller", async (tt) => {
  const nats = await startNatsServer();
  const dirs = [tempDir("uptrakit-resets-"), tempDir("uptrakit-resets-"), tempDir("uptrakit-resets-")];
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await nats.stop();
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });
  const relay = async (id: string, dataDir: string, args: string[]): Promise<RelayProcess> => {
    const r = await startRelay({ instanceId: id, natsUrl: nats.url, dataDir, args });
    relays.push(r);
    return r;
  };
  const [victim, feeder, open] = await Promise.all([
    relay("victim", dirs[0]!, ["--token", TOKEN]),
    relay("feeder", dirs[1]!, []),
    relay("open", dirs[2]!, []),
  ]);
  const [c, d] = await Promise.all([TestController.connect(victim.wsUrl, { token: TOKEN }), TestController.connect(feeder.wsUrl)]);
  controllers.push(c, d);
  // Both controllers ack whatever they are handed, as a real handler would.
  c.onFrame((f) => f.type === "deliver" && c.ack(f));
  d.onFrame((f) => f.type === "deliver" && d.ack(f));

  /** Rejects as soon as the victim exits, so a crash is reported as one and not as a timeout. */
  const whileVictimLives = <T>(p: Promise<T>): Promise<T> =>
    Promise.race([p, victim.exited.then((code): never => { throw new Error(`the victim relay exited (code ${code}); stderr:\n${victim.stderr()}`); })]);

  // One round trip of the watched controller: it publishes (→ `published`) and its peer receives;
  // the peer publishes and it receives. Runs alongside every batch of attacks.
  let round = 0;
  const answers: Frame[] = [];
  const roundTrip = async (): Promise<void> => {
    const n = round++;
    const [mine, theirs] = await Promise.all([c.publish(KIND, { n }, `c-${n}`), d.publish(KIND, { n }, `d-${n}`)]);
    answers.push(mine);
    if (mine.type !== "published" || theirs.type !== "published") throw new Error(`round ${n}: ${JSON.stringify({ mine, theirs })}`);
    await Promise.all([
      d.next((f) => f.type === "deliver" && f.id === `c-${n}`),
      c.next((f) => f.type === "deliver" && f.id === `d-${n}`),
    ]);
  };

  const refusals: Array<{ why: string; port: number; bytes: string }> = [
    { why: "wrong token", port: victim.port, bytes: upgradeRequest(victim.port, { token: "not-the-token" }) },
    { why: "no token", port: victim.port, bytes: upgradeRequest(victim.port, {}) },
    { why: "wrong path", port: victim.port, bytes: upgradeRequest(victim.port, { path: "/socket", token: TOKEN }) },
    { why: "foreign Origin", port: victim.port, bytes: upgradeRequest(victim.port, { token: TOKEN, origin: "https://evil.example" }) },
    { why: "malformed request", port: victim.port, bytes: malformedRequest(victim.port) },
    { why: "bad WebSocket handshake", port: victim.port, bytes: upgradeRequest(victim.port, { token: TOKEN, version: "99" }) },
  ];
  const attacks: Attack[] = [];
  for (const r of refusals)
    for (const when of ["mid-request", "after-request", "on-response"] as const)
      for (let i = 0; i < PER_STAGE; i++) attacks.push({ name: `${r.why}, reset ${when}`, port: r.port, bytes: r.bytes, when });
  for (const r of refusals) for (let i = 0; i < HALF_CLOSED; i++) attacks.push({ name: `${r.why}, half-closed`, port: r.port, bytes: r.bytes, when: "half-closed" });
  const accepted = upgradeRequest(open.port, {});
  for (const when of ["after-request", "on-response"] as const)
    for (let i = 0; i < PER_STAGE; i++) attacks.push({ name: `accepted upgrade, reset ${when}`, port: open.port, bytes: accepted, when });
  for (let i = 0; i < PER_STAGE * 2; i++)
    attacks.push({ name: "reset mid-frame", port: open.port, bytes: accepted, when: "after-101", tail: MID_FRAME_CUTS[i % MID_FRAME_CUTS.length] });
  shuffle(attacks);

  for (let i = 0; i < attacks.length; i += BATCH) await whileVictimLives(Promise.all([runAll(attacks.slice(i, i + BATCH)), roundTrip()]));
  tt.comment(
    `${attacks.length} connections reset (${refusals.length} refusal reasons × (3 stages × ${PER_STAGE} + ${HALF_CLOSED} half-closed), ` +
      `and ${PER_STAGE * 4} accepted upgrades), ${round} controller round trips meanwhile`,
  );

  // Refused connections whose client never closes its side: each is closed by the relay.
  const held = await whileVictimLives(
    Promise.all(Array.from({ length: 20 }, (_, i) => refusedAndHeldOpen(victim.port, i % 2 ? { token: "wrong" } : { path: "/nope" }, 5_000))),
  );
  tt.same([...new Set(held)].sort(), ["HTTP/1.1 401 Unauthorized", "HTTP/1.1 404 Not Found"], "20 refused connections held open by their client were answered and then closed by the relay");
  await whileVictimLives(roundTrip());

  tt.equal(victim.proc.exitCode, null, "the victim relay is alive");
  tt.equal(open.proc.exitCode, null, "the relay that took the accepted upgrades is alive");
  for (const r of [victim, open]) tt.equal((await fetch(`${r.httpUrl}/healthz`)).status, 200, `${r.instanceId}: /healthz 200`);
  tt.equal(c.closeCode, undefined, "the watched controller was never disconnected");
  tt.equal(c.frames.filter((f) => f.type === "ready").length, 1, "and never had to reconnect (one ready frame)");
  tt.equal(answers.length, round, `all ${round} of its publishes were answered`);
  tt.ok(answers.every((a) => a.type === "published" && a.queued === undefined), "every one `published`, none queued");
  const got = new Set(c.deliveries().map((f) => f.id as string));
  tt.equal([...Array(round).keys()].filter((n) => !got.has(`d-${n}`)).length, 0, `it received all ${round} of its peer's messages`);
  const metrics = await (await fetch(`${victim.httpUrl}/metrics`)).text();
  tt.match(metrics, /^uptrakit_relay_controller_connected 1$/m, "the victim still counts its controller as connected");
  for (const r of [victim, open]) tt.notMatch(r.stderr(), /unhandled|ECONNRESET|EPIPE|Error/i, `${r.instanceId}: nothing on stderr about an unhandled error`);
});
