// The one interface between the relay core and a message bus. JetStream and the embedded SQLite
// bus both implement it and both pass test/conformance (the same behavioural suite).
//
// The semantics every backend provides, modelled on a JetStream durable pull consumer:
// - publish() resolves only once the message is durable; a retried publish of the same
//   (origin, id) within the duplicate window is stored once.
// - consume() yields every message in the stream published after this instance's consumer was
//   first created, from every origin (echo filtering is the relay's job, not the bus's).
// - Each yielded message must be settled with ack(), nak(delay) or term(). An unsettled
//   message is redelivered after ackWaitMs; working() restarts that clock. After maxDeliver
//   deliveries the bus stops redelivering (UNLIMITED_DELIVERIES: never; that is what the relay
//   asks for, dead-lettering itself past --max-deliver).
// - At most maxInFlight messages are unsettled at once (backpressure, not buffering).
// - Consumer state (what was acked, delivery counts) survives a restart of the relay.

import type { BusName } from "../protocol.js";
import type { Peer } from "../peers.js";

export interface BusMessage {
  /** The controller's publish id; unique per origin. */
  id: string;
  kind: string;
  /** Instance id of the publishing relay. */
  origin: string;
  /** ISO-8601 time the origin relay accepted the publish. */
  publishedAt: string;
  /** Payload as JSON text. */
  payloadJson: string;
  /** W3C trace context of the publish (validated by the origin relay), carried as it is. */
  traceparent?: string;
  tracestate?: string;
}

export interface InboundMessage extends BusMessage {
  /** The subject it arrived on, for a bus that has subjects (JetStream); see inbound-policy.ts. */
  readonly subject?: string;
  /** The first relay header the message carried twice, "" or absent when none. */
  readonly duplicatedHeader?: string;
  /** False when the payload's bytes were not UTF-8 (absent: the bus holds text). */
  readonly payloadUtf8?: boolean;
  /** 1 on first delivery, counting up on each redelivery. */
  attempt: number;
  /** A key for the stored message (stream sequence): the same across redeliveries. */
  seq: number;
  ack(): void;
  /** Redeliver after delayMs (never sooner). */
  nak(delayMs: number): void;
  /** The handler is still busy: restart the ack-wait clock. */
  working(): void;
  /** Stop redelivering this message. */
  term(): void;
}

export interface PublishResult {
  /** True when the bus already held this (origin, id): the retry was stored once. */
  duplicate: boolean;
}

/** What a bus tells the relay about besides messages. */
export interface BusHooks {
  /** A settle (ack, nak, working, term) could not be sent; the message will be redelivered. */
  settleFailed?(what: string, err: unknown): void;
  /** The connection was found silently cut off (no answer to pings or to a probe). */
  connectionStale?(reason: string): void;
  /** A nats.js fast path changed state (JetStream; relay/bus/nats-internals.ts). */
  fastPath?(path: string, state: string): void;
}

/** BusSettings.maxDeliver for "redeliver until settled" (JetStream's max_deliver -1). */
export const UNLIMITED_DELIVERIES = -1;

export interface BusSettings {
  instanceId: string;
  /** JetStream stream name; for SQLite, the logical stream inside the file. */
  stream: string;
  ackWaitMs: number;
  maxDeliver: number;
  maxInFlight: number;
  /** Retention: messages older than this are dropped. */
  maxAgeMs: number;
  /** Consumers idle this long are removed. */
  inactiveThresholdMs: number;
  hooks?: BusHooks;
}

export type BusState = "connected" | "disconnected" | "closed";

export interface BusStatus {
  state: BusState;
  /** Short human reason when not connected. */
  reason?: string;
}

export interface StreamInfo {
  bus: BusName;
  stream: string;
  messages: number;
  bytes: number;
  firstSeq: number;
  lastSeq: number;
  consumer: {
    name: string;
    /** Messages not yet delivered to this consumer. */
    pending: number;
    /** Delivered but not yet acked. */
    ackPending: number;
    redelivered: number;
  } | null;
}

/**
 * Messages a relay hands back unhandled when it stops consuming (drain, controller gone) are
 * nak'd with this delay, not 0: redelivered at once, JetStream (2.9) may give such a message to
 * this connection's last pull request, which the server still holds for a moment after the
 * relay stopped pulling, and the message then sits out a whole ack wait (and loses an attempt).
 * After the delay it goes to the next pull: the restarted relay, or this one again.
 */
export const HANDBACK_DELAY_MS = 1_000;

/** Raised by start() with a message fit to print as the reason the relay cannot start. */
export class BusStartError extends Error {
  override name = "BusStartError";
}

/** Raised by publish() when the bus cannot take the message right now (outage, election). */
export class BusUnavailableError extends Error {
  override name = "BusUnavailableError";
}

export interface Consumption {
  /** Stops pulling. Messages already yielded stay the caller's to settle. */
  stop(): Promise<void>;
}

export interface Bus {
  readonly name: BusName;
  /** Connects and creates or verifies the stream and this instance's consumer. Idempotent across instances. */
  start(): Promise<void>;
  publish(msg: BusMessage): Promise<PublishResult>;
  /** Starts pulling; onMessage is called for each delivery, in order of arrival. */
  consume(onMessage: (msg: InboundMessage) => void): Consumption;
  status(): BusStatus;
  /** Listens for status changes; returns the unsubscribe function. */
  onStatus(listener: (s: BusStatus) => void): () => void;
  /** The stream and this instance's consumer, on a started bus. */
  info(): Promise<StreamInfo>;
  /**
   * A read-only look for operators (`stream info`): connects with the same settings (on a bus
   * that need not be started, and leaves it as it was), reads the stream and this instance's
   * consumer (null when it has none) and never creates or changes either. Rejects with a
   * message fit to print when the bus cannot be reached or the stream (or SQLite file) does not
   * exist.
   */
  inspect(): Promise<StreamInfo>;
  /** The relays on this stream (consumers and origins), for the status page; read-only. */
  peers(): Promise<Peer[]>;
  /** Where the bus is: the NATS server it is connected to, or the bus file. */
  location(): string | undefined;
  /** Stops consuming, lets pending settles reach the bus, and disconnects. */
  close(): Promise<void>;
}
