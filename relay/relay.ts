// The relay's composition root: wires the store, the bus, the publisher, the delivery state
// machine, dead-letter replay and the controller-facing server together, and runs their
// lifecycle: new → start() → running → stop() (drains) → closed. Delivery policy lives in
// delivery.ts, publishing in publisher.ts.

import net from "node:net";
import { HANDBACK_DELAY_MS, type Bus, type Consumption, type InboundMessage } from "./bus/bus.js";
import { createBus } from "./bus/create.js";
import type { RelayConfig } from "./config.js";
import { DeliveryMachine, type ArrivalSource } from "./delivery.js";
import { InboundGate } from "./inbound-gate.js";
import { LocalServer, type ControllerSession } from "./local-server.js";
import type { Logger } from "./log.js";
import { RelayMetrics } from "./metrics.js";
import { CLOSE_NORMAL, CLOSE_SUPERSEDED, publishedFrame, readyFrame, type ClientFrame, type FrameError, type PublishFrame } from "./protocol.js";
import { Publisher } from "./publisher.js";
import { readiness, type ReadinessReport } from "./readiness.js";
import { StatusReporter } from "./status.js";
import { ReplaySource } from "./replay.js";
import { loadTracing, type RelayTracing } from "./trace-loader.js";
import { DAEMON_BUSY_TIMEOUT_MS, RelayStore } from "./store/store.js";

export type RelayState = "new" | "starting" | "running" | "closing" | "closed";

// new Date().toISOString() costs about a microsecond; publishes come thousands a second, many
// within the same millisecond.
let isoMs = -1;
let isoText = "";
function isoNow(): string {
  const ms = Date.now();
  if (ms !== isoMs) {
    isoMs = ms;
    isoText = new Date(ms).toISOString();
  }
  return isoText;
}

export class Relay {
  readonly cfg: RelayConfig;
  readonly metrics = new RelayMetrics();
  private readonly log: Logger;
  private _state: RelayState = "new";
  private store: RelayStore | undefined;
  private bus: Bus | undefined;
  private server: LocalServer | undefined;
  private publisher: Publisher | undefined;
  private tracker: DeliveryMachine | undefined;
  /** Span export, only when OTLP is configured (see trace-loader.ts). */
  private tracing: RelayTracing | undefined;
  /** Messages from the bus: it redelivers by itself; their dead letters are new rows in the store. */
  private readonly busSource: ArrivalSource = {
    name: "bus",
    redelivers: true,
    recordDeadLetter: (msg, attempts, reason) => this.store!.addDeadLetter(msg, attempts, reason),
  };
  private replay: ReplaySource | undefined;
  private gate: InboundGate | undefined;
  private session: ControllerSession | undefined;
  private consumption: Consumption | undefined;
  private consumptionStopping: Promise<void> = Promise.resolve();
  private unsubscribeStatus: (() => void) | undefined;
  private _address: { host: string; port: number } | undefined;

  constructor(cfg: RelayConfig, logger: Logger) {
    this.cfg = cfg;
    this.log = logger;
    this.metrics.outboxMax.set(cfg.outboxMax);
    this.metrics.readinessSource = () => this.readiness();
  }

  get state(): RelayState {
    return this._state;
  }

  /** The address the local server is bound to (the port is real even when 0 was asked for). */
  get address(): { host: string; port: number } {
    if (!this._address) throw new Error("relay not started");
    return this._address;
  }

