/**
 * The byte stream under the protocol. The handshake and transmission code
 * only ever call {@linkcode Transport}, which turns any {@linkcode ByteStream}
 * (a `Deno.Conn`, a TLS connection, a descriptor owned by `ffi/`) into exact
 * reads and whole-message writes.
 *
 * @module
 */

import {
  errorText,
  NbdConnectionClosedError,
  NbdError,
  NbdProtocolError,
  type ProtocolPhase,
} from "./errors.ts";

/**
 * The least a byte stream must offer: `Deno.Conn` and `Deno.TlsConn` already
 * have this shape, and so does the descriptor stream in `ffi/`.
 */
export interface ByteStream {
  /** Reads up to `p.length` bytes into `p`; `null` at end of stream. */
  read(p: Uint8Array): Promise<number | null>;
  /** Writes some prefix of `p`, returning how many bytes were written. */
  write(p: Uint8Array): Promise<number>;
  /** Closes the stream; pending reads and writes fail. */
  close(): void;
}

const BUFFER_SIZE = 256 * 1024;
/** Reads at least this large skip the buffer. */
const DIRECT_READ = 16 * 1024;
/** How much to fetch for a header that follows a large payload. */
const SMALL_FILL = 4 * 1024;
/** Below this size a message's parts are copied into one write. */
const COALESCE_LIMIT = 64 * 1024;

/**
 * Exact reads and serialised writes over a {@linkcode ByteStream}.
 *
 * Reads are buffered; a large payload drains the buffer and then lands
 * straight in the caller's memory. Writes of one message never interleave
 * with writes of another.
 */
export class Transport {
  #stream: ByteStream;
  #buf = new Uint8Array(BUFFER_SIZE);
  /**
   * Where runs of small parts are joined. Writes run one at a time (each
   * after `#writeTail`), so one buffer serves them all.
   */
  #joined = new Uint8Array(COALESCE_LIMIT);
  #start = 0;
  #end = 0;
  #writeTail: Promise<void> = Promise.resolve();
  /** Corking: hold writes while the reader works through buffered replies. */
  #corking = false;
  #readerWaiting = false;
  #held: Uint8Array[] = [];
  #heldDone: Array<[() => void, (e: unknown) => void]> = [];
  #closed = false;
  #afterLarge = false;
  #closeReason: unknown = undefined;
  /** Bytes written to the stream so far, handshake included. */
  bytesSent = 0;
  /** Bytes read from the stream so far, handshake included. */
  bytesReceived = 0;
  /** Used to name the phase in protocol errors raised here. */
  phase: ProtocolPhase = "handshake";

  /**
   * Wraps a stream.
   *
   * @param stream The stream to speak over.
   */
  constructor(stream: ByteStream) {
    this.#stream = stream;
  }

  /** The stream currently under this transport. */
  get stream(): ByteStream {
    return this.#stream;
  }

  /** Whether {@linkcode Transport.close} has been called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes received but not yet consumed. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  /**
   * Swaps the stream under the transport, as after STARTTLS. Nothing may be
   * buffered: a server that sent bytes ahead of the TLS handshake is broken.
   */
  replaceStream(stream: ByteStream): void {
    if (this.buffered !== 0) {
      throw new NbdProtocolError(
        this.phase,
        `Server sent ${this.buffered} unexpected bytes before the TLS handshake`,
      );
    }
    this.#stream = stream;
  }

