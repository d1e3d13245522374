// The stream and this relay's consumer on the server: the configuration the relay wants for them,
// creating them or bringing existing ones to it (at start-up, and again when they vanish under a
// running relay), and reading their state back. Every JetStream API request here rides out a short
// outage (retryTransient): a cluster electing a leader answers 503.

import { setTimeout as sleep } from "node:timers/promises";
import { nanos, type NatsConnection } from "@nats-io/transport-node";
import {
  AckPolicy,
  DeliverPolicy,
  DiscardPolicy,
  RetentionPolicy,
  StorageType,
  jetstreamManager,
  type ConsumerConfig,
  type ConsumerInfo,
  type JetStreamManager,
  type StreamConfig,
} from "@nats-io/jetstream";
import { BusStartError, type StreamInfo } from "./bus.js";
import type { JetStreamConnection } from "./jetstream-connection.js";
import { describe, isConsumerNotFound, isNotEnabled, isStreamNotFound, isTransient } from "./jetstream-errors.js";
import { SUBJECT_FILTER } from "./jetstream-wire.js";

/** "JetStream not enabled" is also what a cluster answers during a leader election: retry this long. */
const JS_CHECK_WINDOW_MS = 5_000;
/** Each JetStream API request (stream/consumer info, create, update). */
export const API_TIMEOUT_MS = 4_000;
const DUPLICATE_WINDOW_MS = 2 * 60_000;

/** What provisioning needs: the relay's settings, where NATS is (for messages), the bus's logger. */
export type ProvisioningContext = Pick<JetStreamConnection, "opts" | "where" | "log">;

export class StreamProvisioning {
  constructor(private readonly ctx: ProvisioningContext) {}

  /**
   * A server without -js answers the JetStream API with "no responders"; so does a cluster while it
   * elects a leader. Retry for a few seconds before calling it a configuration error.
   */
  async checkJetStream(nc: NatsConnection): Promise<JetStreamManager> {
    const jsm = await jetstreamManager(nc, { timeout: API_TIMEOUT_MS, checkAPI: false });
    const until = Date.now() + JS_CHECK_WINDOW_MS;
    for (let attempt = 0; ; attempt++) {
      try {
        await jsm.getAccountInfo();
        return jsm;
      } catch (err) {
        if (!isTransient(err) && !isNotEnabled(err)) throw err;
        if (Date.now() >= until)
          throw new BusStartError(`JetStream is not enabled on the NATS server at ${this.ctx.where} (${describe(err)}); start nats-server with -js`, { cause: err });
        this.ctx.log.debug({ err: describe(err), attempt }, "JetStream not available yet; retrying");
        await sleep(Math.min(250 * (attempt + 1), 1_000));
      }
    }
  }

  streamConfig(): Partial<StreamConfig> & { name: string } {
    const opts = this.ctx.opts;
    return {
      name: opts.stream,
      subjects: [SUBJECT_FILTER],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      discard: DiscardPolicy.Old,
      max_age: nanos(opts.maxAgeMs),
      // The server refuses a duplicate window longer than max_age.
      duplicate_window: nanos(Math.min(DUPLICATE_WINDOW_MS, opts.maxAgeMs)),
      num_replicas: opts.replicas,
    };
  }

  /** Creates the stream, or verifies it; many relays may race here on a fresh server. */
  async ensureStream(jsm: JetStreamManager): Promise<void> {
    const where = this.ctx.where;
    const want = this.streamConfig();
    try {
      await retryTransient(() => jsm.streams.add({ ...want }));
      this.ctx.log.debug({ stream: want.name }, "stream created or already identical");
      return;
    } catch (err) {
      if (/subjects overlap/i.test(describe(err)))
        throw new BusStartError(
          `cannot create stream ${want.name} on NATS at ${where}: its subject ${SUBJECT_FILTER} overlaps another stream's (${describe(err)}); remove that stream or narrow its subjects`,
          { cause: err },
        );
      // Exists with another config (or created by a racing relay a moment ago): look and decide.
      if (!/already in use/i.test(describe(err)))
        throw new BusStartError(`cannot create stream ${want.name} on NATS at ${where}: ${describe(err)}`, { cause: err });
    }
    await this.reconcileStream(jsm, want);
  }

