// Server-to-client WebSocket text frames (RFC 6455 §5.2: FIN, opcode 1, unmasked), many in one
// buffer. The relay writes a tick's deliveries and answers to the socket with one write: through
// ws.send() each frame cost a Buffer for its text, another for its header and two stream writes.

/** Bytes of the header of an unmasked frame with a payload of n bytes. */
function headerBytes(n: number): number {
  return n < 126 ? 2 : n < 65_536 ? 4 : 10;
}

/** The frames, in order, as one buffer ready for the socket. */
export function encodeTextFrames(frames: readonly string[]): Buffer {
  const lengths = new Array<number>(frames.length);
  let total = 0;
  for (let i = 0; i < frames.length; i++) {
    const n = Buffer.byteLength(frames[i]!, "utf8");
    lengths[i] = n;
    total += headerBytes(n) + n;
  }
  const out = Buffer.allocUnsafe(total);
  let at = 0;
  for (let i = 0; i < frames.length; i++) {
    const n = lengths[i]!;
    out[at++] = 0x81; // FIN + text
    if (n < 126) out[at++] = n;
    else if (n < 65_536) {
      out[at++] = 126;
      out.writeUInt16BE(n, at);
      at += 2;
    } else {
      out[at++] = 127;
      out.writeUInt32BE(Math.floor(n / 2 ** 32), at);
      out.writeUInt32BE(n >>> 0, at + 4);
      at += 8;
    }
    at += out.write(frames[i]!, at, "utf8");
  }
  return out;
}
