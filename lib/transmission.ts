/**
 * The transmission phase: requests out, replies in, matched by cookie in
 * any order. One reader loop parses every reply (simple, structured or
 * extended), checks each chunk against its request, and lands read data
 * straight in the request's buffer. Read beside "Transmission" in
 * `doc/proto.md`.
 *
 * @module
 */

import {
  CHUNK_TYPE_NAMES,
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_FLAG_REQ_ONE,
  CMD_READ,
  COMMAND_NAMES,
  EINVAL,
  ESHUTDOWN,
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
import type { Tracer } from "./debug.ts";
import {
  abortReason,
  NbdCommandError,
  NbdConnectionClosedError,
  NbdError,
  NbdProtocolError,
} from "./errors.ts";
import type { ExportInfo } from "./export.ts";
import type { Transport } from "./transport.ts";
import {
  decodeExtendedReply,
  decodeSimpleReply,
  decodeStructuredReply,
  encodeRequest,
  getU64,
  Reader,
  type ReplyHeader,
  SIZES,
  viewOf,
} from "./wire.ts";

/** One extent of a block status reply. */
export interface Extent {
  /** Where the extent starts, in bytes. */
  offset: number;
  /** Its length in bytes. */
  length: number;
  /** Flags whose meaning the context defines (`NBD_STATE_HOLE`, ...). */
  flags: number;
}

/** A request as the client layer hands it over, already checked. */
export interface Command {
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** Data to send (`NBD_CMD_WRITE`). */
  payload?: Uint8Array;
  /** Where read data lands (`NBD_CMD_READ`); `length` bytes. */
  buffer?: Uint8Array;
  signal?: AbortSignal | undefined;
}

/** Block status results by metadata context id. */
export type ExtentsById = Map<number, Extent[]>;

/** What commands other than block status resolve with. */
const NO_EXTENTS: ExtentsById = new Map();

/** Error chunks carry at most a 4096-byte message and an offset. */
const MAX_ERROR_CHUNK = 4 + 2 + MAX_STRING_LENGTH + 8;
/** Bound on one block status chunk: 4 Mi extents of the compact kind. */
const MAX_STATUS_CHUNK = 64 * 1024 * 1024;

interface Pending {
  cookie: number;
  cmd: Command;
  /** Offset and length as sent (for writes, the payload's length). */
  wireOffset: number;
  wireLength: number;
  /** Byte ranges of read data already received, sorted, disjoint. */
  covered: Array<[number, number]> | undefined;
  coveredBytes: number;
  /** Block status received so far (block status commands only). */
  extents: ExtentsById | undefined;
  error: NbdCommandError | undefined;
  /** The caller stopped waiting (its signal aborted); close() need not wait. */
  abandoned: boolean;
  resolve: (extents: ExtentsById) => void;
  reject: (e: Error) => void;
}

/** Inserts [start, end) into sorted disjoint ranges; false on overlap. */
export function addRange(
  ranges: Array<[number, number]>,
  start: number,
  end: number,
): boolean {
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (ranges[mid]![0] < start) lo = mid + 1;
    else hi = mid;
  }
  const before = ranges[lo - 1];
  const after = ranges[lo];
  if (before && before[1] > start) return false;
  if (after && after[0] < end) return false;
  ranges.splice(lo, 0, [start, end]);
  return true;
}

/**
 * Carries commands over a negotiated transport. Every command goes through
 * {@linkcode Transmission.submit}; a protocol violation fails every pending
 * request with the same error; a server errno fails one.
 */
export class Transmission {
  #transport: Transport;
  #info: ExportInfo;
  #trace: Tracer;
  #pending = new Map<number, Pending>();
  #nextCookie = 1;
  /** Scratch for the 8-byte offset at the head of a data chunk. */
  #offsetField = new Uint8Array(8);
  #maxInFlight: number;
  #inFlight = 0;
  #waiters: Array<() => void> = [];
  #header = new Uint8Array(SIZES.extendedReply);
  #failure: Error | undefined;
  #closing = false;
  #shutdown = false;
  #idle: Array<() => void> = [];
  #loop: Promise<void>;
  #ended = false;

