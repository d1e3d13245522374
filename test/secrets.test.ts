// Secrets the way operators pass them, against real nats-servers with user/password and with
// token auth and real relay processes: credentials inside --nats-url (percent-encoded), the
// `_FILE` forms by flag and by env var, the relay's own --token-file. Each works, and no secret
// ever appears in stdout/stderr (at trace level too, and in failed starts), /readyz (also while
// NATS is down), /metrics, or `stream info` (text and --json).

import t, { type Test } from "tap";
import fs from "node:fs";
import path from "node:path";
import { startNatsServer, type NatsServer, type NatsServerOptions } from "./helpers/nats-server.js";
import { runRelayCli, startRelay, tempDir, type CliResult, type RelayProcess } from "./helpers/relay-process.js";
import { TestController, upgradeStatus } from "./helpers/test-controller.js";

interface Env {
  nats(opts: NatsServerOptions): Promise<NatsServer>;
  relay(id: string, args: string[], env?: Record<string, string>): Promise<RelayProcess>;
  controller(r: RelayProcess, token?: string): Promise<TestController>;
  /** A file holding `content`, in a temp dir removed at the end. */
  secretFile(content: string): string;
  dir(): string;
}

function setup(tt: Test): Env {
  const servers: NatsServer[] = [];
  const relays: RelayProcess[] = [];
  const controllers: TestController[] = [];
  const dirs: string[] = [];
  let files = 0;
  const env: Env = {
    async nats(opts) {
      const s = await startNatsServer(opts);
      servers.push(s);
      return s;
    },
    async relay(id, args, extra) {
      const r = await startRelay({ instanceId: id, dataDir: env.dir(), args, env: extra });
      relays.push(r);
      return r;
    },
    async controller(r, token) {
      const c = await TestController.connect(r.wsUrl, { token });
      controllers.push(c);
      return c;
    },
    secretFile(content) {
      const f = path.join(env.dir(), `secret-${files++}`);
      fs.writeFileSync(f, content, { mode: 0o600 });
      return f;
    },
    dir() {
      const d = tempDir("uptrakit-secrets-");
      dirs.push(d);
      return d;
    },
  };
  tt.teardown(async () => {
    await Promise.all(controllers.map((c) => c.close().catch(() => undefined)));
    await Promise.all(relays.map((r) => r.stop("SIGKILL")));
    await Promise.all(servers.map((s) => s.stop()));
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });
  return env;
}

/** Asserts that none of the secrets (nor their percent-encoded forms) is in `text`. */
function noSecrets(tt: Test, what: string, text: string, secrets: string[]): void {
  const forms = [...new Set(secrets.flatMap((s) => [s, encodeURIComponent(s)]))];
  const found = forms.filter((s) => text.includes(s));
  tt.same(found.map((s) => `${s.slice(0, 3)}…`), [], `${what}: no secret in it (${text.length} characters looked at)`);
}

const logsOf = (r: RelayProcess): string => JSON.stringify(r.logs) + r.stderr();
const cliText = (r: CliResult): string => r.stdout + r.stderr;

async function body(url: string): Promise<{ status: number; text: string }> {
  const res = await fetch(url);
  return { status: res.status, text: await res.text() };
}

