/**
 * The checks on the server's replies in the transmission phase, as pure
 * functions: a reply header, a chunk's payload or a finished reply goes in
 * with the facts of the request it answers, and a value or a typed
 * {@linkcode NbdProtocolError} comes out. Nothing here reads a socket
 * (pg-protocol's parser has none either): `transmission.ts` reads exactly
 * the bytes these functions ask for, in order, and lands read data in the
 * caller's buffer at the place they return. Read beside "Simple reply
 * message", "Structured reply chunk message" and "Extended headers" in
 * `doc/proto.md`.
 *
 * A reply is checked in this order: {@linkcode replyHeaderLength} and
 * {@linkcode decodeReplyHeader}, then {@linkcode checkSimpleReply} or
 * {@linkcode checkChunkHeader}; for a chunk the payload parser of its type
 * ({@linkcode claimDataChunk}, {@linkcode claimHoleChunk},
 * {@linkcode parseBlockStatusChunk}, {@linkcode parseErrorChunk}); after the
 * chunk flagged `NBD_REPLY_FLAG_DONE`, {@linkcode checkReplyComplete}.
 *
 * @module
 */

import {
  CHUNK_TYPE_NAMES,
  CMD_BLOCK_STATUS,
  CMD_FLAG_REQ_ONE,
  CMD_READ,
  commandName,
  EINVAL,
  EXTENDED_REPLY_MAGIC,
  MAX_STRING_LENGTH,
  nameOrNumber,
  numberAndName,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_FLAG_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "./constants.ts";
import { claimRange, type ReadCoverage } from "./_coverage.ts";
import { NbdProtocolError } from "./errors.ts";
import {
  decodeExtendedReply,
  decodeSimpleReply,
  decodeStructuredReply,
  getU64,
  plural,
  Reader,
  REPLY_FIELD,
  type ReplyHeader,
  SIZES,
  u64Text,
  viewOf,
} from "./_wire.ts";

/** One extent of a block status reply. */
export interface Extent {
  /** Where the extent starts, in bytes. */
  offset: number;
  /** Its length in bytes. */
  length: number;
  /** Flags whose meaning the context defines (`NBD_STATE_HOLE`, ...). */
  flags: number;
}

/**
 * One extent of a block status reply to a request made with bigint
 * offsets: exact to 2^63 - 1.
 */
export interface ExtentBigInt {
  /** Where the extent starts, in bytes. */
  offset: bigint;
  /** Its length in bytes. */
  length: bigint;
  /** Flags whose meaning the context defines (`NBD_STATE_HOLE`, ...). */
  flags: number;
}

/** What the checks know of a request: the fields it was sent with. */
export interface RequestFacts {
  /** The command, `NBD_CMD_*`. */
  readonly type: number;
  /** Command flags (`NBD_CMD_FLAG_REQ_ONE` matters here). */
  readonly flags: number;
  /** Offset as sent: a bigint for a request made by a bigint call. */
  readonly offset: number | bigint;
  /** Length as sent: a bigint when the offset is one. */
  readonly length: number | bigint;
  /**
   * For block status in the payload form: the only context ids asked
   * about (otherwise every negotiated context must answer).
   */
  readonly contexts?: readonly number[] | undefined;
}

/** What the checks know of the connection (an `ExportInfo` fits). */
export interface ReplyContext {
  /** Whether structured replies were negotiated. */
  readonly structuredReplies: boolean;
  /** Whether extended headers were negotiated. */
  readonly extendedHeaders: boolean;
  /** Negotiated metadata contexts, by id. */
  readonly metaContexts: ReadonlyMap<number, string>;
  /** Export size in bytes. */
  readonly size: bigint;
}

/** A range of the read buffer: `[start, end)`. */
export interface BufferRange {
  start: number;
  end: number;
}

/** What an error chunk says. */
export interface ErrorChunk {
  /** The errno, `EINVAL` when the server sent 0. */
  errno: number;
  /** The server's text, possibly empty. */
  message: string;
  /**
   * For `NBD_REPLY_TYPE_ERROR_OFFSET`: where, inside the request (a bigint
   * when the request's offset is one).
   */
  offset: number | bigint | undefined;
}

/** What a block status chunk says. */
export interface BlockStatusChunk {
  /** The metadata context id. */
  id: number;
  /**
   * Its extents, from the request's offset on: bigint ones when the
   * request's offset is a bigint.
   */
  extents: Extent[] | ExtentBigInt[];
}

/** Error chunks carry at most a 4096-byte message and an offset. */
export const MAX_ERROR_CHUNK = 4 + 2 + MAX_STRING_LENGTH + 8; // errno, length, message, offset
/** Bound on one block status chunk: 4 Mi extents of the compact kind. */
export const MAX_STATUS_CHUNK = 64 * 1024 * 1024;

const lenient = new TextDecoder();

/** An exact 64-bit value for a message: `value`, or the field's bytes. */
function exact(value: number, bytes: Uint8Array, at: number): string {
  return Number.isFinite(value) ? String(value) : u64Text(bytes, at);
}

function violation(text: string): NbdProtocolError {
  return new NbdProtocolError("transmission", text);
}

/** A protocol error about one chunk, built only when thrown. */
function chunkViolation(
  req: RequestFacts,
  type: number,
  text: string,
): NbdProtocolError {
  return violation(
    `${numberAndName(CHUNK_TYPE_NAMES, type)} chunk for ${
      commandName(req.type)
    } (offset ${req.offset}, length ${req.length}): ${text}`,
  );
}

function badMagic(magic: number, expected: string): NbdProtocolError {
  return violation(
    `Bad reply magic 0x${
      magic.toString(16).padStart(8, "0")
    } (expected ${expected} reply)`,
  );
}

/**
 * How many bytes to read first for a reply header: a whole extended header,
 * or the 16 bytes that a simple reply and a structured chunk share.
 */
export function replyHeaderStart(ctx: ReplyContext): number {
  return ctx.extendedHeaders ? SIZES.extendedReply : SIZES.simpleReply;
}

/**
 * The length of the reply header that begins with `start` (at least its
 * 4-byte magic), from the magic and what was negotiated.
 *
 * @throws {NbdProtocolError} on a magic the connection does not allow.
 */
export function replyHeaderLength(
  start: Uint8Array,
  ctx: ReplyContext,
): number {
  const magic = viewOf(start).getUint32(0);
  if (ctx.extendedHeaders) {
    if (magic === EXTENDED_REPLY_MAGIC) return SIZES.extendedReply;
    throw badMagic(magic, "an extended");
  }
  if (magic === SIMPLE_REPLY_MAGIC) return SIZES.simpleReply;
  if (magic === STRUCTURED_REPLY_MAGIC && ctx.structuredReplies) {
    return SIZES.structuredReply;
  }
  throw badMagic(magic, ctx.structuredReplies ? "a structured" : "a simple");
}

/**
 * Decodes a whole reply header, its kind told by its length (as
 * {@linkcode replyHeaderLength} gave it), into `out` when given.
 */
export function decodeReplyHeader(
  bytes: Uint8Array,
  out?: ReplyHeader,
): ReplyHeader {
  switch (bytes.length) {
    case SIZES.simpleReply:
      return decodeSimpleReply(bytes, out);
    case SIZES.structuredReply:
      return decodeStructuredReply(bytes, out);
    case SIZES.extendedReply:
      return decodeExtendedReply(bytes, out);
    default:
      throw new RangeError(
        `decodeReplyHeader(): ${bytes.length} bytes is no reply header's size`,
      );
  }
}

/** The error for a reply whose cookie matches no request in flight. */
export function unknownCookie(h: ReplyHeader): NbdProtocolError {
  return violation(
    `Server replied to unknown cookie ${
      exact(h.cookie, h.bytes, REPLY_FIELD.cookie)
    }`,
  );
}

/** Whether an extended header names `offset`, exactly past 2^53 too. */
function sameOffset(h: ReplyHeader, offset: number | bigint): boolean {
  return typeof offset === "bigint"
    ? viewOf(h.bytes).getBigUint64(REPLY_FIELD.offset) === offset
    : h.offset === offset;
}

/**
 * Checks a simple reply against its request.
 *
 * @returns How many payload bytes follow: a successful read's data when
 *   structured replies are off, else 0.
 * @throws {NbdProtocolError} for a read with structured replies on, or block
 *   status without an error.
 */
export function checkSimpleReply(
  req: RequestFacts,
  h: ReplyHeader,
  ctx: ReplyContext,
): number {
  if (h.error !== 0) return 0;
  if (req.type === CMD_READ) {
    if (ctx.structuredReplies) {
      throw violation(
        `Server sent a simple reply with data to ${
          commandName(req.type)
        } although structured replies were negotiated`,
      );
    }
    return Number(req.length);
  }
  if (req.type === CMD_BLOCK_STATUS) {
    throw violation(
      `Server sent a simple reply without extents to ${commandName(req.type)}`,
    );
  }
  return 0;
}

/**
 * Checks a chunk's header against its request, before any of its payload
 * is read: the extended header's offset, the type against the command, the
 * payload length against the type and the request (so that no hostile
 * length is ever used to allocate or read), `NBD_REPLY_TYPE_NONE` only as
 * the last chunk.
 *
 * @throws {NbdProtocolError} on any mismatch.
 */
export function checkChunkHeader(
  req: RequestFacts,
  h: ReplyHeader,
  ctx: ReplyContext,
): void {
  if (h.kind === "extended" && !sameOffset(h, req.offset)) {
    throw violation(
      `Extended reply to ${commandName(req.type)} names offset ${
        exact(h.offset, h.bytes, REPLY_FIELD.offset)
      }, but the request was at ${req.offset}`,
    );
  }
  const type = h.type;
  const length = h.length;
  if (type & REPLY_TYPE_FLAG_ERROR) {
    if (length < 4 + 2 || length > MAX_ERROR_CHUNK) { // errno, message length
      throw badLength(req, h, " is out of range");
    }
    return;
  }
  switch (type) {
    case REPLY_TYPE_NONE:
      if (length !== 0) throw badLength(req, h, ", expected 0");
      if (!(h.flags & REPLY_FLAG_DONE)) {
        throw chunkViolation(req, type, "NBD_REPLY_FLAG_DONE is not set");
      }
      return;
    case REPLY_TYPE_OFFSET_DATA:
      if (req.type !== CMD_READ) throw notFor(req, type);
      if (length <= 8 || length - 8 > req.length) { // offset, data
        throw badLength(req, h, " does not fit the request");
      }
      return;
    case REPLY_TYPE_OFFSET_HOLE:
      if (req.type !== CMD_READ) throw notFor(req, type);
      if (length !== 8 + 4) throw badLength(req, h, ", expected 12"); // offset, length
      return;
    case REPLY_TYPE_BLOCK_STATUS:
    case REPLY_TYPE_BLOCK_STATUS_EXT: {
      if (req.type !== CMD_BLOCK_STATUS) throw notFor(req, type);
      if (type === REPLY_TYPE_BLOCK_STATUS_EXT && !ctx.extendedHeaders) {
        throw chunkViolation(req, type, "sent without extended headers");
      }
      if (extentCount(type, length) < 0) {
        throw badLength(req, h, " is invalid");
      }
      return;
    }
    default:
      throw chunkViolation(req, type, "unknown chunk type");
  }
}

/**
 * How many extents a block status payload of `length` bytes holds; -1 when
 * no whole number of them (at least one) fits, or past the bound.
 */
function extentCount(type: number, length: number): number {
  const wide = type === REPLY_TYPE_BLOCK_STATUS_EXT;
  const head = wide ? 4 + 4 : 4; // context id, descriptor count
  const each = wide ? 8 + 8 : 4 + 4; // length, flags
  if (
    length < head + each || (length - head) % each !== 0 ||
    length > MAX_STATUS_CHUNK
  ) {
    return -1;
  }
  return (length - head) / each;
}

/** "payload length N" and `tail`, N exact even past 2^53. */
function badLength(
  req: RequestFacts,
  h: ReplyHeader,
  tail: string,
): NbdProtocolError {
  const length = h.kind === "extended"
    ? exact(h.length, h.bytes, REPLY_FIELD.length)
    : String(h.length);
  return chunkViolation(req, h.type, `payload length ${length}${tail}`);
}

function notFor(req: RequestFacts, type: number): NbdProtocolError {
  return chunkViolation(
    req,
    type,
    `not a valid reply to ${commandName(req.type)}`,
  );
}

/** Checks a read chunk's range, records it, returns its buffer offset. */
function claim(
  req: RequestFacts,
  cov: ReadCoverage,
  type: number,
  payload: Uint8Array,
  size: number,
): number {
  // A read's length is its buffer's, a number; its offset is a bigint
  // when the read was at or past 2^53.
  const length = Number(req.length);
  let rel: number;
  if (typeof req.offset === "bigint") {
    const from = viewOf(payload).getBigUint64(0) - req.offset;
    rel = from < 0n || from > BigInt(length) ? -1 : Number(from);
  } else {
    rel = getU64(viewOf(payload), 0) - req.offset;
  }
  if (rel < 0 || rel + size > length) {
    throw chunkViolation(
      req,
      type,
      `range ${u64Text(payload, 0)}+${size} lies outside the request`,
    );
  }
  if (!claimRange(cov, rel, rel + size, length)) {
    throw chunkViolation(
      req,
      type,
      `range ${u64Text(payload, 0)}+${size} overlaps data already received`,
    );
  }
  return rel;
}

/**
 * Checks where an `NBD_REPLY_TYPE_OFFSET_DATA` chunk's data goes and
 * records it in `cov`.
 *
 * @param offset The payload's first 8 bytes (the offset field).
 * @param size The data's length: the chunk's payload length less 8.
 * @returns Where the data starts in the read's buffer.
 * @throws {NbdProtocolError} for a range outside the request or one that
 *   overlaps data already received.
 */
export function claimDataChunk(
  req: RequestFacts,
  cov: ReadCoverage,
  offset: Uint8Array,
  size: number,
): number {
  if (offset.length !== 8) throw tooShort(offset, 8, REPLY_TYPE_OFFSET_DATA);
  return claim(req, cov, REPLY_TYPE_OFFSET_DATA, offset, size);
}

/**
 * Checks an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk's 12-byte payload and
 * records its range in `cov`.
 *
 * @returns The range of the read's buffer that reads as zeroes.
 * @throws {NbdProtocolError} for a hole of length 0, outside the request,
 *   or over data already received.
 */
export function claimHoleChunk(
  req: RequestFacts,
  cov: ReadCoverage,
  payload: Uint8Array,
): BufferRange {
  const type = REPLY_TYPE_OFFSET_HOLE;
  if (payload.length !== 8 + 4) throw tooShort(payload, 8 + 4, type);
  const size = viewOf(payload).getUint32(8);
  if (size === 0) throw chunkViolation(req, type, "hole of length 0");
  const start = claim(req, cov, type, payload, size);
  return { start, end: start + size };
}

function tooShort(
  payload: Uint8Array,
  want: number,
  type: number,
): NbdProtocolError {
  return violation(
    `${CHUNK_TYPE_NAMES[type]} payload has ${
      plural(payload.length, "byte")
    }, expected ${want}`,
  );
}

/**
 * Parses an error chunk's payload (any type with `NBD_REPLY_TYPE_FLAG_ERROR`).
 *
 * @throws {NbdProtocolError} for a message that overruns the payload,
 *   trailing bytes, or an error offset outside the request.
 */
export function parseErrorChunk(
  req: RequestFacts,
  type: number,
  payload: Uint8Array,
): ErrorChunk {
  const r = new Reader(
    payload,
    `${numberAndName(CHUNK_TYPE_NAMES, type)} payload`,
    "transmission",
  );
  const errno = r.u32();
  const messageLength = r.u16();
  if (messageLength > r.remaining) {
    throw chunkViolation(
      req,
      type,
      `message length ${messageLength} exceeds the ${
        plural(r.remaining, "byte")
      } left`,
    );
  }
  const message = lenient.decode(r.bytes(messageLength));
  let offset: number | bigint | undefined;
  if (type === REPLY_TYPE_ERROR) {
    r.expectEnd();
  } else if (type === REPLY_TYPE_ERROR_OFFSET) {
    const at = r.u64();
    r.expectEnd();
    const start = BigInt(req.offset);
    if (at < start || at >= start + BigInt(req.length)) {
      throw chunkViolation(
        req,
        type,
        `error offset ${at} lies outside the request`,
      );
    }
    offset = typeof req.offset === "bigint" ? at : Number(at);
  }
  // A server that forgets the errno still reports failure.
  return { errno: errno === 0 ? EINVAL : errno, message, offset };
}

/**
 * Parses a block status chunk (compact or extended) and checks every
 * extent: a negotiated context, one chunk per context, `REQ_ONE`, lengths
 * that are not 0, that start inside the request and end inside the export.
 *
 * @param received The contexts already answered in this reply.
 * @throws {NbdProtocolError} on any of those.
 */
export function parseBlockStatusChunk(
  req: RequestFacts,
  type: number,
  payload: Uint8Array,
  ctx: ReplyContext,
  received: ReadonlyMap<number, unknown>,
): BlockStatusChunk {
  const bad = (text: string) => chunkViolation(req, type, text);
  const wide = type === REPLY_TYPE_BLOCK_STATUS_EXT;
  const count = extentCount(type, payload.length);
  if (count < 0) throw bad(`payload length ${payload.length} is invalid`);
  const r = new Reader(
    payload,
    `${nameOrNumber(CHUNK_TYPE_NAMES, type)} payload`,
    "transmission",
  );
  const id = r.u32();
  if (wide) {
    const declared = r.u32();
    if (declared !== 0 && declared !== count) {
      const follow = count === 1 ? "follows" : "follow";
      throw bad(`descriptor count ${declared}, but ${count} ${follow}`);
    }
  }
  if (!ctx.metaContexts.has(id)) {
    throw bad(`unknown metadata context id ${id}`);
  }
  if (req.contexts && !req.contexts.includes(id)) {
    throw bad(`metadata context id ${id}, which the request did not ask for`);
  }
  if (received.has(id)) {
    throw bad(`second chunk for metadata context id ${id}`);
  }
  const reqOne = (req.flags & CMD_FLAG_REQ_ONE) !== 0;
  if (reqOne && count !== 1) {
    throw bad(`${count} extents despite NBD_CMD_FLAG_REQ_ONE`);
  }
  // Exact arithmetic: a hostile 64-bit length must not round into range.
  const start = BigInt(req.offset);
  const end = start + BigInt(req.length);
  const limit = ctx.size;
  const big = typeof req.offset === "bigint";
  const extents: Array<Extent | ExtentBigInt> = [];
  let pos = start;
  for (let i = 0; i < count; i++) {
    const len = wide ? r.u64() : BigInt(r.u32());
    const flags = wide ? r.u64() : BigInt(r.u32());
    if (len === 0n) throw bad(`extent ${i} has length 0`);
    if (pos >= end) throw bad(`extent ${i} starts beyond the request`);
    if (pos + len > limit) {
      throw bad(`extent ${i} runs past the end of the export`);
    }
    if (reqOne && len > BigInt(req.length)) {
      throw bad("the single extent is longer than the request");
    }
    if (flags > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw bad(`extent ${i} flags 0x${flags.toString(16)} are too wide`);
    }
    extents.push(
      big
        ? { offset: pos, length: len, flags: Number(flags) }
        : { offset: Number(pos), length: Number(len), flags: Number(flags) },
    );
    pos += len;
  }
  r.expectEnd();
  return { id, extents: extents as Extent[] | ExtentBigInt[] };
}

/**
 * Checks a reply that has ended without a server error: a read covered in
 * full, block status with extents for every negotiated context. Nothing to
 * check without structured replies.
 *
 * @param coveredBytes Read data received (reads only).
 * @param received The contexts answered (block status only).
 * @throws {NbdProtocolError} when the reply left something out.
 */
export function checkReplyComplete(
  req: RequestFacts,
  coveredBytes: number,
  received: ReadonlyMap<number, unknown> | undefined,
  ctx: ReplyContext,
): void {
  if (!ctx.structuredReplies) return;
  const name = commandName(req.type);
  if (req.type === CMD_READ && coveredBytes !== req.length) {
    throw violation(
      `Server's reply to ${name} (offset ${req.offset}) covered ${coveredBytes} of ${req.length} bytes`,
    );
  }
  if (req.type === CMD_BLOCK_STATUS) {
    for (const [id, context] of ctx.metaContexts) {
      if (req.contexts && !req.contexts.includes(id)) continue;
      if (!received?.has(id)) {
        throw violation(
          `Server's reply to ${name} (offset ${req.offset}) has no extents for "${context}"`,
        );
      }
    }
  }
}
