// The JetStream bus's consume loop: keeps one consume() of this relay's durable pull consumer
// going for each consumption, hands every delivery on as a JsInbound (jetstream-inbound.ts), and
// replaces a consume() that broke — missed heartbeats, a new consumer leader, the consumer or the
// stream deleted under it (then recreated, the bus not ready until they are back). On a hot path
// (dispatch, and the settler every settle goes through); the rest runs only when something broke.

import { setTimeout as sleep } from "node:timers/promises";
import type { MsgHdrs, Subscription } from "@nats-io/transport-node";
import type { ConsumerMessages, JsMsg } from "@nats-io/jetstream";
import type { Consumption, InboundMessage } from "./bus.js";
import { backoffMs } from "../clock.js";
import type { Logger } from "../log.js";
import type { JetStreamConnection } from "./jetstream-connection.js";
import { describe, isConsumerNotFound, isStreamNotFound } from "./jetstream-errors.js";
import { JsInbound, type Settler } from "./jetstream-inbound.js";
import type { StreamProvisioning } from "./jetstream-provisioning.js";
import { ackInfo, readHeaders } from "./jetstream-wire.js";
import type { NatsFastPaths } from "./nats-internals.js";

/** Bounded pull batch: the consumer's max_ack_pending is the real in-flight limit. */
const MAX_PULL_BATCH = 1_000;
/**
 * A pull request lives at most one ack wait (nats.js: 1 s to its default 30 s). The server
 * redelivers into pending pull requests, and through a silent partition those are a dead
 * connection: with a pull outliving several ack waits, every redelivery went into the void and
 * counted against max_deliver until the server gave up — messages lost without an arrival to
 * dead-letter (found by npm run chaos). A pull no longer than the ack wait takes at most one.
 */
export function pullExpiresMs(ackWaitMs: number): number {
  return Math.max(1_000, Math.min(30_000, ackWaitMs));
}
/** consume() re-pulls on its own after missed heartbeats; restart it when that keeps failing. */
const HEARTBEATS_MISSED_RESTART = 4;
/** After "consumer deleted", give the server a moment to finish the delete before recreating. */
const RECREATE_DELAY_MS = 1_000;

interface ConsumeRun {
  stopped: boolean;
  /** Aborted by stop(): cuts short any back-off wait. */
  abort: AbortController;
  messages?: ConsumerMessages;
  /** Set by the status watcher when the current consume() must be replaced. */
  restart?: { reason: string; recreate: boolean };
}

/** What the consume loop uses of the connection (jetstream-connection.ts). */
export type ConsumeContext = Pick<
  JetStreamConnection,
  "opts" | "log" | "fast" | "nc" | "js" | "jsm" | "current" | "closing" | "missing" | "setStatus" | "cork"
>;
/** What it uses of provisioning (jetstream-provisioning.ts): bringing the stream and consumer back. */
export type Reprovisioning = Pick<StreamProvisioning, "ensureStream" | "ensureConsumer" | "consumerInfo">;

export class JetStreamConsumeLoop {
  private readonly conn: ConsumeContext;
  private readonly provisioning: Reprovisioning;
  private readonly log: Logger;
  private readonly fast: NatsFastPaths;
  private readonly runs = new Set<{ run: ConsumeRun; done: Promise<void> }>();

  constructor(conn: ConsumeContext, provisioning: Reprovisioning) {
    this.conn = conn;
    this.provisioning = provisioning;
    this.log = conn.log;
    this.fast = conn.fast;
  }

  consume(onMessage: (msg: InboundMessage) => void): Consumption {
    if (!this.conn.js) throw new Error("JetStreamBus.consume() called before start()");
    const run: ConsumeRun = { stopped: false, abort: new AbortController() };
    const done = this.consumeLoop(run, onMessage).catch((err) => this.log.error({ err: describe(err) }, "consume loop failed"));
    const entry = { run, done };
    this.runs.add(entry);
    return {
      stop: async () => {
        this.stopRun(run);
        await entry.done;
        this.runs.delete(entry);
      },
    };
  }

  /** close(): stops every consumption and waits for its loop to end. */
  async stopAll(): Promise<void> {
    await Promise.all([...this.runs].map(async (e) => {
      this.stopRun(e.run);
      await e.done;
    }));
    this.runs.clear();
  }

  private stopRun(run: ConsumeRun): void {
    if (run.stopped) return;
    run.stopped = true;
    run.abort.abort();
    // Ends the iteration in consumeLoop, which the caller then awaits.
    run.messages?.stop();
  }

