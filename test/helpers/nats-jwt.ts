// A throwaway NATS operator (JWT) setup for tests of `.creds` files: an operator, a system
// account and an account with JetStream, preloaded into nats-server's memory resolver, and a user
// of that account written as a .creds file. The JWTs are made here by hand (header.claims.sig,
// ed25519 with nkeys), as `nsc` would make them, so the tests need no other tool.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { nkeys } from "@nats-io/transport-node";

type KeyPair = ReturnType<typeof nkeys.createOperator>;

const b64url = (v: string | object): string => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");

/** A unique JWT id in nats' base32 alphabet (the server does not check how it was derived). */
function jti(): string {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  return [...crypto.randomBytes(52)].map((b) => alphabet[b % 32]).join("");
}

function encodeJwt(issuer: KeyPair, subject: string, name: string, nats: Record<string, unknown>): string {
  const claims = { jti: jti(), iat: Math.floor(Date.now() / 1000), iss: issuer.getPublicKey(), name, sub: subject, nats: { ...nats, version: 2 } };
  const signing = `${b64url({ typ: "JWT", alg: "ed25519-nkey" })}.${b64url(claims)}`;
  return `${signing}.${Buffer.from(issuer.sign(Buffer.from(signing))).toString("base64url")}`;
}

const UNLIMITED = { subs: -1, data: -1, payload: -1, imports: -1, exports: -1, wildcards: true, conn: -1, leaf: -1 };
const JETSTREAM = { mem_storage: -1, disk_storage: -1, streams: -1, consumer: -1 };

function credsFile(file: string, account: KeyPair, name: string): string {
  const user = nkeys.createUser();
  const jwt = encodeJwt(account, user.getPublicKey(), name, { type: "user", pub: {}, sub: {}, subs: -1, data: -1, payload: -1 });
  const seed = new TextDecoder().decode(user.getSeed());
  fs.writeFileSync(
    file,
    `-----BEGIN NATS USER JWT-----\n${jwt}\n------END NATS USER JWT------\n\n` +
      `-----BEGIN USER NKEY SEED-----\n${seed}\n------END USER NKEY SEED------\n`,
  );
  return seed;
}

export interface OperatorSetup {
  /** nats-server arguments: -c <config in operator mode>. */
  serverArgs: string[];
  /** A user of the JetStream account. */
  creds: string;
  /** Its seed: a secret that must never be logged. */
  seed: string;
  /** A user of an account the server does not know: refused. */
  foreignCreds: string;
}

export function makeOperatorSetup(dir: string): OperatorSetup {
  const operator = nkeys.createOperator();
  const system = nkeys.createAccount();
  const account = nkeys.createAccount();
  const stranger = nkeys.createAccount();
  const conf = path.join(dir, "operator.conf");
  fs.writeFileSync(
    conf,
    [
      `operator: ${encodeJwt(operator, operator.getPublicKey(), "uptrakit-test", { type: "operator" })}`,
      `system_account: ${system.getPublicKey()}`,
      "resolver: MEMORY",
      "resolver_preload: {",
      `  ${system.getPublicKey()}: ${encodeJwt(operator, system.getPublicKey(), "SYS", { type: "account", limits: UNLIMITED })}`,
      `  ${account.getPublicKey()}: ${encodeJwt(operator, account.getPublicKey(), "uptrakit", { type: "account", limits: { ...UNLIMITED, ...JETSTREAM } })}`,
      "}",
      "",
    ].join("\n"),
  );
  const creds = path.join(dir, "relay.creds");
  const seed = credsFile(creds, account, "relay");
  const foreignCreds = path.join(dir, "stranger.creds");
  credsFile(foreignCreds, stranger, "stranger");
  return { serverArgs: ["-c", conf], creds, seed, foreignCreds };
}