  /**
   * Fills `dst` completely.
   *
   * @param dst Where the bytes go.
   * @param what Names the message for errors ("a simple reply").
   * @returns `false` if the stream ended cleanly before the first byte and
   *   `eofOk` was set; `true` once `dst` is full, or once its bytes are
   *   consumed if its owner detached `dst` meanwhile (its length then no
   *   longer matches).
   * @throws {NbdConnectionClosedError} at end of stream before any byte.
   * @throws {NbdProtocolError} at end of stream inside the message.
   */
  async readInto(
    dst: Uint8Array,
    what: string,
    eofOk = false,
  ): Promise<boolean> {
    let got = 0;
    const want = dst.length;
    while (got < want) {
      if (dst.length !== want) {
        // Detached while the read waited: read the rest anyway, so that the
        // stream stays in step.
        await this.skip(want - got, what);
        return true;
      }
      if (this.#end > this.#start) {
        const n = Math.min(this.#end - this.#start, want - got);
        dst.set(this.#buf.subarray(this.#start, this.#start + n), got);
        this.#start += n;
        got += n;
        continue;
      }
      this.#start = this.#end = 0;
      const remaining = want - got;
      // A large payload goes straight to its destination, skipping a copy.
      const direct = remaining >= DIRECT_READ;
      // After a large payload the next header is likely followed by another:
      // fetch a little, so that the payload lands in place, not via a copy.
      const target = direct
        ? dst.subarray(got)
        : this.#afterLarge
        ? this.#buf.subarray(0, SMALL_FILL)
        : this.#buf;
      this.#afterLarge = direct;
      const n = await this.#read(target);
      if (n === null) {
        if (got === 0 && eofOk) return false;
        if (got === 0) {
          throw new NbdConnectionClosedError(
            `Connection closed by the server while waiting for ${what}`,
          );
        }
        // The stream ended inside a message: broken framing to a parser,
        // a lost connection (the cause) to whoever might reconnect.
        throw new NbdProtocolError(
          this.phase,
          `Connection closed after ${got} of ${want} bytes of ${what}`,
          { cause: new NbdConnectionClosedError("End of stream") },
        );
      }
      if (direct) got += n;
      else this.#end = n;
    }
    return true;
  }

  /**
   * Fills `dst` from bytes already received, without waiting: the reader
   * works through replies that arrived together with no trip through the
   * event loop per field.
   *
   * @returns `true` when `dst` was filled; `false` (nothing consumed) when
   *   fewer bytes are buffered.
   */
  take(dst: Uint8Array): boolean {
    const n = dst.length;
    if (this.#end - this.#start < n) return false;
    const at = this.#start;
    if (n <= 16) {
      // Headers and fields: a loop beats making a view to copy from.
      const buf = this.#buf;
      for (let i = 0; i < n; i++) dst[i] = buf[at + i]!;
    } else {
      dst.set(this.#buf.subarray(at, at + n));
    }
    this.#start = at + n;
    return true;
  }

  /**
   * Reads exactly `n` bytes into a new array.
   *
   * @throws {NbdConnectionClosedError} at end of stream before any byte.
   * @throws {NbdProtocolError} at end of stream inside the message.
   */
  async readExact(n: number, what: string): Promise<Uint8Array> {
    const out = new Uint8Array(n);
    await this.readInto(out, what);
    return out;
  }

  /** Reads and drops `n` bytes, without allocating `n` bytes. */
  async skip(n: number, what: string): Promise<void> {
    const scratch = new Uint8Array(Math.min(n, 64 * 1024));
    let left = n;
    while (left > 0) {
      const step = Math.min(left, scratch.length);
      await this.readInto(scratch.subarray(0, step), what);
      left -= step;
    }
  }

  async #read(p: Uint8Array): Promise<number | null> {
    if (this.#closed) throw this.#closedError();
    // About to wait for the server: everything held goes out first.
    this.flush();
    this.#readerWaiting = true;
    try {
      const n = await this.#stream.read(p);
      if (n !== null) this.bytesReceived += n;
      return n;
    } catch (e) {
      throw this.#streamError(e, "reading");
    } finally {
      this.#readerWaiting = false;
    }
  }

  /**
   * From now on, writes made while a reader is busy with replies already
   * received are held and sent together just before it next waits for the
   * server: one system call for many requests when replies arrive in bursts.
   * Only for transmission, where a reader always runs.
   */
  cork(): void {
    this.#corking = true;
  }

  #flushQueued = false;
  #flushHeld = () => {
    this.#flushQueued = false;
    this.flush();
  };

  /** Sends everything held by corking. */
  flush(): void {
    if (this.#held.length === 0) return;
    const parts = this.#held;
    const done = this.#heldDone;
    this.#held = [];
    this.#heldDone = [];
    // One part with nothing queued before it starts at once, as in write().
    const run = this.#queuedWrites === 0 && parts.length === 1
      ? this.#writeAll(parts[0]!)
      : this.#writeTail.then(() => this.#writeParts(parts));
    this.#queuedWrites++;
    this.#writeTail = run.then(this.#writeDone, this.#writeDone);
    if (done.length === 1) {
      run.then(done[0]![0], done[0]![1]);
    } else {
      run.then(
        () => done.forEach(([resolve]) => resolve()),
        (e) => done.forEach(([, reject]) => reject(e)),
      );
    }
  }

  /**
   * Writes one message made of `parts`, after every message queued before it.
   *
   * @throws {NbdConnectionClosedError} if the stream is closed or fails.
   */
  write(...parts: Uint8Array[]): Promise<void> {
    if (this.#corking && !this.#closed) {
      for (const p of parts) this.#held.push(p);
      // With the reader waiting, what is written in this turn of the
      // microtask queue (the requests that the replies just handled let
      // through) goes out together at its end.
      if (this.#readerWaiting && !this.#flushQueued) {
        this.#flushQueued = true;
        queueMicrotask(this.#flushHeld);
      }
      return new Promise((resolve, reject) => {
        this.#heldDone.push([resolve, reject]);
      });
    }
    // Nothing queued before it: one part starts at once, not a turn later.
    const run = this.#queuedWrites === 0 && parts.length === 1
      ? this.#writeAll(parts[0]!)
      : this.#writeTail.then(() => this.#writeParts(parts));
    this.#queuedWrites++;
    // Later writes must run even if this one fails; they fail on their own.
    this.#writeTail = run.then(this.#writeDone, this.#writeDone);
    return run;
  }

  /** Writes queued or running: a write with none before it can start now. */
  #queuedWrites = 0;
  #writeDone = () => {
    this.#queuedWrites--;
  };

  async #writeParts(parts: Uint8Array[]): Promise<void> {
    // Runs of small parts are joined so that headers and small payloads go
    // out in one system call; large payloads are written as they are.
    let run: Uint8Array[] = [];
    let runBytes = 0;
    for (const part of parts) {
      if (part.length >= COALESCE_LIMIT) {
        await this.#writeJoined(run, runBytes);
        run = [];
        runBytes = 0;
        await this.#writeAll(part);
        continue;
      }
      if (runBytes + part.length > COALESCE_LIMIT) {
        await this.#writeJoined(run, runBytes);
        run = [];
        runBytes = 0;
      }
      run.push(part);
      runBytes += part.length;
    }
    await this.#writeJoined(run, runBytes);
  }

  async #writeJoined(run: Uint8Array[], bytes: number): Promise<void> {
    if (run.length === 0) return;
    if (run.length === 1) return await this.#writeAll(run[0]!);
    const joined = this.#joined.subarray(0, bytes);
    let at = 0;
    for (const p of run) {
      joined.set(p, at);
      at += p.length;
    }
    await this.#writeAll(joined);
  }

  async #writeAll(part: Uint8Array): Promise<void> {
    let at = 0;
    while (at < part.length) {
      if (this.#closed) throw this.#closedError();
      try {
        const n = await this.#stream.write(part.subarray(at));
        at += n;
        this.bytesSent += n;
      } catch (e) {
        throw this.#streamError(e, "writing");
      }
    }
  }

  /** Waits until every queued write (held ones too) has reached the stream. */
  drain(): Promise<void> {
    this.flush();
    return this.#writeTail;
  }

  /**
   * Closes the stream. Reads and writes in progress fail with `reason` (when
   * it is an error) or with a {@linkcode NbdConnectionClosedError}.
   */
  close(reason?: unknown): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeReason = reason;
    const held = this.#heldDone;
    this.#held = [];
    this.#heldDone = [];
    for (const [, reject] of held) reject(this.#closedError());
    try {
      this.#stream.close();
    } catch {
      // Already closed by the other side; nothing left to release.
    }
  }

  /** What a failed stream read or write becomes. */
  #streamError(e: unknown, doing: string): Error {
    if (this.#closed) return this.#closedError();
    // A stream that speaks in NBD errors (TLS) is already precise.
    if (e instanceof NbdError) return e;
    return new NbdConnectionClosedError(
      `Connection failed while ${doing}: ${errorText(e)}`,
      { cause: e },
    );
  }

  #closedError(): Error {
    if (this.#closeReason instanceof Error) return this.#closeReason;
    return new NbdConnectionClosedError("The connection is closed");
  }
}