  /**
   * Opens the store, starts the bus (stream and consumer in place), and listens. Throws with
   * a message fit to print when any of it cannot be done; nothing is left running then.
   */
  async start(): Promise<void> {
    if (this._state !== "new") throw new Error(`relay cannot start from state ${this._state}`);
    this._state = "starting";
    try {
      this.store = RelayStore.open(this.cfg.dataDir, {
        busyTimeoutMs: DAEMON_BUSY_TIMEOUT_MS,
        onBusy: (err, failures) => {
          if (failures === 1 || failures % 20 === 0) this.log.warn({ err: err.message, failures }, "relay store busy (another process holds it); retrying");
        },
      });
      // nats.js's internals only on JetStream: they load nats.js, which the embedded bus never needs.
      const fastPathStates = this.cfg.natsUrls.length > 0 ? (await import("./bus/nats-internals.js")).FAST_PATH_STATES : [];
      // await: ready for a createBus that loads only the configured bus's module (today it loads both).
      this.bus = await createBus(this.cfg, this.log, {
        settleFailed: (what, err) => {
          this.metrics.settleFailures.inc();
          this.log.warn({ err, what }, "could not settle a message with the bus; it will be redelivered");
        },
        connectionStale: (reason) => {
          this.metrics.natsStale.inc();
          this.log.error({ reason }, "NATS connection silently cut off; publishes go to the outbox until it answers again");
        },
        fastPath: (path, state) => this.metrics.setFastPath(path, state, fastPathStates),
      });
      await this.bus.start();
      this.tracing = await loadTracing({ instanceId: this.cfg.instanceId, bus: this.bus.name, logger: this.log });
      this.publisher = new Publisher({ bus: this.bus, store: this.store, outboxMax: this.cfg.outboxMax, metrics: this.metrics, logger: this.log });
      this.tracker = new DeliveryMachine({
        maxDeliver: this.cfg.maxDeliver,
        ackWaitMs: this.cfg.ackWaitMs,
        nackDelayMs: this.cfg.nackDelayMs,
        metrics: this.metrics,
        logger: this.log,
        tracing: this.tracing,
      });
      this.gate = new InboundGate({
        instanceId: this.cfg.instanceId,
        metrics: this.metrics,
        logger: this.log,
        deliver: (m, source) => this.tracker!.offer(m, source),
        refuse: (m, source, reason, onRecorded) => this.tracker!.refuse(m, source, reason, onRecorded),
      });
      this.replay = new ReplaySource({
        store: this.store,
        instanceId: this.cfg.instanceId,
        logger: this.log,
        offer: (m, source) => this.admit(m, source),
        republish: (row) => this.publisher!.requeueDeadLetter(row),
      });
      this.unsubscribeStatus = this.bus.onStatus((s) => {
        this.metrics.natsConnected.set(s.state === "connected" ? 1 : 0);
        if (s.state === "connected") {
          this.log.info("bus connected");
          this.publisher?.kick();
        } else if (s.state === "disconnected") this.log.warn({ reason: s.reason }, "bus disconnected");
      });
      this.metrics.natsConnected.set(this.bus.status().state === "connected" ? 1 : 0);
      this.server = new LocalServer({
        host: this.cfg.listenHost,
        port: this.cfg.listenPort,
        token: this.cfg.token,
        allowOrigins: this.cfg.allowOrigins,
        maxFrameBytes: this.cfg.maxFrameBytes,
        logger: this.log,
        hooks: {
          readiness: () => this.readiness(),
          metrics: async () => ({ contentType: this.metrics.registry.contentType, body: await this.metrics.registry.metrics() }),
          status: () => this.statusReporter().snapshot(),
          sessionOpened: (s) => this.onSessionOpened(s),
          sessionClosed: (s) => this.onSessionClosed(s),
          frame: (s, f) => this.onFrame(s, f),
          badFrame: (_s, e) => this.onBadFrame(e),
        },
      });
      this._address = await this.server.listen();
      this.warnIfExposed();
      this.publisher.kick(); // whatever a previous run left queued
      this._state = "running";
      this.log.info(
        { bus: this.bus.name, listen: `${this._address.host}:${this._address.port}`, stream: this.cfg.stream, outbox: this.publisher.outboxDepth },
        "relay running",
      );
    } catch (err) {
      await this.teardown();
      this._state = "closed";
      throw err;
    }
  }

