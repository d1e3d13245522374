// Throwaway TLS material for tests, made with the openssl command line: a CA, a server
// certificate for 127.0.0.1 signed by it, a client certificate signed by it, and a second CA that
// signed nothing (a server certificate checked against it is untrusted).

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

export interface TlsFiles {
  dir: string;
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  otherCa: string;
  /** nats-server arguments for TLS that also requires a client certificate signed by `ca`. */
  serverArgs: string[];
  remove(): void;
}

const EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

export function makeTlsFiles(): TlsFiles {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "uptrakit-tls-"));
  const f = (name: string): string => path.join(dir, name);
  const openssl = (...args: string[]): void => {
    execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  };
  const selfSigned = (name: string, cn: string): void =>
    openssl("req", "-x509", ...EC_KEY, "-keyout", f(`${name}.key`), "-out", f(`${name}.pem`), "-days", "2", "-subj", `/CN=${cn}`);
  const signed = (name: string, cn: string, ext: string): void => {
    openssl("req", ...EC_KEY, "-keyout", f(`${name}.key`), "-out", f(`${name}.csr`), "-subj", `/CN=${cn}`);
    fs.writeFileSync(f(`${name}.ext`), ext);
    openssl("x509", "-req", "-in", f(`${name}.csr`), "-CA", f("ca.pem"), "-CAkey", f("ca.key"), "-CAcreateserial",
      "-out", f(`${name}.pem`), "-days", "2", "-extfile", f(`${name}.ext`));
  };
  selfSigned("ca", "uptrakit-test-ca");
  selfSigned("other-ca", "some-other-ca");
  signed("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  signed("client", "uptrakit-relay", "extendedKeyUsage=clientAuth\n");
  return {
    dir,
    ca: f("ca.pem"),
    serverCert: f("server.pem"),
    serverKey: f("server.key"),
    clientCert: f("client.pem"),
    clientKey: f("client.key"),
    otherCa: f("other-ca.pem"),
    serverArgs: ["--tls", "--tlscert", f("server.pem"), "--tlskey", f("server.key"), "--tlscacert", f("ca.pem"), "--tlsverify"],
    remove: () => fs.rmSync(dir, { recursive: true, force: true }),
  };
}
