// The door between the buses and delivery: every message passes inboundVerdict (inbound-policy.ts)
// before the delivery state machine sees it. A rejected message is never delivered: it becomes a
// dead letter with its reason (the payload withheld for a credential-bearing kind), is counted in
// uptrakit_relay_inbound_rejected_total{reason}, and only then terminated on the bus. If the
// dead letter cannot be written the message is left to the bus (nak'd), never dropped.

import type { InboundMessage } from "./bus/bus.js";
import type { ArrivalSource } from "./delivery.js";
import { inboundVerdict, type InboundRejection } from "./inbound-policy.js";
import type { Logger } from "./log.js";
import type { RelayMetrics } from "./metrics.js";

/** How long a rejected message whose dead letter could not be written waits before the bus redelivers it. */
const RECORD_FAILED_RETRY_MS = 2_000;
/** Rejections are logged once per reason per this interval (a flood must not become a log flood). */
const LOG_INTERVAL_MS = 10_000;

export interface InboundGateOptions {
  instanceId: string;
  metrics: RelayMetrics;
  logger: Logger;
  /** Hands an admitted message to delivery. */
  deliver(msg: InboundMessage, source: ArrivalSource): void;
}

export class InboundGate {
  private readonly o: InboundGateOptions;
  /** Rejections whose dead letter is being written, by seq; later arrivals of one wait with it. */
  private readonly recording = new Map<number, InboundMessage[]>();
  private readonly lastLogged = new Map<string, { at: number; suppressed: number }>();
  private idleWaiters: Array<() => void> = [];

  constructor(o: InboundGateOptions) {
    this.o = o;
  }

  admit(m: InboundMessage, source: ArrivalSource): void {
    const v = inboundVerdict(m, this.o.instanceId);
    if (v === "ok") this.o.deliver(m, source);
    else if (v === "echo") {
      m.ack();
      this.o.metrics.echoFiltered.inc();
    } else this.reject(m, source, v);
  }

  /** Resolves true once no dead letter of a rejection is being written, false after timeoutMs. */
  async waitIdle(timeoutMs: number): Promise<boolean> {
    if (this.recording.size === 0) return true;
    let timer: NodeJS.Timeout | undefined;
    const idle = new Promise<boolean>((resolve) => this.idleWaiters.push(() => resolve(true)));
    const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    try {
      return await Promise.race([idle, late]);
    } finally {
      clearTimeout(timer);
    }
  }

  private reject(m: InboundMessage, source: ArrivalSource, r: InboundRejection): void {
    const waiting = this.recording.get(m.seq);
    if (waiting) {
      waiting.push(m); // a redelivery while its dead letter is being written: settled with it
      return;
    }
    this.recording.set(m.seq, []);
    const reason = `${r.reason}: ${r.detail}`;
    source.recordDeadLetter(deadLetterOf(m, r), m.attempt, reason).then(
      () => {
        this.o.metrics.inboundRejected.inc({ reason: r.reason });
        this.o.metrics.deadLettered.inc();
        this.logRejection(m, r);
        m.term();
        for (const again of this.done(m.seq)) again.term();
      },
      (err: unknown) => {
        this.o.logger.error({ err: (err as Error).message, reason: r.reason, seq: m.seq }, "could not record a rejected inbound message as a dead letter; left to the bus to redeliver");
        m.nak(RECORD_FAILED_RETRY_MS);
        for (const again of this.done(m.seq)) again.nak(RECORD_FAILED_RETRY_MS);
      },
    );
  }

  private done(seq: number): InboundMessage[] {
    const also = this.recording.get(seq) ?? [];
    this.recording.delete(seq);
    if (this.recording.size === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
    return also;
  }

  /** Names the claim, never the payload. */
  private logRejection(m: InboundMessage, r: InboundRejection): void {
    const now = Date.now();
    const last = this.lastLogged.get(r.reason);
    if (last && now - last.at < LOG_INTERVAL_MS) {
      last.suppressed++;
      return;
    }
    this.lastLogged.set(r.reason, { at: now, suppressed: 0 });
    this.o.logger.warn(
      { reason: r.reason, detail: r.detail, seq: m.seq, subject: m.subject?.slice(0, 200), suppressedSinceLast: last?.suppressed ?? 0 },
      "inbound message rejected: recorded as a dead letter, not delivered",
    );
  }
}

/**
 * What the dead letter holds: the claimed fields as they came (cut to a sane length), a stand-in
 * id when there was none (so rows stay apart), and no payload for a credential-bearing kind.
 */
function deadLetterOf(m: InboundMessage, r: InboundRejection): InboundMessage {
  const withhold = r.reason === "forbidden_kind";
  return {
    id: m.id !== "" ? m.id.slice(0, 256) : `#${m.seq}`,
    kind: m.kind.slice(0, 256),
    origin: m.origin.slice(0, 256),
    publishedAt: m.publishedAt.slice(0, 64),
    payloadJson: withhold ? "" : m.payloadJson,
    subject: m.subject,
    seq: m.seq,
    attempt: m.attempt,
    ack: () => m.ack(),
    nak: (ms: number) => m.nak(ms),
    working: () => m.working(),
    term: () => m.term(),
  };
}
