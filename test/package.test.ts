// The client as a package: `npm pack` the project, install the tarball into a scratch project in a
// temp dir (offline: the scratch project's lockfile is derived from ours, so npm takes every
// dependency from the cache `npm ci` filled), type-check a small TypeScript controller that
// imports `uptrakit-relay/client` with the project's own TypeScript, and run it against a real
// relay. Also: the compiled client's import graph reaches no SQLite, NATS or pino, and the
// installed `uptrakit-relay` bin still runs.

import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import t from "tap";
import { startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";
import { staticImports } from "./helpers/import-graph.js";

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(here, "../..");
const require = createRequire(import.meta.url);
const TSC = require.resolve("typescript/bin/tsc");
const NPM_OPTS = { cwd: ROOT, timeout: 180_000, maxBuffer: 16 << 20 };
const DAEMON_ONLY = ["better-sqlite3", "@nats-io/jetstream", "@nats-io/nats-core", "@nats-io/transport-node", "pino"];

t.test("the compiled client's static import graph reaches no SQLite, NATS or pino", async (tt) => {
  const g = staticImports(path.join(ROOT, "dist/controller-stub/client.js"));
  tt.same(g.packages, ["ws"], "ws is its only package");
  tt.same(g.files.map((f) => path.relative(ROOT, f)).sort(), ["dist/controller-stub/client.js", "dist/controller-stub/trace.js"], "and these its only files");
  const trace = fs.readFileSync(path.join(ROOT, "dist/controller-stub/trace.js"), "utf8");
  tt.same([...trace.matchAll(/import\(\s*["']([^"']+)["']\s*\)/g)].map((m) => m[1]), ["@opentelemetry/api"], "the one dynamic import is the optional @opentelemetry/api");
});

const CONTROLLER_TS = `
import { RelayClient, RejectError, type Delivery, type PublishResult } from "uptrakit-relay/client";

const url = process.env.RELAY_URL!;
const client = new RelayClient({ url });
// @ts-expect-error publish() needs a kind: the declarations are real, not any
void (() => client.publish());
const ready = await client.connect();
const got = new Promise<Delivery<{ n: number }>>((resolve) =>
  client.onMessage((d) => {
    if (d.kind === "Poison") throw new RejectError("not for us");
    resolve(d as Delivery<{ n: number }>);
  }),
);
const published: PublishResult = await client.publish("CertificateRenewed", { from: "scratch" }, "scratch-1");
process.stdout.write(JSON.stringify({ ready, published }) + "\\n");
const d = await got;
process.stdout.write(JSON.stringify({ delivered: d.id, n: d.payload.n }) + "\\n");
await client.close();
`;

t.test("npm pack → install offline in a scratch project → type-check and run a TypeScript controller", async (tt) => {
  const scratch = tempDir("uptrakit-scratch-");
  tt.teardown(() => fs.rmSync(scratch, { recursive: true, force: true }));
  const { stdout } = await run("npm", ["pack", "--silent", "--pack-destination", scratch], NPM_OPTS);
  const tgz = stdout.trim().split("\n").at(-1)!;
  tt.ok(fs.existsSync(path.join(scratch, tgz)), `packed ${tgz}`);

  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8")) as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
  const lock = JSON.parse(fs.readFileSync(path.join(ROOT, "package-lock.json"), "utf8")) as { packages: Record<string, { dev?: boolean }> };
  const spec = `file:${tgz}`;
  const packages: Record<string, unknown> = {
    "": { name: "scratch", dependencies: { "uptrakit-relay": spec } },
    "node_modules/uptrakit-relay": { version: pkg.version, resolved: spec, dependencies: pkg.dependencies, bin: pkg.bin, engines: pkg.engines },
  };
  for (const [k, v] of Object.entries(lock.packages)) if (k.startsWith("node_modules/") && !v.dev) packages[k] = v;
  fs.writeFileSync(path.join(scratch, "package.json"), JSON.stringify({ name: "scratch", private: true, type: "module", dependencies: { "uptrakit-relay": spec } }));
  fs.writeFileSync(path.join(scratch, "package-lock.json"), JSON.stringify({ name: "scratch", lockfileVersion: 3, requires: true, packages }));
  // --ignore-scripts: better-sqlite3's native build is the daemon's business, not a controller's.
  await run("npm", ["ci", "--offline", "--no-audit", "--no-fund", "--ignore-scripts"], { ...NPM_OPTS, cwd: scratch });
  const installed = path.join(scratch, "node_modules/uptrakit-relay");
  tt.ok(fs.existsSync(path.join(installed, "dist/controller-stub/client.d.ts")), "the declarations are in the package");
  const g = staticImports(path.join(installed, "dist/controller-stub/client.js"));
  tt.same(g.packages.filter((p) => DAEMON_ONLY.includes(p)), [], "the installed client imports no daemon dependency");

  // Type-check with the project's TypeScript; @types/node is the application's own, as anywhere.
  fs.mkdirSync(path.join(scratch, "node_modules/@types"), { recursive: true });
  fs.symlinkSync(path.join(ROOT, "node_modules/@types/node"), path.join(scratch, "node_modules/@types/node"), "dir");
  fs.writeFileSync(path.join(scratch, "controller.ts"), CONTROLLER_TS);
  fs.writeFileSync(
    path.join(scratch, "tsconfig.json"),
    JSON.stringify({ compilerOptions: { target: "ES2022", module: "NodeNext", moduleResolution: "NodeNext", strict: true, outDir: "out", types: ["node"] }, files: ["controller.ts"] }),
  );
  const tsc = await run(process.execPath, [TSC, "-p", "tsconfig.json"], { cwd: scratch, timeout: 120_000 }).then(
    () => "",
    (e: { stdout?: string }) => e.stdout ?? String(e),
  );
  tt.equal(tsc, "", "the controller type-checks against uptrakit-relay/client");

  const bin = await run(path.join(scratch, "node_modules/.bin/uptrakit-relay"), ["--help"], { cwd: scratch, timeout: 60_000 });
  tt.match(bin.stdout, /Usage: uptrakit-relay/, "the installed bin runs");

  // Run it against a real relay (embedded bus), with a second relay and controller to talk to.
  const bus = `sqlite:${path.join(scratch, "bus.db")}`;
  const relays: RelayProcess[] = [];
  tt.teardown(() => Promise.all(relays.map((r) => r.stop("SIGKILL"))));
  for (const id of ["scratch-a", "scratch-b"]) relays.push(await startRelay({ instanceId: id, args: ["--bus", bus] }));
  const other = await TestController.connect(relays[1]!.wsUrl);
  tt.teardown(() => other.close());
  const child = execFile(process.execPath, [path.join(scratch, "out/controller.js")], { cwd: scratch, env: { ...process.env, RELAY_URL: relays[0]!.wsUrl }, timeout: 60_000 });
  let out = "";
  let err = "";
  child.stdout!.on("data", (c: Buffer) => (out += c.toString()));
  child.stderr!.on("data", (c: Buffer) => (err += c.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
  const fromScratch = await other.next((f) => f.type === "deliver" && f.id === "scratch-1", 30_000);
  tt.equal(fromScratch.origin, "scratch-a");
  tt.same(fromScratch.payload, { from: "scratch" });
  other.ack(fromScratch);
  tt.same((await other.publish("CertificateRenewed", { n: 7 }, "to-scratch")).type, "published");
  tt.equal(await exited, 0, `the scratch controller exits 0 (${err})`);
  const lines = out.trim().split("\n").map((l) => JSON.parse(l) as Record<string, any>); // eslint-disable-line @typescript-eslint/no-explicit-any
  tt.same(lines[0], { ready: { instanceId: "scratch-a", bus: "sqlite" }, published: { id: "scratch-1", queued: false } });
  tt.same(lines[1], { delivered: "to-scratch", n: 7 });
});
