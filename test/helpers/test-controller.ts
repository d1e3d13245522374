// A frame-level controller for tests: raw WebSocket, every frame recorded, and waits that
// resolve on the frame itself (no sleeps).

import { WebSocket } from "ws";
import { checkReceivedFrame, checkSentFrame } from "./frame-schemas.js";

export type Frame = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

export class TestController {
  readonly frames: Frame[] = [];
  /** Frames that were not JSON (a relay must never send one): kept, not thrown in the socket's handler. */
  readonly unparsed: string[] = [];
  ready!: Frame;
  closeCode: number | undefined;
  closeReason: string | undefined;
  private readonly ws: WebSocket;
  private waiters: Array<{ pred: (f: Frame) => boolean; resolve: (f: Frame) => void; from: number }> = [];
  private readonly listeners = new Set<(f: Frame) => void>();
  private readonly closedP: Promise<void>;
  private nextId = 0;

  private constructor(ws: WebSocket) {
    this.ws = ws;
    ws.on("message", (data, isBinary) => {
      const text = isBinary ? "{}" : data.toString();
      let f: Frame;
      try {
        f = JSON.parse(text) as Frame;
      } catch {
        this.unparsed.push(text);
        return;
      }
      if (!isBinary) checkReceivedFrame(text); // docs/asyncapi.yaml: throws on drift
      this.frames.push(f);
      const idx = this.frames.length - 1;
      for (const l of this.listeners) l(f);
      for (const w of [...this.waiters]) {
        if (idx >= w.from && w.pred(f)) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          w.resolve(f);
        }
      }
    });
    this.closedP = new Promise((resolve) =>
      ws.once("close", (code, reason) => {
        this.closeCode = code;
        this.closeReason = reason.toString();
        resolve();
      }),
    );
  }

  /** Connects and waits for the ready frame. */
  static async connect(url: string, opts: { token?: string; headers?: Record<string, string> } = {}): Promise<TestController> {
    const headers: Record<string, string> = { ...(opts.headers ?? {}) };
    if (opts.token) headers.authorization = `Bearer ${opts.token}`;
    const ws = new WebSocket(url, { headers, perMessageDeflate: false });
    const c = new TestController(ws);
    await new Promise<void>((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("unexpected-response", (_req, res) => reject(Object.assign(new Error(`HTTP ${res.statusCode}`), { statusCode: res.statusCode })));
      ws.once("error", reject);
    });
    c.ready = await c.next((f) => f.type === "ready");
    return c;
  }

  /** Calls listener with every frame from now on (a controller's handler); returns the unsubscribe. */
  onFrame(listener: (f: Frame) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Waits for a frame matching pred, looking at frames already received from index `from` on. */
  next(pred: (f: Frame) => boolean, timeoutMs = 10_000, from = 0): Promise<Frame> {
    for (let i = from; i < this.frames.length; i++) if (pred(this.frames[i]!)) return Promise.resolve(this.frames[i]!);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.resolve !== done);
        reject(new Error(`no matching frame within ${timeoutMs} ms; got ${this.frames.length} frames, last: ${JSON.stringify(this.frames.at(-1))}`));
      }, timeoutMs);
      const done = (f: Frame): void => {
        clearTimeout(timer);
        resolve(f);
      };
      this.waiters.push({ pred, resolve: done, from });
    });
  }

  /** Waits until `n` frames match pred in total. */
  async nextN(pred: (f: Frame) => boolean, n: number, timeoutMs = 10_000): Promise<Frame[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const got = this.frames.filter(pred);
      if (got.length >= n) return got.slice(0, n);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`only ${got.length} of ${n} matching frames within ${timeoutMs} ms`);
      await this.next(pred, left, this.frames.length);
    }
  }

  send(frame: Frame | string | Buffer, binary = false): void {
    if (!binary) checkSentFrame(typeof frame === "string" ? frame : Buffer.isBuffer(frame) ? frame.toString("utf8") : JSON.stringify(frame));
    this.ws.send(typeof frame === "string" || Buffer.isBuffer(frame) ? frame : JSON.stringify(frame), { binary });
  }

  /** Publishes and resolves with the answer for that id (published or error). */
  async publish(kind: string, payload: unknown, id = `t-${process.pid}-${this.nextId++}`): Promise<Frame> {
    const from = this.frames.length;
    this.send({ type: "publish", id, kind, payload });
    return this.next((f) => (f.type === "published" || f.type === "error") && f.id === id, 15_000, from);
  }

  deliveries(): Frame[] {
    return this.frames.filter((f) => f.type === "deliver");
  }

  ack(f: Frame): void {
    this.send({ type: "ack", deliveryId: f.deliveryId });
  }

  closed(): Promise<void> {
    return this.closedP;
  }

  async close(): Promise<void> {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000);
    await this.closedP;
  }
}

/** Tries an upgrade and returns the HTTP status it was refused with (101 when accepted). */
export function upgradeStatus(url: string, headers: Record<string, string> = {}): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    ws.once("unexpected-response", (_req, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.once("open", () => {
      resolve(101);
      ws.close();
    });
    ws.once("error", (err) => {
      if (!/Unexpected server response/.test(err.message)) reject(err);
    });
  });
}
