/**
 * Several connections per client, where they pay: a server that serves one
 * request at a time per connection, each taking a millisecond (`nbdkit
 * pattern` behind the `noparallel` and `delay` filters). Random 4 KiB
 * reads a window of 64, ours over 4 connections and over 1, against
 * libnbd's `aio_pread` through `nbdsh`.
 *
 * @module
 */

import { connect, type NbdClient } from "../mod.ts";
import {
  type BenchContext,
  RANDOM_SIZE,
  type Row,
  startServer,
} from "./_harness.ts";
import { nbdshContender } from "./_peers.ts";
import { fmt } from "./_table.ts";
import { oursRandom } from "./random_read.ts";

/**
 * The section "rand 4K QD64 on a one-at-a-time server".
 *
 * @param ctx The run's context.
 * @returns Its rows.
 */
export async function sections(ctx: BenchContext): Promise<Row[]> {
  const c = ctx.config;
  const offsets = await ctx.offsets();
  const slow = await startServer(ctx.dir, c.size, c.threads, "pattern", [
    "--filter=noparallel",
    "--filter=delay",
  ], ["serialize=requests", "rdelay=1ms"]);
  try {
    const count = Math.min(c.qd64Count, 4000);
    const clients: NbdClient[] = [];
    try {
      for (const connections of [4, 1]) {
        clients.push(
          await connect({ path: slow.path, maxInFlight: 64, connections }),
        );
      }
      return await ctx.section(
        `rand 4K QD64 on a one-at-a-time server (1 ms each), ${
          fmt(count)
        } reads`,
        [
          ...clients.map((nbd) => ({
            client: `ours readInto(), window of 64, ${nbd.connections} conn`,
            ours: true,
            warm: () =>
              oursRandom(nbd, offsets.list, 256, 64, c.seconds, "full"),
            once: () =>
              oursRandom(nbd, offsets.list, count, 64, c.seconds, "one"),
          })),
          ...ctx.libs.map((lib) => ({
            client: `nbdsh ${lib.version} h.aio_pread window of 64`,
            ours: false,
            ...nbdshContender(ctx, lib, {
              mode: "rand",
              request: RANDOM_SIZE,
              depth: 64,
              seconds: c.seconds,
              count,
              warmCount: 256,
              offsetsFile: offsets.file,
            }, slow.uri),
          })),
        ],
      );
    } finally {
      for (const nbd of clients) await nbd.close();
    }
  } finally {
    await slow.stop();
  }
}
