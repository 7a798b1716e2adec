/**
 * MD5 (RFC 1321), which Web Crypto leaves out and blkhash offers. Pure:
 * bytes in, 16 bytes out. Not for security, only for matching digests
 * other tools print.
 *
 * @module
 */

/** Per-round left rotations, four per round (RFC 1321 section 3.4). */
const SHIFTS = [
  7,
  12,
  17,
  22,
  5,
  9,
  14,
  20,
  4,
  11,
  16,
  23,
  6,
  10,
  15,
  21,
];

/** T[i] = floor(|sin(i + 1)| * 2^32), the RFC's sine table. */
const T = Uint32Array.from(
  { length: 64 },
  (_, i) => Math.floor(Math.abs(Math.sin(i + 1)) * 0x100000000) >>> 0,
);

/** Which message word step `i` reads, per round. */
function wordIndex(i: number): number {
  if (i < 16) return i;
  if (i < 32) return (5 * i + 1) % 16;
  if (i < 48) return (3 * i + 5) % 16;
  return (7 * i) % 16;
}
const WORD = Uint8Array.from({ length: 64 }, (_, i) => wordIndex(i));
const SHIFT = Uint8Array.from(
  { length: 64 },
  (_, i) => SHIFTS[(i >> 4) * 4 + (i % 4)]!,
);

/** Folds 64-byte blocks of `view` from `at` into `state`. */
function compress(
  state: Uint32Array,
  view: DataView,
  at: number,
  blocks: number,
  x: Uint32Array,
): void {
  for (let b = 0; b < blocks; b++, at += 64) {
    for (let j = 0; j < 16; j++) x[j] = view.getUint32(at + 4 * j, true);
    let a = state[0]!, bb = state[1]!, c = state[2]!, d = state[3]!;
    for (let i = 0; i < 64; i++) {
      let f: number;
      if (i < 16) f = (bb & c) | (~bb & d);
      else if (i < 32) f = (d & bb) | (~d & c);
      else if (i < 48) f = bb ^ c ^ d;
      else f = c ^ (bb | ~d);
      const sum = (a + f + T[i]! + x[WORD[i]!]!) | 0;
      const s = SHIFT[i]!;
      a = d;
      d = c;
      c = bb;
      bb = (bb + ((sum << s) | (sum >>> (32 - s)))) | 0;
    }
    state[0] = (state[0]! + a) | 0;
    state[1] = (state[1]! + bb) | 0;
    state[2] = (state[2]! + c) | 0;
    state[3] = (state[3]! + d) | 0;
  }
}

/**
 * The MD5 digest of `data`.
 *
 * @param data The message.
 * @returns 16 bytes.
 */
export function md5(data: Uint8Array): Uint8Array {
  const state = Uint32Array.of(0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476);
  const x = new Uint32Array(16);
  const whole = Math.floor(data.length / 64);
  compress(
    state,
    new DataView(data.buffer, data.byteOffset, data.byteLength),
    0,
    whole,
    x,
  );
  // The tail, a 0x80 byte, zeroes, and the length in bits (64-bit LE).
  const rest = data.length - whole * 64;
  const tail = new Uint8Array(rest < 56 ? 64 : 128);
  tail.set(data.subarray(whole * 64));
  tail[rest] = 0x80;
  const tv = new DataView(tail.buffer);
  const bits = data.length * 8;
  tv.setUint32(tail.length - 8, bits >>> 0, true);
  tv.setUint32(tail.length - 4, Math.floor(bits / 0x100000000), true);
  compress(state, tv, 0, tail.length / 64, x);
  const out = new Uint8Array(16);
  const ov = new DataView(out.buffer);
  for (let i = 0; i < 4; i++) ov.setUint32(4 * i, state[i]!, true);
  return out;
}
