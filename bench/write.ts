/**
 * Writes into `nbdkit memory`, the same server for every client:
 * sequential 256 KiB requests 16 in flight, and random 4 KiB requests a
 * window of 64, ours against libnbd's `aio_pwrite` through `nbdsh`. Every
 * request of ours is read back after the timing.
 *
 * @module
 */

import type { NbdClient } from "../mod.ts";
import { connect } from "../mod.ts";
import {
  type BenchContext,
  checkWord,
  KiB,
  MiB,
  RANDOM_SIZE,
  type Row,
  type Run,
  startServer,
  timedRequests,
} from "./_harness.ts";
import { nbdshContender } from "./_peers.ts";
import { fmt } from "./_table.ts";

/**
 * Writes `count` requests of `request` bytes, request `i` at `at(i)`,
 * `depth` in flight, each slot's buffer reused. Each request's first word
 * is stamped with its offset (the pattern plugin's formula); after the
 * timed part, every request's first word is read back and checked, so a
 * write that did not land fails the run.
 */
export async function oursWrite(
  nbd: NbdClient,
  at: (i: number) => number,
  count: number,
  request: number,
  depth: number,
  seconds: number,
): Promise<Run> {
  const { ops, issued, seconds: elapsed, cpu } = await timedRequests(
    count,
    depth,
    request,
    seconds,
    64,
    async (i, buf, view) => {
      const offset = at(i);
      view.setUint32(0, Math.floor(offset / 0x1_0000_0000));
      view.setUint32(4, offset >>> 0);
      await nbd.write(offset, buf);
    },
  );
  // Untimed: every request written is there.
  let check = 0;
  const checker = async () => {
    const word = new Uint8Array(8);
    while (check < issued) {
      const offset = at(check++);
      await nbd.readInto(word, offset);
      checkWord(word, offset, 0);
    }
  };
  await Promise.all(Array.from({ length: 64 }, checker));
  return { ops, bytes: ops * request, seconds: elapsed, cpu };
}

/**
 * The sections "seq write" and "rand 4K write QD64".
 *
 * @param ctx The run's context.
 * @returns Their rows.
 */
export async function sections(ctx: BenchContext): Promise<Row[]> {
  const c = ctx.config;
  const req = c.requestSize;
  const qd = c.seqDepth;
  const warmSize = Math.min(c.size, 256 * MiB);
  const offsets = await ctx.offsets();
  const rows: Row[] = [];
  const mem = await startServer(ctx.dir, c.size, c.threads, "memory");
  try {
    const w = await connect({ path: mem.path, maxInFlight: 64 });
    try {
      const seqCount = c.size / req;
      rows.push(
        ...await ctx.section(`seq write ${fmt(c.size / MiB)} MiB into memory`, [
          {
            client: `ours write() ${req / KiB}K x${qd}`,
            ours: true,
            warm: () =>
              oursWrite(w, (i) => i * req, warmSize / req, req, qd, 60),
            once: () =>
              oursWrite(w, (i) => i * req, seqCount, req, qd, c.seconds),
          },
          ...ctx.libs.map((lib) => ({
            client: `nbdsh ${lib.version} aio_pwrite ${req / KiB}K x${qd}`,
            ours: false,
            ...nbdshContender(ctx, lib, {
              mode: "seq",
              write: true,
              request: req,
              depth: qd,
              seconds: c.seconds,
              size: c.size,
              warmSize,
            }, mem.uri),
          })),
        ]),
      );
      const count = c.qd64Count;
      const warmCount = Math.min(count, Math.max(1000, count / 10));
      const at = (i: number) => offsets.list[i]!;
      rows.push(
        ...await ctx.section(`rand 4K write QD64, ${fmt(count)} writes`, [
          {
            client: "ours write(), window of 64",
            ours: true,
            warm: () => oursWrite(w, at, warmCount, RANDOM_SIZE, 64, 60),
            once: () => oursWrite(w, at, count, RANDOM_SIZE, 64, c.seconds),
          },
          ...ctx.libs.map((lib) => ({
            client: `nbdsh ${lib.version} h.aio_pwrite window of 64`,
            ours: false,
            ...nbdshContender(ctx, lib, {
              mode: "rand",
              write: true,
              request: RANDOM_SIZE,
              depth: 64,
              seconds: c.seconds,
              count,
              warmCount,
              offsetsFile: offsets.file,
            }, mem.uri),
          })),
        ]),
      );
    } finally {
      await w.close();
    }
  } finally {
    await mem.stop();
  }
  return rows;
}
