/**
 * Byte-level codec: a big-endian reader cursor that fails with a protocol
 * error instead of reading past the end, a writer, and the fixed-size
 * headers of the protocol. No I/O happens here.
 *
 * @module
 */

import {
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  REQUEST_MAGIC,
} from "./constants.ts";
import { NbdProtocolError, type ProtocolPhase } from "./errors.ts";

const decoder = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

/** Sizes of the fixed parts of messages, as sums of their fields. */
export const SIZES = {
  /** NBDMAGIC + IHAVEOPT or cliserv magic */
  greeting: 8 + 8,
  /** size, flags, reserved zeroes (after the two magics) */
  oldstyleRest: 8 + 4 + 124,
  /** handshake flags */
  handshakeFlags: 2,
  /** client flags */
  clientFlags: 4,
  /** IHAVEOPT, option, length */
  optionHeader: 8 + 4 + 4,
  /** magic, option, reply type, length */
  optionReplyHeader: 8 + 4 + 4 + 4,
  /** size, transmission flags (NBD_OPT_EXPORT_NAME reply) */
  exportNameReply: 8 + 2,
  /** reserved zeroes after the NBD_OPT_EXPORT_NAME reply */
  exportNameZeroes: 124,
  /** magic, flags, type, cookie, offset, length */
  request: 4 + 2 + 2 + 8 + 8 + 4,
  /** magic, flags, type, cookie, offset, length (64-bit) */
  extendedRequest: 4 + 2 + 2 + 8 + 8 + 8,
  /** magic, error, cookie */
  simpleReply: 4 + 4 + 8,
  /** magic, flags, type, cookie, length */
  structuredReply: 4 + 2 + 2 + 8 + 4,
  /** magic, flags, type, cookie, offset, length (64-bit) */
  extendedReply: 4 + 2 + 2 + 8 + 8 + 8,
} as const;

/** A DataView over exactly the bytes of `u8`, wherever they sit. */
export function viewOf(u8: Uint8Array): DataView {
  return new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
}

/** "1 byte", "2 bytes": a count and its noun, for messages. */
export function plural(n: number | bigint, noun: string): string {
  return `${n} ${noun}${n === 1 || n === 1n ? "" : "s"}`;
}

/** Decodes UTF-8 that the spec requires to be valid. */
export function decodeString(
  bytes: Uint8Array,
  what: string,
  phase: ProtocolPhase,
): string {
  try {
    return decoder.decode(bytes);
  } catch {
    throw new NbdProtocolError(phase, `${what} is not valid UTF-8`);
  }
}

/** Encodes a string as UTF-8. */
export function encodeString(s: string): Uint8Array {
  return encoder.encode(s);
}

/**
 * A cursor over one received message. Reading past its end is a protocol
 * error that names the message.
 */
export class Reader {
  #bytes: Uint8Array;
  #view: DataView;
  #pos = 0;
  #what: string;
  #phase: ProtocolPhase;

  /**
   * @param bytes The whole message.
   * @param what Names the message in errors.
   * @param phase The protocol phase, for errors.
   */
  constructor(bytes: Uint8Array, what: string, phase: ProtocolPhase) {
    this.#bytes = bytes;
    this.#view = viewOf(bytes);
    this.#what = what;
    this.#phase = phase;
  }

  /** Bytes not yet read. */
  get remaining(): number {
    return this.#bytes.length - this.#pos;
  }

  #need(n: number): number {
    if (this.remaining < n) {
      throw new NbdProtocolError(
        this.#phase,
        `${this.#what} is too short: ${
          plural(this.#bytes.length, "byte")
        }, needed ${this.#pos + n}`,
      );
    }
    const at = this.#pos;
    this.#pos += n;
    return at;
  }

  /** Reads an unsigned 16-bit integer. */
  u16(): number {
    return this.#view.getUint16(this.#need(2));
  }

  /** Reads an unsigned 32-bit integer. */
  u32(): number {
    return this.#view.getUint32(this.#need(4));
  }

  /** Reads an unsigned 64-bit integer. */
  u64(): bigint {
    return this.#view.getBigUint64(this.#need(8));
  }

  /** Returns the next `n` bytes (a view, not a copy). */
  bytes(n: number): Uint8Array {
    const at = this.#need(n);
    return this.#bytes.subarray(at, at + n);
  }

  /** Reads an `n`-byte UTF-8 string. */
  string(n: number, what = this.#what): string {
    return decodeString(this.bytes(n), what, this.#phase);
  }

  /** Reads a 32-bit length, checks it against what is left, then the string. */
  lengthPrefixedString(what: string): string {
    const n = this.u32();
    if (n > this.remaining) {
      throw new NbdProtocolError(
        this.#phase,
        `${what} claims ${n} bytes but ${this.#what} has only ${this.remaining} left`,
      );
    }
    return this.string(n, what);
  }

  /** Everything not yet read, as a string. */
  restString(what = this.#what): string {
    return this.string(this.remaining, what);
  }

  /** Fails unless every byte was consumed. */
  expectEnd(): void {
    if (this.remaining !== 0) {
      throw new NbdProtocolError(
        this.#phase,
        `${this.#what} has ${
          plural(this.remaining, "unexpected trailing byte")
        }`,
      );
    }
  }
}