  /**
   * @param transport A transport whose handshake has finished.
   * @param info What the handshake negotiated.
   * @param maxInFlight How many requests may wait for replies at once.
   * @param trace Optional tracer.
   */
  constructor(
    transport: Transport,
    info: ExportInfo,
    maxInFlight: number,
    trace: Tracer,
  ) {
    this.#transport = transport;
    this.#info = info;
    this.#maxInFlight = maxInFlight;
    this.#trace = trace;
    transport.phase = "transmission";
    transport.cork();
    this.#loop = this.#readLoop().finally(() => {
      this.#ended = true;
      // Nothing may stay held once no reader will flush it.
      transport.flush();
    });
  }

  /** The error that killed the connection, if one did. */
  get failure(): Error | undefined {
    return this.#failure;
  }

  /** Settles once the reader has stopped, for whatever reason. */
  get finished(): Promise<void> {
    return this.#loop;
  }

  /** Whether the server asked to shut down (`ESHUTDOWN`). */
  get shuttingDown(): boolean {
    return this.#shutdown;
  }

  /**
   * Sends one command and waits for its whole reply.
   *
   * @returns Block status extents by context id (empty for other commands).
   * @throws {NbdCommandError} when the server fails this command.
   * @throws {NbdProtocolError} when the server breaks the protocol.
   * @throws {NbdConnectionClosedError} when the connection is gone.
   */
  async submit(cmd: Command): Promise<ExtentsById> {
    const signal = cmd.signal;
    if (signal?.aborted) throw abortReason(signal);
    // The common case takes a free slot without a trip through the queue.
    if (this.#inFlight < this.#maxInFlight && this.#waiters.length === 0) {
      this.#inFlight++;
    } else {
      await this.#acquire(signal);
    }
    let released = false;
    const release = () => {
      if (!released) {
        released = true;
        this.#release();
      }
    };
    try {
      this.#checkUsable(COMMAND_NAMES[cmd.type] ?? "command");
    } catch (e) {
      release();
      throw e;
    }
    const cookie = this.#nextCookie++;
    const extended = this.#info.extendedHeaders;
    const wireLength = cmd.payload ? cmd.payload.length : cmd.length;
    const wireOffset = cmd.offset;
    let entry: Pending | undefined;
    const done = new Promise<ExtentsById>((resolve, reject) => {
      entry = {
        cookie,
        cmd,
        wireOffset,
        wireLength,
        covered: undefined,
        coveredBytes: 0,
        extents: cmd.type === CMD_BLOCK_STATUS ? new Map() : undefined,
        error: undefined,
        abandoned: false,
        resolve: (v) => {
          release();
          resolve(v);
        },
        reject: (e) => {
          release();
          reject(e);
        },
      };
      this.#pending.set(cookie, entry);
    });
    // A caller that stops waiting must not leave a rejection unobserved.
    done.catch(() => {});
    const header = encodeRequest(
      {
        flags: cmd.flags,
        type: cmd.type,
        cookie,
        offset: wireOffset,
        length: wireLength,
      },
      extended,
    );
    this.#trace?.("send command", {
      command: COMMAND_NAMES[cmd.type],
      cookie,
      offset: cmd.offset,
      length: cmd.length,
      flags: cmd.flags || undefined,
    });
    const sent = cmd.payload
      ? this.#transport.write(header, cmd.payload)
      : this.#transport.write(header);
    sent.catch((e) => this.#fail(e));
    if (!signal) return await done;
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<never>((_, reject) => {
      onAbort = () => {
        entry!.abandoned = true;
        this.#wakeIfIdle();
        reject(abortReason(signal));
      };
      signal.addEventListener("abort", onAbort, { once: true });
    });
    try {
      return await Promise.race([done, aborted]);
    } finally {
      signal.removeEventListener("abort", onAbort!);
    }
  }

  #checkUsable(what: string): void {
    if (this.#failure) {
      throw new NbdConnectionClosedError(
        `Cannot send ${what}: the connection failed: ${this.#failure.message}`,
        { cause: this.#failure },
      );
    }
    if (this.#shutdown) {
      throw new NbdConnectionClosedError(
        `Cannot send ${what}: the server is shutting down (ESHUTDOWN)`,
      );
    }
    if (this.#closing) {
      throw new NbdConnectionClosedError(
        `Cannot send ${what}: the connection is closing`,
      );
    }
  }

  async #acquire(signal: AbortSignal | undefined): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const grant = () => {
        signal?.removeEventListener("abort", onAbort);
        this.#inFlight++;
        resolve();
      };
      const onAbort = () => {
        const i = this.#waiters.indexOf(grant);
        if (i >= 0) this.#waiters.splice(i, 1);
        reject(abortReason(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#waiters.push(grant);
    });
  }

  #release(): void {
    this.#inFlight--;
    const next = this.#waiters.shift();
    if (next) next();
    this.#wakeIfIdle();
  }

  /** No reply is awaited by anyone (abandoned requests do not count). */
  #isIdle(): boolean {
    for (const p of this.#pending.values()) if (!p.abandoned) return false;
    return true;
  }

  #wakeIfIdle(): void {
    if (this.#isIdle()) { for (const wake of this.#idle.splice(0)) wake(); }
  }

  /** Resolves once no caller is waiting for a reply. */
  #whenIdle(): Promise<void> {
    if (this.#isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /**
   * Fails every pending request and later call with `error`, and closes the
   * transport. Only the first failure counts.
   */
  #fail(error: unknown): void {
    if (this.#failure) return;
    const err = error instanceof Error ? error : new NbdError(String(error));
    if (this.#closing && this.#pending.size === 0) {
      // The connection ended after a clean disconnect; nothing is lost.
      this.#transport.close();
      return;
    }
    this.#failure = err;
    this.#trace?.("connection failed", { error: err.message });
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(err);
    for (const wake of this.#waiters.splice(0)) wake();
    for (const wake of this.#idle.splice(0)) wake();
    this.#transport.close(err);
  }

  /**
   * Soft disconnect: waits for requests whose callers still wait (until
   * `signal` aborts), sends `NBD_CMD_DISC`, and closes the transport.
   * Requests abandoned through their signals do not hold it up. Safe to
   * call more than once.
   */
  async disconnect(signal?: AbortSignal): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      if (signal) {
        let onAbort: (() => void) | undefined;
        await Promise.race([
          this.#whenIdle(),
          new Promise<void>((resolve) => {
            onAbort = resolve;
            if (signal.aborted) resolve();
            else signal.addEventListener("abort", onAbort, { once: true });
          }),
        ]);
        signal.removeEventListener("abort", onAbort!);
      } else {
        await this.#whenIdle();
      }
      if (!this.#failure) {
        const header = encodeRequest(
          {
            flags: 0,
            type: CMD_DISC,
            cookie: this.#nextCookie++,
            offset: 0,
            length: 0,
          },
          this.#info.extendedHeaders,
        );
        this.#trace?.("send command", { command: "NBD_CMD_DISC" });
        try {
          await this.#transport.write(header);
          await this.#transport.drain();
        } catch {
          // The server may already have gone; we are closing anyway.
        }
      }
      const left = [...this.#pending.values()];
      this.#pending.clear();
      for (const p of left) {
        p.reject(
          new NbdConnectionClosedError(
            `The connection was closed before the server replied to ${
              COMMAND_NAMES[p.cmd.type]
            } (offset ${p.cmd.offset}, length ${p.cmd.length})`,
          ),
        );
      }
      this.#transport.close();
    }
    await this.#loop;
  }

  async #readLoop(): Promise<void> {
    try {
      while (true) {
        const header = await this.#readHeader();
        if (!header) break;
        await this.#dispatch(header);
      }
      if (this.#pending.size > 0 || !this.#closing) {
        this.#fail(
          new NbdConnectionClosedError(
            `Server closed the connection with ${this.#pending.size} requests in flight`,
          ),
        );
      }
    } catch (e) {
      this.#fail(e);
    }
  }

  /** Reads one reply header; `undefined` at a clean end of stream. */
  async #readHeader(): Promise<ReplyHeader | undefined> {
    const t = this.#transport;
    const h = this.#header;
    if (this.#info.extendedHeaders) {
      if (!await t.readInto(h, "an extended reply header", true)) return;
      const magic = viewOf(h).getUint32(0);
      if (magic !== EXTENDED_REPLY_MAGIC) throw badMagic(magic, "extended");
      return decodeExtendedReply(h);
    }
    const first = h.subarray(0, SIZES.simpleReply);
    if (!await t.readInto(first, "a reply header", true)) return;
    const magic = viewOf(h).getUint32(0);
    if (magic === SIMPLE_REPLY_MAGIC) return decodeSimpleReply(first);
    if (magic === STRUCTURED_REPLY_MAGIC && this.#info.structuredReplies) {
      await t.readInto(
        h.subarray(SIZES.simpleReply, SIZES.structuredReply),
        "a structured reply header",
      );
      return decodeStructuredReply(h.subarray(0, SIZES.structuredReply));
    }
    throw badMagic(
      magic,
      this.#info.structuredReplies ? "structured" : "simple",
    );
  }

  async #dispatch(h: ReplyHeader): Promise<void> {
    const p = this.#pending.get(h.cookie);
    if (!p) {
      throw new NbdProtocolError(
        "transmission",
        `Server replied to unknown cookie ${h.cookie}`,
      );
    }
    const name = COMMAND_NAMES[p.cmd.type] ?? String(p.cmd.type);
    if (h.kind === "simple") {
      this.#trace?.("recv simple reply", {
        cookie: h.cookie,
        command: name,
        error: h.error || undefined,
      });
      if (h.error !== 0) {
        p.error = this.#commandError(p, h.error);
      } else if (p.cmd.type === CMD_READ) {
        if (this.#info.structuredReplies) {
          throw new NbdProtocolError(
            "transmission",
            `Server sent a simple reply with data to ${name} although structured replies were negotiated`,
          );
        }
        await this.#transport.readInto(
          p.cmd.buffer!,
          `the ${p.cmd.length}-byte payload of a simple reply to ${name}`,
        );
      } else if (p.cmd.type === CMD_BLOCK_STATUS) {
        throw new NbdProtocolError(
          "transmission",
          `Server sent a simple reply without extents to ${name}`,
        );
      }
      this.#finish(p);
      return;
    }
    if (h.kind === "extended" && h.offset !== p.wireOffset) {
      throw new NbdProtocolError(
        "transmission",
        `Extended reply to ${name} names offset ${h.offset}, but the request was at ${p.wireOffset}`,
      );
    }
    this.#trace?.("recv chunk", {
      cookie: h.cookie,
      command: name,
      type: nameOrNumber(CHUNK_TYPE_NAMES, h.type),
      length: h.length,
      done: (h.flags & REPLY_FLAG_DONE) !== 0,
    });
    await this.#chunk(p, h, name);
    if (h.flags & REPLY_FLAG_DONE) this.#finish(p);
  }

  /** A protocol error about one chunk, built only when thrown. */
  #violation(p: Pending, type: number, text: string): NbdProtocolError {
    const name = COMMAND_NAMES[p.cmd.type] ?? String(p.cmd.type);
    return new NbdProtocolError(
      "transmission",
      `${
        numberAndName(CHUNK_TYPE_NAMES, type)
      } chunk for ${name} (offset ${p.cmd.offset}, length ${p.cmd.length}): ${text}`,
    );
  }

  async #chunk(p: Pending, h: ReplyHeader, name: string): Promise<void> {
    const t = this.#transport;
    const type = h.type;
    const length = h.length;
    if (type & REPLY_TYPE_FLAG_ERROR) {
      await this.#errorChunk(p, type, length, name);
      return;
    }
    const needCommand = (command: number) => {
      if (p.cmd.type !== command) {
        throw this.#violation(p, type, `not a valid reply to ${name}`);
      }
    };
    switch (type) {
      case REPLY_TYPE_NONE:
        if (length !== 0) {
          throw this.#violation(
            p,
            type,
            `payload length ${length}, expected 0`,
          );
        }
        if (!(h.flags & REPLY_FLAG_DONE)) {
          throw this.#violation(p, type, "NBD_REPLY_FLAG_DONE is not set");
        }
        return;
      case REPLY_TYPE_OFFSET_DATA: {
        needCommand(CMD_READ);
        if (length <= 8 || length - 8 > p.wireLength) {
          throw this.#violation(
            p,
            type,
            `payload length ${length} does not fit the request`,
          );
        }
        const head = this.#offsetField;
        await t.readInto(head, "the offset of a data chunk");
        const size = length - 8;
        const rel = this.#claim(p, type, getU64(viewOf(head), 0), size);
        await t.readInto(
          p.cmd.buffer!.subarray(rel, rel + size),
          "a data chunk",
        );
        return;
      }
      case REPLY_TYPE_OFFSET_HOLE: {
        needCommand(CMD_READ);
        if (length !== 12) {
          throw this.#violation(
            p,
            type,
            `payload length ${length}, expected 12`,
          );
        }
        const head = await t.readExact(12, "a hole chunk");
        const v = viewOf(head);
        const size = v.getUint32(8);
        if (size === 0) throw this.#violation(p, type, "hole of length 0");
        const rel = this.#claim(p, type, getU64(v, 0), size);
        p.cmd.buffer!.fill(0, rel, rel + size);
        return;
      }
      case REPLY_TYPE_BLOCK_STATUS:
      case REPLY_TYPE_BLOCK_STATUS_EXT: {
        needCommand(CMD_BLOCK_STATUS);
        const wide = type === REPLY_TYPE_BLOCK_STATUS_EXT;
        if (wide && !this.#info.extendedHeaders) {
          throw this.#violation(p, type, "sent without extended headers");
        }
        const head = wide ? 8 : 4;
        const each = wide ? 16 : 8;
        if (
          length < head + each || (length - head) % each !== 0 ||
          length > MAX_STATUS_CHUNK
        ) {
          throw this.#violation(p, type, `payload length ${length} is invalid`);
        }
        const r = new Reader(
          await t.readExact(length, `a block status chunk for ${name}`),
          `${CHUNK_TYPE_NAMES[type]} payload`,
          "transmission",
        );
        this.#extents(p, type, r, wide, (length - head) / each);
        return;
      }
      default:
        throw this.#violation(p, type, "unknown chunk type");
    }
  }

  async #errorChunk(
    p: Pending,
    type: number,
    length: number,
    name: string,
  ): Promise<void> {
    if (length < 6 || length > MAX_ERROR_CHUNK) {
      throw this.#violation(
        p,
        type,
        `payload length ${length} is out of range`,
      );
    }
    const r = new Reader(
      await this.#transport.readExact(length, `an error chunk for ${name}`),
      `${numberAndName(CHUNK_TYPE_NAMES, type)} payload`,
      "transmission",
    );
    let errno = r.u32();
    const messageLength = r.u16();
    if (messageLength > r.remaining) {
      throw this.#violation(
        p,
        type,
        `message length ${messageLength} exceeds the ${r.remaining} bytes left`,
      );
    }
    const message = new TextDecoder().decode(r.bytes(messageLength));
    let errorOffset: number | undefined;
    if (type === REPLY_TYPE_ERROR) {
      r.expectEnd();
    } else if (type === REPLY_TYPE_ERROR_OFFSET) {
      const at = r.u64();
      r.expectEnd();
      const start = BigInt(p.wireOffset);
      if (at < start || at >= start + BigInt(p.cmd.length)) {
        throw this.#violation(
          p,
          type,
          `error offset ${at} lies outside the request`,
        );
      }
      errorOffset = Number(at);
    }
    // A server that forgets the errno still reports failure.
    if (errno === 0) errno = EINVAL;
    p.error ??= this.#commandError(p, errno, message, errorOffset);
  }

  /** Checks a read chunk's range and records it; returns its buffer offset. */
  #claim(p: Pending, type: number, at: number, size: number): number {
    const start = p.wireOffset;
    if (at < start || at + size > start + p.wireLength) {
      throw this.#violation(
        p,
        type,
        `range ${at}+${size} lies outside the request`,
      );
    }
    const rel = at - start;
    const covered = p.covered ??= [];
    if (!addRange(covered, rel, rel + size)) {
      throw this.#violation(
        p,
        type,
        `range ${at}+${size} overlaps data already received`,
      );
    }
    p.coveredBytes += size;
    return rel;
  }

  #extents(
    p: Pending,
    type: number,
    r: Reader,
    wide: boolean,
    count: number,
  ): void {
    const bad = (text: string) => this.#violation(p, type, text);
    const id = r.u32();
    if (wide) {
      const declared = r.u32();
      if (declared !== 0 && declared !== count) {
        throw bad(`descriptor count ${declared}, but ${count} follow`);
      }
    }
    if (!this.#info.metaContexts.has(id)) {
      throw bad(`unknown metadata context id ${id}`);
    }
    const extents = p.extents!;
    if (extents.has(id)) {
      throw bad(`second chunk for metadata context id ${id}`);
    }
    const reqOne = (p.cmd.flags & CMD_FLAG_REQ_ONE) !== 0;
    if (reqOne && count !== 1) {
      throw bad(`${count} extents despite NBD_CMD_FLAG_REQ_ONE`);
    }
    // Exact arithmetic: a hostile 64-bit length must not round into range.
    const start = BigInt(p.wireOffset);
    const end = start + BigInt(p.wireLength);
    const limit = this.#info.size;
    const out: Extent[] = [];
    let pos = start;
    for (let i = 0; i < count; i++) {
      const len = wide ? r.u64() : BigInt(r.u32());
      const flags = wide ? r.u64() : BigInt(r.u32());
      if (len === 0n) throw bad(`extent ${i} has length 0`);
      if (pos >= end) throw bad(`extent ${i} starts beyond the request`);
      if (pos + len > limit) {
        throw bad(`extent ${i} runs past the end of the export`);
      }
      if (reqOne && len > BigInt(p.wireLength)) {
        throw bad("the single extent is longer than the request");
      }
      if (flags > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw bad(`extent ${i} flags 0x${flags.toString(16)} are too wide`);
      }
      out.push({
        offset: Number(pos),
        length: Number(len),
        flags: Number(flags),
      });
      pos += len;
    }
    r.expectEnd();
    extents.set(id, out);
  }

  #commandError(
    p: Pending,
    errno: number,
    message?: string,
    errorOffset?: number,
  ): NbdCommandError {
    if (errno === ESHUTDOWN && !this.#shutdown) {
      this.#shutdown = true;
      this.#trace?.("server shutting down", {});
    }
    return new NbdCommandError({
      command: COMMAND_NAMES[p.cmd.type] ?? String(p.cmd.type),
      errno,
      offset: p.cmd.offset,
      length: p.cmd.length,
      ...(message ? { serverMessage: message } : {}),
      ...(errorOffset !== undefined ? { errorOffset } : {}),
    });
  }

  #finish(p: Pending): void {
    const name = COMMAND_NAMES[p.cmd.type];
    if (!p.error && this.#info.structuredReplies) {
      if (p.cmd.type === CMD_READ && p.coveredBytes !== p.cmd.length) {
        throw new NbdProtocolError(
          "transmission",
          `Server's reply to ${name} (offset ${p.cmd.offset}) covered ${p.coveredBytes} of ${p.cmd.length} bytes`,
        );
      }
      if (p.cmd.type === CMD_BLOCK_STATUS) {
        for (const [id, ctx] of this.#info.metaContexts) {
          if (!p.extents!.has(id)) {
            throw new NbdProtocolError(
              "transmission",
              `Server's reply to ${name} (offset ${p.cmd.offset}) has no extents for "${ctx}"`,
            );
          }
        }
      }
    }
    this.#pending.delete(p.cookie);
    if (p.error) p.reject(p.error);
    else p.resolve(p.extents ?? NO_EXTENTS);
    if (this.#shutdown && this.#pending.size === 0 && !this.#closing) {
      // The spec asks for a soft disconnect once the server says ESHUTDOWN.
      this.disconnect().catch(() => {});
    }
  }

  /** Whether the reader loop has ended. */
  get ended(): boolean {
    return this.#ended;
  }
}

function badMagic(magic: number, expected: string): NbdProtocolError {
  return new NbdProtocolError(
    "transmission",
    `Bad reply magic 0x${
      magic.toString(16).padStart(8, "0")
    } (expected a ${expected} reply)`,
  );
}
