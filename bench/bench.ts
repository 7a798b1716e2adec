/**
 * `deno task bench`: this client beside libnbd's own tools, against one
 * `nbdkit pattern` server on a private Unix socket, in one run.
 *
 * - Sequential read of the whole export (2 GiB by default) in 256 KiB
 *   requests, 16 in flight: ours with `readInto()` and with `readable()`,
 *   `nbdcopy` with the same request size and queue depth on one connection,
 *   `nbdcopy` with its defaults, and libnbd's `aio_pread` through `nbdsh`.
 * - Random 4 KiB reads at queue depth 1 (await each / `h.pread` in a loop)
 *   and 64 (a window of 64 / `h.aio_pread` reaped with `h.poll`), the same
 *   offsets on both sides, from a seeded generator, written to a file that
 *   the `nbdsh` script reads.
 * - Command-line copies to `null:`: `examples/copy.ts` against `nbdcopy`,
 *   1 and 4 connections, when `examples/copy.ts` exists.
 *
 * Every client is warmed up once, then the clients of a section take turns
 * for `--runs` rounds (3), so that other load on the machine falls on all
 * of them alike; the table shows medians, with the client's own CPU time per
 * request beside the wall-clock figures (steadier on a busy machine), and
 * the load average. Every request that our client completes has one word
 * checked against the pattern plugin's formula (each 8-byte word is its own
 * offset, big-endian), and the warm-up checks far more, so the benchmark
 * cannot pass by not reading.
 *
 * Each workload is a module of its own, listed in {@linkcode WORKLOADS}
 * (how to add one is written there); what they share lives in
 * `bench/_harness.ts` (configuration, data checks, servers, timing,
 * sections), `bench/_peers.ts` (libnbd's tools) and `bench/_table.ts` (the
 * output). To compare another command-line copy, add a contender in
 * `bench/copy.ts`'s `copyContenders()`, timed by `timeCommand()`. To see where
 * our time goes, `bench/profile.ts` runs one workload alone under
 * `--cpu-prof` and summarises the profile.
 *
 * ```sh
 * deno task bench
 * deno task bench --quick          # 256 MiB, fewer reads: a smoke test
 * deno task bench --quick --only=rand --runs=1   # one workload
 * deno task bench --size=4G --runs=5 --threads=4
 * ```
 *
 * Every libnbd row runs twice: with the host's libnbd (Debian 12: 1.14)
 * and with libnbd 1.22 from the Debian 13 root that `.ci/setup` makes
 * (`chroot ROOT nbdcopy …`, `chroot ROOT nbdsh …`; the socket, the script
 * and the offsets live in a directory under the root). Each row's
 * "ref/this" is our client over that row, so both ratios are printed; a
 * summary after the table gives them side by side per section.
 *
 * Needs `nbdkit`, `nbdcopy` (libnbd-bin) and `nbdsh` (python3-libnbd) on
 * PATH, and the root; a missing tool's rows are skipped with a note.
 *
 * @module
 */

import {
  type BenchContext,
  type BenchRow,
  loadAverage,
  MiB,
  type Offsets,
  parseConfig,
  randomOffsets,
  type Row,
  runSection,
  type Server,
  startServer,
  versionOf,
  type Workload,
  writeOffsets,
} from "./_harness.ts";
import { libnbds } from "./_peers.ts";
import { fmt, formatBenchRows, formatTable, ratioSummary } from "./_table.ts";
import { TRIXIE_ROOT } from "../tests/support/servers.ts";
import * as copy from "./copy.ts";
import * as fuse from "./fuse.ts";
import * as gnutls from "./gnutls.ts";
import * as oneAtATime from "./one_at_a_time.ts";
import * as randomRead from "./random_read.ts";
import * as rate from "./rate.ts";
import * as seqRead from "./seq_read.ts";
import * as tls from "./tls.ts";
import * as write from "./write.ts";

/**
 * Every workload, by the name `--only` takes, in the order of the output.
 *
 * To add one, write `bench/NAME.ts` exporting
 *
 * ```ts
 * export async function rows(ctx?: BenchContext): Promise<BenchRow[]>
 * ```
 *
 * (both types from `bench/_harness.ts`; `ctx` is optional to use: it has
 * the configuration, a private directory, the libnbd installs, the shared
 * `nbdkit pattern` server and the random offsets), each row one figure of
 * ours beside a peer's: `{ name, unit, higherIsBetter, ours, peer,
 * peerName, note? }`. Then import it here (`import * as NAME from
 * "./NAME.ts"`) and add `["NAME", NAME]` below. Its rows print in a second
 * table after the main one; a module that starts servers stops them before
 * it returns. A module that wants rows in the main table, with several
 * clients timed in turns, exports `sections()` instead (see
 * `bench/seq_read.ts`).
 */
