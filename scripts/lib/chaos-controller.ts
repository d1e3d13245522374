// A controller for the chaos checker, on a raw WebSocket so that it has exact control of every
// frame: it publishes (retrying unanswered publishes with the same id on each new session), and
// answers each delivery with the scenario's behaviour for it — ack, nack with a delay, working,
// reject, silence, a slow ack, a disconnect, or a superseding second connection. Everything it
// sees and does goes to the recorder (chaos-check.ts's history). settleAll() switches it to
// acking everything, for the end of a scenario.

import WebSocket from "ws";
import type { Behaviour } from "./chaos-scenario.js";

export interface ControllerEvents {
  published(origin: string, id: string, kind: string, queued: boolean): void;
  publishFailed(origin: string, id: string, kind: string, code: string): void;
  delivered(relay: string, f: DeliverFrame): void;
  acked(relay: string, f: DeliverFrame): void;
  ackIneffective(relay: string, deliveryId: string): void;
}

export interface DeliverFrame {
  deliveryId: string;
  id: string;
  origin: string;
  kind: string;
  attempt: number;
}

/** Publish errors that end a publish: retrying the same message cannot help. */
const FINAL_CODES = new Set(["forbidden_kind", "invalid_frame", "refused", "frame_too_large"]);
const RECONNECT_MS = 100;
const WORKING_EVERY_MS = 400;
const RETRY_MS = 300;
const MAX_CHURN_PER_MESSAGE = 3;

export class ChaosController {
  private ws: WebSocket | undefined;
  private readonly sockets = new Set<WebSocket>();
  /** No reconnect before this (a "disconnect" behaviour stays away a while). */
  private downUntil = 0;
  private stopped = false;
  private settling = false;
  private deliveries = 0;
  private readonly pending = new Map<string, { kind: string; payload: string }>();
  /** Deliveries not answered yet, with the socket they came on. */
  private readonly unsettled = new Map<string, { ws: WebSocket; f: DeliverFrame }>();
  private readonly timers = new Set<NodeJS.Timeout>();
  /** Disconnects and supersedes caused per message (origin + id). */
  private readonly churn = new Map<string, number>();
  private readyWaiters: Array<() => void> = [];

  constructor(
    readonly instanceId: string,
    private readonly url: string,
    private readonly behaviours: Behaviour[],
    private readonly ev: ControllerEvents,
  ) {}

  get pendingPublishes(): number {
    return this.pending.size;
  }

  /** Connects (retrying while the relay is not up) and resolves on the first `ready`. */
  start(): Promise<void> {
    const ready = new Promise<void>((resolve) => this.readyWaiters.push(resolve));
    this.open();
    return ready;
  }

  publish(id: string, kind: string): void {
    const payload = JSON.stringify({ origin: this.instanceId, id, t: Date.now() });
    this.pending.set(id, { kind, payload });
    this.sendPublish(id);
  }

  /** From now on every delivery is acked, and so is every one still unanswered on the current session. */
  settleAll(): void {
    this.settling = true;
    for (const [deliveryId, u] of this.unsettled) if (u.ws === this.ws) this.ack(u.ws, u.f), this.unsettled.delete(deliveryId);
  }

  async close(): Promise<void> {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    const closing = [...this.sockets].map(
      (ws) =>
        new Promise<void>((resolve) => {
          if (ws.readyState === WebSocket.CLOSED) return resolve();
          ws.once("close", () => resolve());
          ws.terminate();
        }),
    );
    await Promise.all(closing);
  }

  // ---- connection ----------------------------------------------------------------------------

  private later(ms: number, fn: () => void): void {
    const t = setTimeout(() => {
      this.timers.delete(t);
      if (!this.stopped) fn();
    }, ms);
    this.timers.add(t);
  }

  private open(): void {
    if (this.stopped) return;
    const ws = new WebSocket(this.url);
    this.sockets.add(ws);
    ws.on("error", () => undefined); // a refused connect while the relay is down: close follows
    ws.on("message", (data) => this.onFrame(ws, String(data)));
    ws.on("close", () => {
      this.sockets.delete(ws);
      if (ws === this.ws) this.ws = undefined;
      for (const [id, u] of this.unsettled) if (u.ws === ws) this.unsettled.delete(id);
      if (this.stopped) return;
      // After a 4001 a newer socket of ours is open or opening: it carries on (sockets is not empty).
      if (this.ws === undefined && this.sockets.size === 0)
        this.later(Math.max(RECONNECT_MS, this.downUntil - Date.now()), () => this.ensureConnected());
    });
  }

  private ensureConnected(): void {
    if (this.stopped || this.ws || this.sockets.size > 0) return;
    this.open();
  }

