/**
 * Sequential read of the whole `nbdkit pattern` export: ours with
 * `readInto()` (`depth` requests in flight) and with `readable()` (a BYOB
 * reader, `depth` requests ahead), `nbdcopy` with the same request size and
 * queue depth on one connection, `nbdcopy` with its defaults, and libnbd's
 * `aio_pread` through `nbdsh`.
 *
 * @module
 */

import { cpuUsage } from "node:process";
import type { NbdClient } from "../mod.ts";
import { connect } from "../mod.ts";
import {
  type BenchContext,
  type Check,
  checkMany,
  checkOne,
  cpuSince,
  KiB,
  MiB,
  type Row,
  type Run,
  timeCommand,
  timedRequests,
} from "./_harness.ts";
import { nbdcopyMatched, nbdshContender } from "./_peers.ts";
import { fmt } from "./_table.ts";

/** Sequential read with `readInto()`, `depth` requests in flight. */
export async function oursSequential(
  nbd: NbdClient,
  size: number,
  request: number,
  depth: number,
  seconds: number,
  check: Check,
): Promise<Run> {
  const { ops, seconds: elapsed, cpu } = await timedRequests(
    Math.ceil(size / request),
    depth,
    request,
    seconds,
    64,
    async (i, buf, _view, done) => {
      const at = i * request;
      await nbd.readInto(buf, at);
      if (check === "full") checkMany(buf, at, 64);
      else checkOne(buf, at, done);
    },
  );
  return { ops, bytes: ops * request, seconds: elapsed, cpu };
}

/** Sequential read through `readable()` with a BYOB reader, `depth` requests ahead. */
export async function oursStream(
  nbd: NbdClient,
  size: number,
  request: number,
  depth: number,
  seconds: number,
  check: Check,
): Promise<Run> {
  let pos = 0;
  let ops = 0;
  const t0 = performance.now();
  const cpu0 = cpuUsage();
  const deadline = t0 + seconds * 1000;
  const stream = nbd.readable({
    length: size,
    chunkSize: request,
    readAhead: depth,
  });
  // A BYOB reader, its buffer handed back and forth: no allocation per read.
  const reader = stream.getReader({ mode: "byob" });
  let buf = new Uint8Array(request);
  try {
    for (;;) {
      const { value, done } = await reader.read(buf, { min: request });
      if (done || !value) break;
      // Whole requests, in order: the pattern at `pos` must be there.
      if (check === "full") checkMany(value, pos, 64);
      else checkOne(value, pos, ops);
      pos += value.length;
      ops++;
      buf = new Uint8Array(value.buffer);
      if (pos >= size) break;
      if ((ops & 63) === 0 && performance.now() > deadline) break;
    }
  } finally {
    await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
  const elapsed = (performance.now() - t0) / 1000;
  return { ops, bytes: pos, seconds: elapsed, cpu: cpuSince(cpu0) };
}

/**
 * The section "seq read N MiB".
 *
 * @param ctx The run's context.
 * @returns Its rows.
 */
export async function sections(ctx: BenchContext): Promise<Row[]> {
  const c = ctx.config;
  const s = await ctx.pattern();
  const req = c.requestSize;
  const qd = c.seqDepth;
  const warmSize = Math.min(c.size, 256 * MiB);
  const nbd = await connect({ path: s.path, maxInFlight: 64 });
  try {
    const matched = nbdcopyMatched(s.uri, req, qd);
    const defaults = ["nbdcopy", s.uri, "null:"];
    return await ctx.section(`seq read ${fmt(c.size / MiB)} MiB`, [
      {
        client: `ours readInto() ${req / KiB}K x${qd}`,
        ours: true,
        warm: () => oursSequential(nbd, warmSize, req, qd, c.seconds, "full"),
        once: () => oursSequential(nbd, c.size, req, qd, c.seconds, "one"),
      },
      {
        client: `ours readable() BYOB ${req / KiB}K ahead ${qd}`,
        ours: true,
        warm: () => oursStream(nbd, warmSize, req, qd, c.seconds, "full"),
        once: () => oursStream(nbd, c.size, req, qd, c.seconds, "one"),
      },
      ...ctx.libs.flatMap((lib) => [
        {
          client: `nbdcopy ${lib.version} --request-size=${req} ` +
            `--requests=${qd} -C 1`,
          ours: false,
          ...(lib.nbdcopy ? {} : { skip: `nbdcopy ${lib.missing}` }),
          once: () => timeCommand(lib.wrap(matched), c.size, req),
        },
        {
          client: `nbdcopy ${lib.version} (defaults)`,
          ours: false,
          ...(lib.nbdcopy ? {} : { skip: `nbdcopy ${lib.missing}` }),
          once: () => timeCommand(lib.wrap(defaults), c.size, req),
        },
        {
          client: `nbdsh ${lib.version} aio_pread ${req / KiB}K x${qd}`,
          ours: false,
          ...nbdshContender(ctx, lib, {
            mode: "seq",
            request: req,
            depth: qd,
            seconds: c.seconds,
            size: c.size,
            warmSize,
          }, s.uri),
        },
      ]),
    ]);
  } finally {
    await nbd.close();
  }
}