  /** Keeps one consume() going until stopped, replacing it when it breaks. */
  private async consumeLoop(run: ConsumeRun, onMessage: (msg: InboundMessage) => void): Promise<void> {
    const elections = this.watchLeaderElections(run);
    try {
      await this.consumeUntilStopped(run, onMessage);
    } finally {
      elections?.unsubscribe();
    }
  }

  /**
   * In a cluster, a pull request pending on a consumer leader that died is lost without a word:
   * consume() would notice only after two missed heartbeats (30-45 s). The new consumer leader
   * announces itself with an advisory, so re-pull at once. (A new stream leader alone does not
   * break the pull.) Needs subscribe permission on $JS.EVENT.>; without it the heartbeat
   * fallback remains.
   */
  private watchLeaderElections(run: ConsumeRun): Subscription | undefined {
    const nc = this.conn.nc;
    if (!nc || nc.isClosed()) return undefined;
    const subject = `$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.${this.conn.opts.stream}.${this.conn.opts.instanceId}`;
    return nc.subscribe(subject, {
      callback: (err) => {
        if (err) {
          this.log.warn({ err: describe(err), subject }, "cannot watch consumer leader elections");
          return;
        }
        if (run.messages) this.restartConsume(run, run.messages, "new consumer leader elected", false);
      },
    });
  }

  private async consumeUntilStopped(run: ConsumeRun, onMessage: (msg: InboundMessage) => void): Promise<void> {
    let failures = 0;
    while (!run.stopped && this.conn.nc && !this.conn.nc.isClosed()) {
      const messages = await this.openConsume();
      if (!messages) {
        await this.backoff(run, failures++);
        continue;
      }
      if (run.stopped) {
        // stop() came while consume() was being set up. (close() would wait for an iteration.)
        messages.stop();
        break;
      }
      failures = 0;
      run.messages = messages;
      run.restart = undefined;
      this.watchConsumeStatus(messages, run);
      try {
        // After stop(), what was already pulled is still handed over (the iteration ends after
        // the buffer, where stop() queued its end): the relay parks or hands it back, and it
        // alone can turn a last arrival into a dead letter. Nak'ing it here lost that arrival.
        for await (const m of messages) this.dispatch(m, onMessage);
      } catch (err) {
        this.log.warn({ err: describe(err) }, "consume ended with an error; restarting it");
      }
      run.messages = undefined;
      if (run.stopped) break;
      // Set by the status watcher while we were iterating (TS cannot see that).
      const restart = run.restart as ConsumeRun["restart"];
      if (restart?.recreate) {
        // "consumer deleted" reaches us while the server is still removing it: recreating at once
        // races that removal (2.9 then fails the delete with "directory not empty").
        await this.pause(run, RECREATE_DELAY_MS);
        if (!run.stopped) await this.recreate();
      } else if (!restart) await this.backoff(run, failures++);
    }
  }

  private async openConsume(): Promise<ConsumerMessages | undefined> {
    const opts = this.conn.opts;
    try {
      const consumer = await this.conn.js!.consumers.get(opts.stream, opts.instanceId);
      // consume() keeps a pull pending, so a message after long silence arrives at once.
      return await consumer.consume({ max_messages: Math.min(opts.maxInFlight, MAX_PULL_BATCH), expires: pullExpiresMs(opts.ackWaitMs) });
    } catch (err) {
      if (isConsumerNotFound(err) || isStreamNotFound(err)) {
        this.log.warn({ consumer: opts.instanceId }, "consumer is gone; recreating it");
        await this.recreate();
      } else {
        this.log.warn({ err: describe(err) }, "cannot start consuming yet; will retry");
      }
      return undefined;
    }
  }

  /** Ends the current consume() so that consumeLoop opens a new one (after recreating, if asked). */
  private restartConsume(run: ConsumeRun, messages: ConsumerMessages, reason: string, recreate: boolean): void {
    if (run.restart || run.stopped || run.messages !== messages) return;
    this.log.warn({ reason }, "restarting consume");
    run.restart = { reason, recreate };
    if (recreate) this.markMissing(); // not ready from now until recreate() has them back
    messages.stop();
  }

