/**
 * The transmission phase: requests out, replies in, matched by cookie in
 * any order. This module keeps the request slots, the cookies, the one
 * reader loop and the disconnect; every check on what the server sent is
 * a pure function of `_replies.ts`, called here in order, and read data
 * lands straight in the request's buffer. Read beside "Transmission" in
 * `doc/proto.md`.
 *
 * @module
 */

import {
  type Command,
  detachedError,
  type ExtentsById,
  Pending,
  type TransmissionStats,
} from "./_pending.ts";
import {
  CHUNK_TYPE_NAMES,
  CMD_DISC,
  CMD_FLAG_PAYLOAD_LEN,
  CMD_WRITE,
  commandName,
  ESHUTDOWN,
  nameOrNumber,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_FLAG_ERROR,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
} from "./constants.ts";
import type { Tracer } from "./_debug.ts";
import {
  abortReason,
  NbdCommandError,
  NbdConnectionClosedError,
  NbdError,
} from "./errors.ts";
import type { ExportInfo } from "./export.ts";
import {
  checkChunkHeader,
  checkReplyComplete,
  checkSimpleReply,
  claimDataChunk,
  claimHoleChunk,
  decodeReplyHeader,
  parseBlockStatusChunk,
  parseErrorChunk,
  replyHeaderLength,
  replyHeaderStart,
  unknownCookie,
} from "./_replies.ts";
import type { Transport } from "./transport.ts";
import { encodeRequest, plural, type ReplyHeader, SIZES } from "./_wire.ts";
import { WaitQueue, watchAbort } from "./_wait_queue.ts";
import {
  checkTransition,
  TRANSMISSION_TRANSITIONS,
  type TransmissionState,
} from "./_states.ts";

export type { Extent, ExtentBigInt } from "./_replies.ts";

export type { Command, ExtentsById, TransmissionStats } from "./_pending.ts";

