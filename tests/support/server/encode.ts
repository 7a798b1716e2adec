/**
 * The server's encoders: every message it sends, one function each, so a
 * hostile test writes a broken reply in one line. They build bytes field by
 * field with {@linkcode Builder} and share nothing with `lib/`'s encoders,
 * so a library encoding bug is not mirrored here.
 *
 * @module
 */

import {
  CLISERV_MAGIC,
  EXTENDED_REPLY_MAGIC,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_EXPORT,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "../../../lib/constants.ts";

const encoder = new TextEncoder();

/** Builds a big-endian message field by field. */
export class Builder {
  #buf = new Uint8Array(64);
  #view = new DataView(this.#buf.buffer);
  #len = 0;

  #room(n: number): number {
    const at = this.#len;
    if (at + n > this.#buf.length) {
      const next = new Uint8Array(Math.max(this.#buf.length * 2, at + n));
      next.set(this.#buf.subarray(0, at));
      this.#buf = next;
      this.#view = new DataView(next.buffer);
    }
    this.#len += n;
    return at;
  }

  /** Appends one byte. */
  u8(v: number): this {
    const at = this.#room(1);
    this.#view.setUint8(at, v);
    return this;
  }

  /** Appends a big-endian 16-bit field. */
  u16(v: number): this {
    const at = this.#room(2);
    this.#view.setUint16(at, v);
    return this;
  }

  /** Appends a big-endian 32-bit field. */
  u32(v: number): this {
    const at = this.#room(4);
    this.#view.setUint32(at, v >>> 0);
    return this;
  }

  /** Appends a big-endian 64-bit field. */
  u64(v: bigint | number): this {
    const at = this.#room(8);
    this.#view.setBigUint64(at, BigInt.asUintN(64, BigInt(v)));
    return this;
  }

  /** Appends raw bytes. */
  bytes(b: Uint8Array): this {
    const at = this.#room(b.length);
    this.#buf.set(b, at);
    return this;
  }

  /** Appends a string's UTF-8 bytes, without a length. */
  string(s: string): this {
    return this.bytes(encoder.encode(s));
  }

  /** Appends `n` zero bytes. */
  zeroes(n: number): this {
    this.#room(n);
    return this;
  }

  /** The message built so far. */
  done(): Uint8Array {
    return this.#buf.slice(0, this.#len);
  }
}

/** Joins byte arrays. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function toBytes(data: Uint8Array | string | undefined): Uint8Array {
  if (data === undefined) return new Uint8Array(0);
  return typeof data === "string" ? encoder.encode(data) : data;
}

/** The newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
export function newstyleGreeting(
  handshakeFlags: number = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
): Uint8Array {
  return new Builder().u64(NBDMAGIC).u64(IHAVEOPT).u16(handshakeFlags).done();
}

/** The whole oldstyle greeting: magics, size, 32-bit flags, 124 zeroes. */
export function oldstyleGreeting(
  size: bigint | number,
  flags: number,
): Uint8Array {
  return new Builder().u64(NBDMAGIC).u64(CLISERV_MAGIC).u64(size).u32(flags)
    .zeroes(124).done();
}

/**
 * An option reply: magic, option, reply type, length, data.
 *
 * @param option The option this answers (a hostile test may name another).
 * @param type `NBD_REP_*`; error types may carry a message as `data`.
 * @param data The payload, or a string sent as UTF-8.
 */
export function optionReply(
  option: number,
  type: number,
  data?: Uint8Array | string,
): Uint8Array {
  const payload = toBytes(data);
  return new Builder().u64(OPTION_REPLY_MAGIC).u32(option).u32(type)
    .u32(payload.length).bytes(payload).done();
}

/** The payload of `NBD_REP_SERVER`: name length, name, description. */
export function repServerPayload(
  name: string,
  description = "",
): Uint8Array {
  const n = encoder.encode(name);
  return new Builder().u32(n.length).bytes(n).string(description).done();
}

/** The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size, flags. */
export function infoExportPayload(
  size: bigint | number,
  flags: number,
): Uint8Array {
  return new Builder().u16(INFO_EXPORT).u64(size).u16(flags).done();
}

/** The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`. */
export function infoBlockSizePayload(
  minimum: number,
  preferred: number,
  maximum: number,
): Uint8Array {
  return new Builder().u16(INFO_BLOCK_SIZE).u32(minimum).u32(preferred)
    .u32(maximum).done();
}

/** The payload of an `NBD_REP_INFO` holding a string (name, description). */
export function infoStringPayload(type: number, text: string): Uint8Array {
  return new Builder().u16(type).string(text).done();
}

/** The payload of `NBD_REP_META_CONTEXT`: context id, name. */
export function metaContextPayload(id: number, name: string): Uint8Array {
  return new Builder().u32(id).string(name).done();
}

/**
 * The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and unless
 * `noZeroes`, 124 zero bytes.
 */
export function exportNameReply(
  size: bigint | number,
  flags: number,
  noZeroes = false,
): Uint8Array {
  const b = new Builder().u64(size).u16(flags);
  if (!noZeroes) b.zeroes(124);
  return b.done();
}

/** A simple reply: magic, errno, cookie, then `data` (for a read). */
export function simpleReply(
  cookie: bigint,
  errno = 0,
  data?: Uint8Array,
): Uint8Array {
  const b = new Builder().u32(SIMPLE_REPLY_MAGIC).u32(errno).u64(cookie);
  if (data) b.bytes(data);
  return b.done();
}

/**
 * A structured reply chunk. `length` overrides the header's length field
 * (to lie about it); the payload is sent as given either way.
 */
export function structuredChunk(
  cookie: bigint,
  flags: number,
  type: number,
  payload: Uint8Array = new Uint8Array(0),
  length: number = payload.length,
): Uint8Array {
  return new Builder().u32(STRUCTURED_REPLY_MAGIC).u16(flags).u16(type)
    .u64(cookie).u32(length).bytes(payload).done();
}

/**
 * An extended reply chunk (extended headers). `offset` MUST be the request's
 * offset; `length` overrides the 64-bit length field.
 */
export function extendedChunk(
  cookie: bigint,
  flags: number,
  type: number,
  offset: bigint | number,
  payload: Uint8Array = new Uint8Array(0),
  length: bigint | number = payload.length,
): Uint8Array {
  return new Builder().u32(EXTENDED_REPLY_MAGIC).u16(flags).u16(type)
    .u64(cookie).u64(offset).u64(length).bytes(payload).done();
}

/** `NBD_REPLY_TYPE_OFFSET_DATA` payload: offset, data. */
export function offsetDataPayload(
  offset: bigint | number,
  data: Uint8Array,
): Uint8Array {
  return new Builder().u64(offset).bytes(data).done();
}

/** `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset, 32-bit hole size. */
export function offsetHolePayload(
  offset: bigint | number,
  size: number,
): Uint8Array {
  return new Builder().u64(offset).u32(size).done();
}

/** `NBD_REPLY_TYPE_ERROR` payload: errno, message length, message. */
export function errorPayload(errno: number, message = ""): Uint8Array {
  const m = encoder.encode(message);
  return new Builder().u32(errno).u16(m.length).bytes(m).done();
}

/** `NBD_REPLY_TYPE_ERROR_OFFSET` payload: errno, message, offset. */
export function errorOffsetPayload(
  errno: number,
  message: string,
  offset: bigint | number,
): Uint8Array {
  const m = encoder.encode(message);
  return new Builder().u32(errno).u16(m.length).bytes(m).u64(offset).done();
}

/** One extent of a metadata context. */
export interface Extent {
  /** Bytes covered. */
  length: number;
  /** Context-defined flags (`STATE_HOLE | STATE_ZERO` for base:allocation). */
  flags: number;
}

/** `NBD_REPLY_TYPE_BLOCK_STATUS` payload: context id, {u32 length, u32 flags}*. */
export function blockStatusPayload(id: number, extents: Extent[]): Uint8Array {
  const b = new Builder().u32(id);
  for (const e of extents) b.u32(e.length).u32(e.flags);
  return b.done();
}

/**
 * `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload: context id, descriptor count,
 * {u64 length, u64 flags}*.
 */
export function blockStatusExtPayload(
  id: number,
  extents: Extent[],
  count: number = extents.length,
): Uint8Array {
  const b = new Builder().u32(id).u32(count);
  for (const e of extents) b.u64(e.length).u64(e.flags);
  return b.done();
}
