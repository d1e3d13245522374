// The alert rules and the Grafana dashboard in deploy/: promtool (Debian's prometheus package,
// which .ci/run installs) checks the rules and runs their unit tests; the plain rules file and
// the Kubernetes PrometheusRule (deploy/kubernetes/monitoring/) hold the same groups; every alert has a test where it fires and
// one where it stays quiet; and a running relay exports every metric the rules and the
// dashboard name.

import t from "tap";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import YAML from "yaml";
import { startRelay, tempDir } from "./helpers/relay-process.js";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const RULES = path.join(ROOT, "deploy/prometheus/uptrakit-relay-rules.yaml");
const RULE_TESTS = path.join(ROOT, "deploy/prometheus/uptrakit-relay-rules.test.yaml");
const K8S_RULE = path.join(ROOT, "deploy/kubernetes/monitoring/prometheus-rule.yaml");
const DASHBOARD = path.join(ROOT, "deploy/grafana/uptrakit-relay-dashboard.json");

function promtool(args: string[]): { code: number | null; out: string } {
  const r = spawnSync("promtool", args, { encoding: "utf8", cwd: path.dirname(RULES) });
  if (r.error) throw new Error(`promtool not found (.ci/run installs Debian's prometheus package): ${r.error.message}`);
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

interface Rule { alert: string; expr: string; for?: string; labels?: Record<string, string>; annotations?: Record<string, string> }
const rules = YAML.parse(fs.readFileSync(RULES, "utf8")) as { groups: Array<{ name: string; rules: Rule[] }> };
const k8s = YAML.parse(fs.readFileSync(K8S_RULE, "utf8")) as { apiVersion: string; kind: string; spec: typeof rules };
const dashboard = fs.readFileSync(DASHBOARD, "utf8");

t.test("promtool check rules and promtool test rules pass", async (t) => {
  const check = promtool(["check", "rules", RULES]);
  t.equal(check.code, 0, `promtool check rules: ${check.out.trim()}`);
  // The PrometheusRule's spec is a rules file of its own: check it too.
  const dir = tempDir("uptrakit-promrule-");
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const spec = path.join(dir, "k8s-rules.yaml");
  fs.writeFileSync(spec, YAML.stringify(k8s.spec));
  const checkK8s = promtool(["check", "rules", spec]);
  t.equal(checkK8s.code, 0, `promtool check rules on the PrometheusRule's spec: ${checkK8s.out.trim()}`);
  const unit = promtool(["test", "rules", RULE_TESTS]);
  t.equal(unit.code, 0, `promtool test rules: ${unit.out.trim()}`);
});

t.test("the PrometheusRule holds exactly the plain file's groups", async (t) => {
  t.equal(k8s.apiVersion, "monitoring.coreos.com/v1");
  t.equal(k8s.kind, "PrometheusRule");
  t.same(k8s.spec, rules, "same groups, rules, labels and annotations");
});

t.test("every alert is tested firing and quiet; the issue's alerts are all there", async (t) => {
  const alerts = rules.groups.flatMap((g) => g.rules.map((r) => r.alert));
  for (const want of ["UptrakitRelayNotReady", "UptrakitRelayNatsDisconnected", "UptrakitRelayOutboxGrowing", "UptrakitRelayDeadLettersRising", "UptrakitRelayDeliveryLatencyHigh", "UptrakitRelayNoController"])
    t.ok(alerts.includes(want), `${want} is defined`);
  const tests = YAML.parse(fs.readFileSync(RULE_TESTS, "utf8")) as { tests: Array<{ alert_rule_test: Array<{ alertname: string; exp_alerts: unknown[] }> }> };
  const cases = tests.tests.flatMap((x) => x.alert_rule_test);
  for (const a of alerts) {
    t.ok(cases.some((c) => c.alertname === a && c.exp_alerts.length > 0), `${a}: a case where it fires`);
    t.ok(cases.some((c) => c.alertname === a && c.exp_alerts.length === 0), `${a}: a case where it stays quiet`);
  }
});

t.test("a running relay exports every metric the rules and the dashboard name", async (t) => {
  const relay = await startRelay({ instanceId: "metrics-a", dataDir: tempDir("uptrakit-metrics-") });
  t.teardown(() => relay.stop("SIGKILL"));
  const exposition = await (await fetch(`${relay.httpUrl}/metrics`)).text();
  const exported = new Set(exposition.split("\n").filter((l) => l && !l.startsWith("#")).map((l) => /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(l)![0]));
  const named = new Set([...`${rules.groups.flatMap((g) => g.rules.map((r) => r.expr)).join("\n")}\n${dashboard}`.matchAll(/uptrakit_relay_[a-z0-9_]+/g)].map((m) => m[0]));
  t.ok(named.size >= 15, `the rules and the dashboard name ${named.size} relay metrics`);
  for (const name of [...named].sort()) {
    t.ok(exported.has(name), `${name} is exported`);
  }
  for (const panel of ["Throughput", "Delivery latency", "In flight", "Outbox", "Dead letters", "NATS and controller connection", "Redeliveries", "Rejections"])
    t.match(dashboard, new RegExp(`"title": "${panel}`), `the dashboard has a ${panel} panel`);
});