/** What commands other than block status resolve with. */
const NO_EXTENTS: ExtentsById = new Map();
const ONCE: AddEventListenerOptions = { once: true };

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
  /** Requests sent, by command type (15 counts every type past 14). */
  readonly #sent = new Array<number>(16).fill(0);
  #chunksReceived = 0;
  /** Request slots: a reply owed holds one, abandoned or not. */
  #slots: WaitQueue;
  // One buffer and one object for every reply header, views made once.
  #headerBytes = new Uint8Array(SIZES.extendedReply);
  #headerStart: Uint8Array;
  /** The longest reply header this connection can get. */
  #longestHeader: number;
  #headerRest = this.#headerBytes.subarray(
    SIZES.simpleReply,
    SIZES.structuredReply,
  );
  #structuredHeader = this.#headerBytes.subarray(0, SIZES.structuredReply);
  #reply: ReplyHeader;
  /** Scratch for the fixed head of a data (8 bytes) or hole (12) chunk. */
  #holeField = new Uint8Array(8 + 4);
  #offsetField = this.#holeField.subarray(0, 8);
  #state: TransmissionState = { name: "open" };
  #loop: Promise<void>;
  #onWriteError = (e: unknown) => this.#fail(e);
  /** Request headers, reused in turn (see submit()). */
  #headerRing: Array<Uint8Array | undefined>;
  #headerSize: number;
  #ringNext = 0;

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
    this.#slots = new WaitQueue(maxInFlight);
    this.#trace = trace;
    this.#headerStart = this.#headerBytes.subarray(0, replyHeaderStart(info));
    this.#longestHeader = info.extendedHeaders
      ? SIZES.extendedReply
      : info.structuredReplies
      ? SIZES.structuredReply
      : SIZES.simpleReply;
    this.#headerSize = info.extendedHeaders
      ? SIZES.extendedRequest
      : SIZES.request;
    this.#headerRing = new Array(maxInFlight + 1);
    this.#reply = decodeReplyHeader(this.#headerStart);
    transport.phase = "transmission";
    transport.cork();
    this.#loop = this.#readLoop().finally(() => {
      if (this.#state.name === "closing") {
        this.#enter({ name: "closed", shutdown: this.#state.shutdown });
      }
      // Nothing may stay held once no reader will flush it.
      transport.flush();
    });
  }

  /** Where this connection is in its life; see `_states.ts`. */
  get state(): TransmissionState {
    return this.#state;
  }

  /** The one place the state changes, checked against the table. */
  #enter(next: TransmissionState): void {
    checkTransition(
      "a transmission",
      TRANSMISSION_TRANSITIONS,
      this.#state.name,
      next.name,
    );
    this.#state = next;
  }

  /** The error that killed the connection, if one did. */
  get failure(): Error | undefined {
    return this.#state.name === "failed" ? this.#state.error : undefined;
  }

  /**
   * What crossed this connection: bytes both ways (handshake included),
   * requests sent by command type, replies and chunks received.
   */
  get stats(): TransmissionStats {
    return {
      bytesSent: this.#transport.bytesSent,
      bytesReceived: this.#transport.bytesReceived,
      requests: this.#sent,
      chunksReceived: this.#chunksReceived,
    };
  }

  /** Settles once the reader has stopped, for whatever reason. */
  get finished(): Promise<void> {
    return this.#loop;
  }

  /** Whether the server asked to shut down (`ESHUTDOWN`). */
  get shuttingDown(): boolean {
    const s = this.#state;
    return s.name === "shutdown" || (s.name !== "open" && s.shutdown);
  }

  /**
   * Sends one command and waits for its whole reply.
   *
   * @returns Block status extents by context id (empty for other commands).
   * @throws {NbdCommandError} when the server fails this command.
   * @throws {NbdProtocolError} when the server breaks the protocol.
   * @throws {NbdConnectionClosedError} when the connection is gone.
   * @throws {TypeError} when the read's buffer was detached before its data
   *   arrived (the data is dropped; the connection goes on).
   */
  submit(cmd: Command): Promise<ExtentsById> {
    const signal = cmd.signal;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    // The common case takes a free slot without a trip through the queue,
    // and without a promise of its own beyond the one the caller awaits.
    if (this.#slots.tryTake()) {
      try {
        return this.#send(cmd);
      } catch (e) {
        return Promise.reject(e);
      }
    }
    return this.#submitLater(cmd);
  }

  async #submitLater(cmd: Command): Promise<ExtentsById> {
    await this.#slots.take(cmd.signal);
    return await this.#send(cmd);
  }

  /** Sends `cmd`, which holds a slot; the promise settles with its reply. */
  #send(cmd: Command): Promise<ExtentsById> {
    const signal = cmd.signal;
    const refusal = this.#refusal(cmd.type) ??
      (signal?.aborted ? abortReason(signal) : undefined);
    if (refusal) {
      this.#release();
      return Promise.reject(refusal);
    }
    const cookie = this.#nextCookie++;
    // Request headers come from a ring of maxInFlight + 1 buffers, so that
    // no request allocates memory of its own for one. The buffer reused now
    // held the header of the request maxInFlight + 1 before this one; of
    // those maxInFlight + 1 requests at least one has been answered (no
    // more than maxInFlight are ever unanswered), so the server has
    // received its header, and every header written before it, that one
    // included.
    const ring = this.#headerRing;
    const at = this.#ringNext;
    // Made on first use: a connection allowed 65536 requests in flight
    // only ever holds as many headers as it has had requests at once.
    const slice = ring[at] ??= new Uint8Array(this.#headerSize);
    this.#ringNext = at + 1 === ring.length ? 0 : at + 1;
    const { promise, resolve, reject } = Promise.withResolvers<ExtentsById>();
    const p = new Pending(cookie, cmd, resolve, reject, this.#slots);
    this.#pending.set(cookie, p);
    const header = encodeRequest(
      {
        // With extended headers a write says its payload is one
        // (doc/proto.md, extended headers: "MUST be set for NBD_CMD_WRITE").
        flags: this.#info.extendedHeaders && cmd.type === CMD_WRITE
          ? cmd.flags | CMD_FLAG_PAYLOAD_LEN
          : cmd.flags,
        type: cmd.type,
        cookie,
        offset: cmd.offset,
        length: cmd.payload ? cmd.payload.length : cmd.length,
      },
      this.#info.extendedHeaders,
      slice,
    );
    this.#sent[cmd.type < 16 ? cmd.type : 15]!++;
    this.#trace?.("send command", {
      command: commandName(cmd.type),
      cookie,
      offset: cmd.offset,
      length: cmd.length,
      flags: cmd.flags || undefined,
    });
    const sent = cmd.payload
      ? this.#transport.write(header, cmd.payload)
      : this.#transport.write(header);
    sent.catch(this.#onWriteError);
    // One listener per distinct signal, however many requests share it.
    if (signal) p.watch = watchAbort(signal, p);
    // Returned to the caller, who awaits it: no rejection goes unobserved.
    return promise;
  }

  /** Why a command cannot be sent now, if it cannot. */
  #refusal(type: number): NbdConnectionClosedError | undefined {
    const state = this.#state;
    if (state.name === "open") return undefined;
    const what = commandName(type);
    if (state.name === "failed") {
      return new NbdConnectionClosedError(
        `Cannot send ${what}: the connection failed: ${state.error.message}`,
        { cause: state.error },
      );
    }
    if (this.shuttingDown) {
      return new NbdConnectionClosedError(
        `Cannot send ${what}: the server is shutting down (ESHUTDOWN)`,
      );
    }
    return new NbdConnectionClosedError(
      `Cannot send ${what}: the connection is closing`,
    );
  }

  #release(): void {
    this.#slots.release();
  }

  /**
   * Ends one request: frees its slot, then settles its promise (a no-op
   * when its caller already stopped waiting).
   */
  #settle(p: Pending, error: Error | undefined): void {
    p.watch?.cancel();
    this.#slots.release(p.abandoned);
    if (error) p.reject(error);
    else p.resolve(p.extents ?? NO_EXTENTS);
  }

  /** Resolves once no caller is waiting for a reply. */
  #whenIdle(): Promise<void> {
    return this.#slots.whenNoneWaiting();
  }

  /**
   * Fails every pending request and later call with `error`, and closes the
   * transport. Only the first failure counts.
   */
  #fail(error: unknown): void {
    const state = this.#state;
    if (state.name === "failed") return;
    const err = error instanceof Error ? error : new NbdError(String(error));
    if (
      (state.name === "closing" || state.name === "closed") &&
      this.#pending.size === 0
    ) {
      // The connection ended after a clean disconnect; nothing is lost.
      this.#transport.close();
      return;
    }
    this.#enter({ name: "failed", error: err, shutdown: this.shuttingDown });
    this.#trace?.("connection failed", { error: err.message });
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) this.#settle(p, err);
    // Waiters go on, to find the failure when they try to send.
    this.#slots.grantAll();
    this.#slots.wakeIdle();
    this.#transport.close(err);
  }

  /**
   * Soft disconnect: waits for requests whose callers still wait (until
   * `signal` aborts), sends `NBD_CMD_DISC`, and closes the transport.
   * Requests abandoned through their signals do not hold it up. Safe to
   * call more than once.
   */
  async disconnect(signal?: AbortSignal): Promise<void> {
    const from = this.#state.name;
    if (from === "open" || from === "shutdown") {
      this.#enter({ name: "closing", shutdown: from === "shutdown" });
      if (signal) {
        let onAbort: (() => void) | undefined;
        await Promise.race([
          this.#whenIdle(),
          new Promise<void>((resolve) => {
            onAbort = resolve;
            if (signal.aborted) resolve();
            else signal.addEventListener("abort", onAbort, ONCE);
          }),
        ]);
        signal.removeEventListener("abort", onAbort!);
      } else {
        await this.#whenIdle();
      }
      if (!this.failure) {
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
        this.#sent[CMD_DISC]!++;
        this.#trace?.("send command", { command: commandName(CMD_DISC) });
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
        this.#settle(
          p,
          new NbdConnectionClosedError(
            `The connection was closed before the server replied to ${
              commandName(p.cmd.type)
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
      // Replies already received are handled without waiting: a reply
      // whose bytes are all buffered costs no promise at all.
      for (;;) {
        if (!this.#takeHeader() && !await this.#readHeader()) break;
        const more = this.#dispatch(this.#reply);
        if (more !== undefined) await more;
      }
      if (this.#pending.size > 0 || this.#state.name !== "closing") {
        this.#fail(
          new NbdConnectionClosedError(
            `Server closed the connection with ${
              plural(this.#pending.size, "request")
            } in flight`,
          ),
        );
      }
    } catch (e) {
      this.#fail(e);
    }
  }

  /**
   * Decodes a reply header into `#reply` from bytes already received, when
   * they hold the longest header this connection can get.
   */
  #takeHeader(): boolean {
    const t = this.#transport;
    if (t.buffered < this.#longestHeader) return false;
    const start = this.#headerStart;
    t.take(start);
    let bytes = start;
    if (replyHeaderLength(start, this.#info) === SIZES.structuredReply) {
      t.take(this.#headerRest);
      bytes = this.#structuredHeader;
    }
    decodeReplyHeader(bytes, this.#reply);
    return true;
  }

  /** Reads one reply header into `#reply`; `false` at a clean end of stream. */
  async #readHeader(): Promise<boolean> {
    const t = this.#transport;
    const start = this.#headerStart;
    const what = this.#info.extendedHeaders
      ? "an extended reply header"
      : "a reply header";
    // Bytes already received are taken at once; only what has yet to
    // arrive goes through an asynchronous read.
    if (!t.take(start) && !await t.readInto(start, what, true)) return false;
    let bytes = start;
    if (replyHeaderLength(start, this.#info) === SIZES.structuredReply) {
      const rest = this.#headerRest;
      if (!t.take(rest)) await t.readInto(rest, "a structured reply header");
      bytes = this.#structuredHeader;
    }
    decodeReplyHeader(bytes, this.#reply);
    return true;
  }

  /**
   * Handles the reply or chunk whose header is `h`.
   *
   * @returns A promise when its payload has yet to arrive; `undefined` when
   *   it was handled from bytes already received.
   */
  #dispatch(h: ReplyHeader): Promise<void> | undefined {
    const p = this.#pending.get(h.cookie);
    if (!p) throw unknownCookie(h);
    const cmd = p.cmd;
    this.#chunksReceived++;
    if (h.kind === "simple") {
      this.#trace?.("recv simple reply", {
        cookie: h.cookie,
        command: commandName(cmd.type),
        error: h.error || undefined,
      });
      const payload = checkSimpleReply(cmd, h, this.#info);
      if (h.error !== 0) {
        p.error = this.#commandError(p, h.error);
      } else if (payload > 0) {
        const more = this.#readData(p, 0, payload, false);
        if (more) return this.#finishAfter(more, p);
      }
      this.#finish(p);
      return undefined;
    }
    this.#trace?.("recv chunk", {
      cookie: h.cookie,
      command: commandName(cmd.type),
      type: nameOrNumber(CHUNK_TYPE_NAMES, h.type),
      length: h.length,
      done: (h.flags & REPLY_FLAG_DONE) !== 0,
    });
    checkChunkHeader(cmd, h, this.#info);
    const more = this.#chunk(p, h.type, h.length);
    // Read before any wait: `h` is reused for the next header.
    const done = (h.flags & REPLY_FLAG_DONE) !== 0;
    if (more) return done ? this.#finishAfter(more, p) : more;
    if (done) this.#finish(p);
    return undefined;
  }

  async #finishAfter(more: Promise<void>, p: Pending): Promise<void> {
    await more;
    this.#finish(p);
  }

  /**
   * Reads a chunk's payload, whose header has passed its checks: at once
   * from bytes already received where it can (`undefined`), else a
   * promise.
   */
  #chunk(
    p: Pending,
    type: number,
    length: number,
  ): Promise<void> | undefined {
    if (type === REPLY_TYPE_OFFSET_DATA) {
      if (!this.#transport.take(this.#offsetField)) {
        return this.#dataChunk(p, length);
      }
      return this.#dataAfterOffset(p, length);
    }
    // NBD_REPLY_TYPE_NONE has no payload; checkChunkHeader() refused the rest.
    if (type === REPLY_TYPE_NONE) return undefined;
    return this.#otherChunk(p, type, length);
  }

  /** A data chunk whose 8-byte offset has yet to arrive. */
  async #dataChunk(p: Pending, length: number): Promise<void> {
    await this.#transport.readInto(
      this.#offsetField,
      "the offset of a data chunk",
    );
    await this.#dataAfterOffset(p, length);
  }

  /** A data chunk's payload, once its offset is in `#offsetField`. */
  #dataAfterOffset(p: Pending, length: number): Promise<void> | undefined {
    const size = length - 8;
    const rel = claimDataChunk(p.cmd, p, this.#offsetField, size);
    return this.#readData(p, rel, size, true);
  }

  /** Error, hole and block status chunks. */
  async #otherChunk(p: Pending, type: number, length: number): Promise<void> {
    const t = this.#transport;
    const cmd = p.cmd;
    if (type & REPLY_TYPE_FLAG_ERROR) {
      const payload = await t.readExact(
        length,
        `an error chunk for ${commandName(cmd.type)}`,
      );
      const e = parseErrorChunk(cmd, type, payload);
      p.error ??= this.#commandError(p, e.errno, e.message, e.offset);
      return;
    }
    switch (type) {
      case REPLY_TYPE_OFFSET_HOLE: {
        const payload = this.#holeField;
        await t.readInto(payload, "a hole chunk");
        const hole = claimHoleChunk(cmd, p, payload);
        if (cmd.buffer!.length === cmd.length) {
          cmd.buffer!.fill(0, hole.start, hole.end);
        } else {
          p.detached = true;
        }
        return;
      }
      case REPLY_TYPE_BLOCK_STATUS:
      case REPLY_TYPE_BLOCK_STATUS_EXT: {
        const payload = await t.readExact(
          length,
          `a block status chunk for ${commandName(cmd.type)}`,
        );
        const extents = p.extents!;
        const chunk = parseBlockStatusChunk(
          cmd,
          type,
          payload,
          this.#info,
          extents,
        );
        extents.set(chunk.id, chunk.extents);
        return;
      }
    }
  }

  /**
   * Reads `size` bytes of read data into the request's buffer at `rel`. A
   * buffer its owner detached (transferred, say, after aborting the read)
   * can hold nothing: the bytes go to scratch, so the stream stays in step
   * and only this request fails.
   *
   * @param chunk Whether the bytes are a data chunk's (else a simple
   *   reply's payload); names them in errors.
   * @returns `undefined` when the bytes were already received, else a
   *   promise.
   */
  #readData(
    p: Pending,
    rel: number,
    size: number,
    chunk: boolean,
  ): Promise<void> | undefined {
    const t = this.#transport;
    const buffer = p.cmd.buffer!;
    const length = p.cmd.length;
    if (buffer.length !== length) {
      p.detached = true;
      return t.skip(size, this.#dataName(p, chunk));
    }
    // A reply in one piece lands in the buffer itself, with no view made.
    const into = size === length ? buffer : buffer.subarray(rel, rel + size);
    if (t.take(into)) return undefined;
    return this.#readDataLater(p, into, this.#dataName(p, chunk));
  }

  async #readDataLater(
    p: Pending,
    into: Uint8Array,
    what: string,
  ): Promise<void> {
    const length = p.cmd.length;
    await this.#transport.readInto(into, what);
    // Detached while the bytes were arriving: the transport read them all.
    if (p.cmd.buffer!.length !== length) p.detached = true;
  }

  #dataName(p: Pending, chunk: boolean): string {
    return chunk
      ? "a data chunk"
      : `the ${p.cmd.length}-byte payload of a simple reply to ${
        commandName(p.cmd.type)
      }`;
  }

  #commandError(
    p: Pending,
    errno: number,
    message?: string,
    errorOffset?: number | bigint,
  ): NbdCommandError {
    if (errno === ESHUTDOWN && !this.shuttingDown) {
      const s = this.#state;
      this.#enter(
        s.name === "closing" ? { name: "closing", shutdown: true } : {
          name: "shutdown",
        },
      );
      this.#trace?.("server shutting down", {});
    }
    return new NbdCommandError({
      command: commandName(p.cmd.type),
      errno,
      offset: p.cmd.offset,
      length: p.cmd.length,
      ...(message ? { serverMessage: message } : {}),
      ...(errorOffset !== undefined ? { errorOffset } : {}),
    });
  }

  #finish(p: Pending): void {
    if (!p.error) {
      checkReplyComplete(p.cmd, p.coveredBytes, p.extents, this.#info);
    }
    this.#pending.delete(p.cookie);
    this.#settle(p, p.error ?? (p.detached ? detachedError(p.cmd) : undefined));
    if (this.#state.name === "shutdown" && this.#pending.size === 0) {
      // The spec asks for a soft disconnect once the server says ESHUTDOWN.
      this.disconnect().catch(() => {});
    }
  }

  /** Whether the reader loop has ended. */
  get ended(): boolean {
    const name = this.#state.name;
    return name === "closed" || name === "failed";
  }
}
