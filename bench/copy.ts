/**
 * Command-line copies to `null:`: `examples/copy.ts` against `nbdcopy`,
 * 1 and 4 connections, when `examples/copy.ts` exists; then a 4 GiB copy
 * whose peak memory is shown beside nbdcopy's. Skipped with `--no-copy`.
 *
 * @module
 */

import {
  type BenchContext,
  type Config,
  type Contender,
  GiB,
  type Libnbd,
  MiB,
  type Row,
  type Server,
  startServer,
  timeCommand,
} from "./_harness.ts";
import { fmt } from "./_table.ts";

/** The size of the copy whose peak memory is shown. */
const RSS_SIZE = 4 * GiB;

/**
 * `examples/copy.ts` against `nbdcopy`, the whole export to `null:` over
 * `connections` connections, each run timed from spawn to exit by
 * {@linkcode timeCommand}. This is the hook for command-line copies: add a
 * contender here to compare another tool.
 *
 * @param server The benchmark server.
 * @param c The configuration.
 * @param connections Connections each tool may open.
 * @param libs The libnbd installs whose `nbdcopy` to run.
 * @returns The contenders of one section.
 */
export async function copyContenders(
  server: Server,
  c: Config,
  connections: number | undefined,
  libs: readonly Libnbd[],
): Promise<Contender[]> {
  const root = new URL("..", import.meta.url).pathname;
  // Without a count, each tool's default (both: 4, at most one per processor).
  const conns = connections === undefined
    ? []
    : [`--connections=${connections}`];
  const label = connections === undefined ? "(defaults)" : `-C ${connections}`;
  const present = await Deno.stat(`${root}examples/copy.ts`).then(
    () => true,
    () => false,
  );
  const deno = [
    Deno.execPath(),
    "run",
    "-A",
    "examples/copy.ts",
    ...conns,
    server.uri,
    "null:",
  ];
  const tool = ["nbdcopy", ...conns, server.uri, "null:"];
  return [
    {
      client: `deno run -A examples/copy.ts ${label}`,
      ours: true,
      ...(present ? {} : { skip: "examples/copy.ts not found" }),
      // Type-checks and caches the module graph, out of the timing; the
      // server needs no warming by now.
      warm: () =>
        timeCommand(
          [Deno.execPath(), "cache", "examples/copy.ts"],
          c.size,
          c.requestSize,
          root,
        ),
      once: () => timeCommand(deno, c.size, c.requestSize, root),
    },
    ...libs.map((lib) => ({
      client: `nbdcopy ${lib.version} ${label}`,
      ours: false,
      ...(lib.nbdcopy ? {} : { skip: `nbdcopy ${lib.missing}` }),
      once: () => timeCommand(lib.wrap(tool), c.size, c.requestSize),
    })),
  ];
}

/**
 * The copy sections: 1 and 4 connections on the shared server, then the
 * 4 GiB copies with their peak memory.
 *
 * @param ctx The run's context.
 * @returns Their rows.
 */
export async function sections(ctx: BenchContext): Promise<Row[]> {
  const c = ctx.config;
  if (!c.copy) return [];
  const s = await ctx.pattern();
  const rows: Row[] = [];
  for (const conns of [1, 4]) {
    rows.push(
      ...await ctx.section(
        `copy ${fmt(c.size / MiB)} MiB to null:, ${conns} conn`,
        await copyContenders(s, c, conns, ctx.libs),
      ),
    );
  }
  // Memory stays flat whatever the size: 4 GiB, peak RSS beside nbdcopy's.
  const big = await startServer(ctx.dir, RSS_SIZE, c.threads);
  try {
    const cb = { ...c, size: RSS_SIZE };
    for (const conns of [1, undefined]) {
      rows.push(
        ...await ctx.section(
          `copy ${fmt(RSS_SIZE / MiB)} MiB to null:, ${
            conns ? `${conns} conn` : "defaults"
          } (RSS)`,
          await copyContenders(big, cb, conns, ctx.libs),
        ),
      );
    }
  } finally {
    await big.stop();
  }
  return rows;
}
