/**
 * What the benchmark checks its reads against, and where its random reads
 * go: nbdkit's `pattern` plugin stores, in each 8-byte word, that word's
 * own offset, big-endian; the random offsets are seeded, shared with the
 * nbdsh script through a file. Pure, but for the file written.
 *
 * @module
 */

/** The size, and alignment, of a random read. */
export const RANDOM_SIZE = 4 * 1024;

/** Checks the 8-byte word at `at` (relative, 8-aligned) of `buf`, read from `base`. */
export function checkWord(buf: Uint8Array, base: number, at: number): void {
  const v = new DataView(buf.buffer, buf.byteOffset + at, 8);
  const want = base + at;
  const hi = v.getUint32(0);
  const lo = v.getUint32(4);
  if (hi !== Math.floor(want / 0x1_0000_0000) || lo !== want >>> 0) {
    throw new Error(
      `Data check failed at offset ${want}: read 0x${
        hi.toString(16).padStart(8, "0")
      }${lo.toString(16).padStart(8, "0")}, the pattern says ${want}`,
    );
  }
}

/** Checks one word of a request, a different one each time. */
export function checkOne(buf: Uint8Array, base: number, salt: number): void {
  const words = buf.length >>> 3;
  checkWord(buf, base, ((salt * 2654435761) >>> 0) % words * 8);
}

/** Checks up to `samples` words spread over `buf`, or all of them. */
export function checkMany(
  buf: Uint8Array,
  base: number,
  samples = Infinity,
): void {
  const words = buf.length >>> 3;
  const step = Math.max(1, Math.floor(words / samples));
  for (let w = 0; w < words; w += step) checkWord(buf, base, w * 8);
  checkWord(buf, base, (words - 1) * 8);
}

// ---------------------------------------------------------------------------
// The random offsets, shared with the nbdsh script through a file.

/** mulberry32: small, seedable, and good enough to scatter reads. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 0x1_0000_0000;
  };
}

/**
 * 4 KiB-aligned offsets inside the export, the same for every seed.
 *
 * @param count How many.
 * @param size Export size in bytes.
 * @param seed Generator seed.
 * @returns The offsets.
 */
export function randomOffsets(
  count: number,
  size: number,
  seed: number,
): number[] {
  const next = mulberry32(seed);
  const blocks = Math.floor(size / RANDOM_SIZE);
  const out = new Array<number>(count);
  for (let i = 0; i < count; i++) {
    out[i] = Math.floor(next() * blocks) * RANDOM_SIZE;
  }
  return out;
}

/** Little-endian u64s, as `array("Q")` reads them on x86 and arm64. */
export async function writeOffsets(
  path: string,
  offsets: number[],
): Promise<void> {
  const bytes = new Uint8Array(offsets.length * 8);
  const view = new DataView(bytes.buffer);
  offsets.forEach((o, i) => view.setBigUint64(i * 8, BigInt(o), true));
  await Deno.writeFile(path, bytes);
}
