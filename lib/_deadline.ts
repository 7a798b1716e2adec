/**
 * Time limits, in one place for `lib/` and `ffi/`: a caller's signal and a
 * timeout as one signal, a promise raced against a signal, and a bounded
 * wait that leaves no timer behind.
 *
 * @module
 */

import { abortReason } from "./errors.ts";

/**
 * The longest delay a timer can take: Deno (as browsers) fires a longer one
 * at once, so every millisecond option is checked against this.
 */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** A signal that aborts when the caller's does or when time runs out. */
export interface Deadline extends Disposable {
  /** Aborts with the caller's reason, or with the timeout's error. */
  readonly signal: AbortSignal;
}

/**
 * Combines `outer` (the caller's signal, if any) with a limit of `ms`
 * milliseconds (`0` for none). Dispose of it to clear the timer and the
 * listener.
 *
 * @param outer The caller's signal.
 * @param ms The limit; 0 means none.
 * @param timeoutError The reason to abort with when the limit is reached.
 * @returns The combined signal, already aborted if `outer` is.
 */
export function deadline(
  outer: AbortSignal | undefined,
  ms: number,
  timeoutError: () => Error,
): Deadline {
  const gate = new AbortController();
  const forward = () => gate.abort(abortReason(outer!));
  if (outer?.aborted) forward();
  else outer?.addEventListener("abort", forward, { once: true });
  const timer = ms > 0 && !gate.signal.aborted
    ? setTimeout(() => gate.abort(timeoutError()), ms)
    : undefined;
  return {
    signal: gate.signal,
    [Symbol.dispose]() {
      clearTimeout(timer);
      outer?.removeEventListener("abort", forward);
    },
  };
}

/**
 * `promise`, or a rejection with the signal's reason as soon as `signal`
 * aborts (the promise itself runs on; its rejection is observed).
 *
 * @param promise What to wait for.
 * @param signal When to stop waiting.
 * @returns What `promise` resolves to.
 * @throws the signal's reason when it aborts first.
 */
export function untilAborted<T>(
  promise: Promise<T>,
  signal: AbortSignal | undefined,
): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) {
    promise.catch(() => {});
    return Promise.reject(abortReason(signal));
  }
  // One promise and one listener, no race: this runs once per request
  // that carries a signal.
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortReason(signal));
    signal.addEventListener("abort", onAbort, ONCE);
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (e) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

const ONCE: AddEventListenerOptions = { once: true };

/**
 * `promise`, or `undefined` after `ms`; the timer is cleared either way, so
 * nothing is left to keep the process alive.
 *
 * @param promise What to wait for.
 * @param ms How long to wait.
 * @returns What `promise` resolves to, or `undefined` on time-out.
 */
export async function within<T>(
  promise: Promise<T>,
  ms: number,
): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Waits `ms`, or rejects with the signal's reason as soon as it aborts; the
 * timer is cleared either way.
 *
 * @param ms How long to wait.
 * @param signal When to stop waiting.
 * @throws the signal's reason when it aborts first.
 */
export function pause(ms: number, signal?: AbortSignal): Promise<void> {
  if (signal?.aborted) return Promise.reject(abortReason(signal));
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal!));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
