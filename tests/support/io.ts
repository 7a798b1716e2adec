/**
 * Whole writes and exact reads over anything with `write`/`read` (a
 * `Deno.Conn`, a `ByteStream`, an `FdStream`), for the tests that speak
 * raw bytes.
 *
 * @module
 */

/** Anything `writeAll` can write to. */
export interface Writer {
  write(p: Uint8Array): Promise<number>;
}

/** Anything `readExact` can read from. */
export interface Reader {
  read(p: Uint8Array): Promise<number | null>;
}

/** Writes all of `bytes`, however short each write is. */
export async function writeAll(w: Writer, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await w.write(bytes.subarray(at));
}

/**
 * Reads exactly `n` bytes.
 *
 * @throws {Error} saying how many bytes came when the stream ends first.
 */
export async function readExact(r: Reader, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let got = 0;
  while (got < n) {
    const m = await r.read(out.subarray(got));
    if (m === null) throw new Error(`EOF after ${got} of ${n} bytes`);
    got += m;
  }
  return out;
}
