// The option table in relay/config.ts is the one statement of every option: commander's options,
// the parsed RelayConfig, --help and the README's table come from it. These tests keep the
// flags and env vars operators' scripts use, the defaults, and the README in step with the table;
// and they pin down how secrets are read (URL credentials, `_FILE` forms, precedence) without
// ever echoing one. In process: commander is run on the real table, no relay is started.

import t from "tap";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Command } from "commander";
import { ConfigError, ENV_VARS, addConnectionOptions, addRunOptions, optionKeys, renderOptionsTable, toRelayConfig, type RelayConfig } from "../relay/config.js";
import { parseNatsServers } from "../relay/secrets.js";
import { redactCredentials } from "../relay/redact.js";
import { README, withOptionsTable } from "../scripts/docs-options.js";

/** Runs `run`'s options over argv and env as the relay does; resolves to the config or the relay's message. */
function parse(argv: string[], env: Record<string, string> = {}, add = addRunOptions): RelayConfig {
  const saved = { ...process.env };
  for (const k of Object.keys(process.env)) if (k.startsWith("UPTRAKIT_")) delete process.env[k];
  Object.assign(process.env, env);
  let err = "";
  try {
    const cmd = add(new Command("run")).exitOverride().configureOutput({ writeOut: () => {}, writeErr: (s) => void (err += s) });
    try {
      cmd.parse(argv, { from: "user" });
    } catch (e) {
      throw new Error(err.trim() || (e as Error).message);
    }
    return toRelayConfig(cmd.opts());
  } finally {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
  }
}

