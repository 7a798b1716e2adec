/**
 * A multi-connection copy with one thread per connection, as nbdcopy runs
 * them: the main thread copies on the connection it opened, and each other
 * connection is a worker (`worker.ts`) that opens its own lanes and copies
 * the stripes it claims. Every thread claims stripes from one shared
 * counter, through {@linkcode planStripes}; progress, totals and failures
 * come back as messages.
 *
 * @module
 */

import type { Destination, Settings, Source } from "./endpoint.ts";
import { planStripes, stripeSize } from "./plan.ts";
import { type Counter, pump, type Stats } from "./pump.ts";
import type { StartMessage, WorkerReply } from "./worker.ts";
import { NbdEndpoint } from "./nbd.ts";
import type { Blkhasher } from "../../mod.ts";
import type { RateLimiter } from "./rate.ts";

/** Whether both ends can open lanes in other threads. */
export function threadable(src: Source, dst: Destination): boolean {
  return src.lane !== undefined && dst.lane !== undefined &&
    src.size !== undefined && !dst.sequential;
}

/**
 * Requests in flight in one thread running `lanes` connections: `perLane`
 * for each, but at most `queueSlots` (`--queue-size` over the request
 * size) for the thread, as nbdcopy counts both per worker thread; at
 * least one per connection.
 */
export function threadLimit(
  lanes: number,
  perLane: number,
  queueSlots: number,
): number {
  return Math.max(lanes, Math.min(lanes * perLane, queueSlots));
}

/** What {@linkcode copyThreaded} needs beyond the two ends. */
export interface ThreadedOptions {
  /** Threads, one connection each (the main thread is one). */
  threads: number;
  perLane: number;
  /** `--queue-size` in requests: the most one thread has in flight. */
  queueSlots: number;
  requestSize: number;
  align: number;
  sparse: number;
  useExtents: boolean;
  settings: Settings;
  progress: Counter;
  stats: Stats;
  signal: AbortSignal;
  abort: (reason: unknown) => void;
  /** How long a worker's close may wait after a failure. */
  closeMs: number;
  /** `--blkhash`, over a shared table, so every thread hashes its share. */
  hash?: Blkhasher | undefined;
  /** `--rate`, with its shared state. */
  limiter?: RateLimiter | undefined;
  rateState?: SharedArrayBuffer | undefined;
}

/**
 * Copies all of `src` to `dst` on `threads` threads of one connection
 * each (never more connections than threads, as nbdcopy): the main
 * thread's share over the lane `src` and `dst` already have, each other
 * share in a worker. Stops every thread at the first failure and throws it
 * once all have stopped.
 */
export async function copyThreaded(
  src: Source,
  dst: Destination,
  o: ThreadedOptions,
): Promise<void> {
  const size = src.size!;
  const stripe = stripeSize(o.requestSize, o.align);
  const shared = new SharedArrayBuffer(4);
  const counter = new Int32Array(shared);
  const claim = () => Atomics.add(counter, 0, 1);
  let failure: { error: unknown } | undefined;
  const fail = (error: unknown) => {
    failure ??= { error };
    o.abort(error);
  };

  const workers: Worker[] = [];
  const onAbort = () => {
    for (const w of workers) w.postMessage({ kind: "abort" });
  };
  o.signal.addEventListener("abort", onAbort, { once: true });
  const start: Omit<StartMessage, "kind" | "lanes"> = {
    source: src.lane!(),
    destination: dst.lane!(),
    settings: o.settings,
    size,
    stripe,
    counter: shared,
    perLane: o.perLane,
    queueSlots: o.queueSlots,
    requestSize: o.requestSize,
    align: o.align,
    sparse: o.sparse,
    useExtents: o.useExtents,
    closeMs: o.closeMs,
    blkhash: o.hash?.shared,
    rate: o.limiter && o.rateState
      ? { rate: o.limiter.rate, state: o.rateState }
      : undefined,
  };
  // Blocks split between threads, handed back by the workers.
  const pieces: Promise<void>[] = [];
  const finished: Promise<void>[] = [];
  try {
    for (let i = 1; i < o.threads; i++) {
      const w = new Worker(new URL("./worker.ts", import.meta.url).href, {
        type: "module",
      });
      workers.push(w);
      finished.push(
        new Promise<void>((resolve) => {
          w.onmessage = (e: MessageEvent<WorkerReply>) => {
            const m = e.data;
            if (m.kind === "progress") {
              o.progress.add(m.bytes);
              return;
            }
            if (m.kind === "done") {
              o.progress.add(m.bytes);
              o.stats.read += m.stats.read;
              o.stats.written += m.stats.written;
              o.stats.zeroed += m.stats.zeroed;
              if (m.wire.source && src instanceof NbdEndpoint) {
                src.absorb(m.wire.source);
              }
              if (m.wire.destination && dst instanceof NbdEndpoint) {
                dst.absorb(m.wire.destination);
              }
              if (o.hash && m.pieces.length > 0) {
                const adding = o.hash.addPieces(m.pieces);
                adding.catch(() => {});
                pieces.push(adding);
              }
            } else if (!m.abort || !o.signal.aborted) {
              fail(
                new Error(
                  m.message,
                  m.cause ? { cause: new Error(m.cause) } : {},
                ),
              );
            }
            resolve();
          };
          w.onerror = (e: ErrorEvent) => {
            e.preventDefault();
            fail(new Error(`thread ${i + 1}: ${e.message}`));
            resolve();
          };
        }),
      );
      w.postMessage({
        kind: "start",
        ...start,
        lanes: 1,
      });
    }
    if (o.signal.aborted) onAbort();
    try {
      await pump(
        src,
        dst,
        planStripes(
          src,
          size,
          stripe,
          claim,
          o.requestSize,
          o.align,
          o.useExtents,
          o.signal,
        ),
        {
          ...o,
          lanes: 1,
          limit: threadLimit(1, o.perLane, o.queueSlots),
        },
      );
    } catch (e) {
      fail(e);
    }
    await Promise.all(finished);
    await Promise.all(pieces);
  } finally {
    o.signal.removeEventListener("abort", onAbort);
    for (const w of workers) w.terminate();
  }
  if (failure) throw failure.error;
}
