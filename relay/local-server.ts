// The controller-facing server: HTTP for /healthz, /readyz and /metrics, and the WebSocket on
// /ws. Authentication and the Origin check happen at the upgrade, before any frame is read.

import http from "node:http";
import type { Duplex } from "node:stream";
import { createHash, timingSafeEqual } from "node:crypto";
import { WebSocketServer, type WebSocket, type RawData } from "ws";
import {
  CLOSE_TOO_BIG,
  errorFrame,
  parseClientFrame,
  sniffPublishId,
  type ClientFrame,
  type FrameError,
} from "./protocol.js";
import type { Logger } from "./log.js";
import { readinessBody, type ReadinessReport } from "./readiness.js";
import type { StatusSnapshot } from "./status.js";
import { serveStatus } from "./status-page.js";
import { encodeTextFrames } from "./ws-frames.js";

export interface LocalServerOptions {
  host: string;
  port: number;
  token?: string;
  allowOrigins: string[];
  maxFrameBytes: number;
  logger: Logger;
  hooks: LocalServerHooks;
}

export interface LocalServerHooks {
  readiness(): ReadinessReport;
  metrics(): Promise<{ contentType: string; body: string }>;
  /** The status page's data (GET /status.json). */
  status(): Promise<StatusSnapshot>;
  sessionOpened(session: ControllerSession): void;
  sessionClosed(session: ControllerSession): void;
  frame(session: ControllerSession, frame: ClientFrame): void;
  /** A frame that could not be parsed; the session has already been told. */
  badFrame(session: ControllerSession, error: FrameError): void;
}

/** One controller connection. */
export class ControllerSession {
  private static nextNumber = 1;
  readonly number = ControllerSession.nextNumber++;
  /** Frames of this loop turn not yet written (see send()). */
  private pending: string[] = [];
  constructor(
    private readonly ws: WebSocket,
    /**
     * The raw socket under ws, when frames may be written to it directly: ws then has no frame of
     * its own queued (no permessage-deflate), so a whole frame written here cannot interleave.
     */
    private readonly socket?: Duplex,
  ) {}

  get open(): boolean {
    return this.ws.readyState === this.ws.OPEN;
  }

  send(frame: string): void {
    if (!this.open) return;
    if (!this.socket) return this.ws.send(frame);
    // Deliveries and answers come in bursts (a pull batch, a chunk of PubAcks, spread over the
    // I/O callbacks of one loop turn): collect them until the turn's I/O is done and write them
    // in one buffer, one syscall instead of one per frame.
    if (this.pending.length === 0) setImmediate(this.flush);
    this.pending.push(frame);
  }

  /** Writes what send() collected. Also run before a close, so the close frame comes last. */
  private readonly flush = (): void => {
    if (this.pending.length === 0) return;
    const frames = this.pending;
    this.pending = [];
    if (this.open && this.socket!.writable) this.socket!.write(encodeTextFrames(frames));
  };

  sendError(error: FrameError): void {
    this.send(errorFrame(error));
  }

  close(code: number, reason: string): void {
    this.flush();
    if (this.ws.readyState === this.ws.OPEN || this.ws.readyState === this.ws.CONNECTING) this.ws.close(code, reason);
  }

  /** Resolves once the socket is fully closed. */
  closed(): Promise<void> {
    if (this.ws.readyState === this.ws.CLOSED) return Promise.resolve();
    return new Promise((resolve) => this.ws.once("close", () => resolve()));
  }

  terminate(): void {
    this.ws.terminate();
  }
}

// Frames up to this multiple of --max-frame-bytes are read and answered with frame_too_large;
// larger ones close the socket (1009), so a hostile peer cannot make the relay buffer without bound.
const HARD_FRAME_LIMIT_FACTOR = 8;

/**
 * Bytes queued for a controller beyond which the relay stops reading from it until they drain.
 * Small frames cost far more memory queued than their bytes (write-queue entries, a header Buffer
 * each): at 8 MiB a peer flooding 7-byte junk without reading took the relay's RSS to 290 MB,
 * at 1 MiB to under 200 MB. Normal traffic stays below it (256 in-flight deliveries of 512 B).
 */
const OUTPUT_HIGH_WATER = 1024 * 1024;

/** A socket error on the local port (the peer reset or vanished): nothing to answer, just let it go. */
function dropSocket(this: Duplex): void {
  this.destroy();
}

