// Fault-test harness shared by test/faults*.test.ts and scripts/soak.ts: N relays, each with a
// controller (RelayClient) that publishes at a steady rate and acks everything it receives, and
// one ledger that counts, per message: sent, acknowledged (published, queued or not), delivered to
// each peer, duplicates, and lost (acknowledged but not delivered to some peer once the run drained).
//
// Everything waits on events: the ledger re-checks its waiters on each publish answer and each
// delivery, so a drain resolves the moment the last missing (message, peer) pair arrives.
// Self-contained (no imports from test/): scripts are compiled into the image, tests are not.

import { readFile } from "node:fs/promises";
import { RelayClient, RelayError, type Delivery, type HandlerResult } from "../../controller-stub/client.js";

export interface Peer {
  /** The relay's --instance-id (the origin of what its controller publishes). */
  instanceId: string;
  /** ws://host:port/ws — keep the port fixed across relay restarts so the client can reconnect. */
  wsUrl: string;
}

interface MessageRecord {
  origin: string;
  /** Date.now() of the first publish attempt. */
  sentAt: number;
  state: "pending" | "acked" | "gave_up";
  queued: boolean;
  attempts: number;
  /** peer → deliveries of this message to that peer (first delivery and duplicates). */
  deliveredTo: Map<string, number>;
}

export interface LedgerCounts {
  /** Distinct messages the controllers tried to publish. */
  sent: number;
  /** Answered `published` (including queued). */
  acked: number;
  /** Of those, answered `published` with queued: true (held in the relay's outbox). */
  queued: number;
  /** Still waiting for an answer. */
  pending: number;
  /** Never acknowledged: every attempt failed (these need not arrive; reported, not failed). */
  gaveUp: number;
  /** First deliveries per receiving peer. */
  deliveredPerPeer: Record<string, number>;
  /** Deliver frames seen, first deliveries and repeats. */
  deliveries: number;
  /** Deliveries beyond the first of a message to a peer (at-least-once: reported, not failed). */
  duplicates: number;
  /** Deliveries of a peer's own message to itself (must be 0). */
  echoes: number;
  /** Deliveries of ids this ledger never sent (must be 0). */
  foreign: number;
  /** Acknowledged (message, peer) pairs not delivered yet; after a drain these are losses. */
  missingPairs: number;
  /** Acknowledged messages that have not reached every other peer. */
  lost: number;
  /** Publish attempts answered with an error, by code (retried when retryable). */
  publishErrors: Record<string, number>;
}

export interface LatencySummary {
  count: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface MissingMessage {
  id: string;
  origin: string;
  queued: boolean;
  missingAt: string[];
}

export interface DrainResult {
  drained: boolean;
  ms: number;
  counts: LedgerCounts;
  /** Up to 50 acknowledged messages that did not reach every peer. */
  missing: MissingMessage[];
}

interface Waiter {
  pred: () => boolean;
  resolve: (ok: boolean) => void;
  timer: NodeJS.Timeout;
}

export class Ledger {
  readonly peers: string[];
  private readonly msgs = new Map<string, MessageRecord>();
  private acked = 0;
  private queued = 0;
  private pending = 0;
  private gaveUp = 0;
  private deliveries = 0;
  private duplicates = 0;
  private echoes = 0;
  private foreign = 0;
  private missingPairs = 0;
  private readonly deliveredPerPeer: Record<string, number> = {};
  private readonly publishErrors: Record<string, number> = {};
  /** ms from the first publish attempt to the first delivery at a peer. */
  private readonly latencies: number[] = [];
  private waiters: Waiter[] = [];

  constructor(peers: string[]) {
    this.peers = [...peers];
    for (const p of peers) this.deliveredPerPeer[p] = 0;
  }

  // ---- events ----

  recordSent(origin: string, id: string): void {
    if (this.msgs.has(id)) throw new Error(`ledger: id ${id} sent twice`);
    this.msgs.set(id, { origin, sentAt: Date.now(), state: "pending", queued: false, attempts: 0, deliveredTo: new Map() });
    this.pending++;
    this.notify();
  }

  recordAttempt(id: string): void {
    const m = this.msgs.get(id);
    if (m) m.attempts++;
  }