/** The message parse() fails with. */
function failure(argv: string[], env: Record<string, string> = {}): string {
  try {
    parse(argv, env);
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error(`expected ${JSON.stringify(argv)} to be refused`);
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-config-"));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
function file(name: string, content: string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, content);
  return f;
}

// ---- one table -------------------------------------------------------------------------------------

t.test("each entry's key is commander's name for its flag", async (tt) => {
  for (const { key, attribute } of optionKeys()) tt.equal(attribute, key, `${key}`);
});

t.test("README.md's option table is the one rendered from the entries", async (tt) => {
  const readme = fs.readFileSync(README, "utf8");
  const expected = withOptionsTable(readme, renderOptionsTable());
  tt.ok(
    readme === expected,
    readme === expected ? "README.md is up to date" : `README.md's option table differs from relay/config.ts: run \`npm run docs:options\`, or paste:\n${renderOptionsTable()}`,
  );
});

// Every flag and env var users' scripts may already use (the table before the `_FILE` forms).
const EXISTING: Array<[string, string]> = [
  ["--nats-url", "UPTRAKIT_NATS_URL"], ["--bus", "UPTRAKIT_BUS"], ["--instance-id", "UPTRAKIT_INSTANCE_ID"],
  ["--listen", "UPTRAKIT_RELAY_LISTEN"], ["--data-dir", "UPTRAKIT_DATA_DIR"], ["--token", "UPTRAKIT_RELAY_TOKEN"],
  ["--allow-origin", "UPTRAKIT_ALLOW_ORIGIN"], ["--ack-wait", "UPTRAKIT_ACK_WAIT"], ["--max-deliver", "UPTRAKIT_MAX_DELIVER"],
  ["--nack-delay", "UPTRAKIT_NACK_DELAY"], ["--max-in-flight", "UPTRAKIT_MAX_IN_FLIGHT"], ["--stream", "UPTRAKIT_STREAM"],
  ["--replicas", "UPTRAKIT_STREAM_REPLICAS"], ["--max-age", "UPTRAKIT_MAX_AGE"], ["--max-frame-bytes", "UPTRAKIT_MAX_FRAME_BYTES"],
  ["--outbox-max", "UPTRAKIT_OUTBOX_MAX"], ["--drain-timeout", "UPTRAKIT_DRAIN_TIMEOUT"], ["--log-level", "UPTRAKIT_LOG_LEVEL"],
  ["--nats-user", "UPTRAKIT_NATS_USER"], ["--nats-pass", "UPTRAKIT_NATS_PASS"], ["--nats-token", "UPTRAKIT_NATS_TOKEN"],
  ["--nats-nkey-seed-file", "UPTRAKIT_NATS_NKEY_SEED_FILE"], ["--nats-creds", "UPTRAKIT_NATS_CREDS"], ["--nats-tls-ca", "UPTRAKIT_NATS_TLS_CA"],
  ["--nats-tls-cert", "UPTRAKIT_NATS_TLS_CERT"], ["--nats-tls-key", "UPTRAKIT_NATS_TLS_KEY"],
];
const NEW: Array<[string, string]> = [
  ["--token-file", "UPTRAKIT_RELAY_TOKEN_FILE"], ["--nats-pass-file", "UPTRAKIT_NATS_PASS_FILE"], ["--nats-token-file", "UPTRAKIT_NATS_TOKEN_FILE"],
  ["--fast-paths", "UPTRAKIT_RELAY_FAST_PATHS"],
  ["--readiness", "UPTRAKIT_RELAY_READINESS"],
];

t.test("every existing flag and env var is still there, with its pairing; --help lists them", async (tt) => {
  const run = addRunOptions(new Command("run"));
  const pairs = new Map(run.options.map((o) => [o.long!, o.envVar]));
  for (const [flag, env] of [...EXISTING, ...NEW]) tt.equal(pairs.get(flag), env, `${flag} ↔ ${env}`);
  tt.same([...ENV_VARS].sort(), [...EXISTING, ...NEW].map(([, e]) => e).sort(), "ENV_VARS is exactly these");
  const help = run.helpInformation();
  for (const [flag, env] of [...EXISTING, ...NEW]) tt.ok(help.includes(flag) && help.includes(env), `--help shows ${flag} and ${env}`);
  tt.notMatch(help, /`/, "--help shows no Markdown backticks");
  const info = addConnectionOptions(new Command("info")).options.map((o) => o.long);
  for (const runOnly of ["--listen", "--token", "--token-file", "--allow-origin", "--nack-delay", "--max-frame-bytes", "--outbox-max", "--drain-timeout", "--readiness"])
    tt.notOk(info.includes(runOnly), `stream info does not take ${runOnly}`);
  for (const shared of ["--nats-url", "--nats-pass-file", "--nats-token-file", "--instance-id", "--stream", "--log-level"]) tt.ok(info.includes(shared), `stream info takes ${shared}`);
});

t.test("the defaults, through commander and without it (dlq commands pass only --data-dir)", async (tt) => {
  const viaCommander = parse([]);
  const bare = toRelayConfig({});
  const expected = {
    natsUrls: [], instanceId: bare.instanceId, listenHost: "127.0.0.1", listenPort: 4380, dataDir: path.resolve("./.uptrakit"),
    busFile: path.resolve("./.uptrakit", "bus.db"), token: undefined, allowOrigins: [], ackWaitMs: 30_000, maxDeliver: 3, nackDelayMs: 1000,
    stream: "UPTRAKIT_PUSH", replicas: 1, maxAgeMs: 86_400_000, maxInFlight: 256, maxFrameBytes: 1_048_576, outboxMax: 100_000,
    drainTimeoutMs: 10_000, logLevel: "info",
  };
  tt.match(viaCommander, expected, "through commander");
  tt.match(bare, expected, "toRelayConfig({}) alone gives the same");
  tt.match(bare.instanceId, /^[A-Za-z0-9_-]{1,64}$/, "the instance id defaults to the host name made valid");
  tt.equal(toRelayConfig({ dataDir: dir }).busFile, path.join(dir, "bus.db"), "the bus file follows --data-dir");
});

t.test("a flag beats its env var; values are parsed the same from either", async (tt) => {
  tt.equal(parse(["--ack-wait", "5s"], { UPTRAKIT_ACK_WAIT: "7s" }).ackWaitMs, 5000, "flag wins");
  tt.equal(parse([], { UPTRAKIT_ACK_WAIT: "7s" }).ackWaitMs, 7000, "env var when no flag");
  const v6 = parse([], { UPTRAKIT_RELAY_LISTEN: "[::1]:9000" });
  tt.same([v6.listenHost, v6.listenPort], ["::1", 9000], "UPTRAKIT_RELAY_LISTEN with an IPv6 host");
  const l = parse(["--listen", "0.0.0.0:1"]);
  tt.same([l.listenHost, l.listenPort], ["0.0.0.0", 1], "--listen splits into host and port");
  tt.same(parse(["--allow-origin", "https://a.example, https://b.example"]).allowOrigins, ["https://a.example", "https://b.example"]);
  tt.equal(parse(["--log-level", "trace"]).logLevel, "trace");
  tt.match(failure(["--log-level", "loud"]), /--log-level.*Allowed choices are fatal, error, warn, info, debug, trace, silent/);
  tt.match(failure(["--max-deliver", "0"]), /--max-deliver.*expected a whole number from 1 to 100/);
  tt.match(failure([], { UPTRAKIT_MAX_AGE: "forever" }), /UPTRAKIT_MAX_AGE.*expected a duration/);
  tt.match(failure(["--instance-id", "a.b"]), /--instance-id.*letters, digits/);
  // The id is a subject token (uptrakit.push.<id>.<kind>): whatever would break one is refused,
  // and the message says which characters are allowed.
  for (const bad of ["a.b", "a*", ">", "a b", "relay\u00e9", "", "x".repeat(65)])
    tt.match(failure(["--instance-id", bad]), /--instance-id.*1-64 characters of letters, digits, '_' or '-'.*subject token/, `${JSON.stringify(bad)} refused`);
  tt.match(failure([], { UPTRAKIT_INSTANCE_ID: "eu.west" }), /UPTRAKIT_INSTANCE_ID.*subject token/);
});

// ---- NATS URL credentials -------------------------------------------------------------------------

t.test("credentials in --nats-url are taken out of the URL, percent-decoded, and passed as user/pass or token", async (tt) => {
  const up = parse(["--nats-url", "nats://relay:p%40ss%2Fw%3Ard%25@127.0.0.1:4222"]);
  tt.same(up.natsUrls, ["nats://127.0.0.1:4222"], "the URL without its credentials");
  tt.match(up.natsAuth, { user: "relay", pass: "p@ss/w:rd%", token: undefined }, "user and decoded password");
  const tok = parse([], { UPTRAKIT_NATS_URL: "nats://s3cr%3At@n1:4222,nats://n2:4222" });
  tt.same(tok.natsUrls, ["nats://n1:4222", "nats://n2:4222"]);
  tt.match(tok.natsAuth, { token: "s3cr:t", user: undefined, pass: undefined }, "token@ is a token");
  tt.same(parse(["--nats-url", "nats://u:pw@a:1, tls://u:pw@b:2"]).natsUrls, ["nats://a:1", "tls://b:2"], "several URLs with the same credentials");
  tt.match(parse(["--nats-url", "nats://u:@a:1"]).natsAuth, { user: "u", pass: "" }, "an empty password is a password");
  tt.match(parse(["--nats-url", "nats://u:p@ss@a:1"]).natsAuth, { user: "u", pass: "p@ss" }, "the last '@' ends the credentials (as Go's url.Parse, which the NATS tools use)");
  tt.same(parseNatsServers("a:4222"), { urls: ["a:4222"] }, "host:port still works");
});

t.test("bad URL credentials are refused without echoing them", async (tt) => {
  const cases: Array<[string, RegExp]> = [
    ["nats://u:one@a:1,nats://u:two@b:2", /carry different credentials/],
    ["nats://tok1@a:1,nats://u:tok1@b:2", /carry different credentials/],
    ["nats://:secret-pw@a:1", /no user name before the password/],
    ["nats://u:sec%ZZret@a:1", /malformed percent-encoding/],
    ["nats://u:sec/ret@a:1", /must be percent-encoded/],
    ["nats://h:1/x:secret@a:1", /must be percent-encoded/],
    ["http://u:secret@a:1", /is not a NATS URL/],
  ];
  const leak = /secret|sec%ZZ|sec\/ret|one@|two@|tok1/;
  for (const [url, why] of cases) {
    const msg = failure(["--nats-url", url]);
    tt.match(msg, why, `${why.source}`);
    // commander puts the raw value in front ("argument '…' is invalid."); the relay's own words follow.
    const own = msg.slice(msg.indexOf("is invalid."));
    tt.notMatch(own, leak, `the relay's message does not echo the credentials: ${JSON.stringify(own)}`);
    tt.notMatch(redactCredentials(msg), leak, "nor the whole line as main.ts prints it");
    tt.notMatch(redactCredentials(failure([], { UPTRAKIT_NATS_URL: url })), leak, "nor the env var's");
  }
  // commander prefixes its own message with the raw value: main.ts redacts it on the way out.
  const raw = failure(["--nats-url", "http://u:it's@secret@a:1"]);
  tt.match(raw, /secret/, "commander itself echoes the raw value…");
  tt.notMatch(redactCredentials(raw), /secret|it's/, "…which redactCredentials takes out, quotes and '@' included");
});

t.test("URL credentials and --nats-user/--nats-pass/--nats-token (or their files) together: an error", async (tt) => {
  const pw = file("pw-conflict", "x\n");
  tt.match(failure(["--nats-url", "nats://u:p@a:1", "--nats-user", "v"]), /--nats-url carries credentials and --nats-user \/ UPTRAKIT_NATS_USER is set too/);
  tt.match(failure(["--nats-url", "nats://t@a:1"], { UPTRAKIT_NATS_TOKEN: "t2" }), /--nats-url carries credentials and --nats-token \/ UPTRAKIT_NATS_TOKEN is set/);
  tt.match(failure(["--nats-url", "nats://t@a:1", "--nats-pass-file", pw]), /--nats-pass-file/);
});

// ---- _FILE forms ----------------------------------------------------------------------------------

t.test("_FILE forms: by flag and env var, one trailing newline trimmed", async (tt) => {
  const tok = file("relay-token", "relay-tok\n");
  const pw = file("nats-pass", "nats pw \r\n");
  const nt = file("nats-token", "nats-tok\n\n");
  tt.equal(parse(["--token-file", tok]).token, "relay-tok", "--token-file");
  tt.equal(parse([], { UPTRAKIT_RELAY_TOKEN_FILE: tok }).token, "relay-tok", "UPTRAKIT_RELAY_TOKEN_FILE");
  tt.match(parse(["--nats-user", "u", "--nats-pass-file", pw]).natsAuth, { user: "u", pass: "nats pw " }, "--nats-pass-file (CRLF trimmed, spaces kept)");
  tt.match(parse([], { UPTRAKIT_NATS_USER: "u", UPTRAKIT_NATS_PASS_FILE: pw }).natsAuth, { pass: "nats pw " }, "UPTRAKIT_NATS_PASS_FILE");
  tt.equal(parse(["--nats-token-file", nt]).natsAuth.token, "nats-tok\n", "--nats-token-file: only one newline trimmed");
  tt.equal(parse([], { UPTRAKIT_NATS_TOKEN_FILE: nt }).natsAuth.token, "nats-tok\n", "UPTRAKIT_NATS_TOKEN_FILE");
});

t.test("_FILE forms: an unreadable or empty file, or both forms at once, is an error naming the file, never the secret", async (tt) => {
  const missing = path.join(dir, "no-such-file");
  let thrown: unknown;
  try {
    toRelayConfig({ tokenFile: missing });
  } catch (e) {
    thrown = e;
  }
  tt.ok(thrown instanceof ConfigError, "toRelayConfig throws a ConfigError (main.ts prints it and exits 1)");
  tt.match(failure(["--token-file", missing]), new RegExp(`--token-file / UPTRAKIT_RELAY_TOKEN_FILE: cannot read ${missing} \\(ENOENT\\)`));
  tt.match(failure([], { UPTRAKIT_NATS_PASS_FILE: dir }), /--nats-pass-file \/ UPTRAKIT_NATS_PASS_FILE: cannot read .* \(EISDIR\)/);
  tt.match(failure(["--nats-token-file", file("empty", "\n")]), /--nats-token-file .*is empty/);
  const tok = file("both", "file-secret\n");
  const both = failure(["--token", "value-secret", "--token-file", tok]);
  tt.match(both, /--token \/ UPTRAKIT_RELAY_TOKEN and --token-file \/ UPTRAKIT_RELAY_TOKEN_FILE are both set/);
  tt.notMatch(both, /file-secret|value-secret/, "neither secret in the message");
  tt.match(failure([], { UPTRAKIT_NATS_PASS: "a", UPTRAKIT_NATS_PASS_FILE: tok }), /both set/, "env var and env _FILE: the same");
  tt.match(failure(["--nats-token", "a"], { UPTRAKIT_NATS_TOKEN_FILE: tok }), /both set/, "flag and env _FILE: the same");
});

// ---- redaction ------------------------------------------------------------------------------------

t.test("redactCredentials takes out userinfo of every URL in any text", async (tt) => {
  tt.equal(redactCredentials("at nats://u:p@h:1, tls://tok@h2:2 and ws://h3:3"), "at nats://[redacted]@h:1, tls://[redacted]@h2:2 and ws://h3:3");
  tt.equal(
    redactCredentials("error: option '--nats-url <urls>' argument 'u:pw@h:1,nats://a:b@c:2' is invalid. nope"),
    "error: option '--nats-url <urls>' argument '[redacted]@h:1,nats://[redacted]@c:2' is invalid. nope",
  );
  tt.equal(
    redactCredentials("error: option '--nats-url <urls>' value 'nats://a:b c@d' from env 'UPTRAKIT_NATS_URL' is invalid."),
    "error: option '--nats-url <urls>' value 'nats://[redacted]@d' from env 'UPTRAKIT_NATS_URL' is invalid.",
  );
  tt.equal(redactCredentials("nothing to hide: nats://h:4222"), "nothing to hide: nats://h:4222");
});

t.test("--readiness / UPTRAKIT_RELAY_READINESS: degraded by default, strict on request, nothing else", async (tt) => {
  tt.equal(parse([]).readiness, "degraded", "default degraded");
  tt.equal(parse(["--readiness", "strict"]).readiness, "strict", "flag");
  tt.equal(parse([], { UPTRAKIT_RELAY_READINESS: "strict" }).readiness, "strict", "env var");
  tt.equal(parse(["--readiness", "degraded"], { UPTRAKIT_RELAY_READINESS: "strict" }).readiness, "degraded", "the flag beats the env var");
  tt.match(failure(["--readiness", "lenient"]), /--readiness.*Allowed choices are degraded, strict/, "anything else is refused, naming the option");
});
