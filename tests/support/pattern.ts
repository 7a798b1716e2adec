/**
 * Deterministic test data, one definition for every suite: bytes that
 * depend on a seed and on their own offset, so that data read from the
 * wrong place or for the wrong request never matches by accident, and the
 * content nbdkit's pattern plugin serves.
 *
 * @module
 */

/**
 * `length` bytes of the stream named by `seed`, from `offset` on. Each
 * 4-byte word is an xorshift of its own index and the seed, so no short
 * period repeats, and any window of one seed agrees with any other:
 * `pattern(8, s, 4)` is `pattern(12, s).subarray(4)`.
 *
 * @param length How many bytes.
 * @param seed Which stream; streams of different seeds differ.
 * @param offset Where in the stream the bytes start.
 * @returns A new array.
 * @example
 * ```ts
 * disk.data.set(pattern(1 << 20));
 * assert.deepEqual(await client.read(4096, 512), pattern(512, 1, 4096));
 * ```
 */
export function pattern(length: number, seed = 1, offset = 0): Uint8Array {
  const first = Math.floor(offset / 4);
  const words = Math.ceil((offset + length) / 4) - first;
  const out = new Uint8Array(words * 4);
  const view = new DataView(out.buffer);
  const salt = Math.imul(seed, 40503) + 1;
  for (let w = 0; w < words; w++) {
    let x = (Math.imul(first + w, 2654435761 | 0) + salt) >>> 0;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    view.setUint32(w * 4, x >>> 0, true);
  }
  const skip = offset - first * 4;
  return out.subarray(skip, skip + length);
}

/**
 * What nbdkit's pattern plugin serves from `offset` on: each 8-byte word
 * holds its own offset, big-endian.
 *
 * @param offset Where the bytes start in the export.
 * @param length How many bytes.
 * @returns A new array.
 */
export function nbdkitPattern(offset: number, length: number): Uint8Array {
  const start = offset - (offset % 8);
  const words = new Uint8Array(Math.ceil((offset + length - start) / 8) * 8);
  const view = new DataView(words.buffer);
  for (let at = 0; at < words.length; at += 8) {
    view.setBigUint64(at, BigInt(start + at));
  }
  return words.subarray(offset - start, offset - start + length);
}
