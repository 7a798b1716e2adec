/**
 * One copy between two opened ends: how many connections and threads it
 * runs on, the request and sparse block sizes both ends agree on, the
 * plan (all of the source, or the extents of a dirty map) through the
 * pump or the threads, the blkhash and the rate limit beside it, and the
 * one-line summary `--verbose` prints.
 *
 * @module
 */

import { type BlkhashDigest, Blkhasher } from "../../mod.ts";
import { humanBytes, writeAll } from "../_cli.ts";
import { Progress, type ProgressMode } from "../_progress.ts";
import { alignMap, type DirtyMap, planDirtyExtents } from "./dirty.ts";
import type { Destination, Settings, Source } from "./endpoint.ts";
import { copyThreaded, threadable } from "./lanes.ts";
import { alignUp, planRange, planStream } from "./plan.ts";
import { pump, type Stats, wrap } from "./pump.ts";
import { RateLimiter, rateState } from "./rate.ts";

/**
 * How long closing may take: after a ^C or a failure the server may have
 * stopped reading, and a close that waits on it would keep the process
 * alive; after a copy that worked, every request was answered already.
 */
export const CLOSE_MS = { stopped: 1_000, finished: 5_000 };

/** What {@linkcode transfer} does beside copying. */
export interface Extras {
  blkhash?: { digest: BlkhashDigest; blockSize: number } | undefined;
  blkhashFile?: string | undefined;
  rate?: number | undefined;
}

/**
 * Copies `src` to `dst` as the settings say: all of it, or with `dirty`
 * only the extents of that map.
 *
 * @returns The one-line summary for `--verbose`.
 * @throws The first failure, after everything in flight has settled.
 */
export async function transfer(
  src: Source,
  dst: Destination,
  settings: Settings,
  mode: ProgressMode,
  controller: AbortController,
  onProgress: (p: Progress) => void,
  dirty?: DirtyMap,
  extra: Extras = {},
): Promise<string> {
  const signal = controller.signal;
  // Multi-conn only where every NBD side offers it (files count as
  // unlimited); a stream on either side keeps to one of everything. As
  // nbdcopy, no more connections than threads: measured here, four
  // connections on two processors copy slower than two.
  const lanes = Math.max(
    1,
    Math.min(
      settings.connections,
      settings.threads,
      src.maxLanes,
      dst.maxLanes,
    ),
  );
  // Several connections each get a thread of their own where both ends
  // can open lanes there; an incremental copy keeps them in this one.
  const threads = !dirty && threadable(src, dst) ? lanes : 1;
  // Threaded, this thread runs one connection of its own.
  const here = threads > 1 ? 1 : lanes;
  await src.addLanes(here, signal);
  await dst.addLanes(here, signal);

  const size = src.size;
  if (size !== undefined && size % dst.alignment !== 0) {
    throw new Error(
      `the source's size ${size} is not a multiple of the destination's block size ${dst.alignment}`,
    );
  }
  await dst.prepare(size);
  const align = Math.max(src.alignment, dst.alignment);
  const requestSize = alignUp(settings.requestSize, align);
  const sparse = settings.sparse === undefined
    ? Math.max(4096, dst.preferred)
    : settings.sparse === 0
    ? 0
    : alignUp(settings.sparse, align);
  // As nbdcopy: at most --requests, and at most --queue-size bytes, in
  // flight per connection (but always at least one request).
  const perLane = Math.max(
    1,
    Math.min(settings.requests, Math.floor(settings.queueSize / requestSize)),
  );

  const copying = dirty && alignMap(dirty, align, size ?? 0);
  const progress = new Progress(mode, copying ? copying.bytes : size);
  onProgress(progress);
  const stats: Stats = { read: 0, written: 0, zeroed: 0 };
  const started = performance.now();
  // A hasher over a shared table when the size is known, so that every
  // thread hashes what it copies; one that grows for a stream.
  const hash = extra.blkhash &&
    new Blkhasher(extra.blkhash.digest, extra.blkhash.blockSize, size);
  const shared = extra.rate === undefined ? undefined : rateState();
  const limiter = extra.rate === undefined
    ? undefined
    : new RateLimiter(extra.rate, shared!);
  const useExtents = settings.extents && src.hasExtents;
  const plan = () =>
    copying
      ? planDirtyExtents(src, copying, requestSize, align, signal)
      : size === undefined
      ? planStream(src, requestSize, dst.size)
      : planRange(src, size, requestSize, align, useExtents, signal);
  // What the pump of every thread is given, threaded or not.
  const pumping = {
    requestSize,
    sparse,
    progress,
    stats,
    signal,
    abort: (reason: unknown) => controller.abort(reason),
    hash,
    limiter,
  };
  let total: number;
  if (threads > 1) {
    await copyThreaded(src, dst, {
      ...pumping,
      threads,
      perLane,
      queueSlots: Math.max(1, Math.floor(settings.queueSize / requestSize)),
      align,
      useExtents,
      settings,
      closeMs: CLOSE_MS.stopped,
      rateState: shared,
    });
    total = size!;
  } else {
    total = await pump(src, dst, plan(), {
      ...pumping,
      lanes,
      limit: lanes * perLane,
    });
  }
  try {
    await dst.finish(size ?? total, settings.flush, signal);
  } catch (e) {
    throw wrap(`finishing ${dst.name}`, e);
  }
  progress.finish(true);
  if (hash) {
    // As nbdcopy: lowercase hex and a newline, on stdout or in the file.
    const line = `${await hash.hex()}\n`;
    if (extra.blkhashFile === undefined) await writeAll(Deno.stdout, line);
    else await Deno.writeTextFile(extra.blkhashFile, line);
  }
  const seconds = (performance.now() - started) / 1000;
  const counts =
    `read ${stats.read}, wrote ${stats.written}, zeroed ${stats.zeroed}`;
  const [what, bytes] = dirty && copying
    ? [
      `${dirty.bytes} dirty bytes in ${dirty.offsets.length} extent(s) of ${size}, copied ${copying.bytes}`,
      copying.bytes,
    ]
    : [`${size ?? total} bytes`, size ?? total];
  return `copy: ${what} in ${
    seconds.toFixed(3)
  } s over ${lanes} connection(s): ${counts} (${
    humanBytes(bytes / (seconds || 1))
  }/s)`;
}
