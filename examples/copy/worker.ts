/**
 * One connection of a multi-connection copy, in a thread of its own (as
 * nbdcopy runs a thread per connection): it opens its own lane of the
 * source and of the destination, claims stripes of the range from the
 * counter every thread shares, and copies them itself. Only progress, the
 * totals and a failure cross back to the main thread; only an abort comes
 * in.
 *
 * @module
 */

import type { Destination, LaneSpec, Settings, Source } from "./endpoint.ts";
import { FileEndpoint } from "./file.ts";
import { NbdEndpoint } from "./nbd.ts";
import {
  Blkhasher,
  type BlkhashPiece,
  type BlkhashShared,
  type NbdStats,
} from "../../mod.ts";
import { RateLimiter } from "./rate.ts";
import { NullDestination } from "./null.ts";
import { threadLimit } from "./lanes.ts";
import { planStripes } from "./plan.ts";
import { pump, type Stats } from "./pump.ts";

/** What the main thread sends to start a worker. */
export interface StartMessage {
  kind: "start";
  source: LaneSpec;
  destination: LaneSpec;
  settings: Settings;
  size: number;
  stripe: number;
  /** One Int32: the index of the next unclaimed stripe. */
  counter: SharedArrayBuffer;
  /** Connections this thread runs. */
  lanes: number;
  perLane: number;
  queueSlots: number;
  requestSize: number;
  align: number;
  sparse: number;
  useExtents: boolean;
  /** How long closing may wait for requests in flight after a failure. */
  closeMs: number;
  /** `--blkhash`: the table every thread fills. */
  blkhash?: BlkhashShared | undefined;
  /** `--rate`: the limit and the clock every thread shares. */
  rate?: { rate: number; state: SharedArrayBuffer } | undefined;
}

/** The main thread stops the copy. */
export interface AbortMessage {
  kind: "abort";
}

/** What a worker sends back. */
export type WorkerReply =
  | { kind: "progress"; bytes: number }
  | {
    kind: "done";
    stats: Stats;
    bytes: number;
    /** What went over this thread's NBD connections, per side. */
    wire: { source: NbdStats | undefined; destination: NbdStats | undefined };
    /** Blocks this thread saw only part of, for the main thread's hash. */
    pieces: BlkhashPiece[];
  }
  | {
    kind: "error";
    message: string;
    cause?: string;
    /** Whether it stopped because the main thread said so. */
    abort: boolean;
  };

/** An NBD end's `stats`; nothing for a file or `null:`. */
function wireOf(end: Source | Destination): NbdStats | undefined {
  return end instanceof NbdEndpoint ? end.stats : undefined;
}

/** Progress is posted in steps of this many bytes, not per request. */
const PROGRESS_STEP = 16 * 1024 * 1024;

interface WorkerScope {
  onmessage: ((e: MessageEvent<StartMessage | AbortMessage>) => void) | null;
  postMessage(message: WorkerReply): void;
  close(): void;
}

/**
 * Opens what `spec` names in this thread.
 *
 * @throws {Error} For a kind that has no lanes of its own.
 */
export async function openLane(
  spec: LaneSpec,
  settings: Settings,
  signal: AbortSignal,
): Promise<Source & Destination> {
  switch (spec.kind) {
    case "nbd":
      return await NbdEndpoint.open(spec.uri, spec.role, settings, signal);
    case "file":
      return await FileEndpoint.openLane(spec);
    case "null":
      // null: is only ever a destination; the source side is never asked.
      return new NullDestination() as unknown as Source & Destination;
  }
}

async function run(
  scope: WorkerScope,
  m: StartMessage,
  controller: AbortController,
): Promise<void> {
  const signal = controller.signal;
  const counter = new Int32Array(m.counter);
  let src: Source | undefined;
  let dst: Destination | undefined;
  let unsent = 0;
  const progress = {
    add(bytes: number) {
      unsent += bytes;
      if (unsent >= PROGRESS_STEP) {
        scope.postMessage({ kind: "progress", bytes: unsent });
        unsent = 0;
      }
    },
  };
  let ok = false;
  try {
    src = await openLane(m.source, m.settings, signal);
    dst = await openLane(m.destination, m.settings, signal);
    await src.addLanes(m.lanes, signal);
    await dst.addLanes(m.lanes, signal);
    const stats: Stats = { read: 0, written: 0, zeroed: 0 };
    const hash = m.blkhash ? Blkhasher.fromShared(m.blkhash) : undefined;
    await pump(
      src,
      dst,
      planStripes(
        src,
        m.size,
        m.stripe,
        () => Atomics.add(counter, 0, 1),
        m.requestSize,
        m.align,
        m.useExtents,
        signal,
      ),
      {
        lanes: m.lanes,
        limit: threadLimit(m.lanes, m.perLane, m.queueSlots),
        requestSize: m.requestSize,
        sparse: m.sparse,
        progress,
        stats,
        signal,
        abort: (reason) => controller.abort(reason),
        hash,
        limiter: m.rate && new RateLimiter(m.rate.rate, m.rate.state),
      },
    );
    ok = true;
    await closeBoth(src, dst, 5_000);
    scope.postMessage({
      kind: "done",
      stats,
      bytes: unsent,
      wire: { source: wireOf(src), destination: wireOf(dst) },
      pieces: hash?.pieces() ?? [],
    });
  } catch (e) {
    if (!ok) await closeBoth(src, dst, m.closeMs);
    const error = e instanceof Error ? e : new Error(String(e));
    scope.postMessage({
      kind: "error",
      message: error.message,
      ...(error.cause instanceof Error ? { cause: error.cause.message } : {}),
      abort: signal.reason === STOPPED,
    });
  }
}

/** Closes what was opened, within `ms`. */
async function closeBoth(
  src: Source | undefined,
  dst: Destination | undefined,
  ms: number,
): Promise<void> {
  const signal = AbortSignal.timeout(ms);
  await Promise.allSettled([src?.close(signal), dst?.close(signal)]);
}

/** Why a worker stops when the main thread says so. */
const STOPPED = new DOMException("Copy stopped", "AbortError");

/** Serves the messages of a worker thread. */
export function serve(scope: WorkerScope): void {
  const controller = new AbortController();
  scope.onmessage = (e) => {
    const m = e.data;
    if (m.kind === "abort") {
      controller.abort(STOPPED);
      return;
    }
    run(scope, m, controller).finally(() => scope.close());
  };
}

if (import.meta.main) serve(self as unknown as WorkerScope);
