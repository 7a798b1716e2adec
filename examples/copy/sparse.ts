/**
 * Finding all-zero blocks in data that was read.
 *
 * @module
 */

/** Whether every byte is zero; word-at-a-time where alignment allows. */
export function isZero(bytes: Uint8Array): boolean {
  let i = 0;
  const head = (4 - (bytes.byteOffset % 4)) % 4;
  for (; i < head && i < bytes.length; i++) if (bytes[i] !== 0) return false;
  const words = Math.floor((bytes.length - i) / 4);
  if (words > 0) {
    const u32 = new Uint32Array(bytes.buffer, bytes.byteOffset + i, words);
    for (let w = 0; w < u32.length; w++) if (u32[w] !== 0) return false;
    i += words * 4;
  }
  for (; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/**
 * A test for "bytes [from, to) of `data` are all zero" that views the
 * buffer as words once, instead of once per block.
 */
export function blockTester(
  data: Uint8Array,
): (from: number, to: number) => boolean {
  if (data.byteOffset % 4 !== 0) {
    return (from, to) => isZero(data.subarray(from, to));
  }
  const words = new Uint32Array(
    data.buffer,
    data.byteOffset,
    Math.floor(data.length / 4),
  );
  return (from, to) => {
    if (from % 4 !== 0 || (to % 4 !== 0 && to !== data.length)) {
      return isZero(data.subarray(from, to));
    }
    const whole = Math.floor(to / 4);
    for (let w = from / 4; w < whole; w++) if (words[w] !== 0) return false;
    for (let b = whole * 4; b < to; b++) if (data[b] !== 0) return false;
    return true;
  };
}
