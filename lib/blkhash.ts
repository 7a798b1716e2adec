/**
 * blkhash: the block-based hash of a disk image that nbdcopy prints with
 * `--blkhash` (libnbd 1.24), after Nir Soffer's blkhash project. The image
 * is cut into blocks of `blockSize` bytes (the last one may be shorter),
 * each block is hashed on its own with the digest, and the result is the
 * digest of all the block digests in order followed by the image's length
 * as a 64-bit little-endian number.
 *
 * Blocks are independent, so they can be hashed in any order and in many
 * threads; and every all-zero block has the same digest, so a hole or a
 * zero extent is hashed without reading it.
 *
 * @module
 */

import type { NbdClient } from "./client.ts";
import { STATE_ZERO } from "./constants.ts";
import { md5 } from "./_md5.ts";

/** The digests a blkhash can be built on. */
export type BlkhashDigest = "md5" | "sha1" | "sha256" | "sha512";

/** Digest lengths in bytes. */
const DIGEST_LENGTH: Readonly<Record<BlkhashDigest, number>> = {
  md5: 16,
  sha1: 20,
  sha256: 32,
  sha512: 64,
};

/** Web Crypto's names for the digests it has (all but MD5). */
const SUBTLE_NAME: Readonly<Record<Exclude<BlkhashDigest, "md5">, string>> = {
  sha1: "SHA-1",
  sha256: "SHA-256",
  sha512: "SHA-512",
};

/** nbdcopy's default block size: 64 KiB. */
export const BLKHASH_DEFAULT_BLOCK_SIZE = 64 * 1024;

/** Whether `name` is one of the {@linkcode BlkhashDigest}s. */
export function isBlkhashDigest(name: string): name is BlkhashDigest {
  return Object.hasOwn(DIGEST_LENGTH, name);
}

/**
 * Checks the digest and block size a caller passed.
 *
 * @throws {TypeError} For an unknown digest.
 * @throws {RangeError} For a block size that is not a power of two up to
 * 1 GiB.
 */
function checkParams(digest: string, blockSize: number): void {
  if (!isBlkhashDigest(digest)) {
    throw new TypeError(
      `blkhash: unknown digest "${digest}" (md5, sha1, sha256 or sha512)`,
    );
  }
  if (
    !Number.isInteger(blockSize) || blockSize < 1 || blockSize > 1 << 30 ||
    (blockSize & (blockSize - 1)) !== 0
  ) {
    throw new RangeError(
      `blkhash: the block size must be a power of two up to 1 GiB, not ${blockSize}`,
    );
  }
}

/**
 * The most memory the per-block table of one image may take: one byte of
 * state and one digest per block. A 1 TiB image in 64 KiB blocks of
 * SHA-512 takes 1.1 GiB; smaller blocks of a large image are refused
 * before anything is read or written, instead of failing mid-way.
 */
export const MAX_BLKHASH_TABLE = 2 * 1024 * 1024 * 1024;

/** Refuses a table past {@linkcode MAX_BLKHASH_TABLE}, naming the fix. */
function checkTableSize(size: number, blockSize: number, bytes: number): void {
  if (bytes <= MAX_BLKHASH_TABLE) return;
  const gib = (n: number) => (n / 2 ** 30).toFixed(1);
  throw new RangeError(
    `blkhash: ${size} bytes in blocks of ${blockSize} need a ${
      gib(bytes)
    } GiB table (at most ${
      gib(MAX_BLKHASH_TABLE)
    } GiB); use a larger block size`,
  );
}

/**
 * The table check of a {@linkcode Blkhasher} for an image of `size` bytes,
 * without making the table: for a tool that must refuse before it opens
 * its destination.
 *
 * @param digest The digest.
 * @param blockSize Bytes per block.
 * @param size The image's length.
 * @throws {TypeError} For an unknown digest.
 * @throws {RangeError} For a bad block size, or a table past
 *   {@linkcode MAX_BLKHASH_TABLE}.
 * @example
 * ```ts
 * import { checkBlkhash } from "@nbd/client";
 * checkBlkhash("sha256", 65536, 2 ** 40); // 1 TiB: fine
 * ```
 */
export function checkBlkhash(
  digest: BlkhashDigest,
  blockSize: number,
  size: number,
): void {
  checkParams(digest, blockSize);
  checkTableSize(
    size,
    blockSize,
    Math.ceil(size / blockSize) * (1 + DIGEST_LENGTH[digest]),
  );
}