  /**
   * Graceful drain: stop pulling, give in-flight deliveries up to --drain-timeout to be acked,
   * hand the rest back to the bus for redelivery, let dead letters being written land, close the
   * controller session, give the outbox up to --drain-timeout to reach the bus, disconnect.
   * What the outbox still holds stays on disk for the next start — and is logged, since a
   * data dir that goes with its pod (an emptyDir) takes it along.
   */
  async stop(): Promise<void> {
    if (this._state === "closing" || this._state === "closed") return;
    this._state = "closing";
    this.log.info("draining");
    this.replay?.stop();
    await this.stopConsuming();
    const t = this.tracker;
    const idle = (await t?.waitIdle(this.cfg.drainTimeoutMs)) ?? true;
    const released = t?.releaseAll(HANDBACK_DELAY_MS) ?? 0; // see HANDBACK_DELAY_MS
    if (!idle || released > 0) this.log.warn({ released }, "drain timeout: unacked deliveries handed back for redelivery");
    if (t && !(await t.waitRecorded(this.cfg.drainTimeoutMs)))
      this.log.error({ recording: t.recordingCount }, "dead letters still being written at shutdown are left to the bus, which redelivers them");
    await this.server?.closeSessions(CLOSE_NORMAL, "relay shutting down");
    await this.publisher?.settle();
    // Shown while the flush runs (probes and /metrics still answer), so a last scrape sees it.
    this.metrics.outboxUnflushedAtStop.set(this.publisher?.outboxDepth ?? 0);
    const outbox = (await this.publisher?.flushBeforeStop(this.cfg.drainTimeoutMs)) ?? 0;
    this.metrics.outboxUnflushedAtStop.set(outbox);
    await this.server?.close(CLOSE_NORMAL, "relay shutting down");
    if (outbox > 0)
      this.log.error(
        { outbox, dataDir: this.cfg.dataDir },
        "relay stopping with publishes still in the outbox: they are sent at the next start from this data dir, and lost if the data dir is not kept",
      );
    await this.teardown();
    this._state = "closed";
    this.log.info({ outbox }, "relay stopped");
  }

  private reporter: StatusReporter | undefined;
  /** The status page's data source, made on first use (the store and bus exist by then). */
  private statusReporter(): StatusReporter {
    this.reporter ??= new StatusReporter({
      instanceId: this.cfg.instanceId,
      stream: this.cfg.stream,
      busName: this.bus!.name,
      readinessMode: this.cfg.readiness,
      bus: () => this.bus!.status(),
      location: () => this.bus!.location(),
      readiness: () => this.readiness(),
      metrics: this.metrics,
      deadLetters: (limit) => this.store!.deadLetterSummary(limit),
      peers: () => this.bus!.peers(),
    });
    return this.reporter;
  }

  readiness(): ReadinessReport {
    if (this._state !== "running") return { ready: false, degraded: false, reason: `relay is ${this._state}` };
    return readiness({
      mode: this.cfg.readiness,
      state: this._state,
      busName: this.bus!.name,
      bus: this.bus!.status(),
      outboxDepth: this.publisher!.outboxDepth,
      outboxMax: this.cfg.outboxMax,
      storeProblem: this.publisher!.storeProblem,
    });
  }

  // ---- controller session ----

  private onSessionOpened(s: ControllerSession): void {
    if (this._state !== "running") {
      s.close(CLOSE_NORMAL, "relay shutting down");
      return;
    }
    const previous = this.session;
    if (previous) {
      // The newest connection wins: a controller that reconnects after a network blip must not
      // be locked out by its own half-dead old socket.
      this.log.warn({ previous: previous.number, session: s.number }, "new controller session supersedes the previous one");
      this.session = undefined;
      this.tracker!.detach();
      previous.close(CLOSE_SUPERSEDED, "superseded by a newer controller connection");
    }
    this.session = s;
    this.metrics.controllerConnected.set(1);
    s.send(readyFrame(this.cfg.instanceId, this.bus!.name));
    this.tracker!.attach((frame) => s.send(frame));
    this.startConsuming();
    this.replay!.start();
    this.log.info({ session: s.number }, "controller connected");
  }

  private onSessionClosed(s: ControllerSession): void {
    if (this.session !== s) return;
    this.session = undefined;
    this.metrics.controllerConnected.set(0);
    this.log.info({ session: s.number, parked: this.tracker!.inFlightCount }, "controller disconnected; pulling paused");
    this.replay!.stop();
    this.tracker!.detach();
    void this.stopConsuming();
  }