/** Builds a message of known size, big-endian. */
export class Writer {
  #bytes: Uint8Array;
  #view: DataView;
  #pos = 0;

  /** @param size The exact size of the message. */
  constructor(size: number) {
    this.#bytes = new Uint8Array(size);
    this.#view = viewOf(this.#bytes);
  }

  /** Appends an unsigned 16-bit integer. */
  u16(v: number): this {
    this.#view.setUint16(this.#pos, v);
    this.#pos += 2;
    return this;
  }

  /** Appends an unsigned 32-bit integer. */
  u32(v: number): this {
    this.#view.setUint32(this.#pos, v);
    this.#pos += 4;
    return this;
  }

  /** Appends an unsigned 64-bit integer. */
  u64(v: bigint): this {
    this.#view.setBigUint64(this.#pos, v);
    this.#pos += 8;
    return this;
  }

  /** Appends raw bytes. */
  bytes(b: Uint8Array): this {
    this.#bytes.set(b, this.#pos);
    this.#pos += b.length;
    return this;
  }

  /** The finished message; asserts it was filled exactly. */
  done(): Uint8Array {
    if (this.#pos !== this.#bytes.length) {
      throw new Error(
        `Internal error: message built with ${this.#pos} of ${this.#bytes.length} bytes`,
      );
    }
    return this.#bytes;
  }
}

/** Encodes a client option: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data?: Uint8Array): Uint8Array {
  const payload = data ?? new Uint8Array(0);
  return new Writer(SIZES.optionHeader + payload.length)
    .u64(IHAVEOPT)
    .u32(option)
    .u32(payload.length)
    .bytes(payload)
    .done();
}

/**
 * A transmission request, before encoding. The 64-bit fields are numbers
 * on the hot path (a bigint per field costs allocations), and bigint for
 * a request at or past 2^53, which only a bigint call makes: the two are
 * never mixed in one request.
 */
export interface RequestHeader {
  flags: number;
  type: number;
  cookie: number;
  offset: number | bigint;
  length: number | bigint;
}

const TWO_32 = 0x1_0000_0000;

/** Writes a safe integer, or a bigint, as an unsigned 64-bit big-endian field. */
export function setU64(v: DataView, at: number, value: number | bigint): void {
  if (typeof value === "bigint") {
    v.setBigUint64(at, value);
    return;
  }
  v.setUint32(at, Math.floor(value / TWO_32));
  v.setUint32(at + 4, value >>> 0);
}

/**
 * Reads an unsigned 64-bit field as a number: exact up to
 * `Number.MAX_SAFE_INTEGER`, and `Infinity` beyond, so that a range check
 * against any real offset or length fails instead of passing by rounding.
 */
export function getU64(v: DataView, at: number): number {
  const hi = v.getUint32(at);
  if (hi >= 0x20_0000) return Infinity;
  return hi * TWO_32 + v.getUint32(at + 4);
}

/**
 * Encodes a request header into `out` (28 bytes compact, 32 extended),
 * returning the filled view. Lengths must already fit the header.
 */
export function encodeRequest(
  req: RequestHeader,
  extended: boolean,
  out?: Uint8Array,
): Uint8Array {
  const size = extended ? SIZES.extendedRequest : SIZES.request;
  const buf = out ? out.subarray(0, size) : new Uint8Array(size);
  const v = viewOf(buf);
  v.setUint32(0, extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC);
  v.setUint16(4, req.flags);
  v.setUint16(6, req.type);
  setU64(v, 8, req.cookie);
  setU64(v, 16, req.offset);
  if (extended) setU64(v, 24, req.length);
  else v.setUint32(24, Number(req.length));
  return buf;
}