  recordAcked(id: string, queued: boolean): void {
    const m = this.msgs.get(id);
    if (!m || m.state === "acked") return;
    if (m.state === "pending") this.pending--;
    else this.gaveUp--;
    m.state = "acked";
    m.queued = queued;
    this.acked++;
    if (queued) this.queued++;
    for (const p of this.peers) if (p !== m.origin && !m.deliveredTo.has(p)) this.missingPairs++;
    this.notify();
  }

  recordPublishError(id: string, code: string, final: boolean): void {
    this.publishErrors[code] = (this.publishErrors[code] ?? 0) + 1;
    const m = this.msgs.get(id);
    if (final && m && m.state === "pending") {
      m.state = "gave_up";
      this.pending--;
      this.gaveUp++;
    }
    this.notify();
  }

  recordDelivery(peer: string, d: Pick<Delivery, "id" | "origin">): void {
    this.deliveries++;
    const m = this.msgs.get(d.id);
    if (!m) {
      this.foreign++;
    } else if (d.origin === peer || m.origin === peer) {
      this.echoes++;
    } else {
      const n = m.deliveredTo.get(peer) ?? 0;
      m.deliveredTo.set(peer, n + 1);
      if (n > 0) this.duplicates++;
      else {
        this.deliveredPerPeer[peer] = (this.deliveredPerPeer[peer] ?? 0) + 1;
        this.latencies.push(Date.now() - m.sentAt);
        if (m.state === "acked") this.missingPairs--;
      }
    }
    this.notify();
  }

  // ---- queries ----

  get ackedCount(): number {
    return this.acked;
  }

  get queuedCount(): number {
    return this.queued;
  }

  get pendingCount(): number {
    return this.pending;
  }

  /** Deliveries of a peer's messages counted so far (first deliveries only). */
  deliveredTo(peer: string): number {
    return this.deliveredPerPeer[peer] ?? 0;
  }

  counts(): LedgerCounts {
    let lost = 0;
    if (this.missingPairs > 0) for (const m of this.msgs.values()) if (m.state === "acked" && this.missingAt(m).length > 0) lost++;
    return {
      sent: this.msgs.size,
      acked: this.acked,
      queued: this.queued,
      pending: this.pending,
      gaveUp: this.gaveUp,
      deliveredPerPeer: { ...this.deliveredPerPeer },
      deliveries: this.deliveries,
      duplicates: this.duplicates,
      echoes: this.echoes,
      foreign: this.foreign,
      missingPairs: this.missingPairs,
      lost,
      publishErrors: { ...this.publishErrors },
    };
  }

  missing(limit = 50): MissingMessage[] {
    const out: MissingMessage[] = [];
    for (const [id, m] of this.msgs) {
      if (out.length >= limit) break;
      if (m.state !== "acked") continue;
      const missingAt = this.missingAt(m);
      if (missingAt.length > 0) out.push({ id, origin: m.origin, queued: m.queued, missingAt });
    }
    return out;
  }

  latency(): LatencySummary {
    const s = [...this.latencies].sort((a, b) => a - b);
    const q = (p: number): number => (s.length === 0 ? 0 : s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!);
    return { count: s.length, p50: q(50), p90: q(90), p99: q(99), max: s.length ? s[s.length - 1]! : 0 };
  }

  /** Resolves true as soon as pred() holds (checked on every ledger event), false after timeoutMs. */
  waitFor(pred: () => boolean, timeoutMs: number): Promise<boolean> {
    if (pred()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const w: Waiter = {
        pred,
        resolve,
        timer: setTimeout(() => {
          this.waiters = this.waiters.filter((x) => x !== w);
          resolve(pred());
        }, timeoutMs),
      };
      this.waiters.push(w);
    });
  }

  /** Waits until `n` more messages have been acknowledged than now. */
  waitAcked(more: number, timeoutMs: number): Promise<boolean> {
    const target = this.acked + more;
    return this.waitFor(() => this.acked >= target, timeoutMs);
  }

