/**
 * Random 4 KiB reads of the `nbdkit pattern` export at queue depth 1
 * (await each / `h.pread` in a loop) and 64 (a window of 64 /
 * `h.aio_pread` reaped with `h.poll`), the same offsets on both sides,
 * from a seeded generator, written to a file that the `nbdsh` script reads.
 *
 * @module
 */

import type { NbdClient } from "../mod.ts";
import { connect } from "../mod.ts";
import {
  type BenchContext,
  type Check,
  checkMany,
  checkOne,
  RANDOM_SIZE,
  type Row,
  type Run,
  timedRequests,
} from "./_harness.ts";
import { nbdshContender } from "./_peers.ts";
import { fmt } from "./_table.ts";

/** 4 KiB reads at `offsets`, `depth` in flight (1: await each). */
export async function oursRandom(
  nbd: NbdClient,
  offsets: number[],
  count: number,
  depth: number,
  seconds: number,
  check: Check,
): Promise<Run> {
  const { ops, seconds: elapsed, cpu } = await timedRequests(
    Math.min(count, offsets.length),
    depth,
    RANDOM_SIZE,
    seconds,
    256,
    async (i, buf, _view, done) => {
      const at = offsets[i]!;
      await nbd.readInto(buf, at);
      if (check === "full") checkMany(buf, at);
      else checkOne(buf, at, done);
    },
  );
  return { ops, bytes: ops * RANDOM_SIZE, seconds: elapsed, cpu };
}

/**
 * The sections "rand 4K QD1" and "rand 4K QD64".
 *
 * @param ctx The run's context.
 * @returns Their rows.
 */
export async function sections(ctx: BenchContext): Promise<Row[]> {
  const c = ctx.config;
  const s = await ctx.pattern();
  const offsets = await ctx.offsets();
  const rows: Row[] = [];
  const nbd = await connect({ path: s.path, maxInFlight: 64 });
  try {
    for (
      const [depth, count] of [[1, c.qd1Count], [64, c.qd64Count]] as const
    ) {
      const warmCount = Math.min(count, Math.max(1000, count / 10));
      const job = {
        mode: "rand",
        request: RANDOM_SIZE,
        depth,
        seconds: c.seconds,
        count,
        warmCount,
        offsetsFile: offsets.file,
      } as const;
      rows.push(
        ...await ctx.section(`rand 4K QD${depth}, ${fmt(count)} reads`, [
          {
            client: depth === 1
              ? "ours readInto(), await each"
              : `ours readInto(), window of ${depth}`,
            ours: true,
            warm: () =>
              oursRandom(
                nbd,
                offsets.list,
                warmCount,
                depth,
                c.seconds,
                "full",
              ),
            once: () =>
              oursRandom(nbd, offsets.list, count, depth, c.seconds, "one"),
          },
          ...ctx.libs.map((lib) => ({
            client: depth === 1
              ? `nbdsh ${lib.version} h.pread loop`
              : `nbdsh ${lib.version} h.aio_pread window of ${depth}`,
            ours: false,
            ...nbdshContender(ctx, lib, job, s.uri),
          })),
        ]),
      );
    }
  } finally {
    await nbd.close();
  }
  return rows;
}