/**
 * A reply header of any of the three kinds, parsed. 64-bit fields are
 * numbers from {@linkcode getU64}: `Infinity` when too large to be valid;
 * messages print the exact value from `bytes` (see {@linkcode u64Text}).
 */
export interface ReplyHeader {
  kind: "simple" | "structured" | "extended";
  /** Simple replies: the error; chunks: 0. */
  error: number;
  /** Chunk flags (NBD_REPLY_FLAG_DONE). */
  flags: number;
  /** Chunk type. */
  type: number;
  cookie: number;
  /** Extended replies: the request's offset. */
  offset: number;
  /** Chunk payload length. */
  length: number;
  /** The header as received (a view, valid until the next header is read). */
  bytes: Uint8Array;
}

/** Where the 64-bit fields of reply headers sit, for exact messages. */
export const REPLY_FIELD = {
  /** cookie, in all three kinds */
  cookie: 4 + 4,
  /** extended replies: offset, after magic, flags, type, cookie */
  offset: 4 + 2 + 2 + 8,
  /** extended replies: length, after magic, flags, type, cookie, offset */
  length: 4 + 2 + 2 + 8 + 8,
} as const;

/** The exact decimal value of the 64-bit field at `at`, for messages. */
export function u64Text(b: Uint8Array, at: number): string {
  return viewOf(b).getBigUint64(at).toString();
}

function emptyHeader(): ReplyHeader {
  return {
    kind: "simple",
    error: 0,
    flags: 0,
    type: 0,
    cookie: 0,
    offset: 0,
    length: 0,
    bytes: new Uint8Array(0),
  };
}

/**
 * Decodes a 32-byte extended reply header (magic already checked), into
 * `out` when given: the read loop reuses one object for every reply.
 */
export function decodeExtendedReply(
  b: Uint8Array,
  out: ReplyHeader = emptyHeader(),
): ReplyHeader {
  const v = viewOf(b);
  out.kind = "extended";
  out.error = 0;
  out.flags = v.getUint16(4);
  out.type = v.getUint16(6);
  out.cookie = getU64(v, REPLY_FIELD.cookie);
  out.offset = getU64(v, REPLY_FIELD.offset);
  out.length = getU64(v, REPLY_FIELD.length);
  out.bytes = b;
  return out;
}

/** Decodes a 16-byte simple reply header (magic already checked). */
export function decodeSimpleReply(
  b: Uint8Array,
  out: ReplyHeader = emptyHeader(),
): ReplyHeader {
  const v = viewOf(b);
  out.kind = "simple";
  out.error = v.getUint32(4);
  out.flags = 0;
  out.type = 0;
  out.cookie = getU64(v, REPLY_FIELD.cookie);
  out.offset = 0;
  out.length = 0;
  out.bytes = b;
  return out;
}

/** Decodes a 20-byte structured reply header (magic already checked). */
export function decodeStructuredReply(
  b: Uint8Array,
  out: ReplyHeader = emptyHeader(),
): ReplyHeader {
  const v = viewOf(b);
  out.kind = "structured";
  out.error = 0;
  out.flags = v.getUint16(4);
  out.type = v.getUint16(6);
  out.cookie = getU64(v, REPLY_FIELD.cookie);
  out.offset = 0;
  out.length = v.getUint32(16);
  out.bytes = b;
  return out;
}

/** True when `x` is a power of two (and positive). */
export function isPowerOfTwo(x: number): boolean {
  return x > 0 && Number.isInteger(x) && (x & (x - 1)) === 0 &&
    x <= 0x80000000;
}

/**
 * The payload form of `NBD_CMD_BLOCK_STATUS` (extended headers): the effect
 * length, then the ids of the contexts asked about.
 */
export function encodeStatusPayload(
  effect: number | bigint,
  ids: readonly number[],
): Uint8Array {
  const out = new Uint8Array(8 + 4 * ids.length); // effect length, ids
  const v = new DataView(out.buffer);
  v.setBigUint64(0, BigInt(effect));
  for (const [i, id] of ids.entries()) v.setUint32(8 + 4 * i, id);
  return out;
}
