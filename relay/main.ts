#!/usr/bin/env node
// uptrakit-relay: the command line. `run` (the default) starts the daemon; `dlq` and `stream`
// are operator commands on the data dir and the bus.

import { Command, InvalidArgumentError, Option } from "commander";
import { addConnectionOptions, addRunOptions, makeOption, parseDuration, toRelayConfig, type RelayConfig } from "./config.js";
import { redactCredentials } from "./redact.js";
import { createLogger } from "./log.js";
import { Relay } from "./relay.js";
import { RelayStore } from "./store/store.js";
import { createBus } from "./bus/create.js";
import type { StreamInfo } from "./bus/bus.js";
import { formatPeersTable } from "./peers.js";
// doctor and peers load their checks when run (import() in their actions): `run` never needs them.

const program = new Command("uptrakit-relay")
  .description("Sidecar relay: cross-instance push notifications for Uptrakit controllers over NATS JetStream or an embedded SQLite bus")
  .showHelpAfterError("(run with --help for the options)")
  // commander echoes a rejected option value: never print the credentials of a URL.
  .configureOutput({ outputError: (str, write) => write(redactCredentials(str)) });

function fail(message: string): never {
  process.stderr.write(`uptrakit-relay: ${redactCredentials(message)}\n`);
  process.exit(1);
}

/** The config, or a clear exit (an unreadable secret file, conflicting credentials). */
function configOrFail(opts: Record<string, unknown>): RelayConfig {
  try {
    return toRelayConfig(opts);
  } catch (err) {
    fail((err as Error).message);
  }
}

// ---- run ----

