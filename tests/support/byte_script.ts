/**
 * An in-memory ByteStream that plays back a server's bytes cut at chosen
 * points and records what the client wrote: the way to feed every reply
 * split at every byte boundary (pg-protocol's habit).
 */

import type { ByteStream } from "../../lib/transport.ts";

/** Big-endian byte builder for scripting server messages. */
export class Bytes {
  #parts: number[] = [];
  u8(v: number): this {
    this.#parts.push(v & 0xff);
    return this;
  }
  u16(v: number): this {
    return this.u8(v >>> 8).u8(v);
  }
  u32(v: number): this {
    return this.u16(v >>> 16).u16(v & 0xffff);
  }
  u64(v: bigint | number): this {
    const b = BigInt(v);
    return this.u32(Number(b >> 32n)).u32(Number(b & 0xffffffffn));
  }
  str(s: string): this {
    for (const b of new TextEncoder().encode(s)) this.u8(b);
    return this;
  }
  raw(bytes: Uint8Array | number[]): this {
    for (const b of bytes) this.u8(b);
    return this;
  }
  zeroes(n: number): this {
    for (let i = 0; i < n; i++) this.u8(0);
    return this;
  }
  get length(): number {
    return this.#parts.length;
  }
  done(): Uint8Array {
    return Uint8Array.from(this.#parts);
  }
}

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
