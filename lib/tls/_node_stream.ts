/**
 * The `node:tls` path: any {@linkcode ByteStream} (a Unix socket, a
 * descriptor stream from `ffi/`), client certificates, trust limited to the
 * given CA. The library adapts its own stream into a Node `Duplex` and lets
 * `tls.connect({ socket })` speak over it.
 *
 * @module
 */

import { NbdTlsError } from "./error.ts";
import type { TlsStream } from "./stream.ts";
import type { ByteStream } from "../transport.ts";
import { abortReason } from "../errors.ts";
import { closedError, explain, REQUIRE_CERT_HINT } from "./_messages.ts";

/** `node:stream`'s `Duplex`, loaded on first use. */
export type NodeStream = { Duplex: typeof import("node:stream").Duplex };
type TLSSocket = import("node:tls").TLSSocket;
type Duplex = import("node:stream").Duplex;

// ---------------------------------------------------------------------------
// ByteStream -> Node Duplex, so that node:tls can speak over any stream.

/** Bytes read from the raw stream per call. */
const SLAB_SIZE = 256 * 1024;
/** Below this much room left in the slab, a fresh slab is started. */
const MIN_READ = 16 * 1024 + 64;

export function byteStreamDuplex(
  stream: ByteStream,
  { Duplex }: NodeStream,
): Duplex {
  // Chunks handed to node:tls are views of a slab, so the slab is never
  // reused: reads go into the room after the last chunk, then a new slab.
  let slab = new Uint8Array(SLAB_SIZE);
  let used = 0;
  let reading = false;
  let closed = false;
  const duplex: Duplex = new Duplex({
    read() {
      if (reading || closed) return;
      reading = true;
      if (slab.length - used < MIN_READ) {
        slab = new Uint8Array(SLAB_SIZE);
        used = 0;
      }
      const room = slab.subarray(used);
      stream.read(room).then((n) => {
        reading = false;
        if (closed) return;
        if (n === null) {
          duplex.push(null);
          return;
        }
        used += n;
        duplex.push(room.subarray(0, n));
      }, (e) => {
        reading = false;
        if (!closed) duplex.destroy(toError(e));
      });
    },
    write(chunk: Uint8Array, _encoding, done) {
      writeAll(stream, chunk).then(() => done(), (e) => done(toError(e)));
    },
    final(done) {
      done();
    },
    destroy(error, done) {
      closed = true;
      try {
        stream.close();
      } catch {
        // Already closed by the other side.
      }
      done(error);
    },
  });
  return duplex;
}

async function writeAll(stream: ByteStream, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) at += await stream.write(bytes.subarray(at));
}

function toError(e: unknown): Error {
  return e instanceof Error ? e : new Error(String(e));
}

// ---------------------------------------------------------------------------
// Node TLSSocket -> ByteStream.

/** Pause the TLS socket when this much decrypted data waits for a reader. */
const HIGH_WATER = 1024 * 1024;

interface Waiter {
  resolve(): void;
  reject(e: Error): void;
}

/** A `node:tls` session over any {@linkcode ByteStream}. */
export class NodeTlsStream implements TlsStream {
  #socket: TLSSocket;
  #name: string | undefined;
  #sentCertificate: boolean;
  #chunks: Uint8Array[] = [];
  #queued = 0;
  #ended = false;
  #error: Error | undefined;
  #closed = false;
  #secure = false;
  #received = false;
  #readers: Waiter[] = [];
  #writers = new Set<(e: Error) => void>();
  #handshake: Waiter | undefined;
  #protocol: string | undefined;
  #cipher: string | undefined;
  #verified = false;

