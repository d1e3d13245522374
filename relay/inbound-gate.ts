// The door between the buses and delivery: every message passes inboundVerdict (inbound-policy.ts)
// before the delivery state machine sees it. A rejected message is never delivered: the state
// machine turns it into a dead letter with its reason (the payload withheld for a
// credential-bearing kind) and terminates it only once that is durable; then it is counted in
// uptrakit_relay_inbound_rejected_total{reason} and logged, rate-limited, without its payload.

import type { InboundMessage } from "./bus/bus.js";
import type { ArrivalSource } from "./delivery.js";
import { inboundVerdict, type InboundRejection } from "./inbound-policy.js";
import type { Logger } from "./log.js";
import type { RelayMetrics } from "./metrics.js";

/** Rejections are logged once per reason per this interval (a flood must not become a log flood). */
const LOG_INTERVAL_MS = 10_000;

export interface InboundGateOptions {
  instanceId: string;
  metrics: RelayMetrics;
  logger: Logger;
  /** Hands an admitted message to delivery. */
  deliver(msg: InboundMessage, source: ArrivalSource): void;
  /** Hands a rejected message to delivery's dead-letter path; `onRecorded` once it is durable. */
  refuse(msg: InboundMessage, source: ArrivalSource, reason: string, onRecorded: () => void): void;
}

export class InboundGate {
  private readonly o: InboundGateOptions;
  private readonly lastLogged = new Map<string, { at: number; suppressed: number }>();

  constructor(o: InboundGateOptions) {
    this.o = o;
  }

  admit(m: InboundMessage, source: ArrivalSource): void {
    const v = inboundVerdict(m, this.o.instanceId);
    if (v === "ok") this.o.deliver(m, source);
    else if (v === "echo") {
      m.ack();
      this.o.metrics.echoFiltered.inc();
    } else
      this.o.refuse(deadLetterOf(m, v), source, `${v.reason}: ${v.detail}`, () => {
        this.o.metrics.inboundRejected.inc({ reason: v.reason });
        this.logRejection(m, v);
      });
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
