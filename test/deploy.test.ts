// Static checks of the deployment files under deploy/ against the relay itself: every YAML file
// parses; every UPTRAKIT_* env var a relay container sets is one the relay reads (ENV_VARS) and
// its value passes the relay's own option parsers; controllers only set the stub's vars; probes
// hit /healthz or /readyz on the port the relay actually listens on; the Kubernetes relay is a
// native sidecar with its instance id from the pod name and a grace period above its drain
// timeout; the compose relays share their controller's network namespace; the Dockerfile is a
// non-root multi-stage image with a /healthz HEALTHCHECK, STOPSIGNAL SIGTERM and the bin path of
// package.json as its entrypoint. No Docker or Kubernetes is needed: files are read and parsed.

import t, { type Test as Tap } from "tap";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Command } from "commander";
import { parseAllDocuments } from "yaml";
import { ENV_VARS, addRunOptions, toRelayConfig, type RelayConfig } from "../relay/config.js";

// dist/test/deploy.test.js -> repository root
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const DEPLOY = path.join(ROOT, "deploy");

/** The controller stub's env vars (controller-stub/main.ts). */
const CONTROLLER_ENV_VARS = ["UPTRAKIT_RELAY_URL", "UPTRAKIT_RELAY_TOKEN"];
const PROBE_PATHS = ["/healthz", "/readyz"];

// Parsed YAML is untyped; the checks below test every field they rely on.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Y = any;

const rel = (file: string) => path.relative(ROOT, file).split(path.sep).join("/");
const read = (file: string) => fs.readFileSync(file, "utf8");

function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...yamlFiles(p));
    else if (/\.ya?ml$/i.test(e.name)) out.push(p);
  }
  return out.sort();
}

const packageJson = JSON.parse(read(path.join(ROOT, "package.json"))) as { bin: Record<string, string> };
const RELAY_MAIN = packageJson.bin["uptrakit-relay"]!;
const STUB_MAIN = packageJson.bin["uptrakit-controller-stub"]!;

// ---- the relay's own option parsing ----------------------------------------------------------

/**
 * Runs the relay's real option table (commander + the parsers in relay/config.ts) over `env`
 * and returns the resulting config; throws with the relay's message on an invalid value.
 */
function relayConfigFromEnv(env: Record<string, string>): RelayConfig {
  const saved: Record<string, string | undefined> = {};
  for (const k of Object.keys(process.env)) if (k.startsWith("UPTRAKIT_")) saved[k] = process.env[k];
  for (const k of Object.keys(saved)) delete process.env[k];
  for (const k of Object.keys(env)) saved[k] ??= process.env[k];
  Object.assign(process.env, env);
  let errText = "";
  try {
    const cmd = addRunOptions(new Command("run"))
      .exitOverride()
      .configureOutput({ writeOut: () => {}, writeErr: (s) => void (errText += s) });
    try {
      cmd.parse([], { from: "user" });
    } catch (e) {
      throw new Error(errText.trim() || (e as Error).message);
    }
    return toRelayConfig(cmd.opts());
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

const DEFAULTS = relayConfigFromEnv({});

/** relayConfigFromEnv, reported as one failing assertion (naming `where`) instead of a throw. */
function relayConfigOrFail(t: Tap, where: string, env: Record<string, string>): RelayConfig | undefined {
  try {
    const cfg = relayConfigFromEnv(env);
    t.pass(`${where}: the relay's option parsers accept these values`);
    return cfg;
  } catch (e) {
    t.fail(`${where}: the relay rejects its env: ${(e as Error).message}`);
    return undefined;
  }
}

// ---- env helpers (Kubernetes lists, compose maps or lists) -----------------------------------

interface EnvEntry {
  name: string;
  /** Literal value (compose defaults of ${VAR:-default} resolved). */
  value?: string;
  valueFrom?: Y;
}

function k8sEnv(container: Y): EnvEntry[] {
  return ((container.env ?? []) as Y[]).map((e) => ({ name: String(e.name), value: e.value === undefined ? undefined : String(e.value), valueFrom: e.valueFrom }));
}

/** ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR}, $$ — resolved as with VAR unset. */
function composeInterpolate(s: string): string {
  return s
    .replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}/g, (_m, _v, dash, def) => (dash ? def : ""))
    .replace(/\$\$/g, "$");
}

function composeEnv(service: Y): EnvEntry[] {
  const env = service.environment ?? {};
  const pairs: [string, string | undefined][] = Array.isArray(env)
    ? (env as string[]).map((s) => {
        const i = s.indexOf("=");
        return i < 0 ? [s, undefined] : [s.slice(0, i), s.slice(i + 1)];
      })
    : Object.entries(env).map(([k, v]) => [k, v === null || v === undefined ? undefined : String(v)]);
  return pairs.map(([name, v]) => ({ name, value: v === undefined ? undefined : composeInterpolate(v) }));
}

