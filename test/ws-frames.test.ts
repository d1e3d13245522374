// encodeTextFrames against ws's own parser: any frames, any lengths (each header size), in one
// buffer, split anywhere, come out as the same texts in the same order.

import t from "tap";
import fc from "fast-check";
import * as ws from "ws";
import { encodeTextFrames } from "../relay/ws-frames.js";

async function decode(buf: Buffer, cut: number): Promise<string[]> {
  const got: string[] = [];
  // A client's receiver: server frames are unmasked.
  // ws exports its Receiver (wrapper.mjs) without a type for it.
  const Receiver = (ws as unknown as { Receiver: new (o: { isServer: boolean }) => NodeJS.WritableStream & NodeJS.EventEmitter }).Receiver;
  const r = new Receiver({ isServer: false });
  r.on("message", (data: Buffer, isBinary: boolean) => {
    if (isBinary) throw new Error("binary frame");
    got.push(data.toString("utf8"));
  });
  const done = new Promise<void>((resolve, reject) => {
    r.on("error", reject);
    r.on("finish", resolve);
  });
  const at = Math.min(cut, buf.length);
  r.write(buf.subarray(0, at));
  r.end(buf.subarray(at));
  await done;
  return got;
}

t.test("frames encoded in one buffer decode to the same texts", async () => {
  const text = fc.oneof(
    fc.string({ unit: "grapheme", maxLength: 200 }),
    fc.integer({ min: 100, max: 70_000 }).map((n) => "é".repeat(Math.ceil(n / 2)).slice(0, n)),
  );
  await fc.assert(
    fc.asyncProperty(fc.array(text, { minLength: 1, maxLength: 20 }), fc.nat(), async (frames, cut) => {
      const got = await decode(encodeTextFrames(frames), cut);
      if (JSON.stringify(got) !== JSON.stringify(frames)) throw new Error(`decoded ${got.length} frames, not the ${frames.length} encoded`);
    }),
    { numRuns: 200 },
  );
});