export const WORKLOADS: ReadonlyArray<readonly [string, Workload]> = [
  ["seq", seqRead],
  ["rand", randomRead],
  ["write", write],
  ["one-at-a-time", oneAtATime],
  ["tls", tls],
  ["copy", copy],
  // Its rows() takes a target rate, not the context: the default 64 MiB/s.
  ["rate", { rows: () => rate.rows() }],
  // FUSE (examples/fuse.ts) beside nbdfuse 1.14 and 1.22.
  ["fuse", fuse],
  // GnuTLS through FFI: own CA and TLS-PSK, read and copy, beside nbdcopy.
  ["gnutls", {
    rows: (ctx) =>
      ctx === undefined ? gnutls.rows() : gnutls.rows(
        Math.min(ctx.config.size, 1024 * 1024 * 1024),
        ctx.config.runs,
        (text) => ctx.progress(text),
      ),
  }],
];

async function main(): Promise<void> {
  const names = WORKLOADS.map(([name]) => name);
  const c = parseConfig(Deno.args, names);
  const started = performance.now();
  const load0 = await loadAverage();
  // Under the Debian 13 root when there is one, so its tools reach the
  // socket too.
  const rooted = await Deno.stat(`${TRIXIE_ROOT}/tmp`).then(
    (st) => st.isDirectory,
    () => false,
  );
  const dir = await Deno.makeTempDir({
    prefix: "nbd-bench-",
    ...(rooted ? { dir: `${TRIXIE_ROOT}/tmp` } : {}),
  });
  const rows: Row[] = [];
  const benchRows: BenchRow[] = [];
  const failed: string[] = [];
  let versions: string[] = [];
  const progress = (text: string) =>
    console.error(
      `[${((performance.now() - started) / 1000).toFixed(1)}s] ${text}`,
    );
  let server: Promise<Server> | undefined;
  try {
    const libs = await libnbds(dir, c.libnbd);
    versions = libs.map((l) => l.version);
    // Where each install's nbdsh reads the script.
    const script = `${dir}/_libnbd.py`;
    await Deno.copyFile(new URL("./_libnbd.py", import.meta.url), script);

    console.log(
      [
        `deno ${Deno.version.deno} (V8 ${Deno.version.v8})`,
        await versionOf("nbdkit"),
        ...libs.map((l) => `libnbd ${l.version}`),
        `${navigator.hardwareConcurrency} CPUs`,
      ].join(", "),
    );
    console.log(
      `server: nbdkit -U SOCK -f --threads=${c.threads} pattern size=${c.size}` +
        ` (${fmt(c.size / MiB)} MiB)\n`,
    );

    let offsets: Promise<Offsets> | undefined;
    const ctx: BenchContext = {
      config: c,
      dir,
      libs,
      script,
      progress,
      pattern: () => server ??= startServer(dir, c.size, c.threads),
      offsets: () =>
        offsets ??= (async () => {
          const list = randomOffsets(
            Math.max(c.qd1Count, c.qd64Count),
            c.size,
            c.seed,
          );
          const file = `${dir}/offsets.u64le`;
          await writeOffsets(file, list);
          return { list, file };
        })(),
      section: (name, contenders) =>
        runSection(name, contenders, c.runs, progress),
    };
    for (const [name, workload] of WORKLOADS) {
      if (c.only.length > 0 && !c.only.includes(name)) continue;
      if ("sections" in workload) {
        rows.push(...await workload.sections(ctx));
        continue;
      }
      // A plug-in that fails is reported; the others go on.
      progress(`${name}: running`);
      try {
        benchRows.push(...await workload.rows(ctx));
      } catch (e) {
        const text = e instanceof Error ? e.message : String(e);
        console.error(`${name} failed: ${text}`);
        failed.push(`${name}: ${text.split("\n")[0]!.slice(0, 100)}`);
      }
    }
  } finally {
    await server?.then((s) => s.stop(), () => {});
    await Deno.remove(dir, { recursive: true });
  }
  console.log("");
  console.log(formatTable(rows, c.runs));
  console.log("");
  console.log(ratioSummary(rows, versions));
  if (benchRows.length > 0 || failed.length > 0) {
    console.log("");
    console.log(formatBenchRows(benchRows));
    for (const f of failed) console.log(`Failed: ${f}`);
  }
  // Other work on the machine moves these figures; say how busy it was.
  console.log(
    `Load average at start: ${load0}; at end: ${await loadAverage()}.`,
  );
  console.log(
    `Whole benchmark: ${fmt((performance.now() - started) / 1000, 1)} s.`,
  );
}

if (import.meta.main) {
  await main();
}
