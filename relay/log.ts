// pino JSON lines tagged with the instance id. Payloads are never logged anywhere in the relay:
// a credential-bearing kind refused at the door must not leak through a debug line either.

import pino from "pino";

export type Logger = pino.Logger;

export function createLogger(level: string, instanceId: string): Logger {
  return pino({
    level,
    base: { instanceId },
    // Defence in depth: should a payload ever be handed to a log call, it is masked.
    redact: { paths: ["payload", "payloadJson", "*.payload", "*.payloadJson", "token", "*.token", "pass", "*.pass"], censor: "[redacted]" },
  });
}
