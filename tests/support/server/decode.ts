/**
 * Parsing what the client sends. Kept apart from `lib/`'s decoders on purpose:
 * a library decoding bug must not be mirrored by the server that tests it.
 * Malformed data throws a `RangeError`; the phases answer it as the spec
 * says (an error reply, or a hang-up).
 *
 * @module
 */

import {
  COMMAND_NAMES,
  numberAndName,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPT_INFO,
} from "../../../lib/constants.ts";
import type { ReceivedOption, ReceivedRequest } from "./hooks.ts";

const decoder = new TextDecoder();

/** A big-endian reader over option data that throws instead of overrunning. */
class Cursor {
  #view: DataView;
  #u8: Uint8Array;
  #at = 0;

  constructor(u8: Uint8Array) {
    this.#u8 = u8;
    this.#view = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  }

  get left(): number {
    return this.#u8.length - this.#at;
  }

  #take(n: number): number {
    if (n > this.left) throw new RangeError("short option data");
    const at = this.#at;
    this.#at += n;
    return at;
  }

  u16(): number {
    return this.#view.getUint16(this.#take(2));
  }

  u32(): number {
    return this.#view.getUint32(this.#take(4));
  }

  u64(): bigint {
    return this.#view.getBigUint64(this.#take(8));
  }

  string(n: number): string {
    const at = this.#take(n);
    return decoder.decode(this.#u8.subarray(at, at + n));
  }
}

/** The export name inside an EXPORT_NAME, INFO or GO option, if any. */
export function optionExportName(opt: ReceivedOption): string | undefined {
  if (opt.option === OPT_EXPORT_NAME) return decoder.decode(opt.payload);
  if (opt.option === OPT_GO || opt.option === OPT_INFO) {
    try {
      const c = new Cursor(opt.payload);
      return c.string(c.u32());
    } catch {
      return undefined;
    }
  }
  return undefined;
}

/**
 * The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name, requested info
 * types.
 *
 * @throws {RangeError} when the data is short or has bytes left over.
 */
export function decodeInfoRequest(
  payload: Uint8Array,
): { name: string; requested: number[] } {
  const requested: number[] = [];
  const c = new Cursor(payload);
  const name = c.string(c.u32());
  const n = c.u16();
  for (let i = 0; i < n; i++) requested.push(c.u16());
  if (c.left !== 0) throw new RangeError("trailing data");
  return { name, requested };
}

/**
 * The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
 * export name, queries (at most 1024).
 *
 * @throws {RangeError} when the data is short, too many, or has bytes left.
 */
export function decodeMetaContextRequest(
  payload: Uint8Array,
): { name: string; queries: string[] } {
  const queries: string[] = [];
  const c = new Cursor(payload);
  const name = c.string(c.u32());
  const n = c.u32();
  if (n > 1024) throw new RangeError("too many queries");
  for (let i = 0; i < n; i++) queries.push(c.string(c.u32()));
  if (c.left !== 0) throw new RangeError("trailing data");
  return { name, queries };
}

/**
 * A request header: 28 bytes, or 32 with extended headers. The magic is
 * returned as received; the caller checks it (and logs the request first).
 */
export function decodeRequestHeader(
  h: Uint8Array,
  extended: boolean,
  index: number,
): ReceivedRequest {
  const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
  return {
    magic: v.getUint32(0),
    extended,
    flags: v.getUint16(4),
    type: v.getUint16(6),
    name: numberAndName(COMMAND_NAMES, v.getUint16(6)),
    cookie: v.getBigUint64(8),
    offset: v.getBigUint64(16),
    length: extended ? v.getBigUint64(24) : BigInt(v.getUint32(24)),
    index,
  };
}
