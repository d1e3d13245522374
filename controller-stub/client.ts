// RelayClient: the library a controller uses to talk to its relay over the local WebSocket
// (ws://<host:port>/ws, JSON text frames; relay/protocol.ts is the contract).
//
// - connect() resolves on the relay's first `ready` frame; after that the client reconnects by
//   itself (exponential backoff with jitter) whenever the socket drops, until close() — or until
//   the relay closes the session with 4001 because a newer controller took over ('superseded').
// - publish() resolves on `published`, rejects with a RelayError on an error frame for its id,
//   on timeout, or when the socket drops before the answer. A publish made while disconnected
//   waits for the reconnect (bounded by the same timeout). Retrying with the same id is safe:
//   the relay and the bus deduplicate by id.
// - onMessage() runs a handler per delivery and answers ack (resolved), nack (threw; NackError
//   carries a delay), or reject (threw RejectError), sending `working` while a handler runs long.
//
// Hot-path notes: frames are built by string concatenation (ids escaped with JSON.stringify, the
// payload stringified once), publish timeouts share one sweep timer, `working` frames share one
// timer, and permessage-deflate is off by default.

import { EventEmitter } from "node:events";
import { randomUUID } from "node:crypto";
import WebSocket from "ws";
import type { BusName, ErrorCode } from "../relay/protocol.js";
import { activeTraceFields, runInTraceContext, traceApiLoaded } from "./trace.js";

/** Close code the relay uses when a newer controller session supersedes this one. */
const CLOSE_SUPERSEDED = 4001;
const CLOSE_NORMAL = 1000;
/** Longest nack delay the relay accepts (protocol.ts MAX_NACK_DELAY_MS). */
const MAX_NACK_DELAY_MS = 24 * 60 * 60 * 1000;

// ---- public types ---------------------------------------------------------------------------

/** Codes the client itself produces, next to the relay's own ErrorCode values. */
export type ClientErrorCode =
  | "timeout" // no answer to a publish within publishTimeoutMs
  | "disconnected" // the socket dropped before the relay answered
  | "closed" // close() was called, or the client is not running
  | "superseded" // a newer controller session took over (close code 4001)
  | "unauthorized" // the relay refused the upgrade with HTTP 401
  | "http_error" // the relay refused the upgrade with another HTTP status
  | "connect_failed" // no connection (refused, DNS, handshake/ready timeout...)
  | "protocol_error" // the relay sent something that is not a valid frame
  | "invalid_payload"; // publish(): the payload cannot be serialised to JSON

export type RelayErrorCode = ErrorCode | ClientErrorCode;