  private onFrame(ws: WebSocket, text: string): void {
    let f: Record<string, unknown>;
    try {
      f = JSON.parse(text) as Record<string, unknown>;
    } catch {
      return;
    }
    switch (f.type) {
      case "ready": {
        this.ws = ws;
        for (const id of this.pending.keys()) this.sendPublish(id);
        for (const w of this.readyWaiters.splice(0)) w();
        return;
      }
      case "published": {
        const id = String(f.id);
        const p = this.pending.get(id);
        if (!p) return;
        this.pending.delete(id);
        this.ev.published(this.instanceId, id, p.kind, f.queued === true);
        return;
      }
      case "error": {
        const code = String(f.code);
        if (code === "unknown_delivery") {
          const m = /no delivery "([^"]+)"/.exec(String(f.message));
          if (m) this.ev.ackIneffective(this.instanceId, m[1]!);
          return;
        }
        const id = typeof f.id === "string" ? f.id : undefined;
        const p = id === undefined ? undefined : this.pending.get(id);
        if (!id || !p) return;
        if (FINAL_CODES.has(code)) {
          this.pending.delete(id);
          this.ev.publishFailed(this.instanceId, id, p.kind, code);
        } else this.later(RETRY_MS, () => this.sendPublish(id)); // unavailable & co: the same id again
        return;
      }
      case "deliver":
        return this.onDeliver(ws, {
          deliveryId: String(f.deliveryId),
          id: String(f.id),
          origin: String(f.origin),
          kind: String(f.kind),
          attempt: Number(f.attempt),
        });
    }
  }

  private sendPublish(id: string): void {
    const p = this.pending.get(id);
    const ws = this.ws;
    if (!p || !ws || ws.readyState !== WebSocket.OPEN) return; // sent again on the next `ready`
    ws.send(`{"type":"publish","id":${JSON.stringify(id)},"kind":${JSON.stringify(p.kind)},"payload":${p.payload}}`);
  }

  // ---- deliveries ----------------------------------------------------------------------------

  /** Sends a settle frame, but only on the live session: a superseded socket's frames are ignored by the relay. */
  private send(ws: WebSocket, frame: object): boolean {
    if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  private ack(ws: WebSocket, f: DeliverFrame): void {
    this.unsettled.delete(f.deliveryId);
    if (this.send(ws, { type: "ack", deliveryId: f.deliveryId })) this.ev.acked(this.instanceId, f);
  }

  private onDeliver(ws: WebSocket, f: DeliverFrame): void {
    this.ev.delivered(this.instanceId, f);
    if (this.settling) return this.ack(ws, f);
    let b = this.behaviours[this.deliveries++ % this.behaviours.length] ?? { do: "ack" };
    // A parked delivery comes straight back to the next session: bound the reconnect churn per message.
    if (b.do === "disconnect" || b.do === "supersede") {
      const k = `${f.origin}\u0000${f.id}`;
      const n = (this.churn.get(k) ?? 0) + 1;
      this.churn.set(k, n);
      if (n > MAX_CHURN_PER_MESSAGE) b = { do: "ack" };
    }
    this.unsettled.set(f.deliveryId, { ws, f });
    switch (b.do) {
      case "ack":
        return this.ack(ws, f);
      case "nack":
        this.unsettled.delete(f.deliveryId);
        this.send(ws, { type: "nack", deliveryId: f.deliveryId, delayMs: b.delayMs });
        return;
      case "reject":
        this.unsettled.delete(f.deliveryId);
        this.send(ws, { type: "reject", deliveryId: f.deliveryId, reason: "chaos: poison" });
        return;
      case "silence":
        return;
      case "slow":
        // Unless settleAll() acked it meanwhile: a second ack of one delivery is refused (unknown_delivery).
        return this.later(b.ms, () => this.unsettled.has(f.deliveryId) && this.ack(ws, f));
      case "working": {
        const until = Date.now() + b.ms;
        const beat = (): void => {
          if (!this.unsettled.has(f.deliveryId)) return;
          if (Date.now() >= until) return this.ack(ws, f);
          this.send(ws, { type: "working", deliveryId: f.deliveryId });
          this.later(Math.min(WORKING_EVERY_MS, Math.max(1, until - Date.now())), beat);
        };
        return beat();
      }
      case "disconnect":
        if (ws !== this.ws) return;
        this.ws = undefined;
        this.downUntil = Date.now() + b.downMs; // the close handler reconnects after that
        ws.close(1000, "chaos: disconnect");
        return;
      case "supersede":
        if (ws !== this.ws) return;
        this.ws = undefined; // nothing more is sent on the old socket: the relay may already have replaced it
        this.open();
        return;
    }
  }
}
