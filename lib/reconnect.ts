/**
 * Surviving a lost connection, the rules without the I/O: which failures are
 * worth a new connection, how long to wait between attempts, and whether the
 * server reached again still serves the same export. `connections.ts` runs
 * the loop; everything here is pure, so it is tested on its own.
 *
 * Modelled on QEMU's NBD block driver (`reconnect-delay`, `open-timeout`):
 * an I/O failure is retried, a server that broke the protocol is not.
 *
 * @module
 */

import {
  CMD_TRIM,
  CMD_WRITE,
  CMD_WRITE_ZEROES,
  ESHUTDOWN,
  FLAG_BLOCK_STAT_PAYLOAD,
  FLAG_CAN_MULTI_CONN,
  FLAG_READ_ONLY,
  FLAG_SEND_CACHE,
  FLAG_SEND_DF,
  FLAG_SEND_FAST_ZERO,
  FLAG_SEND_FLUSH,
  FLAG_SEND_FUA,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
  TRANSMISSION_FLAG_NAMES,
} from "./constants.ts";
import {
  NbdCommandError,
  NbdConnectionClosedError,
  NbdProtocolError,
} from "./errors.ts";
import type { ReconnectOptions } from "./connect_options.ts";
import { MAX_TIMER_MS, pause } from "./_deadline.ts";
import type { ExportInfo } from "./export.ts";
import { NbdTlsError } from "./tls/error.ts";

/** A {@linkcode ReconnectOptions} with every field settled. */
export interface ReconnectPolicy {
  timeout: number;
  delay: number;
  maxDelay: number;
}

/** What `reconnect: true` means. */
export const DEFAULT_RECONNECT: Readonly<ReconnectPolicy> = Object.freeze({
  timeout: 30_000,
  delay: 50,
  maxDelay: 2_000,
});

/**
 * The pause before attempt `attempt` (0-based): doubling from `delay` up to
 * `maxDelay`, and never past what is left of the deadline.
 */
export function backoff(
  attempt: number,
  policy: ReconnectPolicy,
  left: number,
): number {
  const grown = policy.delay * 2 ** Math.min(attempt, 30);
  return Math.max(0, Math.min(grown, policy.maxDelay, left));
}

/** How {@linkcode retry} tries again. */
export interface RetryOptions {
  /** The pause before the second attempt, in ms. */
  delay: number;
  /** The longest pause, in ms. */
  maxDelay: number;
  /** How much each pause grows over the last (default 2). */
  factor?: number;
  /** When to give up, as a `Date.now()` time; no attempt starts after it. */
  deadline: number;
  /**
   * What a pause that would pass the deadline does: `"shorten"` it to end
   * at the deadline and try once more there (the default), or `"stop"` and
   * give up at once.
   */
  pastDeadline?: "shorten" | "stop";
  /** Stops the retrying: a pause in progress ends with its reason. */
  signal?: AbortSignal | undefined;
  /** Whether a failure is worth another attempt (default: every one). */
  retryable?: (error: unknown) => boolean;
  /**
   * Called after each failed attempt, numbered from 1, with whether
   * another attempt follows.
   */
  debug?: (attempt: number, error: unknown, again: boolean) => void;
  /**
   * Attempts already made, counted on: backoff goes on from there, so that
   * losses close together make one growing backoff (the counter is
   * updated in place).
   */
  counter?: { attempts: number };
  /** What to throw when no attempt is left before one was even made. */
  cause?: unknown;
}

/**
 * Runs `attempt` until it succeeds, pausing between attempts with a
 * backoff that grows from `delay` by `factor` up to `maxDelay`, until the
 * deadline passes, a failure is not retryable, or `signal` aborts.
 *
 * @param attempt One try; told its number (from 0) and the ms left.
 * @param options Backoff, deadline, signal, predicate and debug hook.
 * @returns What the successful attempt returned.
 * @throws the last attempt's error once the deadline has passed or the
 *   error is not retryable; the signal's reason when it aborts in a pause.
 */
export async function retry<T>(
  attempt: (n: number, left: number) => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const counter = options.counter ?? { attempts: 0 };
  let last: unknown = options.cause;
  // Whether the last failure was already judged worth another attempt.
  let again = false;
  for (;;) {
    const n = counter.attempts;
    if (n > 0) {
      const left = options.deadline - Date.now();
      const wait = retryPause(n, options);
      // A counter carried on from an earlier call: time may be up already.
      if (!again && !worthWaiting(wait, left, options)) throw last;
      await pause(Math.max(0, Math.min(wait, left)), options.signal);
    }
    counter.attempts = n + 1;
    try {
      return await attempt(n, options.deadline - Date.now());
    } catch (e) {
      last = e;
      again = !options.signal?.aborted &&
        options.retryable?.(e) !== false &&
        worthWaiting(
          retryPause(n + 1, options),
          options.deadline - Date.now(),
          options,
        );
      options.debug?.(n + 1, e, again);
      if (!again) throw e;
    }
  }
}

/** The pause before attempt `n` (from 1): growing, never past `maxDelay`. */
export function retryPause(n: number, options: RetryOptions): number {
  const grown = options.delay * (options.factor ?? 2) ** Math.min(n - 1, 30);
  return Math.max(0, Math.min(grown, options.maxDelay));
}

function worthWaiting(
  wait: number,
  left: number,
  options: RetryOptions,
): boolean {
  return left > 0 && !(options.pastDeadline === "stop" && wait > left);
}

/**
 * Whether a failure means "the connection went away" (and a new one may
 * carry on) rather than "the server answered" or "the server is broken".
 *
 * Lost: end of stream, reset, broken pipe (under TLS too), a stream cut
 * inside a message (the server died mid-reply), and a server's `ESHUTDOWN`
 * soft disconnect.
 * Not lost: a protocol violation, a server's errno, an abort.
 */
