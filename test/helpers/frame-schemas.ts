// The frames' JSON Schemas from docs/asyncapi.yaml, compiled with ajv, and the checks every frame
// a test sends or receives goes through (test/helpers/test-controller.ts calls them): a frame the
// relay sends must match its schema; a frame a test sends must get the same verdict from the
// schema as from the relay's own parser (relay/protocol.ts). Either mismatch means the document
// and the code have drifted apart, and the check throws.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Ajv, type ValidateFunction } from "ajv";
import YAML from "yaml";
import { CLIENT_FRAME_FIELDS, RELAY_FRAME_FIELDS, parseClientFrame } from "../../relay/protocol.js";

const here = path.dirname(fileURLToPath(import.meta.url));
export const ASYNCAPI_FILE = path.resolve(here, "../../../docs/asyncapi.yaml");

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Doc = Record<string, any>;
export const asyncapi: Doc = YAML.parse(fs.readFileSync(ASYNCAPI_FILE, "utf8")) as Doc;

const ISO_DATE_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$/;
const ajv = new Ajv({ strict: false, allErrors: false, formats: { "date-time": ISO_DATE_TIME } });
ajv.addSchema({ $id: "asyncapi", components: asyncapi.components }, "asyncapi");

const validators = new Map<string, ValidateFunction>();
/** The validator of a frame type's schema (components.schemas.<type>). */
export function validatorFor(type: string): ValidateFunction {
  let v = validators.get(type);
  if (!v) {
    v = ajv.getSchema(`asyncapi#/components/schemas/${type}`);
    if (!v) throw new Error(`docs/asyncapi.yaml has no schema ${type}`);
    validators.set(type, v);
  }
  return v;
}

const CLIENT_TYPES = new Set(Object.keys(CLIENT_FRAME_FIELDS));
const RELAY_TYPES = new Set(Object.keys(RELAY_FRAME_FIELDS));

/** Why a frame is not a valid frame of `types` per the document; undefined when it is. */
function problem(frame: unknown, types: Set<string>): string | undefined {
  if (typeof frame !== "object" || frame === null || Array.isArray(frame)) return "not an object";
  const type = (frame as { type?: unknown }).type;
  if (typeof type !== "string" || !types.has(type)) return `no such frame type ${JSON.stringify(type)}`;
  const v = validatorFor(type);
  return v(frame) ? undefined : ajv.errorsText(v.errors);
}

export const relayFrameProblem = (frame: unknown): string | undefined => problem(frame, RELAY_TYPES);
export const clientFrameProblem = (frame: unknown): string | undefined => problem(frame, CLIENT_TYPES);

export class ContractViolation extends Error {
  override name = "ContractViolation";
}

/** A frame from the relay: must match the document. */
export function checkReceivedFrame(text: string): void {
  const why = relayFrameProblem(JSON.parse(text));
  if (why) throw new ContractViolation(`the relay sent a frame docs/asyncapi.yaml does not allow (${why}): ${text.slice(0, 300)}`);
}

/**
 * A frame to the relay: the document and relay/protocol.ts must agree on it. Not-JSON and
 * non-objects are the parser's alone. What a schema cannot say is allowed for: the credential
 * policy (forbidden_kind on a well-formed kind) and the payload's nesting limit.
 */
export function checkSentFrame(text: string): void {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return;
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) return;
  const why = clientFrameProblem(raw);
  const parsed = parseClientFrame(text);
  const fail = (what: string): never => {
    throw new ContractViolation(`${what}: ${text.slice(0, 300)}`);
  };
  if (parsed.ok) {
    const dropped = parsed.frame.type === "publish" ? parsed.frame.traceDropped : undefined;
    if (dropped === undefined && why) fail(`relay/protocol.ts accepts a frame docs/asyncapi.yaml refuses (${why})`);
    if (dropped !== undefined && !why) fail(`relay/protocol.ts drops a trace context (${dropped}) docs/asyncapi.yaml allows`);
    return;
  }
  const e = parsed.error;
  if (why) return;
  if (e.code === "forbidden_kind" || /nested deeper/.test(e.message)) return;
  fail(`docs/asyncapi.yaml allows a frame relay/protocol.ts refuses (${e.code}: ${e.message})`);
}
