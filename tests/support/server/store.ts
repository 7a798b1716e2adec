/**
 * The exports and their backing memory: a sparse {@linkcode TestDisk} per
 * export, and the transmission flags an export advertises.
 *
 * @module
 */

import {
  FLAG_CAN_MULTI_CONN,
  FLAG_HAS_FLAGS,
  FLAG_READ_ONLY,
  FLAG_SEND_CACHE,
  FLAG_SEND_DF,
  FLAG_SEND_FAST_ZERO,
  FLAG_SEND_FLUSH,
  FLAG_SEND_FUA,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
} from "../../../lib/constants.ts";
import type { Extent } from "./encode.ts";

/** Pages are allocated on first write, so a large export costs nothing. */
const PAGE_SIZE = 64 * 1024;
/** base:allocation extents are cut at this length to fit a u32. */
const MAX_EXTENT = 0x80000000;

/**
 * The pieces of [offset, offset + length) page by page: the page `index`,
 * where in it the piece starts, its length `n`, and its place `at` in the
 * range.
 */
function* spans(
  offset: number,
  length: number,
): Generator<{ index: number; start: number; n: number; at: number }> {
  for (let at = 0; at < length;) {
    const pos = offset + at;
    const index = Math.floor(pos / PAGE_SIZE);
    const start = pos - index * PAGE_SIZE;
    const n = Math.min(PAGE_SIZE - start, length - at);
    yield { index, start, n, at };
    at += n;
  }
}

/** The memory behind one export: sparse, zero until written. */
export class TestDisk {
  /** Export size in bytes. */
  readonly size: number;
  #pages = new Map<number, Uint8Array>();

  /** @param size Export size; must be a safe integer. */
  constructor(size: number) {
    if (!Number.isSafeInteger(size) || size < 0) {
      throw new RangeError(`Bad export size ${size}`);
    }
    this.size = size;
  }

  /** Copies `length` bytes at `offset` out of the disk. */
  read(offset: number, length: number): Uint8Array {
    this.#check(offset, length);
    const out = new Uint8Array(length);
    for (const { index, start, n, at } of spans(offset, length)) {
      const page = this.#pages.get(index);
      if (page) out.set(page.subarray(start, start + n), at);
    }
    return out;
  }

  /** Writes `data` at `offset`, allocating pages. */
  write(offset: number, data: Uint8Array): void {
    this.#check(offset, data.length);
    for (const { index, start, n, at } of spans(offset, data.length)) {
      let page = this.#pages.get(index);
      if (!page) {
        page = new Uint8Array(PAGE_SIZE);
        this.#pages.set(index, page);
      }
      page.set(data.subarray(at, at + n), start);
    }
  }

  /**
   * Zeroes a range. With `punch`, pages wholly inside it are released (they
   * read as zero and report as holes); without, they stay allocated.
   */
  zero(offset: number, length: number, punch: boolean): void {
    this.#check(offset, length);
    for (const { index, start, n } of spans(offset, length)) {
      const page = this.#pages.get(index);
      if (punch && n === PAGE_SIZE) this.#pages.delete(index);
      else if (page) page.fill(0, start, start + n);
      else if (!punch) this.#pages.set(index, new Uint8Array(PAGE_SIZE));
    }
  }

  /** Whether any byte of the page holding `offset` was ever written. */
  allocated(offset: number): boolean {
    return this.#pages.has(Math.floor(offset / PAGE_SIZE));
  }

  /**
   * Splits a range into runs of allocated and unallocated pages, in order.
   * Bounded by the number of pages in the range.
   */
  runs(offset: number, length: number): { length: number; hole: boolean }[] {
    this.#check(offset, length);
    const out: { length: number; hole: boolean }[] = [];
    for (const { index, n } of spans(offset, length)) {
      const hole = !this.#pages.has(index);
      const last = out[out.length - 1];
      if (last && last.hole === hole && last.length + n <= MAX_EXTENT) {
        last.length += n;
      } else out.push({ length: n, hole });
    }
    return out;
  }

  #check(offset: number, length: number): void {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(
        `Range ${offset}+${length} is outside the disk of ${this.size} bytes`,
      );
    }
  }
}

/** Block size constraints, as in `NBD_INFO_BLOCK_SIZE`. */
export interface BlockSize {
  /** Minimum block size; offsets and lengths are multiples of it. */
  minimum: number;
  /** Preferred block size. */
  preferred: number;
  /** Maximum payload size. */
  maximum: number;
}

/** One export of the test server. */
export interface ExportConfig {
  /** Export name; `""` also answers the default-export request. */
  name: string;
  /** Size in bytes (backing memory is allocated lazily). */
  size: number;
  /** Initial contents from offset 0; all-zero 64 KiB pages stay holes. */
  data?: Uint8Array;
  /** Text for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`. */
  description?: string;
  /** Sets `NBD_FLAG_READ_ONLY`; writes fail with EPERM. */
  readOnly?: boolean;
  /**
   * Exact transmission flags (`NBD_FLAG_HAS_FLAGS` is always added). By
   * default: flush, FUA, trim, write zeroes, fast zero, cache, multi-conn,
   * and DF when structured replies are on.
   */
  flags?: number;
  /** Sent in `NBD_INFO_BLOCK_SIZE` when asked, and enforced on requests. */
  blockSize?: BlockSize;
  /**
   * A fixed `base:allocation` map from offset 0. By default the map follows
   * the backing memory: unwritten pages are `STATE_HOLE | STATE_ZERO`.
   */
  allocation?: Extent[];
  /** Further metadata contexts by name, each a map from offset 0. */
  contexts?: Record<string, Extent[]>;
}

/** An export as served: its configuration and its memory. */
export interface ExportState {
  config: ExportConfig;
  disk: TestDisk;
}

/** The context every export has. */
export const BASE_ALLOCATION = "base:allocation";

const DEFAULT_FLAGS = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM |
  FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO | FLAG_SEND_CACHE |
  FLAG_CAN_MULTI_CONN;

/** The transmission flags `c` advertises, with or without structured replies. */
export function transmissionFlags(
  c: ExportConfig,
  structured: boolean,
): number {
  let flags = c.flags ?? (DEFAULT_FLAGS | (structured ? FLAG_SEND_DF : 0));
  if (c.readOnly) flags |= FLAG_READ_ONLY;
  return (flags | FLAG_HAS_FLAGS) & 0xffff;
}

/** Writes initial contents, leaving all-zero pages unallocated (holes). */
export function writeSparse(disk: TestDisk, data: Uint8Array): void {
  for (let at = 0; at < data.length; at += PAGE_SIZE) {
    const page = data.subarray(at, Math.min(at + PAGE_SIZE, data.length));
    if (page.some((b) => b !== 0)) disk.write(at, page);
  }
}
