// Secrets the way operators pass them: credentials inside a NATS URL (as the NATS tools accept
// them) and `_FILE` forms (Docker and Kubernetes secrets mounted as files). Everything here
// runs once at start-up; what it returns is the secret itself, and nothing here ever puts a
// secret into an error message.

import fs from "node:fs";
import { redactUrl } from "./redact.js";

/** Start-up configuration that cannot be used: the message names the option or file, never a secret. */
export class ConfigError extends Error {}

export type UrlCredentials = { user: string; pass: string } | { token: string };

export interface NatsServers {
  /** The URLs without their credentials: what nats.js connects to and what is ever printed. */
  urls: string[];
  /** The credentials the URLs carried (the same for every URL that carried any). */
  credentials?: UrlCredentials;
}

const URL_FORM = /^(nats|tls|ws|wss):\/\/[^\s]+$/;
const HOST_PORT_FORM = /^[\w.-]+:\d+$/;
const USERINFO = /^([a-z][a-z0-9+.-]*:\/\/)([^/?#]*)@(.*)$/i;

function decode(part: string, url: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw new ConfigError(`malformed percent-encoding in the credentials of ${redactUrl(url)}`);
  }
}

/**
 * `user:pass@` is a user and a password, `token@` a token (the NATS convention), each
 * percent-decoded. A '/', '@' or ',' inside them must be percent-encoded (%2F, %40, %2C).
 */
function credentialsOf(userinfo: string, url: string): UrlCredentials {
  const colon = userinfo.indexOf(":");
  if (colon < 0) {
    const token = decode(userinfo, url);
    if (!token) throw new ConfigError(`empty credentials in ${redactUrl(url)}: expected user:password@ or token@`);
    return { token };
  }
  const user = decode(userinfo.slice(0, colon), url);
  if (!user) throw new ConfigError(`no user name before the password in ${redactUrl(url)}: expected user:password@`);
  return { user, pass: decode(userinfo.slice(colon + 1), url) };
}

const sameCredentials = (a: UrlCredentials, b: UrlCredentials): boolean =>
  "token" in a ? "token" in b && a.token === b.token : "user" in b && a.user === b.user && a.pass === b.pass;

/**
 * Parses `--nats-url`: one or more comma-separated URLs, each optionally with credentials.
 * nats.js sends one set of credentials to every server of a connection, so the URLs that carry
 * credentials must all carry the same ones; URLs without any use them too.
 */
export function parseNatsServers(value: string): NatsServers {
  const list = value.split(",").map((s) => s.trim()).filter(Boolean);
  if (list.length === 0) throw new ConfigError("expected one or more comma-separated NATS URLs");
  const urls: string[] = [];
  let credentials: UrlCredentials | undefined;
  for (const given of list) {
    const m = USERINFO.exec(given);
    const url = m ? `${m[1]}${m[3]}` : given;
    if (url.includes("@"))
      throw new ConfigError(`${redactUrl(given)}: a '/', '@' or ',' in the credentials of a NATS URL must be percent-encoded (%2F, %40, %2C)`);
    if (!URL_FORM.test(url) && !HOST_PORT_FORM.test(url)) throw new ConfigError(`${JSON.stringify(url)} is not a NATS URL (nats://host:port)`);
    if (m) {
      const c = credentialsOf(m[2]!, given);
      if (credentials && !sameCredentials(credentials, c))
        throw new ConfigError("the URLs in --nats-url carry different credentials; a connection uses one set for every server");
      credentials = c;
    }
    urls.push(url);
  }
  return credentials ? { urls, credentials } : { urls };
}

/**
 * A secret file's content: read now, one trailing newline (as editors and `echo` leave) trimmed.
 * An unreadable or empty file stops the start with its name and the option, never its content.
 */
export function readSecretFile(file: string, option: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ConfigError(`${option}: cannot read ${file}${code ? ` (${code})` : ""}`);
  }
  const secret = text.replace(/\r?\n$/, "");
  if (secret === "") throw new ConfigError(`${option}: ${file} is empty`);
  return secret;
}

/** A secret that can be given as a value or as a file, each by flag or env var. */
export interface SecretSource {
  value?: string;
  file?: string;
  /** How the operator names each form, for messages: "--token / UPTRAKIT_RELAY_TOKEN". */
  valueName: string;
  fileName: string;
}

/** The value, or the file's content; both forms at once is an error (which one was meant?). */
export function resolveSecret(s: SecretSource): string | undefined {
  if (s.value !== undefined && s.file !== undefined)
    throw new ConfigError(`${s.valueName} and ${s.fileName} are both set: give the secret one way only`);
  return s.file !== undefined ? readSecretFile(s.file, s.fileName) : s.value;
}