  private onFrame(s: ControllerSession, f: ClientFrame): void {
    if (s !== this.session) return; // a superseded socket still draining its input
    const t = this.tracker!;
    let result: "ok" | "unknown_delivery";
    switch (f.type) {
      case "publish":
        this.onPublish(s, f).catch((err: unknown) => {
          // Not expected (the publisher answers every failure itself), but never a crash.
          this.log.error({ err: (err as Error).message, id: f.id }, "publish failed unexpectedly");
          s.sendError({ id: f.id, code: "unavailable", message: "the relay could not take the message; retry" });
        });
        return;
      case "ack":
        result = t.ack(f.deliveryId);
        break;
      case "nack":
        result = t.nack(f.deliveryId, f.delayMs);
        break;
      case "working":
        result = t.working(f.deliveryId);
        break;
      case "reject":
        result = t.reject(f.deliveryId, f.reason);
        break;
    }
    if (result === "unknown_delivery") {
      this.metrics.invalidFrames.inc();
      s.sendError({ code: "unknown_delivery", message: `${f.type}: no delivery ${JSON.stringify(f.deliveryId)} is awaiting settlement (already settled, timed out or redelivered)` });
    }
  }

  private onBadFrame(e: FrameError): void {
    if (e.code === "forbidden_kind") {
      this.metrics.forbiddenKind.inc();
      this.log.warn({ id: e.id }, "refused to publish a credential-bearing kind");
    } else this.metrics.invalidFrames.inc();
  }

  private async onPublish(s: ControllerSession, f: PublishFrame): Promise<void> {
    if (this._state !== "running") {
      this.metrics.unavailable.inc();
      return s.sendError({ id: f.id, code: "unavailable", message: "the relay is shutting down" });
    }
    if (f.traceDropped !== undefined) {
      this.metrics.traceContextDropped.inc();
      this.log.warn({ id: f.id, reason: f.traceDropped }, "dropped the publish's trace context; publishing without it");
    }
    const msg = { id: f.id, kind: f.kind, origin: this.cfg.instanceId, publishedAt: isoNow(), payloadJson: f.payloadJson, traceparent: f.traceparent, tracestate: f.tracestate };
    // With tracing, the message carries the publish span's context (a child of the controller's).
    const span = this.tracing?.publish(msg);
    if (span) (msg.traceparent = span.traceparent), (msg.tracestate = span.tracestate);
    const outcome = await this.publisher!.publish(msg);
    span?.end(outcome.status);
    if (outcome.status === "unavailable" || outcome.status === "refused") {
      (outcome.status === "unavailable" ? this.metrics.unavailable : this.metrics.refused).inc();
      s.sendError({ id: f.id, code: outcome.status, message: outcome.reason });
      return;
    }
    this.metrics.published.inc();
    s.send(publishedFrame(f.id, outcome.status === "queued"));
  }

  // ---- bus consumption ----

  private startConsuming(): void {
    if (this.consumption) return;
    // A stop still under way must finish first, or two pull loops would share one consumer.
    const begin = (): void => {
      if (this.consumption || !this.session || this._state !== "running") return;
      this.consumption = this.bus!.consume((m) => this.onBusMessage(m));
    };
    void this.consumptionStopping.then(begin);
  }

  private stopConsuming(): Promise<void> {
    const c = this.consumption;
    this.consumption = undefined;
    if (c) this.consumptionStopping = this.consumptionStopping.then(() => c.stop()).catch((err) => {
      this.log.warn({ err }, "stopping the bus consumer failed");
    });
    return this.consumptionStopping;
  }

  private onBusMessage(m: InboundMessage): void {
    if (this.tracing && m.origin !== this.cfg.instanceId) this.tracing.receive(m);
    this.admit(m, this.busSource);
  }

  /**
   * The one entry point of messages into delivery, from the bus and from replay alike: the
   * inbound gate filters echoes and turns whatever breaks the inbound policy into dead letters.
   */
  private admit(m: InboundMessage, source: ArrivalSource): void {
    this.gate!.admit(m, source);
  }

  private warnIfExposed(): void {
    const host = this.cfg.listenHost;
    const loopback = host === "localhost" || (net.isIP(host) === 4 ? host.startsWith("127.") : host === "::1");
    if (!loopback && !this.cfg.token)
      this.log.warn(
        { listen: `${host}:${this.cfg.listenPort}` },
        "LISTENING ON A NON-LOOPBACK ADDRESS WITHOUT A TOKEN: anyone who can reach this port can publish and read notifications; set --token",
      );
  }

  private async teardown(): Promise<void> {
    this.unsubscribeStatus?.();
    this.tracker?.close();
    this.publisher?.close();
    try {
      await this.bus?.close();
    } catch (err) {
      this.log.warn({ err }, "closing the bus failed");
    }
    this.store?.close();
    await this.tracing?.shutdown();
  }
}