addRunOptions(
  program
    .command("run", { isDefault: true })
    .description("run the relay daemon (the default command)"),
).action(async (opts: Record<string, unknown>) => {
  const cfg = configOrFail(opts);
  const log = createLogger(cfg.logLevel, cfg.instanceId);
  const relay = new Relay(cfg, log);
  let stopping = false;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (stopping) {
      log.warn({ signal }, "second signal: exiting without draining");
      process.exit(1);
    }
    stopping = true;
    log.info({ signal }, "signal received");
    relay.stop().then(
      () => process.exit(0),
      (err) => {
        log.error({ err }, "error while stopping");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  try {
    await relay.start();
  } catch (err) {
    log.fatal({ err: (err as Error).message }, "cannot start");
    fail(`cannot start: ${(err as Error).message}`);
  }
});

// ---- dlq ----

const dataDirOption = (): Option => makeOption("dataDir");

function openStore(opts: { dataDir: string }): RelayStore {
  try {
    return RelayStore.open(toRelayConfig({ dataDir: opts.dataDir }).dataDir);
  } catch (err) {
    fail((err as Error).message);
  }
}

const dlq = program.command("dlq").description("list, replay or purge dead letters in a relay's data dir");

dlq
  .command("list")
  .description("print the dead letters")
  .addOption(dataDirOption())
  .option("--json", "print a JSON array")
  .action((opts: { dataDir: string; json?: boolean }) => {
    const store = openStore(opts);
    const rows = store.deadLetters();
    store.close();
    if (opts.json) {
      const out = rows.map((r) => ({
        seq: r.seq,
        id: r.id,
        kind: r.kind,
        origin: r.origin,
        attempts: r.attempts,
        reason: r.reason,
        publishedAt: r.publishedAt,
        deadAt: r.deadAt,
        replayRequested: r.replayRequested,
        ...payloadOf(r.payloadJson),
        ...(r.traceparent === undefined ? {} : { traceparent: r.traceparent, tracestate: r.tracestate }),
      }));
      process.stdout.write(JSON.stringify(out, null, 2) + "\n");
      return;
    }
    if (rows.length === 0) {
      process.stdout.write("no dead letters\n");
      return;
    }
    for (const r of rows)
      process.stdout.write(
        `#${r.seq}  ${r.deadAt}  ${r.kind}  id=${r.id}  origin=${r.origin}  attempts=${r.attempts}${r.replayRequested ? "  (replay pending)" : ""}\n    ${r.reason}\n`,
      );
    process.stdout.write(`${rows.length} dead letter${rows.length === 1 ? "" : "s"}\n`);
  });

dlq
  .command("replay")
  .description("deliver a dead letter (by message id, or #seq from `dlq list`) to this relay's controller again, with fresh attempts")
  .argument("<id>", "message id, or the seq shown by `dlq list`")
  .addOption(dataDirOption())
  .action((id: string, opts: { dataDir: string }) => {
    const store = openStore(opts);
    const n = store.requestReplay(id.replace(/^#/, ""));
    store.close();
    if (n === 0) fail(`no dead letter with id or seq ${JSON.stringify(id)}`);
    process.stdout.write(
      `${n} dead letter${n === 1 ? "" : "s"} queued for replay; the running relay delivers ${n === 1 ? "it" : "them"} to its controller ` +
        `(or, for a publish of its own that the bus refused, publishes ${n === 1 ? "it" : "them"} again)\n`,
    );
  });

dlq
  .command("purge")
  .description("remove dead letters: all of them, or those older than a duration")
  .addOption(dataDirOption())
  .addOption(
    new Option("--older-than <duration>", "only those dead for longer than this (e.g. 7d, 12h)").argParser((v) => {
      try {
        return parseDuration(v);
      } catch {
        throw new InvalidArgumentError("expected a duration such as 30m, 12h or 7d");
      }
    }),
  )
  .action((opts: { dataDir: string; olderThan?: number }) => {
    const store = openStore(opts);
    const n = store.purgeDeadLetters(opts.olderThan === undefined ? undefined : new Date(Date.now() - opts.olderThan));
    store.close();
    process.stdout.write(`${n} dead letter${n === 1 ? "" : "s"} removed\n`);
  });

// ---- stream info ----

async function printStreamInfo(opts: Record<string, unknown>): Promise<void> {
  const cfg: RelayConfig = configOrFail(opts);
  const log = createLogger(cfg.logLevel === "info" ? "warn" : cfg.logLevel, cfg.instanceId);
  // inspect(), not start(): a diagnostic must never create or reconcile the stream or a consumer
  // (start() would set the stream to *these* options, e.g. 1 replica without --replicas).
  const bus = await createBus(cfg, log);
  let info: StreamInfo;
  try {
    info = await bus.inspect();
  } catch (err) {
    fail((err as Error).message);
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify(info, null, 2) + "\n");
    return;
  }
  const c = info.consumer;
  process.stdout.write(
    [
      `bus:        ${info.bus}`,
      `stream:     ${info.stream}`,
      `messages:   ${info.messages} (${info.bytes} bytes, seq ${info.firstSeq}..${info.lastSeq})`,
      c
        ? `consumer:   ${c.name}: ${c.pending} pending, ${c.ackPending} awaiting ack, ${c.redelivered} redelivered`
        : `consumer:   none for instance ${cfg.instanceId} (a relay creates its consumer when it starts)`,
    ].join("\n") + "\n",
  );
}

const stream = program.command("stream").description("inspect the stream and this instance's consumer");
for (const cmd of [stream.command("info"), program.command("status")]) {
  addConnectionOptions(cmd.description("print the stream's and this instance's consumer state (read-only: creates and changes nothing)").option("--json", "print JSON")).action(printStreamInfo);
}

// ---- doctor, peers ----

addConnectionOptions(
  program
    .command("doctor")
    .description("check NATS, JetStream, the stream, this relay's consumer, permissions, peers, clocks and the data dir (read-only); exit 0 when all pass, 1 otherwise, 2 when it could not run")
    .addOption(makeOption("outboxMax"))
    .option("--json", "print the report as JSON")
    // An invalid option is "could not run" (2), not a failed check (1).
    .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 2)),
).action(async (opts: Record<string, unknown>) => {
  let cfg: RelayConfig;
  try {
    cfg = toRelayConfig(opts);
  } catch (err) {
    process.stderr.write(`uptrakit-relay: ${redactCredentials((err as Error).message)}\n`);
    process.exit(2);
  }
  try {
    const [{ runDoctor }, { renderText }] = await Promise.all([import("./doctor/doctor.js"), import("./doctor/report.js")]);
    const report = await runDoctor(cfg, createLogger(cfg.logLevel === "info" ? "warn" : cfg.logLevel, cfg.instanceId));
    process.stdout.write(redactCredentials(opts.json ? JSON.stringify(report, null, 2) + "\n" : renderText(report)));
    process.exit(report.ok ? 0 : 1);
  } catch (err) {
    process.stderr.write(`uptrakit-relay: doctor could not finish: ${redactCredentials((err as Error).message)}\n`);
    process.exit(2);
  }
});

addConnectionOptions(
  program.command("peers").description("print the other relays on this stream or bus file: last active, messages published in the retention window (read-only)").option("--json", "print JSON"),
).action(async (opts: Record<string, unknown>) => {
  const cfg = configOrFail(opts);
  let peers;
  try {
    const { readPeers } = await import("./doctor/peers-command.js");
    peers = await readPeers(cfg, createLogger(cfg.logLevel === "info" ? "warn" : cfg.logLevel, cfg.instanceId));
  } catch (err) {
    fail((err as Error).message);
  }
  process.stdout.write(opts.json ? JSON.stringify(peers, null, 2) + "\n" : formatPeersTable(peers));
  process.exit(0);
});

await program.parseAsync(process.argv);

/** A dead letter's payload for --json: rejected inbound messages may hold no JSON, or none at all. */
function payloadOf(text: string): { payload: unknown } | { payloadText: string } | { payloadWithheld: true } {
  if (text === "") return { payloadWithheld: true }; // a credential-bearing kind's: never stored
  try {
    return { payload: JSON.parse(text) as unknown };
  } catch {
    return { payloadText: text };
  }
}