export class RelayError extends Error {
  override name = "RelayError";
  readonly code: RelayErrorCode;
  /** The publish id the error is about, when there is one. */
  readonly id?: string;
  /** HTTP status for unauthorized/http_error. */
  readonly status?: number;
  constructor(code: RelayErrorCode, message: string, opts: { id?: string; status?: number; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.code = code;
    if (opts.id !== undefined) this.id = opts.id;
    if (opts.status !== undefined) this.status = opts.status;
  }
}

/** Throw from a message handler to nack with a specific redelivery delay. */
export class NackError extends Error {
  override name = "NackError";
  readonly delayMs?: number;
  constructor(message = "nack", delayMs?: number) {
    super(message);
    if (delayMs !== undefined) this.delayMs = delayMs;
  }
}

/** Throw from a message handler to reject the message: the relay stops redelivering it. */
export class RejectError extends Error {
  override name = "RejectError";
  readonly reason?: string;
  constructor(reason?: string) {
    super(reason ?? "rejected");
    if (reason !== undefined) this.reason = reason;
  }
}

/**
 * Return (or resolve with) this from a handler to send nothing for the delivery: the controller
 * settles it later with ack()/nack()/reject(), or lets it time out and be redelivered.
 */
export const LEAVE_UNSETTLED: unique symbol = Symbol("uptrakit.leaveUnsettled");

export interface Ready {
  instanceId: string;
  bus: BusName;
}

export interface Delivery<P = unknown> {
  deliveryId: string;
  id: string;
  kind: string;
  origin: string;
  attempt: number;
  publishedAt: string;
  payload: P;
  /** The publish's W3C trace context, when it had one; the handler runs inside it (with @opentelemetry/api). */
  traceparent?: string;
  tracestate?: string;
}

export type HandlerResult = void | typeof LEAVE_UNSETTLED;
export type MessageHandler = (msg: Delivery) => HandlerResult | Promise<HandlerResult>;

export interface PublishResult {
  id: string;
  /** True when the relay accepted the message into its local outbox (bus unavailable for now). */
  queued: boolean;
}

export interface ReconnectOptions {
  /** First retry delay; doubles per failed attempt. Default 100. */
  initialDelayMs?: number;
  /** Cap of the retry delay. Default 5000. */
  maxDelayMs?: number;
}

export interface RelayClientOptions {
  /** ws://host:port/ws */
  url: string;
  /** Sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** Automatic reconnection after the first successful connect; false disables it. */
  reconnect?: ReconnectOptions | false;
  /** Default 30000. */
  publishTimeoutMs?: number;
  /** Default false. */
  perMessageDeflate?: boolean;
  /** How often a long-running handler sends `working` (about ackWait/3). Default 10000; 0 = never. */
  workingIntervalMs?: number;
  /** Delay sent with a nack when the handler's error does not name one; default: the relay's. */
  nackDelayMs?: number;
  /** Bound on one connection attempt: upgrade plus the `ready` frame. Default 10000. */
  connectTimeoutMs?: number;
  /** Largest frame accepted from the relay, in bytes. Default 64 MiB. */
  maxPayload?: number;
  /**
   * With @opentelemetry/api present: send the active span's trace context with each publish, and
   * run handlers inside the delivered one. Default true.
   */
  propagateTrace?: boolean;
}

export interface DisconnectInfo {
  code: number;
  reason: string;
}

export interface ReconnectInfo {
  /** 1 for the first retry after a drop. */
  attempt: number;
  delayMs: number;
}

export type ClientState = "idle" | "connecting" | "ready" | "waiting" | "closed" | "superseded";

export interface RelayClientEvents {
  ready: [Ready];
  disconnected: [DisconnectInfo];
  reconnecting: [ReconnectInfo];
  superseded: [];
  error: [Error];
  handlerError: [unknown, Delivery];
}

// ---- internals --------------------------------------------------------------------------------

interface PendingPublish {
  frame: string;
  deadline: number;
  sent: boolean;
  promise: Promise<PublishResult>;
  resolve: (r: PublishResult) => void;
  reject: (e: Error) => void;
}

interface InFlight {
  /** Last time a deliver or working frame was exchanged for this delivery. */
  last: number;
  /** Connection generation the delivery arrived on: `working` goes only to that session. */
  gen: number;
}

interface ConnectWaiter {
  resolve: (r: Ready) => void;
  reject: (e: Error) => void;
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function ackFrame(deliveryId: string): string {
  return `{"type":"ack","deliveryId":${JSON.stringify(deliveryId)}}`;
}

export class RelayClient extends EventEmitter<RelayClientEvents> {
  readonly url: string;
  private readonly token: string | undefined;
  private readonly reconnectOpts: Required<ReconnectOptions> | false;
  private readonly publishTimeoutMs: number;
  private readonly perMessageDeflate: boolean;
  private readonly workingIntervalMs: number;
  private readonly nackDelayMs: number | undefined;
  private readonly connectTimeoutMs: number;
  private readonly maxPayload: number;
  private readonly propagateTrace: boolean;

  private ws: WebSocket | null = null;
  private _state: ClientState = "idle";
  private _ready: Ready | null = null;
  /** Set once a connection reached `ready`: from then on drops are retried. */
  private autoReconnect = false;
  private retryAttempt = 0;
  private retryTimer: NodeJS.Timeout | null = null;
  private connectWaiters: ConnectWaiter[] = [];
  private gen = 0;

  private readonly pending = new Map<string, PendingPublish>();
  private sweepTimer: NodeJS.Timeout | null = null;

  private handler: MessageHandler | null = null;
  private backlog: Delivery[] = [];
  private readonly inFlight = new Map<string, InFlight>();
  private workingTimer: NodeJS.Timeout | null = null;