const sha256 = (s: string): Buffer => createHash("sha256").update(s).digest();

/** Constant-time comparison of a presented bearer token with the configured one. */
export function tokenMatches(header: string | undefined, token: string): boolean {
  const m = /^Bearer (.+)$/.exec(header ?? "");
  // Hashing first gives equal-length buffers, so timingSafeEqual never short-cuts on length.
  return timingSafeEqual(sha256(m ? m[1]! : ""), sha256(token)) && m !== null;
}

export class LocalServer {
  private readonly o: LocalServerOptions;
  private readonly http: http.Server;
  private readonly wss: WebSocketServer;
  private readonly sessions = new Set<ControllerSession>();

  constructor(o: LocalServerOptions) {
    this.o = o;
    this.http = http.createServer((req, res) => void this.onRequest(req, res));
    // Half-open or dawdling upgrades are cut off rather than held for ever.
    this.http.headersTimeout = 10_000;
    this.http.requestTimeout = 15_000;
    this.wss = new WebSocketServer({
      noServer: true,
      perMessageDeflate: false,
      maxPayload: o.maxFrameBytes * HARD_FRAME_LIMIT_FACTOR,
    });
    // Every socket gets an error listener before anything else can write to it. Node's http server
    // has one of its own, but takes it off a socket it hands to 'upgrade': a reset (ECONNRESET,
    // EPIPE) while an upgrade is refused would then be an uncaught exception that ends the relay.
    this.http.on("connection", (socket: Duplex) => socket.on("error", dropSocket));
    this.http.on("upgrade", (req, socket, head) => this.onUpgrade(req, socket, head));
    this.http.on("clientError", (err: NodeJS.ErrnoException, socket: Duplex) => this.onClientError(err, socket));
  }

