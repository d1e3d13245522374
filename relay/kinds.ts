// Kind policy: which kinds may become a subject, and which must never leave the host.

import type { ErrorCode } from "./protocol.js";

/** A kind becomes the last token of a subject: no dots, no wildcards, no spaces. */
export const KIND_PATTERN = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;

/** Kinds that carry credentials: they stay on the host, whatever the controller asks. */
export const CREDENTIAL_BEARING_KINDS = ["TenantAssignments", "TenantConfigUpdated", "TenantRevoked"] as const;

// Compared after folding case and dropping everything but letters and digits, so that
// " tenantRevoked", "TENANT_REVOKED" or "Tenant.Revoked" are recognised as what they are.
const fold = (s: string): string => s.toLowerCase().replace(/[^a-z0-9]/g, "");
const FORBIDDEN = new Set(CREDENTIAL_BEARING_KINDS.map(fold));

export function isCredentialBearing(kind: string): boolean {
  return FORBIDDEN.has(fold(kind));
}

/** Why a kind cannot be published, or undefined when it can. The credential check comes first. */
export function kindProblem(kind: string): { code: ErrorCode; message: string } | undefined {
  if (isCredentialBearing(kind))
    return { code: "forbidden_kind", message: `kind ${JSON.stringify(kind.slice(0, 64))} carries credentials and never leaves this host` };
  if (!KIND_PATTERN.test(kind))
    return { code: "invalid_frame", message: `"kind" must match ${KIND_PATTERN.source}` };
  return undefined;
}