  constructor(opts: RelayClientOptions) {
    super();
    if (!opts || typeof opts.url !== "string" || opts.url === "") throw new TypeError("RelayClient: `url` is required");
    this.url = opts.url;
    this.token = opts.token === "" ? undefined : opts.token;
    this.reconnectOpts =
      opts.reconnect === false
        ? false
        : {
            initialDelayMs: Math.max(1, opts.reconnect?.initialDelayMs ?? 100),
            maxDelayMs: Math.max(1, opts.reconnect?.maxDelayMs ?? 5000),
          };
    this.publishTimeoutMs = Math.max(1, opts.publishTimeoutMs ?? 30_000);
    this.perMessageDeflate = opts.perMessageDeflate ?? false;
    this.workingIntervalMs = Math.max(0, opts.workingIntervalMs ?? 10_000);
    this.nackDelayMs = opts.nackDelayMs;
    this.connectTimeoutMs = Math.max(1, opts.connectTimeoutMs ?? 10_000);
    this.maxPayload = opts.maxPayload ?? 64 * 1024 * 1024;
    this.propagateTrace = opts.propagateTrace ?? true;
  }

  /** idle | connecting | ready | waiting (backoff before a retry) | closed | superseded */
  get state(): ClientState {
    return this._state;
  }

  /** The current session's ready frame, or null when not connected. */
  get readyInfo(): Ready | null {
    return this._ready;
  }

  /** Publishes waiting for an answer (sent or waiting for a connection). */
  get pendingPublishes(): number {
    return this.pending.size;
  }

  // ---- connection ---------------------------------------------------------------------------

  /**
   * Connects and resolves with the relay's `ready` frame. Rejects with a RelayError when this
   * attempt fails (unauthorized, http_error, connect_failed, superseded, closed); when the client
   * never connected before, no retry follows. Once connected, drops are retried automatically.
   */
  connect(): Promise<Ready> {
    if (this._state === "ready" && this._ready) return Promise.resolve(this._ready);
    const p = new Promise<Ready>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (this._state === "connecting") return p;
    if (this._state === "closed" || this._state === "superseded") this._state = "idle";
    this.clearRetry();
    try {
      this.open();
    } catch (e) {
      // ws throws synchronously on a malformed URL
      this._state = "idle";
      this.ws = null;
      this.rejectConnectWaiters(new RelayError("connect_failed", `cannot connect to relay at ${this.url}: ${describe(e)}`, { cause: e }));
    }
    // Publishes from here on can carry the trace context: the optional import has been tried.
    return traceApiLoaded.then(() => p);
  }

  private open(): void {
    const gen = ++this.gen;
    this._state = "connecting";
    let failure: RelayError | undefined;
    const ws = new WebSocket(this.url, {
      perMessageDeflate: this.perMessageDeflate,
      maxPayload: this.maxPayload,
      headers: this.token === undefined ? undefined : { Authorization: `Bearer ${this.token}` },
    });
    this.ws = ws;

    // One timer per attempt: covers the upgrade and the wait for `ready`.
    let connectTimer: NodeJS.Timeout | null = setTimeout(() => {
      connectTimer = null;
      failure ??= new RelayError(
        "connect_failed",
        `relay at ${this.url} did not complete the handshake (ready frame) within ${this.connectTimeoutMs} ms`,
      );
      ws.terminate();
    }, this.connectTimeoutMs);
    const stopConnectTimer = () => {
      if (connectTimer) clearTimeout(connectTimer);
      connectTimer = null;
    };

    ws.on("unexpected-response", (_req, res) => {
      const status = res.statusCode ?? 0;
      let body = "";
      let finished = false;
      const finish = () => {
        if (finished) return;
        finished = true;
        failure ??= this.httpError(status, res.statusMessage ?? "", body);
        ws.terminate();
      };
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => {
        body += chunk;
        if (body.length > 512) finish();
      });
      res.on("end", finish);
      res.on("close", finish);
      res.on("error", finish);
    });
    ws.on("error", (err) => {
      failure ??= new RelayError("connect_failed", `cannot connect to relay at ${this.url}: ${err.message}`, { cause: err });
    });
    ws.on("message", (data, isBinary) => {
      if (this.ws !== ws) return;
      if (isBinary) {
        this.emitError(new RelayError("protocol_error", "relay sent a binary frame; expected JSON text"));
        return;
      }
      const text = Array.isArray(data) ? Buffer.concat(data).toString() : Buffer.isBuffer(data) ? data.toString() : Buffer.from(data).toString();
      this.onFrame(text, gen);
      if (connectTimer !== null && this._state === "ready") stopConnectTimer();
    });
    ws.on("close", (code, reasonBuf) => {
      stopConnectTimer();
      this.onClose(ws, code, reasonBuf.toString(), failure);
    });
  }