  private async reconcileStream(jsm: JetStreamManager, want: Partial<StreamConfig> & { name: string }): Promise<void> {
    const where = this.ctx.where;
    const have = (await retryTransient(() => jsm.streams.info(want.name))).config;
    const fatal: string[] = [];
    if (!sameSet(have.subjects ?? [], want.subjects!)) fatal.push(`subjects are [${(have.subjects ?? []).join(", ")}], not [${SUBJECT_FILTER}]`);
    if (have.storage !== want.storage) fatal.push(`storage is ${have.storage}, not ${want.storage}`);
    if (have.retention !== want.retention) fatal.push(`retention is ${have.retention}, not ${want.retention}`);
    if (fatal.length > 0)
      throw new BusStartError(
        `stream ${want.name} on NATS at ${where} exists with an incompatible configuration: ${fatal.join("; ")}. Use another --stream name or delete that stream`,
      );

    // Retention, replicas and the duplicate window follow the relay's settings (a deliberate update).
    const changes: Partial<StreamConfig> = {};
    if (have.max_age !== want.max_age) changes.max_age = want.max_age;
    if (have.duplicate_window !== want.duplicate_window) changes.duplicate_window = want.duplicate_window;
    if (have.num_replicas !== want.num_replicas) changes.num_replicas = want.num_replicas;
    if (have.discard !== want.discard) changes.discard = want.discard;
    if (Object.keys(changes).length === 0) return;
    const before = Object.fromEntries(Object.keys(changes).map((k) => [k, have[k as keyof StreamConfig]]));
    this.ctx.log.warn({ stream: want.name, before, after: changes }, "stream exists with different settings; updating it to this relay's settings");
    try {
      await retryTransient(() => jsm.streams.update(want.name, changes));
    } catch (err) {
      throw new BusStartError(`cannot update stream ${want.name} on NATS at ${where} to this relay's settings: ${describe(err)}`, { cause: err });
    }
  }

  consumerConfig(existing?: ConsumerConfig): Partial<ConsumerConfig> {
    const opts = this.ctx.opts;
    return {
      durable_name: opts.instanceId,
      ack_policy: AckPolicy.Explicit,
      // The deliver policy of an existing consumer cannot be changed: keep it.
      deliver_policy: existing?.deliver_policy ?? DeliverPolicy.New,
      filter_subject: SUBJECT_FILTER,
      ack_wait: nanos(opts.ackWaitMs),
      max_deliver: opts.maxDeliver,
      max_ack_pending: opts.maxInFlight,
      inactive_threshold: nanos(opts.inactiveThresholdMs),
    };
  }

  /**
   * Creates this instance's durable consumer, or brings an existing one to the relay's settings.
   * (On 2.9 re-adding a consumer with another config silently updates it; we do it knowingly.)
   */
  async ensureConsumer(jsm: JetStreamManager): Promise<void> {
    const { stream, instanceId } = this.ctx.opts;
    const existing = await this.consumerInfo(jsm);
    const want = this.consumerConfig(existing?.config);
    if (existing) {
      const changed = changedFields(existing.config, want);
      if (changed.length === 0) return;
      this.ctx.log.info({ consumer: instanceId, changed }, "consumer exists with different settings; updating it to this relay's settings");
    }
    try {
      await retryTransient(() => jsm.consumers.add(stream, { ...want }));
    } catch (err) {
      throw new BusStartError(`cannot create or update consumer ${instanceId} on stream ${stream} at ${this.ctx.where}: ${describe(err)}`, { cause: err });
    }
  }

  /** This instance's consumer, or null when it has none. */
  async consumerInfo(jsm: JetStreamManager): Promise<ConsumerInfo | null> {
    try {
      return await retryTransient(() => jsm.consumers.info(this.ctx.opts.stream, this.ctx.opts.instanceId));
    } catch (err) {
      if (isConsumerNotFound(err)) return null;
      throw err;
    }
  }

  /** Reads the stream's and this consumer's state; changes nothing. */
  async readInfo(jsm: JetStreamManager): Promise<StreamInfo> {
    const { stream } = this.ctx.opts;
    let si;
    try {
      si = await retryTransient(() => jsm.streams.info(stream));
    } catch (err) {
      if (isStreamNotFound(err))
        throw new BusStartError(
          `stream ${stream} does not exist on NATS at ${this.ctx.where}: no relay with --stream ${stream} has started against this server yet`,
          { cause: err },
        );
      throw err;
    }
    const ci = await this.consumerInfo(jsm);
    return {
      bus: "jetstream",
      stream,
      messages: si.state.messages,
      bytes: si.state.bytes,
      firstSeq: si.state.first_seq,
      lastSeq: si.state.last_seq,
      consumer: ci && {
        name: ci.name,
        pending: ci.num_pending,
        ackPending: ci.num_ack_pending,
        redelivered: ci.num_redelivered,
      },
    };
  }
}

/** Retries an API call through a short outage (a cluster electing a leader answers 503). */
async function retryTransient<T>(fn: () => Promise<T>, windowMs = JS_CHECK_WINDOW_MS): Promise<T> {
  const until = Date.now() + windowMs;
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (!(isTransient(err) || isNotEnabled(err)) || Date.now() >= until) throw err;
      await sleep(Math.min(250 * (attempt + 1), 1_000));
    }
  }
}

function sameSet(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x) => b.includes(x));
}

/** Names of the fields of `want` whose value differs in `have`. */
function changedFields(have: ConsumerConfig, want: Partial<ConsumerConfig>): string[] {
  return (Object.keys(want) as (keyof ConsumerConfig)[]).filter((k) => have[k] !== want[k]);
}