const envGet = (env: EnvEntry[], name: string) => env.find((e) => e.name === name);

/** A plausible pod name for downward-API metadata.name (a Deployment pod's shape). */
const SAMPLE_POD_NAME = "uptrakit-controller-5d8f7c9b6-x2x9k";

/** The env as the process would see it, with valueFrom sources replaced by samples. */
function effectiveEnv(env: EnvEntry[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const e of env) {
    if (e.value !== undefined) out[e.name] = e.value;
    else if (e.valueFrom?.fieldRef?.fieldPath === "metadata.name") out[e.name] = SAMPLE_POD_NAME;
    else if (e.valueFrom?.secretKeyRef) out[e.name] = "sample-secret-value";
    else if (e.valueFrom?.fieldRef || e.valueFrom?.configMapKeyRef) out[e.name] = "sample";
  }
  return out;
}

/** Compose durations: 1m30s, 20s, 500ms, 1h. */
function composeDurationMs(v: string | number): number {
  if (typeof v === "number") return v * 1000;
  let ms = 0;
  const re = /(\d+(?:\.\d+)?)(ms|us|ns|s|m|h)/g;
  let m: RegExpExecArray | null;
  let matched = "";
  while ((m = re.exec(v))) {
    matched += m[0];
    ms += Number(m[1]) * ({ ns: 1e-6, us: 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 } as Record<string, number>)[m[2]!]!;
  }
  if (matched !== v.trim()) return NaN;
  return ms;
}