  private httpError(status: number, statusText: string, body: string): RelayError {
    const detail = body.trim().slice(0, 200);
    const suffix = detail ? ` (${detail})` : "";
    if (status === 401) {
      const why =
        this.token === undefined
          ? "no token was given; pass the relay's token (token option, --token or UPTRAKIT_RELAY_TOKEN)"
          : "the token was not accepted; check it matches the relay's token";
      return new RelayError("unauthorized", `relay at ${this.url} refused the connection: HTTP 401 Unauthorized — ${why}${suffix}`, {
        status,
      });
    }
    return new RelayError("http_error", `relay at ${this.url} refused the WebSocket upgrade: HTTP ${status} ${statusText}${suffix}`.trimEnd(), {
      status,
    });
  }

  private onClose(ws: WebSocket, code: number, reason: string, failure: RelayError | undefined): void {
    if (this.ws !== ws) return;
    this.ws = null;
    const wasReady = this._state === "ready";
    // Not ready any more; "waiting" until we know whether a retry follows (close() keeps "closed").
    if (this._state === "ready" || this._state === "connecting") this._state = "waiting";
    this._ready = null;
    this.backlog.length = 0;

    // Publishes already on the wire lost their answer: the caller may retry with the same id.
    if (this.pending.size > 0) {
      for (const [id, p] of this.pending) {
        if (!p.sent) continue;
        this.pending.delete(id);
        p.reject(
          code === CLOSE_SUPERSEDED
            ? new RelayError("superseded", `a newer controller session took over before publish ${id} was answered`, { id })
            : new RelayError("disconnected", `connection to relay closed (code ${code}) before publish ${id} was answered`, { id }),
        );
      }
    }

    if (wasReady) {
      this.emit("disconnected", { code, reason });
      if (this.ws !== null) return; // a listener called connect(): that attempt owns the state now
    }

    if (code === CLOSE_SUPERSEDED) {
      this._state = "superseded";
      this.autoReconnect = false;
      const err = new RelayError("superseded", `a newer controller session took over the relay at ${this.url}`);
      this.rejectAllPending(err);
      this.rejectConnectWaiters(err);
      this.emit("superseded");
      this.stopTimersIfIdle();
      return;
    }
    if (this._state === "closed") {
      this.stopTimersIfIdle();
      return;
    }

    const err =
      failure ??
      (wasReady
        ? undefined
        : new RelayError(
            "connect_failed",
            `relay at ${this.url} closed the connection (code ${code}${reason ? `, ${reason}` : ""}) before sending ready`,
          ));
    if (err) this.rejectConnectWaiters(err);

    if (this.autoReconnect && this.reconnectOpts !== false) {
      if (err && !wasReady) this.emitError(err);
      this.scheduleRetry();
    } else {
      this._state = "idle";
      const why = err ?? new RelayError("disconnected", `connection to relay at ${this.url} closed (code ${code})`);
      this.rejectAllPending(why);
      this.stopTimersIfIdle();
    }
  }