  /**
   * Waits (event-driven) until every publish has an answer and every acknowledged message has
   * reached every other peer; bounded by timeoutMs. Never throws: the result says what is missing.
   */
  async waitDrained(timeoutMs: number): Promise<DrainResult> {
    const started = Date.now();
    const drained = await this.waitFor(() => this.pending === 0 && this.missingPairs === 0, timeoutMs);
    return { drained, ms: Date.now() - started, counts: this.counts(), missing: this.missing(50) };
  }

  /** Multi-line human summary: counters, per-peer deliveries, latency percentiles. */
  summary(): string {
    const c = this.counts();
    const l = this.latency();
    const errs = Object.entries(c.publishErrors).map(([k, v]) => `${k}=${v}`).join(" ") || "none";
    return [
      `sent=${c.sent} acked=${c.acked} (queued=${c.queued}) pending=${c.pending} gave_up=${c.gaveUp}`,
      `delivered per peer: ${Object.entries(c.deliveredPerPeer).map(([p, n]) => `${p}=${n}`).join(" ")}`,
      `deliveries=${c.deliveries} duplicates=${c.duplicates} echoes=${c.echoes} foreign=${c.foreign} lost=${c.lost} missing_pairs=${c.missingPairs}`,
      `publish errors (retried): ${errs}`,
      `delivery latency ms: n=${l.count} p50=${l.p50} p90=${l.p90} p99=${l.p99} max=${l.max}`,
    ].join("\n");
  }

  private missingAt(m: MessageRecord): string[] {
    return this.peers.filter((p) => p !== m.origin && !m.deliveredTo.has(p));
  }

  private notify(): void {
    if (this.waiters.length === 0) return;
    for (const w of [...this.waiters]) {
      if (!w.pred()) continue;
      clearTimeout(w.timer);
      this.waiters = this.waiters.filter((x) => x !== w);
      w.resolve(true);
    }
  }
}

// ---- controllers ----------------------------------------------------------------------------------

export interface LoadControllerOptions {
  peer: Peer;
  ledger: Ledger;
  /** Publishes per second while publishing. */
  rate: number;
  kind?: string;
  /** Extra payload bytes per message. */
  padBytes?: number;
  /** RelayClient publish timeout (default 15 s: the relay answers within its 3 s bus timeout). */
  publishTimeoutMs?: number;
  /** Delay before a retryable failure is retried with the same id (default 200 ms). */
  retryDelayMs?: number;
  /** A message still unanswered this long after its first attempt is given up (default 60 s). */
  giveUpAfterMs?: number;
  /**
   * Handler for deliveries after the ledger has counted them. Default: resolve at once (ack).
   * Return LEAVE_UNSETTLED (client.ts) to hold a delivery, a promise to ack later.
   */
  onDeliver?: (d: Delivery) => HandlerResult | Promise<HandlerResult>;
}

/** Failures a real controller retries with the same id (the relay and the bus deduplicate). */
const RETRYABLE = new Set(["timeout", "disconnected", "unavailable", "connect_failed"]);

/** A controller: RelayClient publishing `rate` messages a second and acking whatever arrives. */
export class LoadController {
  readonly peer: Peer;
  readonly client: RelayClient;
  private readonly o: Required<Omit<LoadControllerOptions, "onDeliver">> & Pick<LoadControllerOptions, "onDeliver">;
  private seq = 0;
  private ticker: NodeJS.Timeout | undefined;
  private startedAt = 0;
  private issuedThisRun = 0;
  private closed = false;
  /** Retries waiting for their delay, with the id they are for. */
  private readonly retryTimers = new Map<NodeJS.Timeout, string>();
  private unsettled = 0;
  private settleWaiters: Array<() => void> = [];

  constructor(o: LoadControllerOptions) {
    this.peer = o.peer;
    this.o = {
      kind: "FaultProbe",
      padBytes: 0,
      publishTimeoutMs: 15_000,
      retryDelayMs: 200,
      giveUpAfterMs: 60_000,
      ...o,
    };
    this.client = new RelayClient({
      url: o.peer.wsUrl,
      publishTimeoutMs: this.o.publishTimeoutMs,
      reconnect: { initialDelayMs: 50, maxDelayMs: 500 },
      connectTimeoutMs: 5_000,
    });
    // Reconnect failures while a relay is down are expected: keep them off the default 'error' path.
    this.client.on("error", () => undefined);
    this.client.onMessage((d) => {
      this.o.ledger.recordDelivery(this.peer.instanceId, d);
      return this.o.onDeliver ? this.o.onDeliver(d) : undefined;
    });
  }

