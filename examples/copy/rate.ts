/**
 * `--rate`: a steady limit on the bytes a copy reads per second, over all
 * its threads. One shared clock, the theoretical arrival time of the
 * generic cell rate algorithm: each request moves it on by its length over
 * the rate and waits until the time it moved it from. Idle time earns at
 * most {@linkcode BURST_MS} of credit, so a stall is not followed by a
 * burst.
 *
 * @module
 */

import { UsageError } from "../_cli.ts";

/** The most idle time a copy may make up for at once. */
export const BURST_MS = 50;

/** Milliseconds on a clock every thread shares. */
export type Clock = () => number;

/** Waits `ms` milliseconds, or rejects when `signal` aborts. */
export type Sleep = (ms: number, signal: AbortSignal) => Promise<void>;

/** Wall-clock milliseconds, the same in every worker (unlike `performance.now()`). */
export const wallClock: Clock = () =>
  performance.timeOrigin + performance.now();

/** A timer that an abort cuts short. */
export const sleep: Sleep = (ms, signal) =>
  new Promise<void>((resolve, reject) => {
    signal.throwIfAborted();
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });

/**
 * Parses `--rate=BYTES`: a whole number of bytes per second with an
 * optional k, M or G suffix (powers of 1024, as every size here).
 *
 * @throws {UsageError} For anything else, or less than 1 byte/s.
 */
export function parseRate(text: string): number {
  const m = /^(\d+(?:\.\d+)?)([kKmMgG]?)$/.exec(text.trim());
  const scale = m
    ? { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 }[m[2]!.toLowerCase()]
    : undefined;
  const n = m && scale ? Math.floor(Number(m[1]) * scale) : NaN;
  if (!(n >= 1) || !Number.isSafeInteger(n)) {
    throw new UsageError(
      `--rate: expected bytes per second such as 500k, 20M or 1G, got "${text}"`,
    );
  }
  return n;
}

/**
 * The shared state of a {@linkcode RateLimiter}: one 64-bit slot holding
 * the theoretical arrival time in microseconds, 0 before the first
 * request. Post it to every worker.
 */
export function rateState(): SharedArrayBuffer {
  return new SharedArrayBuffer(8);
}

/** A limit of `rate` bytes per second over every thread sharing `state`. */
export class RateLimiter {
  readonly rate: number;
  #tat: BigInt64Array;
  #clock: Clock;
  #sleep: Sleep;

  /**
   * @param rate Bytes per second.
   * @param state From {@linkcode rateState}, shared by every thread.
   * @param clock Injected in tests.
   * @param wait Injected in tests.
   */
  constructor(
    rate: number,
    state: SharedArrayBuffer,
    clock: Clock = wallClock,
    wait: Sleep = sleep,
  ) {
    this.rate = rate;
    this.#tat = new BigInt64Array(state);
    this.#clock = clock;
    this.#sleep = wait;
  }

  /**
   * Reserves `bytes` and waits until they may go: the request starts when
   * every byte reserved before it has had its time.
   *
   * @returns How long it waited, in milliseconds.
   */
  async take(bytes: number, signal: AbortSignal): Promise<number> {
    const cost = BigInt(Math.ceil((bytes * 1e6) / this.rate));
    let start: bigint;
    for (;;) {
      const old = Atomics.load(this.#tat, 0);
      const now = BigInt(Math.floor(this.#clock() * 1000));
      const floor = now - BigInt(BURST_MS * 1000);
      start = old > floor ? old : floor;
      if (Atomics.compareExchange(this.#tat, 0, old, start + cost) === old) {
        break;
      }
    }
    const wait = Number(start - BigInt(Math.floor(this.#clock() * 1000))) /
      1000;
    if (wait > 0) await this.#sleep(wait, signal);
    return Math.max(0, wait);
  }
}