  async listen(): Promise<{ host: string; port: number }> {
    await new Promise<void>((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException): void => {
        reject(
          new Error(
            err.code === "EADDRINUSE"
              ? `cannot listen on ${this.o.host}:${this.o.port}: the address is already in use`
              : `cannot listen on ${this.o.host}:${this.o.port}: ${err.message}`,
          ),
        );
      };
      this.http.once("error", onError);
      this.http.listen(this.o.port, this.o.host, () => {
        this.http.off("error", onError);
        resolve();
      });
    });
    const addr = this.http.address() as { address: string; port: number };
    return { host: addr.address, port: addr.port };
  }

  /**
   * Closes every session with the code given; the listener stays up (probes and /metrics answer
   * while the relay finishes stopping; new sessions are refused by the relay).
   */
  async closeSessions(code: number, reason: string): Promise<void> {
    const sessions = [...this.sessions];
    for (const s of sessions) s.close(code, reason);
    // A peer that never answers the close handshake is not allowed to hold shutdown up.
    await Promise.race([Promise.all(sessions.map((s) => s.closed())), new Promise((r) => setTimeout(r, 2000).unref())]);
    for (const s of sessions) s.terminate();
  }

  /** Closes every session with the code given, then stops listening. */
  async close(code: number, reason: string): Promise<void> {
    await this.closeSessions(code, reason);
    await new Promise<void>((resolve) => {
      this.http.close(() => resolve());
      this.http.closeAllConnections();
    });
    this.wss.close();
  }

  private async onRequest(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const path = (req.url ?? "/").split("?")[0];
    const json = (status: number, body: unknown): void => {
      res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
    };
    if (req.method !== "GET" && req.method !== "HEAD") return json(405, { error: "method not allowed" });
    switch (path) {
      case "/healthz":
        return json(200, { status: "ok" });
      case "/readyz": {
        const r = this.o.hooks.readiness();
        return json(r.ready ? 200 : 503, readinessBody(r));
      }
      case "/metrics": {
        try {
          const m = await this.o.hooks.metrics();
          res.writeHead(200, { "content-type": m.contentType }).end(m.body);
        } catch (err) {
          json(500, { error: (err as Error).message });
        }
        return;
      }
      case "/ws":
        return json(426, { error: "upgrade to a WebSocket" });
      default:
        // The status page (/, /status.json), behind the token when one is set.
        if (await serveStatus(req, res, { token: this.o.token, snapshot: () => this.o.hooks.status() })) return;
        return json(404, { error: "not found", paths: ["/", "/status.json", "/ws", "/healthz", "/readyz", "/metrics"] });
    }
  }

  /**
   * A connection the HTTP parser gave up on (malformed request, oversized head, timeout) or that
   * failed before a request was complete (reset). Answered like Node's default handler does, but
   * only while nothing has been written and the socket still takes writes, then always destroyed.
   */
  private onClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
    this.o.logger.debug({ err: err.code ?? err.message }, "local connection dropped before a request was complete");
    const untouched = !("bytesWritten" in socket) || socket.bytesWritten === 0;
    if (err.code !== "ECONNRESET" && err.code !== "EPIPE" && socket.writable && untouched) {
      const status = err.code === "HPE_HEADER_OVERFLOW" ? "431 Request Header Fields Too Large" : err.code === "ERR_HTTP_REQUEST_TIMEOUT" ? "408 Request Timeout" : "400 Bad Request";
      socket.once("finish", () => socket.destroy());
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
      return;
    }
    socket.destroy();
  }

  private onUpgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
    const refuse = (status: number, text: string, message: string): void => {
      this.o.logger.warn({ status, remote: req.socket.remoteAddress, origin: req.headers.origin }, `WebSocket upgrade refused: ${message}`);
      const body = JSON.stringify({ error: message });
      // The http server (allowHalfOpen) would leave the socket half-open after end() for as long
      // as the peer keeps its side open: close it completely once the answer is written.
      socket.once("finish", () => socket.destroy());
      socket.end(
        `HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
    };
    const path = (req.url ?? "/").split("?")[0];
    if (path !== "/ws") return refuse(404, "Not Found", "the WebSocket endpoint is /ws");
    // Browsers always send Origin; a controller process does not. Refusing unknown origins
    // stops a web page on this host from talking to the relay (cross-site WebSocket hijacking).
    const origin = req.headers.origin;
    if (origin !== undefined && !this.o.allowOrigins.includes(origin))
      return refuse(403, "Forbidden", `origin ${JSON.stringify(origin)} is not allowed (see --allow-origin)`);
    if (this.o.token !== undefined && !tokenMatches(req.headers.authorization, this.o.token))
      return refuse(401, "Unauthorized", "missing or wrong bearer token");
    this.wss.handleUpgrade(req, socket, head, (ws) => this.onConnection(ws, socket));
  }

  private onConnection(ws: WebSocket, socket: Duplex): void {
    // Frames go straight to the socket unless an extension transforms them (none is offered).
    const session = new ControllerSession(ws, ws.extensions === "" ? socket : undefined);
    this.sessions.add(session);
    ws.on("error", (err) => {
      this.o.logger.warn({ err: err.message, session: session.number }, "controller socket error");
      // ws closes with 1009 (too big) or 1007 (invalid UTF-8) on its own after this.
      if ((err as { code?: string }).code === "WS_ERR_UNSUPPORTED_MESSAGE_LENGTH") session.close(CLOSE_TOO_BIG, "frame too large");
    });
    ws.on("close", () => {
      this.sessions.delete(session);
      this.o.hooks.sessionClosed(session);
    });
    ws.on("message", (data, isBinary) => {
      this.onMessage(session, data, isBinary);
      // Every bad frame gets an answer (a 7-byte junk frame, a 75-byte error frame): a peer that
      // sends without reading would have the relay buffer answers without bound. Past the high
      // water mark, stop reading from it until it has read what it was sent (TCP backpressure).
      if (ws.bufferedAmount > OUTPUT_HIGH_WATER && !ws.isPaused) {
        ws.pause();
        socket.once("drain", () => ws.resume());
      }
    });
    this.o.hooks.sessionOpened(session);
  }

  private onMessage(session: ControllerSession, data: RawData, isBinary: boolean): void {
    const bytes = Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
    const bad = (error: FrameError): void => {
      session.sendError(error);
      this.o.hooks.badFrame(session, error);
    };
    if (isBinary) return bad({ code: "invalid_frame", message: "binary frames are not accepted: send JSON as text frames" });
    if (bytes.length > this.o.maxFrameBytes) {
      const id = sniffPublishId(bytes.subarray(0, 512).toString("utf8"));
      const error: FrameError = { code: "frame_too_large", message: `frame of ${bytes.length} bytes exceeds the limit of ${this.o.maxFrameBytes}` };
      return bad(id === undefined ? error : { ...error, id });
    }
    const parsed = parseClientFrame(bytes.toString("utf8"));
    if (!parsed.ok) return bad(parsed.error);
    this.o.hooks.frame(session, parsed.frame);
  }
}
