/**
 * An in-memory ByteStream that plays back a server's bytes cut at chosen
 * points and records what the client wrote: the way to feed every reply
 * split at every byte boundary (pg-protocol's habit). The bytes themselves
 * come from the scripted server's encoders (`Builder` and the rest in
 * `server.ts`).
 */

import type { ByteStream } from "../../lib/transport.ts";

/** Plays `data` back in pieces cut at `cuts`; records writes. */
export class ScriptedStream implements ByteStream {
  readonly written: Uint8Array[] = [];
  #pieces: Uint8Array[];
  #closed = false;
  #hang: boolean;
  #wake: ((closed: boolean) => void) | undefined;

  /**
   * @param data Everything the server will send.
   * @param cuts Offsets at which reads return early.
   * @param hang At the end, wait until closed instead of reporting EOF.
   */
  constructor(data: Uint8Array, cuts: number[] = [], hang = false) {
    const points = [...new Set(cuts)].filter((c) => c > 0 && c < data.length)
      .sort((a, b) => a - b);
    this.#pieces = [];
    let at = 0;
    for (const c of [...points, data.length]) {
      this.#pieces.push(data.slice(at, c));
      at = c;
    }
    this.#hang = hang;
  }

  read(p: Uint8Array): Promise<number | null> {
    if (this.#closed) return Promise.reject(new Error("stream closed"));
    while (this.#pieces.length > 0 && this.#pieces[0]!.length === 0) {
      this.#pieces.shift();
    }
    const head = this.#pieces[0];
    if (!head) {
      if (!this.#hang) return Promise.resolve(null);
      return new Promise((resolve, reject) => {
        this.#wake = (closed) => {
          this.#wake = undefined;
          if (closed) reject(new Error("stream closed"));
          else resolve(this.read(p));
        };
      });
    }
    const n = Math.min(head.length, p.length);
    p.set(head.subarray(0, n));
    this.#pieces[0] = head.subarray(n);
    return Promise.resolve(n);
  }

  /** Appends more server bytes (cut at `cuts`), waking a waiting read. */
  feed(data: Uint8Array, cuts: number[] = []): void {
    let at = 0;
    for (
      const c of [...cuts.filter((c) => c > 0 && c < data.length), data.length]
    ) {
      if (c > at) this.#pieces.push(data.slice(at, c));
      at = Math.max(at, c);
    }
    this.#wake?.(false);
  }

  /** Ends the stream: reads see EOF once the bytes fed so far are used. */
  end(): void {
    this.#hang = false;
    this.#wake?.(false);
  }

  write(p: Uint8Array): Promise<number> {
    if (this.#closed) return Promise.reject(new Error("stream closed"));
    this.written.push(p.slice());
    return Promise.resolve(p.length);
  }

  close(): void {
    this.#closed = true;
    this.#wake?.(true);
  }

  /** Everything the client wrote, joined. */
  get sent(): Uint8Array {
    const total = this.written.reduce((n, w) => n + w.length, 0);
    const out = new Uint8Array(total);
    let at = 0;
    for (const w of this.written) {
      out.set(w, at);
      at += w.length;
    }
    return out;
  }
}