  /** Connects, retrying while the relay is not up yet, for at most timeoutMs. */
  async connect(timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        await this.client.connect();
        return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  get published(): number {
    return this.seq;
  }

  /** Starts (or resumes) publishing at the steady rate. */
  startPublishing(): void {
    if (this.ticker || this.closed) return;
    this.startedAt = Date.now();
    this.issuedThisRun = 0;
    // Catch-up arithmetic keeps the average rate exact whatever the timer jitter.
    this.ticker = setInterval(() => {
      const due = Math.floor(((Date.now() - this.startedAt) / 1000) * this.o.rate) - this.issuedThisRun;
      for (let i = 0; i < due; i++) this.publishOne();
    }, Math.max(5, Math.min(50, Math.floor(1000 / this.o.rate))));
  }

  stopPublishing(): void {
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = undefined;
  }

  /** Publishes `n` messages at once (a burst, outside the steady rate). */
  burst(n: number): void {
    for (let i = 0; i < n; i++) this.publishOne(false);
  }

  /** Resolves once every publish of this controller has been answered or given up. */
  settled(): Promise<void> {
    if (this.unsettled === 0) return Promise.resolve();
    return new Promise((resolve) => this.settleWaiters.push(resolve));
  }

  async close(): Promise<void> {
    this.closed = true;
    this.stopPublishing();
    for (const [t, id] of this.retryTimers) {
      clearTimeout(t);
      this.o.ledger.recordPublishError(id, "closed", true);
      this.settle();
    }
    this.retryTimers.clear();
    await this.client.close();
  }

  private publishOne(steady = true): void {
    if (steady) this.issuedThisRun++;
    const n = this.seq++;
    const id = `${this.peer.instanceId}-${n}`;
    const payload: Record<string, unknown> = { origin: this.peer.instanceId, n, t: Date.now() };
    if (this.o.padBytes > 0) payload.pad = "x".repeat(this.o.padBytes);
    this.o.ledger.recordSent(this.peer.instanceId, id);
    this.unsettled++;
    this.attempt(id, payload, Date.now());
  }

  private attempt(id: string, payload: unknown, firstAt: number): void {
    this.o.ledger.recordAttempt(id);
    this.client.publish(this.o.kind, payload, id).then(
      (r) => {
        this.o.ledger.recordAcked(id, r.queued);
        this.settle();
      },
      (err: unknown) => {
        const code = err instanceof RelayError ? err.code : "exception";
        const retry = RETRYABLE.has(code) && !this.closed && Date.now() - firstAt < this.o.giveUpAfterMs;
        this.o.ledger.recordPublishError(id, code, !retry);
        if (!retry) return this.settle();
        const t = setTimeout(() => {
          this.retryTimers.delete(t);
          this.attempt(id, payload, firstAt);
        }, this.o.retryDelayMs);
        this.retryTimers.set(t, id);
      },
    );
  }

  private settle(): void {
    this.unsettled--;
    if (this.unsettled === 0) for (const w of this.settleWaiters.splice(0)) w();
  }
}

/** Connects one LoadController per peer against one shared ledger. */
export async function startControllers(
  peers: Peer[],
  opts: Omit<LoadControllerOptions, "peer" | "ledger"> & { ledger?: Ledger },
): Promise<{ ledger: Ledger; controllers: LoadController[] }> {
  const ledger = opts.ledger ?? new Ledger(peers.map((p) => p.instanceId));
  const controllers = peers.map((peer) => new LoadController({ ...opts, peer, ledger }));
  await Promise.all(controllers.map((c) => c.connect()));
  return { ledger, controllers };
}

/** Current resident set of a process in MB (VmRSS), or undefined when it is gone. */
export async function rssMb(pid: number | undefined): Promise<number | undefined> {
  if (pid === undefined) return undefined;
  try {
    const status = await readFile(`/proc/${pid}/status`, "utf8");
    const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
    return m ? Math.round((Number(m[1]) / 1024) * 10) / 10 : undefined;
  } catch {
    return undefined;
  }
}