  /** Watches one consume()'s notifications and replaces it when it needs replacing. */
  private watchConsumeStatus(messages: ConsumerMessages, run: ConsumeRun): void {
    const restart = (reason: string, recreate: boolean): void => this.restartConsume(run, messages, reason, recreate);
    void (async () => {
      for await (const s of messages.status()) {
        if (s.type === "next" || s.type === "heartbeat") this.log.trace({ status: s }, "consume status");
        else this.log.debug({ status: s }, "consume status");
        switch (s.type) {
          case "heartbeats_missed":
            this.log.debug({ count: s.count }, "consumer heartbeats missed");
            if (s.count >= HEARTBEATS_MISSED_RESTART) restart(`${s.count} heartbeats missed`, false);
            break;
          case "consumer_not_found":
          case "consumer_deleted":
            restart(s.type.replace("_", " "), true);
            break;
          case "stream_not_found":
            restart("stream not found", true);
            break;
          case "exceeded_limits":
            this.log.warn({ description: s.description }, "pull request exceeded a server limit");
            break;
          default:
            break;
        }
      }
    })().catch((err) => this.log.debug({ err: describe(err) }, "consume status watcher ended"));
  }

  // ---- the stream or consumer gone ------------------------------------------------------------

  /**
   * Brings back the stream and consumer after they vanished under a running relay. Until they
   * are back the bus reports itself disconnected: not ready, and publishes go to the outbox.
   */
  private async recreate(): Promise<void> {
    const conn = this.conn;
    if (conn.closing) return;
    this.markMissing();
    try {
      await this.provisioning.ensureStream(conn.jsm!);
      await this.provisioning.ensureConsumer(conn.jsm!);
      conn.missing = undefined;
      if (!conn.closing && conn.nc && !conn.nc.isClosed()) conn.setStatus({ state: "connected" });
    } catch (err) {
      this.log.error({ err: describe(err) }, "cannot recreate the stream/consumer; will retry");
    }
  }

  private markMissing(): void {
    const conn = this.conn;
    const reason = `stream ${conn.opts.stream} or consumer ${conn.opts.instanceId} is missing; recreating it`;
    conn.missing = reason;
    if (conn.current.state === "connected") conn.setStatus({ state: "disconnected", reason });
  }

  /** After a reconnect: are the stream and this consumer still there? Recreates them if not. */
  async checkTopology(): Promise<void> {
    const conn = this.conn;
    if (!conn.jsm || conn.closing) return;
    let gone: boolean;
    try {
      gone = (await this.provisioning.consumerInfo(conn.jsm)) === null;
    } catch (err) {
      if (!isStreamNotFound(err)) {
        this.log.debug({ err: describe(err) }, "cannot check the stream/consumer after reconnecting");
        return;
      }
      gone = true;
    }
    if (gone) await this.recreate();
    else if (conn.missing && !conn.closing) {
      conn.missing = undefined;
      conn.setStatus({ state: "connected" });
    }
  }

  // ---- waiting --------------------------------------------------------------------------------

  private async backoff(run: ConsumeRun, failures: number): Promise<void> {
    await this.pause(run, backoffMs(failures, 5_000, 250));
  }

  /** Waits ms, or less if the consumption is stopped meanwhile. */
  private async pause(run: ConsumeRun, ms: number): Promise<void> {
    await sleep(ms, undefined, { signal: run.abort.signal }).catch(() => undefined);
  }

  // ---- deliveries -----------------------------------------------------------------------------

  private dispatch(m: JsMsg, onMessage: (msg: InboundMessage) => void): void {
    try {
      onMessage(this.toInbound(m));
    } catch (err) {
      this.log.error({ err: describe(err), seq: m.info.streamSequence }, "message handler threw");
    }
  }

  private toInbound(m: JsMsg): InboundMessage {
    this.fast.checkDelivery(m, this.readBlock, this.readPublic, ackInfo);
    return new JsInbound(m, this.settler);
  }

  private readonly readBlock = (block: Uint8Array): Record<string, string> => ({ ...readHeaders({ headers: undefined }, block) });
  private readonly readPublic = (h: MsgHdrs | undefined): Record<string, string> => ({ ...readHeaders({ headers: h }) });

  /** What a JsInbound needs to settle: cork the socket for the batch, log a failed settle. */
  private readonly settler: Settler = {
    headerBlock: (m) => this.fast.headerBlock(m),
    reply: (m) => this.fast.reply(m),
    cork: () => this.conn.cork(),
    respond: (reply, data) => {
      const nc = this.conn.nc;
      if (!nc) throw new Error("not connected");
      nc.publish(reply, data);
    },
    failed: (err, seq, what) => {
      this.log.debug({ err: describe(err), seq, what }, "could not settle message");
      this.conn.opts.hooks?.settleFailed?.(what, describe(err));
    },
  };
}