/**
 * One digest of `bytes`. Web Crypto copies its input before the promise
 * settles, so the caller may reuse the buffer at once.
 */
export function digestOf(
  digest: BlkhashDigest,
  bytes: Uint8Array,
): Promise<Uint8Array> {
  if (digest === "md5") return Promise.resolve(md5(bytes));
  return crypto.subtle.digest(
    SUBTLE_NAME[digest],
    bytes as Uint8Array<ArrayBuffer>,
  ).then((d) => new Uint8Array(d));
}

/** Lowercase hexadecimal, as nbdcopy prints a digest. */
export function toHex(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

/** Block states in the table. */
const UNKNOWN = 0;
const ZERO = 1;
const DATA = 2;

/**
 * A {@linkcode Blkhasher}'s table of block digests in shared memory, so
 * that hashers in several workers fill one table; pass it in a message.
 */
export interface BlkhashShared {
  /** The digest the blocks are hashed with. */
  digest: BlkhashDigest;
  /** Bytes per block. */
  blockSize: number;
  /** The image's length. */
  size: number;
  /** One state byte per block. */
  states: SharedArrayBuffer;
  /** One digest per block, in order. */
  digests: SharedArrayBuffer;
}

/**
 * Bytes of a block that arrived in pieces (an extent that ends inside a
 * block, a block two threads share): handed from one hasher to another
 * with {@linkcode Blkhasher.pieces} and {@linkcode Blkhasher.update}.
 */
export interface BlkhashPiece {
  /** Where the piece is in the image. */
  offset: number;
  /** `null`: that many zero bytes. */
  bytes: Uint8Array | null;
  /** How many bytes. */
  length: number;
}

/** A block seen in part so far. */
interface Partial {
  buf: Uint8Array;
  /** Bytes seen. */
  n: number;
  /** What was seen, `[from, to)` within the block, for {@linkcode Blkhasher.pieces}. */
  seen: Array<[number, number, boolean]>;
}

/**
 * Builds a blkhash from data and zero ranges given in any order, each byte
 * exactly once: what a copy sees as it goes. Whole blocks are hashed as
 * they arrive; a block seen in parts waits until it is complete.
 *
 * @example
 * ```ts
 * import { Blkhasher } from "@nbd/client";
 *
 * const h = new Blkhasher("sha256", 65536, 131072);
 * await h.zero(65536, 65536);
 * await h.update(0, new Uint8Array(65536).fill(1));
 * console.log(await h.hex());
 * ```
 */
export class Blkhasher {
  /** The digest the blocks are hashed with. */
  readonly digest: BlkhashDigest;
  /** Bytes per block. */
  readonly blockSize: number;
  #size: number | undefined;
  #len: number;
  #states: Uint8Array;
  #digests: Uint8Array;
  #shared: BlkhashShared | undefined;
  #partial = new Map<number, Partial>();
  /** The furthest byte seen, the size when none was given. */
  #end = 0;

  /**
   * A hasher for one image.
   *
   * @param digest The digest to build on.
   * @param blockSize Bytes per block, a power of two (nbdcopy: 64 KiB).
   * @param size The image's length when known beforehand: the table is
   * then made in shared memory (see {@linkcode Blkhasher.shared}).
   * Without it (a stream) the table grows as data comes.
   * @throws {TypeError} For an unknown digest.
   * @throws {RangeError} For a bad block size or size.
   */
  constructor(digest: BlkhashDigest, blockSize: number, size?: number) {
    checkParams(digest, blockSize);
    this.digest = digest;
    this.blockSize = blockSize;
    this.#len = DIGEST_LENGTH[digest];
    if (size === undefined) {
      this.#size = undefined;
      this.#states = new Uint8Array(64);
      this.#digests = new Uint8Array(64 * this.#len);
      return;
    }
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`blkhash: bad size ${size}`);
    }
    this.#size = size;
    const blocks = Math.ceil(size / blockSize);
    checkTableSize(size, blockSize, blocks * (1 + this.#len));
    const states = new SharedArrayBuffer(blocks);
    const digests = new SharedArrayBuffer(blocks * this.#len);
    this.#shared = { digest, blockSize, size, states, digests };
    this.#states = new Uint8Array(states);
    this.#digests = new Uint8Array(digests);
  }

  /**
   * A hasher over the table of another one (in another worker): complete
   * blocks go straight into it; pieces must be handed back.
   *
   * @param shared What {@linkcode Blkhasher.shared} gave.
   * @returns A hasher writing into that table.
   */
  static fromShared(shared: BlkhashShared): Blkhasher {
    const h = new Blkhasher(shared.digest, shared.blockSize);
    h.#size = shared.size;
    h.#shared = shared;
    h.#states = new Uint8Array(shared.states);
    h.#digests = new Uint8Array(shared.digests);
    return h;
  }

  /** The shared table, for {@linkcode Blkhasher.fromShared}; none without a size. */
  get shared(): BlkhashShared | undefined {
    return this.#shared;
  }

  /** Makes room for block `i` in a growing table. */
  #reserve(i: number): void {
    if (this.#size !== undefined) {
      if (i >= this.#states.length) {
        throw new RangeError(
          `blkhash: offset ${
            i * this.blockSize
          } is past the size ${this.#size}`,
        );
      }
      return;
    }
    if (i < this.#states.length) return;
    const n = Math.max(i + 1, this.#states.length * 2);
    const states = new Uint8Array(n);
    states.set(this.#states);
    const digests = new Uint8Array(n * this.#len);
    digests.set(this.#digests);
    this.#states = states;
    this.#digests = digests;
  }

  /** The length of block `i`: shorter only as the last block of a known size. */
  #blockLength(i: number): number {
    const start = i * this.blockSize;
    return this.#size === undefined
      ? this.blockSize
      : Math.min(this.blockSize, this.#size - start);
  }

  async #hashBlock(i: number, bytes: Uint8Array): Promise<void> {
    const d = await digestOf(this.digest, bytes);
    this.#digests.set(d, i * this.#len);
    this.#states[i] = DATA;
  }

  /**
   * Adds bytes `[from, to)` of block `i` (data, or zeroes when `data` is
   * null) to what was seen of it, and hashes it once it is complete.
   */
  async #piece(
    i: number,
    from: number,
    data: Uint8Array | null,
    length: number,
  ): Promise<void> {
    this.#reserve(i);
    if (this.#states[i] !== UNKNOWN) {
      throw new Error(`blkhash: block ${i} was hashed already`);
    }
    let p = this.#partial.get(i);
    if (!p) {
      p = { buf: new Uint8Array(this.blockSize), n: 0, seen: [] };
      this.#partial.set(i, p);
    }
    if (data) p.buf.set(data.subarray(0, length), from);
    p.n += length;
    p.seen.push([from, from + length, data !== null]);
    if (this.#size !== undefined && p.n >= this.#blockLength(i)) {
      this.#partial.delete(i);
      await this.#hashBlock(i, p.buf.subarray(0, this.#blockLength(i)));
    } else if (this.#size === undefined && p.n === this.blockSize) {
      this.#partial.delete(i);
      await this.#hashBlock(i, p.buf);
    }
  }

  /** Walks `[offset, offset + length)` block by block. */
  async #walk(
    offset: number,
    length: number,
    data: Uint8Array | null,
  ): Promise<void> {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0) {
      throw new RangeError(`blkhash: bad range ${offset}+${length}`);
    }
    if (this.#size !== undefined && offset + length > this.#size) {
      throw new RangeError(
        `blkhash: ${offset}+${length} is past the size ${this.#size}`,
      );
    }
    this.#end = Math.max(this.#end, offset + length);
    const B = this.blockSize;
    const pending: Promise<void>[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const i = Math.floor(pos / B);
      const from = pos - i * B;
      const n = Math.min(B - from, length - done);
      const slice = data ? data.subarray(done, done + n) : null;
      if (from === 0 && n === this.#blockLength(i) && n === B) {
        this.#reserve(i);
        if (this.#states[i] !== UNKNOWN || this.#partial.has(i)) {
          throw new Error(`blkhash: block ${i} was hashed already`);
        }
        if (slice) pending.push(this.#hashBlock(i, slice));
        else this.#states[i] = ZERO;
      } else {
        pending.push(this.#piece(i, from, slice, n));
      }
      done += n;
    }
    await Promise.all(pending);
  }

  /**
   * Hashes `data`, the bytes at `offset`. The buffer may be reused once the
   * promise settles.
   *
   * @param offset Where the bytes are in the image.
   * @param data The bytes.
   * @returns When they are hashed.
   * @throws {RangeError} Past the size.
   * @throws {Error} When a block is given twice.
   */
  update(offset: number, data: Uint8Array): Promise<void> {
    return this.#walk(offset, data.length, data);
  }

  /**
   * Hashes `length` zero bytes at `offset` without reading them: whole
   * blocks cost nothing.
   *
   * @param offset Where the zeroes are in the image.
   * @param length How many.
   * @returns When they are hashed.
   * @throws {RangeError} Past the size.
   * @throws {Error} When a block is given twice.
   */
  zero(offset: number, length: number): Promise<void> {
    return this.#walk(offset, length, null);
  }

  /**
   * The blocks seen only in part, as pieces for another hasher over the
   * same table (the one that will finish), which adds them with
   * {@linkcode Blkhasher.update} and {@linkcode Blkhasher.zero}.
   *
   * @returns The pieces; this hasher forgets them.
   */
  pieces(): BlkhashPiece[] {
    const out: BlkhashPiece[] = [];
    for (const [i, p] of this.#partial) {
      for (const [a, b, data] of p.seen) {
        out.push({
          offset: i * this.blockSize + a,
          bytes: data ? p.buf.slice(a, b) : null,
          length: b - a,
        });
      }
    }
    this.#partial.clear();
    return out;
  }

  /**
   * Adds pieces from {@linkcode Blkhasher.pieces}.
   *
   * @param pieces Pieces of another hasher over this table.
   * @returns When they are hashed.
   */
  async addPieces(pieces: BlkhashPiece[]): Promise<void> {
    await Promise.all(
      pieces.map((p) =>
        p.bytes ? this.update(p.offset, p.bytes) : this.zero(p.offset, p.length)
      ),
    );
  }

  /**
   * The blkhash of the image, once every byte was given.
   *
   * @returns The digest's bytes.
   * @throws {Error} When a block was never given.
   */
  async final(): Promise<Uint8Array> {
    const size = this.#size ?? this.#end;
    const blocks = Math.ceil(size / this.blockSize);
    // A stream's last block is shorter and complete only now.
    for (const [i, p] of this.#partial) {
      const want = Math.min(this.blockSize, size - i * this.blockSize);
      if (p.n !== want) {
        throw new Error(
          `blkhash: block ${i} is incomplete (${p.n} of ${want} bytes)`,
        );
      }
      this.#partial.delete(i);
      await this.#hashBlock(i, p.buf.subarray(0, want));
    }
    const B = this.blockSize;
    const zeroDigest = await digestOf(this.digest, new Uint8Array(B));
    const all = new Uint8Array(blocks * this.#len + 8);
    for (let i = 0; i < blocks; i++) {
      const state = i < this.#states.length ? this.#states[i] : UNKNOWN;
      if (state === DATA) {
        all.set(
          this.#digests.subarray(i * this.#len, (i + 1) * this.#len),
          i * this.#len,
        );
      } else if (state === ZERO) {
        const n = Math.min(B, size - i * B);
        all.set(
          n === B ? zeroDigest : await digestOf(this.digest, new Uint8Array(n)),
          i * this.#len,
        );
      } else {
        throw new Error(`blkhash: block ${i} was never hashed`);
      }
    }
    new DataView(all.buffer).setBigUint64(
      blocks * this.#len,
      BigInt(size),
      true,
    );
    return await digestOf(this.digest, all);
  }

  /**
   * {@linkcode Blkhasher.final} as nbdcopy prints it: lowercase hex.
   *
   * @returns The hex digest.
   * @throws {Error} When a block was never given.
   */
  async hex(): Promise<string> {
    return toHex(await this.final());
  }
}

/** Options of {@linkcode blkhash}. */
export interface BlkhashOptions {
  /** The digest (default `"sha256"`, as nbdcopy). */
  digest?: BlkhashDigest;
  /** Bytes per block, a power of two (default 64 KiB, as nbdcopy). */
  blockSize?: number;
  /** Where the range starts (default 0). */
  offset?: number;
  /** How long it is (default: to the end of the export). */
  length?: number;
  /**
   * Windows read at once (default: 4 per connection of the client, at most
   * 64 MiB in flight).
   */
  concurrency?: number;
  /** Stops the hash, rejecting with its reason. */
  signal?: AbortSignal;
}

/** Bytes one window of {@linkcode blkhash} covers at least. */
const WINDOW = 2 * 1024 * 1024;

/**
 * The blkhash of a range of an export, as `nbdcopy --blkhash` prints it for
 * a copy of that range: to verify a backup without copying it. Where the
 * client negotiated `base:allocation`, extents the server reports as zero
 * are hashed without being read; the rest is read with several windows in
 * flight, spread over the client's connections.
 *
 * @param client A connected client.
 * @param options Digest, block size, range, concurrency and signal.
 * @returns The digest in lowercase hex.
 * @throws {TypeError} For an unknown digest.
 * @throws {RangeError} For a bad block size or a range outside the export.
 * @throws {NbdError} When a read or block status request fails.
 * @example
 * ```ts
 * import { blkhash, connect } from "@nbd/client";
 *
 * await using nbd = await connect("nbd+unix:///?socket=/tmp/nbd.sock", {
 *   metaContexts: ["base:allocation"],
 * });
 * console.log(await blkhash(nbd, { digest: "sha256" }));
 * ```
 */
export async function blkhash(
  client: NbdClient,
  options: BlkhashOptions = {},
): Promise<string> {
  const digest = options.digest ?? "sha256";
  const B = options.blockSize ?? BLKHASH_DEFAULT_BLOCK_SIZE;
  checkParams(digest, B);
  const start = options.offset ?? 0;
  const length = options.length ?? client.size - start;
  if (
    !Number.isSafeInteger(start) || !Number.isSafeInteger(length) ||
    start < 0 || length < 0 || start + length > client.size
  ) {
    throw new RangeError(
      `blkhash: range ${start}+${length} is outside the export (${client.size} bytes)`,
    );
  }
  const signal = options.signal;
  const req = signal ? { signal } : {};
  const hasher = new Blkhasher(digest, B, length);
  const window = Math.max(B, Math.ceil(WINDOW / B) * B);
  const useStatus = client.metaContexts.includes("base:allocation");
  const concurrency = Math.max(
    1,
    Math.min(
      options.concurrency ?? 4 * Math.max(1, client.connections),
      Math.floor(64 * 1024 * 1024 / window),
    ),
  );

  /** Hashes window `[a, b)` of the range (offsets relative to it). */
  const hashWindow = async (a: number, b: number, buf: Uint8Array) => {
    // Ranges of the window that read as zero, from block status.
    const zero: Array<[number, number]> = [];
    if (useStatus) {
      let pos = a;
      while (pos < b) {
        const reply = await client.blockStatus(start + pos, b - pos, req);
        const before = pos;
        for (const e of reply["base:allocation"] ?? []) {
          if (pos >= b) break;
          const end = Math.min(b, pos + e.length);
          if ((e.flags & STATE_ZERO) !== 0) {
            const last = zero.at(-1);
            if (last && last[1] === pos) last[1] = end;
            else zero.push([pos, end]);
          }
          pos = end;
        }
        if (pos === before) {
          throw new Error(`blkhash: no extents returned at ${start + pos}`);
        }
      }
    }
    // Data between the zero ranges is read; whole zero blocks are not
    // hashed at all, partial ones are hashed as the zeroes they read as.
    const data = buf.subarray(0, b - a);
    data.fill(0);
    let pos = a;
    const reads: Promise<void>[] = [];
    for (const [za, zb] of [...zero, [b, b] as [number, number]]) {
      if (za > pos) {
        reads.push(
          client.readInto(data.subarray(pos - a, za - a), start + pos, req),
        );
      }
      pos = Math.max(pos, zb);
    }
    await Promise.all(reads);
    // Blocks wholly inside one zero range cost nothing; the rest is hashed
    // from the buffer.
    let z = 0;
    for (let o = a; o < b; o += B) {
      const e = Math.min(b, o + B);
      while (z < zero.length && zero[z]![1] <= o) z++;
      const inZero = z < zero.length && zero[z]![0] <= o && zero[z]![1] >= e;
      if (inZero) await hasher.zero(o, e - o);
      else await hasher.update(o, data.subarray(o - a, e - a));
    }
  };

  let next = 0;
  let failed = false;
  const worker = async () => {
    const buf = new Uint8Array(window);
    while (next < length && !failed) {
      signal?.throwIfAborted();
      const a = next;
      const b = Math.min(length, a + window);
      next = b;
      try {
        await hashWindow(a, b, buf);
      } catch (e) {
        // The other windows stop at their next turn.
        failed = true;
        throw e;
      }
    }
  };
  const workers: Promise<void>[] = [];
  for (let i = 0; i < concurrency; i++) workers.push(worker());
  const results = await Promise.allSettled(workers);
  for (const r of results) if (r.status === "rejected") throw r.reason;
  return await hasher.hex();
}