/** Every http://host:port/path in a probe command string. */
function urlsIn(s: string): { port: number; path: string }[] {
  return [...s.matchAll(/https?:\/\/[^/'"\s:]+:(\d+)(\/[A-Za-z0-9_-]*)/g)].map((m) => ({ port: Number(m[1]), path: m[2]! }));
}

const commandText = (...parts: unknown[]) => JSON.stringify(parts.filter((p) => p !== undefined));

// ---- load everything once --------------------------------------------------------------------

interface YamlFile {
  file: string;
  docs: Y[];
}
const files: YamlFile[] = [];
const parseErrors: string[] = [];
for (const file of yamlFiles(DEPLOY)) {
  const docs = parseAllDocuments(read(file), { prettyErrors: true });
  const list = Array.isArray(docs) ? docs : [docs];
  const errs = list.flatMap((d) => [...d.errors, ...d.warnings].map((e) => `${rel(file)}: ${e.message}`));
  parseErrors.push(...errs);
  if (errs.length === 0) files.push({ file, docs: list.map((d) => d.toJS({ maxAliasCount: 100 })).filter((d) => d != null) });
}

const k8sDocs: { file: string; doc: Y }[] = files
  .filter((f) => rel(f.file).startsWith("deploy/kubernetes/"))
  .flatMap((f) => f.docs.map((doc) => ({ file: rel(f.file), doc })));
const composeFile = files.find((f) => /(^|\/)(docker-)?compose\.ya?ml$/.test(rel(f.file)));
const compose: Y = composeFile?.docs[0];

type Role = "relay" | "controller" | "other";

function k8sRole(c: Y): Role {
  const text = commandText(c.command, c.args);
  if (/controller-stub/.test(text) || /controller/.test(String(c.image))) return "controller";
  if (text.includes(RELAY_MAIN) || /relay/.test(String(c.image))) return "relay";
  return "other";
}

function composeRole(s: Y): Role {
  const text = commandText(s.entrypoint, s.command);
  if (text.includes(STUB_MAIN) || /controller-stub/.test(text)) return "controller";
  const dockerfile = typeof s.build === "object" && s.build ? String(s.build.dockerfile ?? "") : "";
  if (text.includes(RELAY_MAIN) || /(^|\/)deploy\/Dockerfile$/.test(dockerfile) || /relay/.test(String(s.image ?? ""))) return "relay";
  return "other";
}

interface PodSpecRef {
  file: string;
  workload: Y;
  spec: Y;
}
const WORKLOADS = ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"];
const podSpecs: PodSpecRef[] = [
  ...k8sDocs.filter(({ doc }) => WORKLOADS.includes(doc.kind)).map(({ file, doc }) => ({ file, workload: doc, spec: doc.spec?.template?.spec })),
  ...k8sDocs.filter(({ doc }) => doc.kind === "Pod").map(({ file, doc }) => ({ file, workload: doc, spec: doc.spec })),
  ...k8sDocs.filter(({ doc }) => doc.kind === "CronJob").map(({ file, doc }) => ({ file, workload: doc, spec: doc.spec?.jobTemplate?.spec?.template?.spec })),
];

interface ContainerRef {
  where: string;
  role: Role;
  env: EnvEntry[];
}
const containers: ContainerRef[] = [];
for (const p of podSpecs) {
  for (const [list, cs] of [["initContainers", p.spec?.initContainers], ["containers", p.spec?.containers]] as const) {
    for (const c of (cs ?? []) as Y[]) {
      containers.push({ where: `${p.file} ${p.workload.kind}/${p.workload.metadata?.name} ${list}/${c.name}`, role: k8sRole(c), env: k8sEnv(c) });
    }
  }
}
for (const [name, s] of Object.entries((compose?.services ?? {}) as Record<string, Y>)) {
  containers.push({ where: `${composeFile ? rel(composeFile.file) : "compose"} service ${name}`, role: composeRole(s), env: composeEnv(s) });
}

// ---- tests -----------------------------------------------------------------------------------

t.test("every YAML file under deploy/ parses", async (t) => {
  const all = yamlFiles(DEPLOY).map(rel);
  t.ok(all.length > 0, "deploy/ has YAML files");
  for (const expected of [
    "deploy/docker-compose.yml",
    "deploy/kubernetes/controller-deployment.yaml",
    "deploy/kubernetes/relay-token-secret.yaml",
    "deploy/kubernetes/nats-statefulset.yaml",
    "deploy/nats-helm-values.yaml",
  ])
    t.ok(all.includes(expected), `${expected} exists`);
  t.same(parseErrors, [], "no YAML errors or warnings");
  for (const f of files) t.ok(f.docs.length > 0, `${rel(f.file)} has at least one document`);
  for (const { file, doc } of k8sDocs) t.ok(doc.apiVersion && doc.kind && doc.metadata?.name, `${file}: ${doc.kind}/${doc.metadata?.name} has apiVersion, kind and metadata.name`);
  t.ok(compose?.services, "the compose file has services");
});

t.test("UPTRAKIT_* env vars are ones their program reads, with values the relay accepts", async (t) => {
  t.ok(ENV_VARS.length > 0 && ENV_VARS.every((v) => v.startsWith("UPTRAKIT_")), "ENV_VARS is the relay's list");
  const relays = containers.filter((c) => c.role === "relay");
  const controllers = containers.filter((c) => c.role === "controller");
  t.ok(relays.length >= 3, `relay containers found (${relays.length}: k8s sidecar + two compose relays)`);
  t.ok(controllers.length >= 3, `controller containers found (${controllers.length})`);

  for (const c of containers) {
    const names = c.env.map((e) => e.name).filter((n) => n.startsWith("UPTRAKIT_"));
    if (c.role === "other") {
      t.same(names, [], `${c.where}: no UPTRAKIT_* vars outside relay/controller containers`);
      continue;
    }
    const allowed = c.role === "relay" ? ENV_VARS : CONTROLLER_ENV_VARS;
    for (const n of names) t.ok(allowed.includes(n), `${c.where}: ${n} is read by the ${c.role}`);
    t.equal(new Set(c.env.map((e) => e.name)).size, c.env.length, `${c.where}: no env var set twice`);
    for (const e of c.env.filter((e) => e.name.startsWith("UPTRAKIT_")))
      t.ok(e.value !== undefined || e.valueFrom?.fieldRef || e.valueFrom?.secretKeyRef, `${c.where}: ${e.name} has a value or a supported valueFrom`);
  }

  for (const r of relays) {
    for (const required of ["UPTRAKIT_NATS_URL", "UPTRAKIT_INSTANCE_ID", "UPTRAKIT_RELAY_TOKEN", "UPTRAKIT_DATA_DIR"])
      t.ok(envGet(r.env, required), `${r.where}: sets ${required}`);
    const cfg = relayConfigOrFail(t, r.where, effectiveEnv(r.env));
    if (cfg) {
      t.ok(cfg.natsUrls.length > 0, `${r.where}: uses NATS (not the embedded bus)`);
      t.ok(cfg.token, `${r.where}: token set`);
    }
  }
  for (const c of controllers) for (const required of CONTROLLER_ENV_VARS) t.ok(envGet(c.env, required), `${c.where}: sets ${required}`);
});

t.test("Kubernetes: relay is a native sidecar of the controller pod", async (t) => {
  const withRelay = podSpecs.filter((p) => [...(p.spec?.initContainers ?? []), ...(p.spec?.containers ?? [])].some((c: Y) => k8sRole(c) === "relay"));
  t.ok(withRelay.length >= 1, "a pod template runs the relay");
  const secrets = k8sDocs.filter(({ doc }) => doc.kind === "Secret").map(({ doc }) => doc);
  const statefulSets = k8sDocs.filter(({ doc }) => doc.kind === "StatefulSet").map(({ doc }) => doc);
  const services = k8sDocs.filter(({ doc }) => doc.kind === "Service").map(({ doc }) => doc);

  for (const p of withRelay) {
    const where = `${p.file} ${p.workload.kind}/${p.workload.metadata?.name}`;
    const spec = p.spec;
    t.notOk((spec.containers ?? []).some((c: Y) => k8sRole(c) === "relay"), `${where}: relay is not a regular container`);
    const relay = (spec.initContainers ?? []).find((c: Y) => k8sRole(c) === "relay");
    t.ok(relay, `${where}: relay is in initContainers`);
    if (!relay) continue;
    t.equal(relay.restartPolicy, "Always", `${where}: relay initContainer has restartPolicy Always (native sidecar)`);
    const controllers = (spec.containers ?? []).filter((c: Y) => k8sRole(c) === "controller");
    t.equal(controllers.length, 1, `${where}: one controller container beside the relay`);
    const controller = controllers[0];

    const env = k8sEnv(relay);
    const cfg = relayConfigOrFail(t, where, effectiveEnv(env));
    if (!cfg) continue;
    t.equal(envGet(env, "UPTRAKIT_INSTANCE_ID")?.valueFrom?.fieldRef?.fieldPath, "metadata.name", `${where}: instance id from the downward API (metadata.name)`);

    // Token from a Secret that the deploy files define, shared with the controller.
    const tokenRef = envGet(env, "UPTRAKIT_RELAY_TOKEN")?.valueFrom?.secretKeyRef;
    t.ok(tokenRef?.name && tokenRef?.key, `${where}: relay token from a secretKeyRef`);
    const secret = secrets.find((s) => s.metadata?.name === tokenRef?.name);
    t.ok(secret, `${where}: Secret ${tokenRef?.name} is among the deploy files`);
    t.ok(secret && tokenRef && (secret.stringData?.[tokenRef.key] !== undefined || secret.data?.[tokenRef.key] !== undefined), `${where}: the Secret has key ${tokenRef?.key}`);
    if (controller) {
      const cenv = k8sEnv(controller);
      t.same(envGet(cenv, "UPTRAKIT_RELAY_TOKEN")?.valueFrom?.secretKeyRef, tokenRef, `${where}: controller uses the same token Secret`);
      const url = new URL(envGet(cenv, "UPTRAKIT_RELAY_URL")?.value ?? "invalid:");
      t.equal(url.protocol, "ws:", `${where}: controller relay URL is ws://`);
      t.equal(url.hostname, "127.0.0.1", `${where}: controller reaches the relay on loopback (same pod)`);
      t.equal(Number(url.port), cfg.listenPort, `${where}: controller relay URL port = relay listen port`);
      t.equal(url.pathname, "/ws", `${where}: controller relay URL path is /ws`);
    }

    // Probes: paths the relay serves, on the port it listens on, reachable from the kubelet.
    const portOf = (port: unknown): number =>
      typeof port === "number" ? port : Number((relay.ports ?? []).find((cp: Y) => cp.name === port)?.containerPort ?? NaN);
    for (const [probe, wantPath] of [["startupProbe", "/healthz"], ["livenessProbe", "/healthz"], ["readinessProbe", "/readyz"]] as const) {
      const h = relay[probe]?.httpGet;
      t.ok(h, `${where}: relay has an httpGet ${probe}`);
      if (!h) continue;
      t.ok(PROBE_PATHS.includes(h.path), `${where}: ${probe} path ${h.path} is one the relay serves`);
      t.equal(h.path, wantPath, `${where}: ${probe} on ${wantPath}`);
      t.equal(portOf(h.port), cfg.listenPort, `${where}: ${probe} port = the relay's listen port (${cfg.listenPort})`);
    }
    t.notOk(["127.0.0.1", "localhost", "::1"].includes(cfg.listenHost), `${where}: relay listens beyond loopback (${cfg.listenHost}) so kubelet probes reach it`);
    t.ok(cfg.token, `${where}: a non-loopback listener is token-protected`);

    // The drain waits up to the drain timeout twice: for in-flight deliveries, then for the outbox.
    t.ok(typeof spec.terminationGracePeriodSeconds === "number" && spec.terminationGracePeriodSeconds * 1000 > 2 * cfg.drainTimeoutMs, `${where}: terminationGracePeriodSeconds (${spec.terminationGracePeriodSeconds}) > twice the drain timeout (${cfg.drainTimeoutMs} ms)`);

    // Data dir on a pod volume; hardening; resources.
    const mount = (relay.volumeMounts ?? []).find((m: Y) => path.posix.resolve(m.mountPath) === path.posix.resolve(cfg.dataDir));
    t.ok(mount, `${where}: UPTRAKIT_DATA_DIR (${cfg.dataDir}) is a volume mount`);
    const vol = (spec.volumes ?? []).find((v: Y) => v.name === mount?.name);
    const claim = (p.workload.spec?.volumeClaimTemplates ?? []).find((v: Y) => v.metadata?.name === mount?.name);
    t.ok(vol?.emptyDir || vol?.persistentVolumeClaim || vol?.ephemeral || claim, `${where}: the data dir volume is emptyDir/PVC`);
    for (const c of [relay, ...(controller ? [controller] : [])]) {
      t.ok(c.resources?.requests?.cpu && c.resources?.requests?.memory && c.resources?.limits?.memory, `${where}: ${c.name} has resource requests and limits`);
      t.ok(c.securityContext?.runAsNonRoot === true || spec.securityContext?.runAsNonRoot === true, `${where}: ${c.name} runAsNonRoot`);
      t.equal(c.securityContext?.readOnlyRootFilesystem, true, `${where}: ${c.name} readOnlyRootFilesystem`);
    }

    // NATS URLs name the pods of a StatefulSet through its headless Service, all replicas.
    const sts = statefulSets.find((s) => cfg.natsUrls.some((u) => new URL(u).hostname.startsWith(`${s.metadata.name}-`)));
    t.ok(sts, `${where}: UPTRAKIT_NATS_URL names pods of a StatefulSet in the deploy files`);
    if (sts) {
      const svc = services.find((s) => s.metadata?.name === sts.spec.serviceName);
      t.ok(svc, `${where}: StatefulSet ${sts.metadata.name}'s serviceName ${sts.spec.serviceName} is defined`);
      t.equal(svc?.spec?.clusterIP, "None", `${where}: that Service is headless`);
      const clientPort = (svc?.spec?.ports ?? []).find((p: Y) => p.port === 4222 || p.name === "client")?.port;
      const expected = Array.from({ length: sts.spec.replicas }, (_, i) => `nats://${sts.metadata.name}-${i}.${sts.spec.serviceName}:${clientPort}`);
      t.same(cfg.natsUrls, expected, `${where}: UPTRAKIT_NATS_URL lists every NATS pod`);
      t.equal(cfg.replicas, sts.spec.replicas, `${where}: UPTRAKIT_STREAM_REPLICAS (${cfg.replicas}) = NATS replicas`);
    }
  }
});

t.test("Kubernetes: the StatefulSet variant keeps each relay's data dir on its own claim", async (t) => {
  const variant = podSpecs.find((p) => p.workload.kind === "StatefulSet" && /controller-statefulset\.ya?ml$/.test(p.file));
  t.ok(variant, "deploy/kubernetes/persistent/controller-statefulset.yaml has a StatefulSet running the relay");
  if (!variant) return;
  const relay = (variant.spec.initContainers ?? []).find((c: Y) => k8sRole(c) === "relay");
  const dataDir = envGet(k8sEnv(relay), "UPTRAKIT_DATA_DIR")?.value;
  const mount = (relay?.volumeMounts ?? []).find((m: Y) => m.mountPath === dataDir);
  t.ok(mount, "the data dir is a volume mount");
  t.ok((variant.workload.spec.volumeClaimTemplates ?? []).some((v: Y) => v.metadata?.name === mount?.name), "…of a volume claim template (one claim per pod)");
  t.notOk((variant.spec.volumes ?? []).some((v: Y) => v.name === mount?.name), "…not a pod volume (an emptyDir goes with the pod)");
  t.equal(variant.workload.spec.persistentVolumeClaimRetentionPolicy?.whenScaled, "Retain", "claims (and their outboxes) are kept when scaled down");
  t.equal(envGet(k8sEnv(relay), "UPTRAKIT_INSTANCE_ID")?.valueFrom?.fieldRef?.fieldPath, "metadata.name", "instance id = the stable pod name");
  const svc = k8sDocs.find(({ doc }) => doc.kind === "Service" && doc.metadata?.name === variant.workload.spec.serviceName)?.doc;
  t.equal(svc?.spec?.clusterIP, "None", "its serviceName is a headless Service in the same file set");
});

t.test("Kubernetes: NATS StatefulSet runs a JetStream cluster", async (t) => {
  const sts = k8sDocs.find(({ doc }) => doc.kind === "StatefulSet" && doc.metadata?.name === "nats")?.doc;
  t.ok(sts, "StatefulSet nats exists");
  if (!sts) return;
  t.equal(sts.spec.replicas, 3, "3 replicas");
  t.equal(sts.spec.podManagementPolicy, "Parallel", "all servers start together (JetStream quorum)");
  const c = (sts.spec.template.spec.containers as Y[]).find((c) => c.name === "nats");
  t.match(String(c?.image), /^nats:2\.(1\d|[2-9]\d)[.\w-]*$/, "nats 2.10 or newer (sync_interval: always)");
  t.ok((sts.spec.volumeClaimTemplates ?? []).length > 0, "has PVC templates");
  const svc = k8sDocs.find(({ doc }) => doc.kind === "Service" && doc.metadata?.name === sts.spec.serviceName)?.doc;
  t.equal(svc?.spec?.publishNotReadyAddresses, true, "headless Service publishes not-ready addresses (cluster formation)");

  const configVolume = (sts.spec.template.spec.volumes as Y[]).find((v) => v.configMap);
  const cm = k8sDocs.find(({ doc }) => doc.kind === "ConfigMap" && doc.metadata?.name === configVolume?.configMap?.name)?.doc;
  t.ok(cm, "the config volume's ConfigMap is defined");
  const conf = String(Object.values(cm?.data ?? {})[0] ?? "");
  t.match(conf, /jetstream\s*\{[^}]*store_dir/, "nats.conf enables JetStream with a store_dir");
  t.match(conf, /jetstream\s*\{[^}]*\n\s*sync_interval:\s*always/, "nats.conf fsyncs before each PubAck (sync_interval: always)");
  for (let i = 0; i < sts.spec.replicas; i++) t.ok(conf.includes(`nats://${sts.metadata.name}-${i}.${sts.spec.serviceName}:6222`), `nats.conf routes to ${sts.metadata.name}-${i}`);
  const serverNameVar = /server_name:\s*\$(\w+)/.exec(conf)?.[1];
  t.ok(serverNameVar, "server_name comes from an env var");
  t.equal(k8sEnv(c).find((e) => e.name === serverNameVar)?.valueFrom?.fieldRef?.fieldPath, "metadata.name", "that env var is the pod name");
  const storeDir = /store_dir:\s*(\S+)/.exec(conf)?.[1] ?? "";
  const dataMount = (c.volumeMounts as Y[]).find((m) => (sts.spec.volumeClaimTemplates as Y[]).some((v) => v.metadata.name === m.name));
  t.ok(dataMount && (storeDir + "/").startsWith(dataMount.mountPath.replace(/\/?$/, "/")), `store_dir ${storeDir} is on the PVC`);
});

t.test("NATS Helm values: cluster of 3 with a JetStream file store", async (t) => {
  const f = files.find((f) => rel(f.file) === "deploy/nats-helm-values.yaml");
  t.ok(f, "deploy/nats-helm-values.yaml parses");
  const v = f?.docs[0];
  t.equal(v?.config?.cluster?.enabled, true, "config.cluster.enabled");
  t.equal(v?.config?.cluster?.replicas, 3, "config.cluster.replicas = 3");
  t.equal(v?.config?.jetstream?.enabled, true, "config.jetstream.enabled");
  t.equal(v?.config?.jetstream?.fileStore?.enabled, true, "config.jetstream.fileStore.enabled");
  t.equal(v?.config?.jetstream?.merge?.sync_interval, "always", "config.jetstream.merge.sync_interval = always");
  // Same DNS names as nats-statefulset.yaml, so the relay's UPTRAKIT_NATS_URL fits both.
  t.equal(v?.fullnameOverride, "nats", "pods are nats-0..2");
  t.equal(v?.headlessService?.name, "nats", "headless Service is `nats`");
});

t.test("Dockerfile: multi-stage, non-root, healthcheck, stop signal, entrypoint", async (t) => {
  const text = read(path.join(DEPLOY, "Dockerfile"));
  // Instructions with line continuations joined and comments dropped.
  const instructions = text
    .replace(/\\\r?\n/g, " ")
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"))
    .map((l) => {
      const m = /^(\w+)\s*(.*)$/.exec(l)!;
      return { op: m[1]!.toUpperCase(), args: m[2]!.trim() };
    });
  const froms = instructions.map((ins, i) => ({ ...ins, i })).filter((ins) => ins.op === "FROM");
  const named = froms.map((f) => /^\S+\s+AS\s+(\S+)$/i.exec(f.args)?.[1]).filter(Boolean) as string[];
  t.ok(froms.length >= 2, `multi-stage (${froms.length} FROM)`);
  t.ok(named.length >= 2, `named stages: FROM ... AS (${named.join(", ")})`);
  for (const ins of instructions.filter((i) => i.op === "COPY" && /--from=/.test(i.args))) {
    const from = /--from=(\S+)/.exec(ins.args)![1]!;
    t.ok(named.includes(from), `COPY --from=${from} names a stage`);
  }
  const all = instructions.map((i) => `${i.op} ${i.args}`).join("\n");
  t.match(all, /npm install -g npm@11/, "build uses npm 11 (allowScripts)");
  t.match(all, /RUN .*npm ci\b(?!.*--omit=dev)/, "a stage installs all dependencies");
  t.match(all, /RUN .*npm run build/, "a stage compiles TypeScript");
  t.match(all, /RUN .*npm ci\b.*--omit=dev/, "a stage installs production dependencies only");
  t.match(all, /apt-get install[^\n]*python3[^\n]*make[^\n]*g\+\+/, "build tools for better-sqlite3");

  const final = instructions.slice(froms[froms.length - 1]!.i);
  const last = (op: string) => [...final].reverse().find((i) => i.op === op)?.args;
  t.notOk(/npm ci(?!.*--omit=dev)|npm run build|apt-get install/.test(final.map((i) => i.args).join("\n")), "runtime stage installs nothing and compiles nothing");

  const user = last("USER");
  t.ok(user, "runtime stage sets USER");
  t.notOk(/^(root|0)(:|$)/.test(user ?? "root"), `USER ${user} is not root`);

  const hc = last("HEALTHCHECK") ?? "";
  t.match(hc, /\/healthz/, "HEALTHCHECK hits /healthz");
  // Exec form must be valid JSON, or Docker silently falls back to shell form.
  const hcCmd = /\bCMD\s+(\[.*\])\s*$/.exec(hc)?.[1];
  let hcArgv: unknown;
  t.doesNotThrow(() => (hcArgv = JSON.parse(hcCmd ?? "null")), "HEALTHCHECK CMD is a JSON exec-form array");
  t.ok(Array.isArray(hcArgv) && hcArgv[0] === "node" && hcArgv[1] === "-e", "HEALTHCHECK probes with node -e");
  const hcScript = Array.isArray(hcArgv) ? String(hcArgv[2]) : "";
  t.doesNotThrow(() => new Function(hcScript), "HEALTHCHECK script is valid JavaScript");
  t.match(hc, new RegExp(`\\b${DEFAULTS.listenPort}\\b`), `HEALTHCHECK uses the default listen port ${DEFAULTS.listenPort}`);
  t.notMatch(hc, /\b(curl|wget)\b/, "HEALTHCHECK needs no curl/wget (slim image)");
  t.equal(last("STOPSIGNAL"), "SIGTERM", "STOPSIGNAL SIGTERM");
  t.same(JSON.parse(last("ENTRYPOINT") ?? "null"), ["node", RELAY_MAIN], `ENTRYPOINT ["node","${RELAY_MAIN}"] (package.json bin)`);
  t.same(JSON.parse(last("CMD") ?? "null"), ["run"], 'CMD ["run"]');

  const envText = final.filter((i) => i.op === "ENV").map((i) => i.args).join(" ");
  const envNames = [...envText.matchAll(/\b(UPTRAKIT_\w+)=/g)].map((m) => m[1]!);
  for (const n of envNames) t.ok(ENV_VARS.includes(n), `ENV ${n} is read by the relay`);
  const dataDir = /\bUPTRAKIT_DATA_DIR=(\S+)/.exec(envText)?.[1];
  t.ok(dataDir, "UPTRAKIT_DATA_DIR is set");
  t.ok(dataDir && JSON.stringify(last("VOLUME") ?? "").includes(dataDir), `VOLUME covers ${dataDir}`);
  t.ok(final.some((i) => i.op === "COPY" && /package\.json/.test(i.args)), 'runtime stage has package.json ("type": "module")');
  t.ok(final.some((i) => i.op === "COPY" && /node_modules/.test(i.args)), "runtime stage copies node_modules");
  t.ok(final.some((i) => i.op === "COPY" && /\bdist\b/.test(i.args)), "runtime stage copies dist/");

  const ignore = read(path.join(ROOT, ".dockerignore")).split(/\r?\n/).map((l) => l.trim());
  for (const p of ["node_modules", "dist", ".git", ".uptrakit"]) t.ok(ignore.includes(p), `.dockerignore excludes ${p}`);
});

t.test("compose: relay/controller pairs share a network namespace", async (t) => {
  const services = (compose?.services ?? {}) as Record<string, Y>;
  const nats = Object.entries(services).find(([, s]) => /^nats:/.test(String(s.image)));
  t.ok(nats, "a NATS service");
  if (nats) {
    const [, s] = nats;
    t.equal(s.image, "nats:2.9-alpine", "nats:2.9-alpine");
    const cmd = Array.isArray(s.command) ? s.command.join(" ") : String(s.command);
    t.match(cmd, /(^|\s)-js(\s|$)/, "JetStream enabled (-js)");
    t.match(cmd, /(^|\s)-sd\s+\/data(\s|$)/, "store dir /data (-sd)");
    t.ok((s.volumes ?? []).some((v: Y) => /:\/data$/.test(String(typeof v === "string" ? v : `${v.source}:${v.target}`))), "/data is a volume");
    t.ok(s.healthcheck?.test, "NATS has a healthcheck");
  }

  const relays = Object.entries(services).filter(([, s]) => composeRole(s) === "relay");
  const controllers = Object.entries(services).filter(([, s]) => composeRole(s) === "controller");
  t.ok(relays.length >= 2, `two or more relays (${relays.map(([n]) => n).join(", ")})`);
  t.equal(controllers.length, relays.length, "one controller per relay");
  const ids = new Set<string>();
  const paired = new Set<string>();
  for (const [name, s] of relays) {
    const where = `relay ${name}`;
    const m = /^service:(.+)$/.exec(String(s.network_mode ?? ""));
    t.ok(m, `${where}: network_mode service:<controller>`);
    const ctrlName = m?.[1] ?? "";
    const ctrl = services[ctrlName];
    t.ok(ctrl && composeRole(ctrl) === "controller", `${where}: ${ctrlName} is a controller service`);
    t.notOk(paired.has(ctrlName), `${where}: ${ctrlName} has only this relay`);
    paired.add(ctrlName);
    t.notOk(ctrl?.network_mode, `${where}: ${ctrlName} is on the project network (so \`nats\` resolves)`);
    t.notOk(s.ports, `${where}: publishes no ports`);

    const env = composeEnv(s);
    const cfg = relayConfigOrFail(t, where, effectiveEnv(env));
    if (!cfg) continue;
    t.equal(cfg.instanceId, ctrlName, `${where}: UPTRAKIT_INSTANCE_ID is its controller's name`);
    t.notOk(ids.has(cfg.instanceId), `${where}: instance id is unique`);
    ids.add(cfg.instanceId);
    t.ok(["127.0.0.1", "localhost", "::1"].includes(cfg.listenHost), `${where}: listens on loopback only (${cfg.listenHost})`);
    for (const u of cfg.natsUrls) t.ok(services[new URL(u).hostname], `${where}: NATS host ${new URL(u).hostname} is a service`);
    const volumeTargets = (s.volumes ?? []).map((v: Y) => (typeof v === "string" ? { source: v.split(":")[0], target: v.split(":")[1] } : v));
    const dataVol = volumeTargets.find((v: Y) => path.posix.resolve(String(v.target)) === path.posix.resolve(cfg.dataDir));
    t.ok(dataVol && compose.volumes && dataVol.source in compose.volumes, `${where}: data dir ${cfg.dataDir} is a named volume`);
    t.ok(composeDurationMs(s.stop_grace_period ?? "10s") > cfg.drainTimeoutMs, `${where}: stop_grace_period (${s.stop_grace_period ?? "10s default"}) > drain timeout (${cfg.drainTimeoutMs} ms)`);

    const test = commandText(s.healthcheck?.test);
    const urls = urlsIn(test);
    const argv = s.healthcheck?.test as unknown[] | undefined;
    if (Array.isArray(argv) && argv[1] === "node" && argv[2] === "-e")
      t.doesNotThrow(() => new Function(String(argv[3])), `${where}: healthcheck script is valid JavaScript`);
    t.ok(urls.length > 0, `${where}: has a healthcheck`);
    for (const u of urls) {
      t.ok(PROBE_PATHS.includes(u.path), `${where}: healthcheck path ${u.path} is one the relay serves`);
      t.equal(u.port, cfg.listenPort, `${where}: healthcheck port = listen port`);
    }

    if (ctrl) {
      const cenv = composeEnv(ctrl);
      const url = new URL(envGet(cenv, "UPTRAKIT_RELAY_URL")?.value ?? "invalid:");
      t.equal(url.hostname, "127.0.0.1", `${ctrlName}: relay URL on loopback`);
      t.equal(Number(url.port), cfg.listenPort, `${ctrlName}: relay URL port = ${name}'s listen port`);
      t.equal(envGet(cenv, "UPTRAKIT_RELAY_TOKEN")?.value, envGet(env, "UPTRAKIT_RELAY_TOKEN")?.value, `${ctrlName}: same token as ${name}`);
      t.ok(commandText(ctrl.entrypoint, ctrl.command).includes(STUB_MAIN), `${ctrlName}: runs ${STUB_MAIN} (package.json bin)`);
      // Its wait-for-relay check (if any) probes the relay on the right port.
      for (const u of urlsIn(commandText(ctrl.entrypoint))) t.equal(u.port, cfg.listenPort, `${ctrlName}: waits on the relay's port`);
    }
  }
  for (const [name, s] of [...relays, ...controllers]) {
    const b = s.build;
    t.ok(b, `${name}: built from the repo`);
    if (!b || !composeFile) continue;
    const context = path.resolve(path.dirname(composeFile.file), typeof b === "string" ? b : b.context ?? ".");
    t.equal(context, ROOT, `${name}: build context is the repository root`);
    t.ok(fs.existsSync(path.join(context, typeof b === "string" ? "Dockerfile" : b.dockerfile ?? "Dockerfile")), `${name}: its Dockerfile exists`);
  }
});