  private scheduleRetry(): void {
    if (this.reconnectOpts === false) return;
    const { initialDelayMs, maxDelayMs } = this.reconnectOpts;
    const attempt = ++this.retryAttempt;
    const base = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.min(attempt - 1, 30));
    const delayMs = Math.round(base / 2 + Math.random() * (base / 2));
    this._state = "waiting";
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this._state === "waiting") this.open();
    }, delayMs);
    this.emit("reconnecting", { attempt, delayMs });
  }

  private clearRetry(): void {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private rejectConnectWaiters(err: Error): void {
    if (this.connectWaiters.length === 0) return;
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.reject(err);
  }

  /**
   * Stops reconnecting, closes the session with 1000 and rejects pending publishes (code
   * "closed"). Resolves once the socket is closed. connect() may be called again afterwards.
   */
  async close(): Promise<void> {
    this._state = "closed";
    this.autoReconnect = false;
    this.clearRetry();
    const err = new RelayError("closed", "relay client closed");
    this.rejectAllPending(err);
    this.rejectConnectWaiters(err);
    this.backlog.length = 0;
    this.inFlight.clear();
    this.stopTimersIfIdle();
    const ws = this.ws;
    if (!ws) return;
    if (ws.readyState === WebSocket.CLOSED) {
      this.ws = null;
      return;
    }
    await new Promise<void>((resolve) => {
      const force = setTimeout(() => ws.terminate(), 2000);
      ws.once("close", () => {
        clearTimeout(force);
        resolve();
      });
      if (ws.readyState === WebSocket.OPEN) ws.close(CLOSE_NORMAL, "client closed");
      else if (ws.readyState === WebSocket.CONNECTING) ws.terminate();
    });
  }

  // ---- frames from the relay ----------------------------------------------------------------

  private onFrame(text: string, gen: number): void {
    if (this._state === "closed") return; // close() is under way
    let f: Record<string, unknown>;
    try {
      f = JSON.parse(text) as Record<string, unknown>;
    } catch {
      this.emitError(new RelayError("protocol_error", `relay sent a frame that is not JSON: ${text.slice(0, 100)}`));
      return;
    }
    if (typeof f !== "object" || f === null) {
      this.emitError(new RelayError("protocol_error", `relay sent a frame that is not a JSON object: ${text.slice(0, 100)}`));
      return;
    }
    switch (f.type) {
      case "deliver":
        this.onDeliver(f, gen);
        return;
      case "published": {
        const id = f.id as string;
        const p = this.pending.get(id);
        if (!p) return; // answer to a publish that already timed out
        this.pending.delete(id);
        p.resolve({ id, queued: f.queued === true });
        return;
      }
      case "error": {
        const id = typeof f.id === "string" ? f.id : undefined;
        const code = (typeof f.code === "string" ? f.code : "protocol_error") as RelayErrorCode;
        const message = typeof f.message === "string" ? f.message : "relay error";
        const err = new RelayError(code, message, id === undefined ? {} : { id });
        const p = id === undefined ? undefined : this.pending.get(id);
        if (p) {
          this.pending.delete(id!);
          p.reject(err);
        } else {
          this.emitError(err);
        }
        return;
      }
      case "ready":
        this.onReady({ instanceId: String(f.instanceId), bus: f.bus as BusName });
        return;
      default:
        this.emitError(new RelayError("protocol_error", `relay sent an unknown frame type: ${text.slice(0, 100)}`));
    }
  }

  private onReady(ready: Ready): void {
    const first = this._state !== "ready";
    this._ready = ready;
    this._state = "ready";
    this.autoReconnect = true;
    this.retryAttempt = 0;
    this.clearRetry();
    if (first) this.flushUnsent();
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.resolve(ready);
    this.emit("ready", ready);
  }

  private flushUnsent(): void {
    const ws = this.ws;
    if (!ws || this.pending.size === 0) return;
    for (const p of this.pending.values()) {
      if (p.sent) continue;
      p.sent = true;
      ws.send(p.frame);
    }
  }

  // ---- publishing ---------------------------------------------------------------------------

  /**
   * Publishes a notification. Resolves on the relay's `published` (queued: true when the relay
   * holds it in its outbox while the bus is unavailable). Rejects with a RelayError on an error
   * frame for this id (its code: invalid_frame, forbidden_kind, unavailable, ...), on timeout,
   * when the socket drops before the answer, on close() or on supersession. Retrying with the
   * same id is safe. A second publish of an id still pending shares the first one's outcome.
   */
  publish(kind: string, payload: unknown, id: string = randomUUID()): Promise<PublishResult> {
    let payloadJson: string | undefined;
    try {
      payloadJson = JSON.stringify(payload);
    } catch (e) {
      return Promise.reject(new RelayError("invalid_payload", `payload cannot be serialised to JSON: ${describe(e)}`, { id, cause: e }));
    }
    if (payloadJson === undefined)
      return Promise.reject(new RelayError("invalid_payload", "payload must be a JSON value (got undefined or a function)", { id }));
    return this.publishJson(kind, payloadJson, id);
  }

  /**
   * publish() for a payload that is already JSON text: it is spliced into the frame as it is,
   * never parsed or re-stringified. The caller vouches that it is valid JSON.
   */
  publishJson(kind: string, payloadJson: string, id: string = randomUUID()): Promise<PublishResult> {
    const existing = this.pending.get(id);
    if (existing) return existing.promise;
    if (this._state === "closed" || this._state === "superseded")
      return Promise.reject(
        new RelayError(this._state, this._state === "closed" ? "relay client is closed" : "this controller session was superseded", { id }),
      );

    const trace = this.propagateTrace ? activeTraceFields() : "";
    const frame = `{"type":"publish","id":${JSON.stringify(id)},"kind":${JSON.stringify(kind)}${trace},"payload":${payloadJson}}`;
    let resolve!: (r: PublishResult) => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<PublishResult>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const ws = this.ws;
    // Not sent on a closing socket: it waits for the reconnect instead of being lost with it.
    const sendNow = this._state === "ready" && ws !== null && ws.readyState === WebSocket.OPEN;
    this.pending.set(id, { frame, deadline: Date.now() + this.publishTimeoutMs, sent: sendNow, promise, resolve, reject });
    if (sendNow) ws.send(frame);
    this.ensureSweep();
    return promise;
  }

  private ensureSweep(): void {
    if (this.sweepTimer) return;
    const every = Math.min(1000, Math.max(10, Math.floor(this.publishTimeoutMs / 10)));
    this.sweepTimer = setInterval(() => this.sweep(), every);
  }

  /** Pending publishes are in deadline order (insertion order, one timeout): stop at the first live one. */
  private sweep(): void {
    const now = Date.now();
    for (const [id, p] of this.pending) {
      if (p.deadline > now) break;
      this.pending.delete(id);
      p.reject(
        new RelayError(
          "timeout",
          p.sent
            ? `no answer from the relay to publish ${id} within ${this.publishTimeoutMs} ms`
            : `not connected to the relay within ${this.publishTimeoutMs} ms; publish ${id} was not sent`,
          { id },
        ),
      );
    }
    if (this.pending.size === 0 && this.sweepTimer) {
      clearInterval(this.sweepTimer);
      this.sweepTimer = null;
    }
  }

  private rejectAllPending(err: RelayError): void {
    if (this.pending.size === 0) return;
    const all = [...this.pending.entries()];
    this.pending.clear();
    for (const [id, p] of all) p.reject(new RelayError(err.code, err.message, { id, ...(err.status ? { status: err.status } : {}) }));
  }

  // ---- deliveries ---------------------------------------------------------------------------

  /**
   * Sets the handler for deliveries (replacing any previous one). Resolved → ack; threw → nack
   * (NackError.delayMs, else the nackDelayMs option, else the relay's default delay); threw
   * RejectError → reject; returned LEAVE_UNSETTLED → nothing is sent. While the handler runs,
   * `working` is sent every workingIntervalMs. Deliveries that arrived before a handler was set
   * are handed to it now.
   */
  onMessage(handler: MessageHandler): void {
    this.handler = handler;
    if (this.backlog.length > 0) {
      const queued = this.backlog;
      this.backlog = [];
      for (const d of queued) this.dispatch(d, this.gen);
    }
  }

  private onDeliver(f: Record<string, unknown>, gen: number): void {
    const d: Delivery = {
      deliveryId: f.deliveryId as string,
      id: f.id as string,
      kind: f.kind as string,
      origin: f.origin as string,
      attempt: f.attempt as number,
      publishedAt: f.publishedAt as string,
      payload: f.payload,
    };
    if (typeof f.traceparent === "string") d.traceparent = f.traceparent;
    if (typeof f.tracestate === "string") d.tracestate = f.tracestate;
    if (typeof d.deliveryId !== "string") {
      this.emitError(new RelayError("protocol_error", "relay sent a deliver frame without a deliveryId"));
      return;
    }
    if (this.handler === null) {
      this.backlog.push(d);
      return;
    }
    this.dispatch(d, gen);
  }

  private dispatch(d: Delivery, gen: number): void {
    const deliveryId = d.deliveryId;
    // Already being handled here (the relay re-sent it): the running handler will settle it.
    if (this.inFlight.has(deliveryId)) return;
    let result: HandlerResult | Promise<HandlerResult>;
    try {
      const handler = this.handler!;
      result = d.traceparent === undefined ? handler(d) : runInTraceContext(d.traceparent, d.tracestate, () => handler(d));
    } catch (e) {
      this.settleFailure(d, e);
      return;
    }
    if (result !== null && typeof result === "object" && typeof (result as Promise<unknown>).then === "function") {
      this.inFlight.set(deliveryId, { last: Date.now(), gen });
      this.ensureWorkingTimer();
      (result as Promise<HandlerResult>).then(
        (r) => {
          if (!this.inFlight.delete(deliveryId)) return; // close() forgot it
          if (r !== LEAVE_UNSETTLED) this.ack(deliveryId);
        },
        (e: unknown) => {
          if (!this.inFlight.delete(deliveryId)) return;
          this.settleFailure(d, e);
        },
      );
      return;
    }
    if (result !== LEAVE_UNSETTLED) this.ack(deliveryId);
  }

  private settleFailure(d: Delivery, e: unknown): void {
    this.emit("handlerError", e, d);
    if (e instanceof RejectError) {
      this.reject(d.deliveryId, e.reason ?? e.message);
      return;
    }
    const delay = e instanceof NackError && e.delayMs !== undefined ? e.delayMs : this.nackDelayMs;
    this.nack(d.deliveryId, delay);
  }

  private ensureWorkingTimer(): void {
    if (this.workingTimer || this.workingIntervalMs === 0) return;
    const every = Math.max(5, Math.floor(this.workingIntervalMs / 4));
    this.workingTimer = setInterval(() => this.sendWorking(), every);
    this.workingTimer.unref();
  }

  /** inFlight is kept in order of `last` (refreshed entries move to the end): stop at the first fresh one. */
  private sendWorking(): void {
    const now = Date.now();
    const ws = this.ws;
    const canSend = ws !== null && this._state === "ready";
    for (const [deliveryId, f] of this.inFlight) {
      if (now - f.last < this.workingIntervalMs) break;
      this.inFlight.delete(deliveryId);
      f.last = now;
      this.inFlight.set(deliveryId, f);
      if (canSend && f.gen === this.gen) ws.send(`{"type":"working","deliveryId":${JSON.stringify(deliveryId)}}`);
    }
    if (this.inFlight.size === 0 && this.workingTimer) {
      clearInterval(this.workingTimer);
      this.workingTimer = null;
    }
  }

  private stopTimersIfIdle(): void {
    if (this.pending.size === 0 && this.sweepTimer) {
      clearInterval(this.sweepTimer);
      this.sweepTimer = null;
    }
    if (this.inFlight.size === 0 && this.workingTimer) {
      clearInterval(this.workingTimer);
      this.workingTimer = null;
    }
  }

  // ---- low-level frames (each returns false when there is no open session to send on) ------------

  ack(deliveryId: string): boolean {
    return this.sendRaw(ackFrame(deliveryId));
  }

  nack(deliveryId: string, delayMs?: number): boolean {
    if (delayMs === undefined || !Number.isFinite(delayMs))
      return this.sendRaw(`{"type":"nack","deliveryId":${JSON.stringify(deliveryId)}}`);
    const d = Math.min(MAX_NACK_DELAY_MS, Math.max(0, Math.round(delayMs)));
    return this.sendRaw(`{"type":"nack","deliveryId":${JSON.stringify(deliveryId)},"delayMs":${d}}`);
  }

  working(deliveryId: string): boolean {
    return this.sendRaw(`{"type":"working","deliveryId":${JSON.stringify(deliveryId)}}`);
  }

  reject(deliveryId: string, reason?: string): boolean {
    if (reason === undefined) return this.sendRaw(`{"type":"reject","deliveryId":${JSON.stringify(deliveryId)}}`);
    return this.sendRaw(`{"type":"reject","deliveryId":${JSON.stringify(deliveryId)},"reason":${JSON.stringify(reason)}}`);
  }

  /** Sends a text frame as it is (tests, diagnostics). */
  sendRaw(text: string): boolean {
    const ws = this.ws;
    if (ws === null || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(text);
    return true;
  }

  /** Emits 'error' only when someone listens, so a daemon without a listener is not crashed by it. */
  private emitError(err: Error): void {
    if (this.listenerCount("error") > 0) this.emit("error", err);
  }
}