  /** @internal Use {@linkcode upgradeToTls}. */
  constructor(socket: TLSSocket, name: string | undefined, sentCert: boolean) {
    this.#socket = socket;
    this.#name = name;
    this.#sentCertificate = sentCert;
    socket.on("secureConnect", () => {
      this.#secure = true;
      // Read once: the socket forgets all this when it is destroyed.
      this.#protocol = socket.getProtocol() ?? undefined;
      this.#cipher = socket.getCipher()?.standardName;
      this.#verified = socket.authorized;
      this.#handshake?.resolve();
    });
    socket.on("data", (chunk: Uint8Array) => {
      this.#received = true;
      this.#chunks.push(chunk);
      this.#queued += chunk.length;
      if (this.#queued >= HIGH_WATER) socket.pause();
      this.#wakeReaders();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#wakeReaders();
    });
    socket.on("error", (e: Error) => this.#fail(e));
    socket.on("close", () => {
      if (!this.#secure) {
        this.#fail(new Error("the server closed the connection"));
      }
      this.#ended = true;
      this.#wakeReaders();
    });
  }

  /** The TLS version, e.g. `"TLSv1.3"`; kept after close. */
  get protocol(): string | undefined {
    return this.#protocol;
  }

  /** The cipher suite's standard name; kept after close. */
  get cipher(): string | undefined {
    return this.#cipher;
  }

  /** Whether the server's certificate chain was verified; kept after close. */
  get verified(): boolean {
    return this.#verified;
  }

  /** @internal Waits for the handshake; {@linkcode upgradeToTls} calls it. */
  async handshake(signal: AbortSignal | undefined): Promise<void> {
    if (this.#secure) return;
    const onAbort = () => {
      const reason = abortReason(signal!);
      this.#handshake?.reject(reason);
      this.close();
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await new Promise<void>((resolve, reject) => {
        if (this.#error) reject(this.#error);
        else this.#handshake = { resolve, reject };
      });
    } catch (e) {
      this.close();
      throw e;
    } finally {
      this.#handshake = undefined;
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * Reads decrypted bytes into `p`.
   *
   * @param p Where the bytes go.
   * @returns How many bytes were read, or `null` at the end of the stream.
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  async read(p: Uint8Array): Promise<number | null> {
    while (true) {
      if (this.#closed) throw closedError();
      if (this.#queued > 0) return this.#take(p);
      if (this.#error) throw this.#error;
      if (this.#ended) {
        if (!this.#received) throw this.#earlyEnd();
        return null;
      }
      await new Promise<void>((resolve, reject) =>
        this.#readers.push({ resolve, reject })
      );
    }
  }

  #take(p: Uint8Array): number {
    let n = 0;
    while (n < p.length && this.#chunks.length > 0) {
      const chunk = this.#chunks[0]!;
      const step = Math.min(chunk.length, p.length - n);
      p.set(chunk.subarray(0, step), n);
      n += step;
      if (step === chunk.length) this.#chunks.shift();
      else this.#chunks[0] = chunk.subarray(step);
    }
    this.#queued -= n;
    if (this.#queued < HIGH_WATER && this.#socket.isPaused()) {
      this.#socket.resume();
    }
    return n;
  }

  /**
   * Encrypts and sends all of `p`; resolves once it has been handed to the
   * raw stream, so `p` may be reused after.
   *
   * @param p The bytes to send.
   * @returns `p.length`.
   * @throws {NbdTlsError} when the TLS layer fails.
   * @throws {NbdConnectionClosedError} after `close()`.
   */
  write(p: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(closedError());
    if (this.#error) return Promise.reject(this.#error);
    return new Promise<number>((resolve, reject) => {
      const fail = (e: Error) => {
        this.#writers.delete(fail);
        reject(e);
      };
      this.#writers.add(fail);
      this.#socket.write(p, (e?: Error | null) => {
        if (!this.#writers.has(fail)) return;
        this.#writers.delete(fail);
        if (e) reject(this.#error ?? this.#wrap(e));
        else resolve(p.length);
      });
    });
  }

  /**
   * Closes the TLS session and the raw stream under it, without waiting for
   * the server. Reads and writes in progress fail with
   * {@linkcode NbdConnectionClosedError}.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    const error = closedError();
    for (const reader of this.#readers.splice(0)) reader.reject(error);
    for (const fail of [...this.#writers]) fail(error);
    this.#chunks = [];
    this.#queued = 0;
    this.#socket.destroy();
  }

  #fail(e: Error): void {
    if (this.#error || this.#closed) return;
    this.#error = e instanceof NbdTlsError ? e : this.#wrap(e);
    this.#handshake?.reject(this.#error);
    for (const reader of this.#readers.splice(0)) reader.reject(this.#error);
    for (const fail of [...this.#writers]) fail(this.#error);
  }

  #wakeReaders(): void {
    for (const reader of this.#readers.splice(0)) reader.resolve();
  }

  /** The server hung up right after the handshake, before saying a word. */
  #earlyEnd(): NbdTlsError {
    return new NbdTlsError(
      `The server closed the TLS connection right after the handshake, before sending anything; ${this.#rejectionHint()}`,
    );
  }

  #rejectionHint(): string {
    return this.#sentCertificate
      ? "it may not trust the client certificate that was sent"
      : REQUIRE_CERT_HINT;
  }

  #wrap(e: Error): NbdTlsError {
    const code = (e as { code?: unknown }).code;
    const codeText = typeof code === "string" ? code : undefined;
    const detail = codeText && !e.message.includes(codeText)
      ? `${codeText}: ${e.message}`
      : e.message;
    const who = this.#name ?? "the server";
    if (!this.#secure) {
      const meaning = explain(codeText, this.#name);
      return new NbdTlsError(
        `TLS handshake with ${who} failed: ${
          meaning ? `${meaning} (${detail})` : detail
        }`,
        { cause: e, ...(codeText ? { code: codeText } : {}) },
      );
    }
    const hint = this.#received ? "" : `; ${this.#rejectionHint()}`;
    return new NbdTlsError(
      `TLS connection to ${who} failed${
        this.#received ? "" : " right after the handshake"
      }: ${detail}${hint}`,
      { cause: e, ...(codeText ? { code: codeText } : {}) },
    );
  }
}
