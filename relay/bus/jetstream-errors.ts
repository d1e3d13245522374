// What an error from nats.js or the JetStream API means, for every part of the JetStream bus:
// describe() for messages, and the classifiers the bus decides by (retry, report, recreate). In one
// place so that start-up, publishing and consuming judge the same error the same way.

import { errors as natsErrors } from "@nats-io/transport-node";
import { JetStreamApiError } from "@nats-io/jetstream";

export function describe(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const cause = err.cause instanceof Error ? err.cause.message : undefined;
  return cause && !err.message.includes(cause) ? `${err.message} (${cause})` : err.message;
}

/** Node's certificate verification failures (UNABLE_TO_VERIFY_LEAF_SIGNATURE, CERT_HAS_EXPIRED, ERR_TLS_CERT_ALTNAME_INVALID, ...). */
export function isTlsError(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && /^(UNABLE_TO_|CERT_|ERR_TLS_|ERR_SSL_|DEPTH_ZERO_|SELF_SIGNED_|HOSTNAME_)/.test(code);
}

export function isAuthError(err: unknown): boolean {
  return (
    err instanceof natsErrors.AuthorizationError ||
    err instanceof natsErrors.UserAuthenticationExpiredError ||
    /authorization violation|authentication/i.test(describe(err))
  );
}

/** "JetStream not enabled": a config error at start-up, a leader election at run time. */
export function isNotEnabled(err: unknown): boolean {
  return err instanceof Error && (err.name === "JetStreamNotEnabled" || /jetstream (is )?not enabled/i.test(err.message));
}

/** The server refused this user the operation (its permissions): never transient. */
export function isPermissionViolation(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++)
    if (e instanceof natsErrors.PermissionViolationError || /permissions violation/i.test(e.message)) return true;
  return false;
}

/** Errors that mean "JetStream cannot answer right now", not "the request is wrong". */
export function isTransient(err: unknown): boolean {
  if (isPermissionViolation(err)) return false;
  if (err instanceof natsErrors.TimeoutError) return true;
  if (err instanceof natsErrors.RequestError) return true;
  if (err instanceof natsErrors.ClosedConnectionError || err instanceof natsErrors.DrainingConnectionError) return true;
  if (err instanceof natsErrors.ConnectionError) return true;
  if (err instanceof JetStreamApiError && err.status === 503) return true;
  return err instanceof Error && /no responders|timeout|temporarily unavailable|no suitable peers/i.test(describe(err));
}

export function isConsumerNotFound(err: unknown): boolean {
  return err instanceof Error && (err.name === "ConsumerNotFoundError" || /consumer not found/i.test(err.message));
}

export function isStreamNotFound(err: unknown): boolean {
  return err instanceof Error && (err.name === "StreamNotFoundError" || /stream not found/i.test(err.message));
}