/** Polls /readyz until its JSON status is `status` ("ready", "degraded", "not ready"); resolves with the body. */
async function readyzSays(r: RelayProcess, status: string, timeoutMs = 15_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await body(`${r.httpUrl}/readyz`);
    if ((JSON.parse(got.text) as { status?: string }).status === status) return got.text;
    if (Date.now() > deadline) throw new Error(`${r.instanceId}: /readyz not "${status}" within ${timeoutMs} ms (last ${got.status} ${got.text})`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

/** One message each way between two relays' controllers. */
async function exchange(tt: Test, a: TestController, b: TestController, id: string): Promise<void> {
  tt.match(await a.publish("VersionCheckCompleted", { id }, `${id}-ab`), { type: "published", id: `${id}-ab` });
  b.ack(await b.next((f) => f.type === "deliver" && f.id === `${id}-ab`));
  tt.match(await b.publish("VersionCheckCompleted", { id }, `${id}-ba`), { type: "published", id: `${id}-ba` });
  a.ack(await a.next((f) => f.type === "deliver" && f.id === `${id}-ba`));
  tt.pass(`${id}: a message crossed each way`);
}

const failedStart = (natsUrlArgs: string[], dataDir: string, extra: string[] = [], env?: Record<string, string>): Promise<CliResult> =>
  runRelayCli(["run", "--instance-id", "bad-start", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--log-level", "trace", ...natsUrlArgs, ...extra], { env });

t.test("NATS user/password in --nats-url (percent-encoded) and from --nats-pass-file / UPTRAKIT_NATS_PASS_FILE; never printed", async (tt) => {
  const env = setup(tt);
  // Characters a URL must encode (':', '/', '@', '%', ' '), so decoding is exercised too.
  const PASS = "pw:5c0a/77@e2%d4 x";
  const WRONG = "wrong-pw-91ab3";
  const nats = await env.nats({ args: ["--user", "relay", "--pass", PASS] });
  const urlWith = (pass: string): string => `nats://relay:${encodeURIComponent(pass)}@127.0.0.1:${nats.port}`;
  const passFile = env.secretFile(`${PASS}\n`);

  const byUrl = await env.relay("up-url", ["--nats-url", urlWith(PASS), "--log-level", "trace"]);
  const byFile = await env.relay("up-file", ["--nats-url", nats.url, "--nats-user", "relay", "--nats-pass-file", passFile, "--log-level", "debug"]);
  const byEnvFile = await env.relay("up-env-file", [], { UPTRAKIT_NATS_URL: nats.url, UPTRAKIT_NATS_USER: "relay", UPTRAKIT_NATS_PASS_FILE: passFile });
  for (const r of [byUrl, byFile, byEnvFile]) tt.equal((await body(`${r.httpUrl}/readyz`)).status, 200, `${r.instanceId}: connected and ready`);
  const [cu, cf] = await Promise.all([env.controller(byUrl), env.controller(byFile)]);
  await exchange(tt, cu, cf, "up");

  const seen: Array<[string, string]> = [];
  seen.push(["/readyz", (await body(`${byUrl.httpUrl}/readyz`)).text]);
  seen.push(["/metrics", (await body(`${byUrl.httpUrl}/metrics`)).text]);

  // The one place a server address reaches /readyz: the reason while the connection is lost.
  // (With the default --readiness degraded, /readyz stays 200 and says "degraded" with the reason.)
  await nats.kill();
  const down = await readyzSays(byUrl, "degraded");
  tt.match(down, /degraded.*disconnected/, `/readyz while NATS is down: ${down}`);
  seen.push(["/readyz while NATS is down", down]);
  await nats.restart();
  await readyzSays(byUrl, "ready", 20_000);
  await exchange(tt, cu, cf, "after-restart");

  const infoText = await runRelayCli(["stream", "info", "--instance-id", "up-url", "--log-level", "trace"], { env: { UPTRAKIT_NATS_URL: urlWith(PASS) } });
  tt.equal(infoText.code, 0, `stream info with the credentials in UPTRAKIT_NATS_URL: ${infoText.stderr}`);
  tt.match(infoText.stdout, /consumer: +up-url:/);
  const infoJson = await runRelayCli(["stream", "info", "--json", "--instance-id", "up-file", "--nats-url", nats.url], {
    env: { UPTRAKIT_NATS_USER: "relay", UPTRAKIT_NATS_PASS_FILE: passFile },
  });
  tt.equal(infoJson.code, 0, `stream info --json with UPTRAKIT_NATS_PASS_FILE: ${infoJson.stderr}`);
  tt.equal((JSON.parse(infoJson.stdout) as { consumer?: { name: string } }).consumer?.name, "up-file");
  const infoUrlJson = await runRelayCli(["stream", "info", "--json", "--instance-id", "up-url", "--nats-url", urlWith(PASS)]);
  tt.equal(infoUrlJson.code, 0, "stream info --json with the credentials in --nats-url");
  seen.push(["stream info", cliText(infoText)], ["stream info --json", cliText(infoJson)], ["stream info --json (URL)", cliText(infoUrlJson)]);

  const wrong = await failedStart(["--nats-url", urlWith(WRONG)], env.dir());
  tt.not(wrong.code, 0, `a wrong password in the URL: exit ${wrong.code}`);
  tt.match(wrong.stderr, /cannot start: NATS at nats:\/\/127\.0\.0\.1:\d+ refused the credentials/, "the reason is clear and names the server without credentials");
  const wrongInfo = await runRelayCli(["stream", "info", "--nats-url", urlWith(WRONG)]);
  tt.not(wrongInfo.code, 0, "stream info with a wrong password in the URL fails too");
  tt.match(wrongInfo.stderr, /refused the credentials/);
  const both = await failedStart(["--nats-url", urlWith(PASS), "--nats-user", "relay"], env.dir());
  tt.not(both.code, 0, "credentials in the URL and --nats-user: does not start");
  tt.match(both.stderr, /uptrakit-relay: --nats-url carries credentials and --nats-user \/ UPTRAKIT_NATS_USER is set too/);
  const invalid = await failedStart(["--nats-url", `http://relay:${encodeURIComponent(PASS)}@127.0.0.1:1`], env.dir());
  tt.match(invalid.stderr, /is not a NATS URL/, "an invalid URL with credentials is refused…");
  seen.push(["failed start (wrong password)", cliText(wrong)], ["failed stream info", cliText(wrongInfo)], ["conflict", cliText(both)], ["invalid URL", cliText(invalid)]);

  await Promise.all([cu.close(), cf.close()]);
  for (const r of [byUrl, byFile, byEnvFile]) tt.equal(await r.stop("SIGTERM"), 0, `${r.instanceId} stops cleanly`);
  tt.ok(byUrl.logs.some((l) => Number(l.level) <= 10), `trace logging was on (${byUrl.logs.length} lines)`);
  for (const r of [byUrl, byFile, byEnvFile]) seen.push([`${r.instanceId}'s logs`, logsOf(r)]);
  for (const [what, text] of seen) noSecrets(tt, what, text, [PASS, WRONG]);
});

t.test("NATS token in --nats-url and from --nats-token-file / UPTRAKIT_NATS_TOKEN_FILE; never printed", async (tt) => {
  const env = setup(tt);
  const TOKEN = "nats-tok=7d1f+0c5a:9e";
  const WRONG = "wrong-tok-3b8e21";
  const nats = await env.nats({ args: ["--auth", TOKEN] });
  const urlWith = (token: string): string => `nats://${encodeURIComponent(token)}@127.0.0.1:${nats.port}`;
  const tokenFile = env.secretFile(`${TOKEN}\n`);

  const byUrl = await env.relay("tok-url", ["--nats-url", urlWith(TOKEN), "--log-level", "trace"]);
  const byFile = await env.relay("tok-file", ["--nats-url", nats.url, "--nats-token-file", tokenFile, "--log-level", "trace"]);
  const byEnvFile = await env.relay("tok-env-file", [], { UPTRAKIT_NATS_URL: nats.url, UPTRAKIT_NATS_TOKEN_FILE: tokenFile });
  for (const r of [byUrl, byFile, byEnvFile]) tt.equal((await body(`${r.httpUrl}/readyz`)).status, 200, `${r.instanceId}: connected and ready`);
  const [cu, cf] = await Promise.all([env.controller(byUrl), env.controller(byFile)]);
  await exchange(tt, cu, cf, "tok");

  const seen: Array<[string, string]> = [
    ["/readyz", (await body(`${byUrl.httpUrl}/readyz`)).text],
    ["/metrics", (await body(`${byUrl.httpUrl}/metrics`)).text],
  ];
  const info = await runRelayCli(["status", "--instance-id", "tok-file", "--nats-url", urlWith(TOKEN)]);
  tt.equal(info.code, 0, `status with the token in the URL: ${info.stderr}`);
  tt.match(info.stdout, /consumer: +tok-file:/);
  const infoJson = await runRelayCli(["stream", "info", "--json", "--instance-id", "tok-url"], { env: { UPTRAKIT_NATS_URL: nats.url, UPTRAKIT_NATS_TOKEN_FILE: tokenFile } });
  tt.equal(infoJson.code, 0, `stream info --json with UPTRAKIT_NATS_TOKEN_FILE: ${infoJson.stderr}`);
  tt.equal((JSON.parse(infoJson.stdout) as { consumer?: { name: string } }).consumer?.name, "tok-url");

  const wrong = await failedStart([], env.dir(), [], { UPTRAKIT_NATS_URL: urlWith(WRONG) });
  tt.not(wrong.code, 0, `a wrong token in UPTRAKIT_NATS_URL: exit ${wrong.code}`);
  tt.match(wrong.stderr, /cannot start: NATS at nats:\/\/127\.0\.0\.1:\d+ refused the credentials/, "the reason is clear");
  const both = await failedStart(["--nats-url", nats.url, "--nats-token", TOKEN], env.dir(), [], { UPTRAKIT_NATS_TOKEN_FILE: tokenFile });
  tt.not(both.code, 0, "--nats-token and UPTRAKIT_NATS_TOKEN_FILE together: does not start");
  tt.match(both.stderr, /--nats-token \/ UPTRAKIT_NATS_TOKEN and --nats-token-file \/ UPTRAKIT_NATS_TOKEN_FILE are both set/);
  seen.push(["status", cliText(info)], ["stream info --json", cliText(infoJson)], ["failed start", cliText(wrong)], ["conflict", cliText(both)]);

  await Promise.all([cu.close(), cf.close()]);
  for (const r of [byUrl, byFile, byEnvFile]) tt.equal(await r.stop("SIGTERM"), 0, `${r.instanceId} stops cleanly`);
  for (const r of [byUrl, byFile, byEnvFile]) seen.push([`${r.instanceId}'s logs`, logsOf(r)]);
  for (const [what, text] of seen) noSecrets(tt, what, text, [TOKEN, WRONG]);
});

t.test("the relay's own token from --token-file / UPTRAKIT_RELAY_TOKEN_FILE; an unreadable file stops the start, naming it", async (tt) => {
  const env = setup(tt);
  const TOKEN = "ws-token-from-a-file-6a2c";
  const tokenFile = env.secretFile(`${TOKEN}\n`);

  const byFlag = await env.relay("ws-file", ["--token-file", tokenFile, "--log-level", "trace"]);
  const byEnv = await env.relay("ws-env-file", [], { UPTRAKIT_RELAY_TOKEN_FILE: tokenFile });
  for (const r of [byFlag, byEnv]) {
    tt.equal(await upgradeStatus(r.wsUrl), 401, `${r.instanceId}: no token → 401`);
    tt.equal(await upgradeStatus(r.wsUrl, { authorization: `Bearer ${TOKEN}x` }), 401, `${r.instanceId}: another token → 401`);
    const c = await env.controller(r, TOKEN);
    tt.equal(c.ready.type, "ready", `${r.instanceId}: the file's token without its trailing newline opens /ws`);
    await c.close();
  }

  const missing = path.join(env.dir(), "not-there");
  const unreadable = await failedStart([], env.dir(), ["--token-file", missing]);
  tt.not(unreadable.code, 0, `a missing token file: exit ${unreadable.code}`);
  tt.match(unreadable.stderr, new RegExp(`uptrakit-relay: --token-file / UPTRAKIT_RELAY_TOKEN_FILE: cannot read ${missing.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} \\(ENOENT\\)`), "names the option and the file");
  const viaEnv = await failedStart([], env.dir(), [], { UPTRAKIT_RELAY_TOKEN_FILE: env.dir() });
  tt.match(viaEnv.stderr, /UPTRAKIT_RELAY_TOKEN_FILE: cannot read .* \(EISDIR\)/, "a directory given as the env var's file: named too");
  const both = await failedStart([], env.dir(), ["--token", "other-value"], { UPTRAKIT_RELAY_TOKEN_FILE: tokenFile });
  tt.match(both.stderr, /--token \/ UPTRAKIT_RELAY_TOKEN and --token-file \/ UPTRAKIT_RELAY_TOKEN_FILE are both set/, "a value and a file: refused");

  for (const r of [byFlag, byEnv]) tt.equal(await r.stop("SIGTERM"), 0);
  for (const [what, text] of [
    ["ws-file's logs", logsOf(byFlag)],
    ["ws-env-file's logs", logsOf(byEnv)],
    ["failed starts", cliText(unreadable) + cliText(viaEnv) + cliText(both)],
  ] as const)
    noSecrets(tt, what, text, [TOKEN]);
});