export function isConnectionLoss(e: unknown): boolean {
  if (e instanceof NbdConnectionClosedError) return true;
  // In transmission a TLS failure is the transport under it failing (a
  // reset, a broken pipe); certificates were checked when it was set up.
  if (e instanceof NbdTlsError) return true;
  if (e instanceof NbdCommandError) return e.errno === ESHUTDOWN;
  if (e instanceof NbdProtocolError) {
    return e.cause instanceof NbdConnectionClosedError;
  }
  return false;
}

/** The flags a client may have promised its callers, and may not lose. */
const RELIED_ON = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM |
  FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF | FLAG_SEND_CACHE |
  FLAG_SEND_FAST_ZERO | FLAG_BLOCK_STAT_PAYLOAD;

/**
 * What differs between the export a client was using and the one a new
 * connection reached, in words; empty when it is safe to carry on. Data must
 * never go to another disk, so anything that could mean one is a change:
 * another size, read-only now, a command flag withdrawn, block sizes that
 * requests already checked would break, a metadata context gone, or a reply
 * format that cannot carry the requests already sized for the old one.
 *
 * @param before What the first connection negotiated.
 * @param after What the new connection negotiated.
 * @param several Whether the client runs several connections (then
 *   `NBD_FLAG_CAN_MULTI_CONN` is relied on too).
 */
export function exportChanges(
  before: ExportInfo,
  after: ExportInfo,
  several = false,
): string[] {
  const out: string[] = [];
  if (after.size !== before.size) {
    out.push(`size ${before.size} is now ${after.size}`);
  }
  if (!(before.flags & FLAG_READ_ONLY) && after.flags & FLAG_READ_ONLY) {
    out.push("the export is read-only now");
  }
  const relied = RELIED_ON | (several ? FLAG_CAN_MULTI_CONN : 0);
  const lost = before.flags & relied & ~after.flags;
  for (let bit = 1; bit <= lost; bit <<= 1) {
    if (lost & bit) {
      out.push(
        `${
          TRANSMISSION_FLAG_NAMES[bit] ?? `flag 0x${bit.toString(16)}`
        } withdrawn`,
      );
    }
  }
  const b = before.blockSize;
  const a = after.blockSize;
  if (b.minimum % a.minimum !== 0) {
    out.push(`minimum block size ${b.minimum} is now ${a.minimum}`);
  }
  if (a.maximum < b.maximum) {
    out.push(`maximum block size ${b.maximum} is now ${a.maximum}`);
  }
  if (before.extendedHeaders && !after.extendedHeaders) {
    out.push("extended headers are no longer negotiated");
  }
  if (before.tls && !after.tls) {
    out.push("TLS is no longer in use");
  }
  if (before.structuredReplies && !after.structuredReplies) {
    out.push("structured replies are no longer negotiated");
  }
  const now = new Set(after.metaContexts.values());
  for (const name of before.metaContexts.values()) {
    if (!now.has(name)) out.push(`metadata context ${name} is gone`);
  }
  return out;
}

/**
 * The new connection reached an export that is not the one the client was
 * using; nothing was sent to it. `changes` says what differs.
 */
export class NbdExportChangedError extends NbdConnectionClosedError {
  /** What differs, one phrase each ("size 1048576 is now 2097152"). */
  readonly changes: readonly string[];

  /**
   * Creates the error.
   *
   * @param changes What differs, as {@linkcode exportChanges} lists it.
   */
  constructor(changes: readonly string[]) {
    super(
      `Reconnected to a different export, so no request was replayed: ${
        changes.join("; ")
      }`,
    );
    this.name = "NbdExportChangedError";
    this.changes = changes;
  }
}

/** The commands that change data; a multi-conn flush waits for them. */
export function modifiesData(type: number): boolean {
  return type === CMD_WRITE || type === CMD_WRITE_ZEROES || type === CMD_TRIM;
}

/** Checks a user's `reconnect` option and settles its defaults. */
export function reconnectPolicy(
  value: boolean | ReconnectOptions | undefined,
): ReconnectPolicy | undefined {
  if (value === undefined || value === false) return undefined;
  if (value === true) return { ...DEFAULT_RECONNECT };
  if (typeof value !== "object" || value === null) {
    throw new TypeError(
      `reconnect must be a boolean or { timeout, delay, maxDelay }, not ${typeof value}`,
    );
  }
  const field = (name: keyof ReconnectOptions, min: number): number => {
    const v = value[name];
    if (v === undefined) return DEFAULT_RECONNECT[name];
    if (typeof v !== "number" || !Number.isFinite(v)) {
      throw new TypeError(`reconnect.${name} must be a number, not ${v}`);
    }
    if (v < min || v > MAX_TIMER_MS) {
      throw new RangeError(
        `reconnect.${name} must be between ${min} and ${MAX_TIMER_MS} ms, not ${v}`,
      );
    }
    return v;
  };
  const policy = {
    timeout: field("timeout", 1),
    delay: field("delay", 0),
    maxDelay: field("maxDelay", 0),
  };
  if (policy.maxDelay < policy.delay) policy.maxDelay = policy.delay;
  return policy;
}

/** The error every held request gets when no new connection came in time. */
export function gaveUp(
  policy: ReconnectPolicy,
  last: unknown,
): NbdConnectionClosedError {
  const why = last instanceof Error ? last.message : String(last);
  return new NbdConnectionClosedError(
    `Could not reconnect to the server within ${policy.timeout} ms: ${why}`,
    { cause: last },
  );
}
