// The status page in a real headless Chromium (Debian's chromium, driven by playwright-core):
// behind the token (the ?token= form sets an HttpOnly cookie), with a relay under traffic the
// rendered numbers match /metrics, and a dead letter appears on the page after it is recorded,
// without its payload. UPDATE_SCREENSHOT=1 also writes docs/status-page.png.

import t from "tap";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { startNatsServer } from "./helpers/nats-server.js";
import { startRelay, tempDir, type RelayProcess } from "./helpers/relay-process.js";
import { TestController } from "./helpers/test-controller.js";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const TOKEN = "page-secret-token";
const SCREENSHOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../docs/status-page.png");

async function metric(r: RelayProcess, name: string): Promise<number> {
  const text = await (await fetch(`${r.httpUrl}/metrics`)).text();
  const m = new RegExp(`^uptrakit_relay_${name} (\\S+)$`, "m").exec(text);
  if (!m) throw new Error(`no metric ${name}`);
  return Number(m[1]);
}

/** Waits until the page shows `want` in the element of data-field `field`. */
async function shows(page: Page, field: string, want: string, timeoutMs = 20_000): Promise<void> {
  await page.waitForFunction(
    ([f, w]) => document.querySelector(`[data-field="${f}"]`)?.textContent === w,
    [field, want] as const,
    { timeout: timeoutMs, polling: 100 },
  );
}

t.test("status page in Chromium: token, numbers equal /metrics, a dead letter appears", async (t) => {
  t.ok(fs.existsSync(CHROMIUM), `chromium at ${CHROMIUM} (.ci/run installs Debian's chromium)`);
  const nats = await startNatsServer();
  const a = await startRelay({ instanceId: "status-a", natsUrl: nats.url, args: ["--token", TOKEN] });
  const b = await startRelay({ instanceId: "status-b", natsUrl: nats.url });
  const ca = await TestController.connect(a.wsUrl, { token: TOKEN });
  const cb = await TestController.connect(b.wsUrl);
  const userDataDir = tempDir("uptrakit-chromium-");
  let context: BrowserContext | undefined;
  t.teardown(async () => {
    await context?.close().catch(() => undefined);
    await Promise.all([ca.close().catch(() => undefined), cb.close().catch(() => undefined)]);
    await Promise.all([a.stop("SIGKILL"), b.stop("SIGKILL")]);
    await nats.stop();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  });
  // A's controller rejects poison, acks the rest; B's acks everything.
  ca.onFrame((f) => {
    if (f.type !== "deliver") return;
    if (String(f.id).startsWith("poison")) ca.send({ type: "reject", deliveryId: f.deliveryId, reason: "cannot parse the payload" });
    else ca.ack(f);
  });
  cb.onFrame((f) => f.type === "deliver" && cb.ack(f));

  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));

  // Behind the token: a form first, then a cookie.
  const first = await page.goto(`${a.httpUrl}/`);
  t.equal(first?.status(), 401, "without the token: 401");
  t.ok(await page.isVisible("input[name=token]"), "a token form is shown");
  t.equal((await fetch(`${a.httpUrl}/status.json`)).status, 401, "/status.json needs the token too");
  await page.fill("input[name=token]", TOKEN);
  await Promise.all([page.waitForURL(`${a.httpUrl}/`), page.click("button")]);
  await shows(page, "instanceId", "status-a");
  errors.length = 0; // the 401 of the first visit was expected
  t.notMatch(page.url(), /token/, "the token does not stay in the address bar");
  const cookie = (await context.cookies()).find((c) => c.name === "uptrakit_relay_token");
  t.ok(cookie?.httpOnly, "the token cookie is HttpOnly");
  t.equal(cookie?.sameSite, "Strict", "and SameSite=Strict");

  // Traffic both ways while the page refreshes.
  const N = 40;
  await Promise.all([
    ...Array.from({ length: N }, (_, i) => cb.publish("VersionCheckCompleted", { i }, `to-a-${i}`)),
    ...Array.from({ length: N / 2 }, (_, i) => ca.publish("ScanFinished", { i }, `to-b-${i}`)),
  ]);
  await ca.nextN((f) => f.type === "deliver", N, 30_000);
  await cb.nextN((f) => f.type === "deliver", N / 2, 30_000);
  // The acks are sent; once /metrics counts them all, the page must show the same numbers.
  const deadline = Date.now() + 20_000;
  while ((await metric(a, "acked_total")) < N && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  const fields: Array<[string, string]> = [
    ["counter.published_total", "published_total"],
    ["counter.delivered_total", "delivered_total"],
    ["counter.acked_total", "acked_total"],
    ["counter.echo_filtered_total", "echo_filtered_total"],
    ["inFlight", "in_flight"],
    ["outboxDepth", "outbox_depth"],
    ["outboxMax", "outbox_max"],
  ];
  for (const [field, name] of fields) {
    const want = String(await metric(a, name));
    await shows(page, field, want);
    t.pass(`${field} on the page = uptrakit_relay_${name} in /metrics (${want})`);
  }
  t.equal(await metric(a, "published_total"), N / 2, "A published what its controller sent");
  await shows(page, "controller", "connected");
  await page.waitForFunction(() => document.querySelector('[data-field="busState"]')?.textContent === "connected");
  t.match(await page.textContent('[data-field="location"]'), /127\.0\.0\.1:\d+ \(nats-server 2\.\d+\.\d+/, "the NATS server is shown");
  await page.waitForSelector("#peers tbody tr >> text=status-b");
  t.pass("the peer is listed");

  // A dead letter: recorded by A when its controller rejects it, then on the page.
  t.equal(await page.textContent('[data-field="deadLetterCount"]'), "0", "no dead letters yet");
  await cb.publish("ScanFinished", { secret: "payload-never-on-the-page" }, "poison-1");
  await page.waitForSelector("#dead-letters tbody tr >> text=poison-1", { timeout: 20_000 });
  const row = await page.$$eval("#dead-letters tbody tr", (trs) => trs.map((tr) => [...tr.querySelectorAll("td")].map((td) => td.textContent)));
  t.equal(row.length, 1, "one dead letter row");
  t.same(row[0]!.slice(1, 5), ["ScanFinished", "poison-1", "status-b", "1"], "kind, id, origin, attempts");
  t.match(row[0]![5], /cannot parse the payload/, "and the reason");
  await shows(page, "deadLetterCount", "1");
  await shows(page, "counter.dead_lettered_total", String(await metric(a, "dead_lettered_total")));
  t.notMatch(await page.content(), /payload-never-on-the-page/, "never the payload");
  // Peers are re-read every few seconds: B's count in the retention window reaches what it published.
  await page.waitForFunction(
    (n) => [...document.querySelectorAll("#peers tbody tr")].some((tr) => tr.children[0]?.textContent === "status-b" && tr.children[2]?.textContent === String(n)),
    N + 1,
    { timeout: 20_000, polling: 200 },
  );
  t.pass(`the peer's published count is ${N + 1}`);
  t.same(errors, [], "no script errors, no CSP violations");

  if (process.env.UPDATE_SCREENSHOT === "1") {
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    t.comment(`wrote ${SCREENSHOT}`);
  }
});
