/**
 * A socket descriptor owned by `ffi/`, seen as the library's
 * {@linkcode ByteStream}. Reads and writes run `nonblocking` on Deno's
 * thread pool, so the event loop stays free while one waits.
 *
 * @module
 */

import { NbdConnectionClosedError } from "../lib/errors.ts";
import type { ByteStream } from "../lib/transport.ts";
import { libc, MSG_NOSIGNAL, SHUT_RDWR } from "./_libc.ts";
import { NbdSystemCallError } from "./errors.ts";

/**
 * A connected stream socket descriptor as a {@linkcode ByteStream}.
 *
 * `close()` shuts the socket down first, which wakes a read or write in
 * progress on a pool thread; the descriptor itself is closed once nothing
 * uses it any more, so its number cannot be reused under a pending call.
 */
export class FdStream implements ByteStream {
  #fd: number;
  #pending = 0;
  #closed = false;
  #released = false;

  /** @param fd A connected, blocking stream socket; the stream owns it. */
  constructor(fd: number) {
    this.#fd = fd;
  }

  /** The descriptor, while the stream owns it. */
  get fd(): number {
    return this.#fd;
  }

  /** Whether close() or release() was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Reads up to `p.length` bytes; `null` once the peer has shut down. */
  async read(p: Uint8Array): Promise<number | null> {
    this.#check("read");
    if (p.length === 0) return 0;
    this.#pending++;
    try {
      const n = Number(
        await libc().recv(
          this.#fd,
          p as Uint8Array<ArrayBuffer>,
          BigInt(p.length),
          0,
        ),
      );
      if (n > 0) return n;
      if (this.#closed) throw closedError("read");
      if (n === 0) return null;
      // errno stayed on the pool thread; the call name is what we know.
      throw new NbdSystemCallError("recv", 0, "Reading from the socket");
    } finally {
      this.#settle();
    }
  }

  /** Writes a prefix of `p`, returning its length. */
  async write(p: Uint8Array): Promise<number> {
    this.#check("write");
    if (p.length === 0) return 0;
    this.#pending++;
    try {
      const n = Number(
        await libc().send(
          this.#fd,
          p as Uint8Array<ArrayBuffer>,
          BigInt(p.length),
          MSG_NOSIGNAL,
        ),
      );
      if (this.#closed) throw closedError("write");
      if (n >= 0) return n;
      throw new NbdSystemCallError("send", 0, "Writing to the socket");
    } finally {
      this.#settle();
    }
  }

  /** Shuts the socket down and closes it once no call is in progress. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    libc().shutdown(this.#fd, SHUT_RDWR);
    if (this.#pending === 0) this.#closeFd();
  }

  /**
   * Gives the descriptor up without closing it, for the kernel to take.
   *
   * @throws {Error} if a read or write is still in progress.
   */
  release(): number {
    if (this.#closed) throw closedError("release");
    if (this.#pending !== 0) {
      throw new Error(
        `Cannot release descriptor ${this.#fd}: ${this.#pending} calls in progress`,
      );
    }
    this.#closed = true;
    this.#released = true;
    return this.#fd;
  }

  #check(what: string): void {
    if (this.#closed) throw closedError(what);
  }

  #settle(): void {
    this.#pending--;
    if (this.#closed && !this.#released && this.#pending === 0) {
      this.#closeFd();
    }
  }

  #closeFd(): void {
    if (this.#fd < 0) return;
    libc().close(this.#fd);
    this.#fd = -1;
  }
}

function closedError(what: string): NbdConnectionClosedError {
  return new NbdConnectionClosedError(`Cannot ${what}: the socket is closed`);
}
