/**
 * What every workload of `deno task bench` shares: the configuration, the
 * figures of a run and a table row, the data checks, the random offsets,
 * the round-robin that times a section's contenders, the `nbdkit` server,
 * CPU and command-line timing, and the two shapes a workload module
 * has (see `bench/bench.ts` for the list of workloads).
 *
 * @module
 */

import { cpuUsage } from "node:process";

export {
  checkMany,
  checkOne,
  checkWord,
  randomOffsets,
  writeOffsets,
} from "./_data.ts";

/** What one timed run did. */
export interface Run {
  /** Requests completed. */
  ops: number;
  /** Bytes read. */
  bytes: number;
  /** Wall-clock seconds around the I/O. */
  seconds: number;
  /** CPU seconds (user + system) the client spent, where known. */
  cpu?: number;
  /** Peak resident memory of a command line, in bytes, where known. */
  rss?: number;
}

/** One line of the table. */
export interface Row {
  /** The measurement, shared by the rows compared with each other. */
  section: string;
  /** Who ran it, and how. */
  client: string;
  /** Whether it is our client. */
  ours: boolean;
  /** The timed runs. */
  runs: Run[];
  /** Why there are no runs. */
  note?: string;
}

/** What the command line chose (see `USAGE`). */
export interface Config {
  /** Export size, and bytes read sequentially. */
  size: number;
  /** Bytes per sequential request. */
  requestSize: number;
  /** Sequential requests in flight. */
  seqDepth: number;
  /** Timed runs per client. */
  runs: number;
  /** Budget of one run: no request is issued after it. */
  seconds: number;
  /** Random reads per run at queue depth 1. */
  qd1Count: number;
  /** Random reads per run at queue depth 64. */
  qd64Count: number;
  /** Seed of the random offsets. */
  seed: number;
  /** nbdkit's `--threads`. */
  threads: number;
  /** Whether to run the copy sections. */
  copy: boolean;
  /** Whether to run nbdcopy and nbdsh. */
  libnbd: boolean;
  /** Whether to run the TLS section. */
  tls: boolean;
  /** Workloads to run (their names in `bench/bench.ts`); empty: all. */
  only: string[];
}

/**
 * One comparison a plug-in workload module reports: our figure beside a
 * peer's, for the second table. A module of that kind exports
 * `rows(ctx?: BenchContext): Promise<BenchRow[]>` (see `bench/bench.ts`).
 */
export interface BenchRow {
  /** What was measured, e.g. `"attach 1 GiB over netlink"`. */
  name: string;
  /** The figures' unit, e.g. `"MiB/s"`, `"ms"`. */
  unit: string;
  /** Whether a larger figure is the better one (MiB/s: yes, ms: no). */
  higherIsBetter: boolean;
  /** Our client's figure. */
  ours: number;
  /** The peer's figure; `null` when the peer could not run (say why in `note`). */
  peer: number | null;
  /** Who the peer is, e.g. `"nbd-client 3.26"`. */
  peerName: string;
  /** Anything the reader needs to weigh the figures. */
  note?: string;
}

/** The sizes the benchmark speaks in. */
export const KiB = 1024;
export const MiB = 1024 * KiB;

/** The median; of an even count, the mean of the middle two. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}
export const GiB = 1024 * MiB;
/** Bytes per random request. */
export { RANDOM_SIZE } from "./_data.ts";

/** The options; `WORKLOADS` stands for the list of names. */
export const USAGE = `Usage: deno task bench [OPTIONS]

  --size=N        export size and bytes read sequentially (2G)
  --runs=N        timed runs per measurement; the median is shown (3)
  --seconds=S     stop issuing requests in a run after S seconds (10)
  --qd1-count=N   random reads per run at queue depth 1 (20000)
  --qd64-count=N  random reads per run at queue depth 64 (50000)
  --seed=N        seed of the random offsets (1)
  --threads=N     nbdkit --threads (16, nbdkit's default)
  --no-copy       skip the command-line copy benchmark
  --no-libnbd     skip nbdcopy and nbdsh
  --no-tls        skip the TLS section
  --quick         256 MiB, 2000 and 10000 random reads, 2 runs
  --only=A,B      run only these workloads: WORKLOADS
`;

function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(text);
  if (!m) throw new RangeError(`Bad size ${text}`);
  const unit = { "": 1, K: KiB, M: MiB, G: GiB, T: 1024 * GiB }[
    m[2]!.toUpperCase() as "" | "K" | "M" | "G" | "T"
  ];
  return Number(m[1]) * unit;
}

/**
 * Reads the command line.
 *
 * @param args The arguments after the script.
 * @param workloads The names `--only` may list.
 * @returns The configuration; `--help` prints the usage and exits.
 * @throws {RangeError} or {TypeError} on a bad option.
 */
export function parseConfig(args: string[], workloads: string[]): Config {
  const c: Config = {
    size: 2 * GiB,
    requestSize: 256 * KiB,
    seqDepth: 16,
    runs: 3,
    seconds: 10,
    qd1Count: 20_000,
    qd64Count: 50_000,
    seed: 1,
    threads: 16,
    copy: true,
    libnbd: true,
    tls: true,
    only: [],
  };
  for (const arg of args) {
    const [name, value = ""] = arg.split("=", 2) as [string, string?];
    const int = () => {
      const n = Number(value);
      if (!Number.isSafeInteger(n) || n <= 0) {
        throw new RangeError(
          `${name} needs a positive integer, not "${value}"`,
        );
      }
      return n;
    };
    switch (name) {
      case "--size":
        c.size = parseSize(value);
        break;
      case "--runs":
        c.runs = int();
        break;
      case "--seconds":
        c.seconds = Number(value);
        break;
      case "--qd1-count":
        c.qd1Count = int();
        break;
      case "--qd64-count":
        c.qd64Count = int();
        break;
      case "--seed":
        c.seed = int();
        break;
      case "--threads":
        c.threads = int();
        break;
      case "--no-copy":
        c.copy = false;
        break;
      case "--no-libnbd":
        c.libnbd = false;
        break;
      case "--no-tls":
        c.tls = false;
        break;
      case "--quick":
        c.size = 256 * MiB;
        c.qd1Count = 2000;
        c.qd64Count = 10_000;
        c.runs = 2;
        break;
      case "--only":
        c.only = value.split(",").filter((n) => n !== "");
        for (const n of c.only) {
          if (!workloads.includes(n)) {
            throw new RangeError(
              `--only: no workload "${n}" (there are ${workloads.join(", ")})`,
            );
          }
        }
        break;
      case "-h":
      case "--help":
        console.log(usage(workloads));
        Deno.exit(0);
        break;
      default:
        throw new TypeError(`Unknown option ${arg}\n\n${usage(workloads)}`);
    }
  }
  if (c.size % c.requestSize !== 0) {
    throw new RangeError(`--size must be a multiple of ${c.requestSize}`);
  }
  return c;
}

/** The usage text, naming the workloads. */
export function usage(workloads: string[]): string {
  return USAGE.replace("WORKLOADS", workloads.join(", "));
}

// ---------------------------------------------------------------------------
// Timing our client.

/** How much read data to check: one word per request, or many. */
export type Check = "one" | "full";

/** CPU seconds of this process (every thread: V8's and Deno's I/O) since `from`. */
export function cpuSince(from: { user: number; system: number }): number {
  const d = cpuUsage(from);
  return (d.user + d.system) / 1e6;
}

/** What {@linkcode timedRequests} measured. */
export interface TimedRequests {
  /** Requests completed. */
  ops: number;
  /** Requests started (the index one past the last). */
  issued: number;
  /** Wall-clock seconds around the requests. */
  seconds: number;
  /** CPU seconds of this process over them. */
  cpu: number;
}

/**
 * Requests 0, 1, 2 ... up to `count` from `depth` workers, each with its own
 * buffer of `bufferSize` bytes, until they are all done or `seconds` have
 * passed: the clock is read once every `clockEvery` completions (a power of
 * two), and past the deadline no worker starts another.
 *
 * @param count How many requests at most.
 * @param depth How many workers, so how many requests in flight.
 * @param bufferSize Each worker's buffer, in bytes.
 * @param seconds The time limit.
 * @param clockEvery How many completions between two looks at the clock.
 * @param request Issues request `i` with the worker's buffer and a view over
 *   it; `done` is how many had completed when it started.
 * @returns The counts, the wall-clock and the CPU time.
 */
export async function timedRequests(
  count: number,
  depth: number,
  bufferSize: number,
  seconds: number,
  clockEvery: number,
  request: (
    i: number,
    buf: Uint8Array,
    view: DataView,
    done: number,
  ) => Promise<void>,
): Promise<TimedRequests> {
  let next = 0;
  let stopAt = count;
  let ops = 0;
  const t0 = performance.now();
  const cpu0 = cpuUsage();
  const deadline = t0 + seconds * 1000;
  const worker = async (buf: Uint8Array) => {
    const view = new DataView(buf.buffer);
    while (next < stopAt) {
      await request(next++, buf, view, ops);
      ops++;
      if ((ops & (clockEvery - 1)) === 0 && performance.now() > deadline) {
        stopAt = next;
      }
    }
  };
  const bufs = Array.from({ length: depth }, () => new Uint8Array(bufferSize));
  await Promise.all(bufs.map(worker));
  const elapsed = (performance.now() - t0) / 1000;
  return { ops, issued: next, seconds: elapsed, cpu: cpuSince(cpu0) };
}

/** One client in a section: warmed up once, then timed once per round. */
export interface Contender {
  /** The row's label. */
  client: string;
  /** Whether this is our client (the first one is the section's reference). */
  ours: boolean;
  /** Why it has no figures, when it cannot run (a tool is missing). */
  skip?: string;
  /** One untimed run, checking more of the data where it can. */
  warm?: () => Promise<unknown>;
  /** One timed run. */
  once: () => Promise<Run>;
}

/**
 * Warms every contender up, then runs them round-robin, `runs` rounds,
 * rotating who goes first: on a shared machine the load drifts, and this
 * spreads the drift over all of them alike.
 */
export async function runSection(
  section: string,
  contenders: Contender[],
  runs: number,
  progress: (text: string) => void,
): Promise<Row[]> {
  const rows: Row[] = contenders.map((k) => ({
    section,
    client: k.client,
    ours: k.ours,
    runs: [],
    ...(k.skip ? { note: k.skip } : {}),
  }));
  const live = contenders.map((_, i) => i).filter((i) => !contenders[i]!.skip);
  // A contender that fails drops out with a note; the others go on.
  const failed = new Set<number>();
  const attempt = async (i: number, step: () => Promise<unknown>) => {
    try {
      await step();
    } catch (e) {
      failed.add(i);
      const text = e instanceof Error ? e.message : String(e);
      console.error(`${section}: ${contenders[i]!.client} failed: ${text}`);
      rows[i]!.runs = [];
      rows[i]!.note = `failed: ${text.split("\n")[0]!.slice(0, 60)}`;
    }
  };
  progress(`${section}: warm-up`);
  for (const i of live) {
    const warm = contenders[i]!.warm;
    if (warm) await attempt(i, warm);
  }
  for (let round = 0; round < runs; round++) {
    progress(`${section}: round ${round + 1} of ${runs}`);
    for (let k = 0; k < live.length; k++) {
      const i = live[(k + round) % live.length]!;
      if (failed.has(i)) continue;
      await attempt(i, async () => {
        const run = await contenders[i]!.once();
        rows[i]!.runs.push(run);
        progress(
          `  ${
            contenders[i]!.client
          }: ${run.ops} requests, ${run.bytes} bytes` +
            ` in ${run.seconds.toFixed(3)} s, CPU ${run.cpu?.toFixed(3)} s`,
        );
      });
    }
  }
  return rows;
}

// ---------------------------------------------------------------------------
// Peers and command lines.

/** One libnbd install whose tools the benchmark runs. */
export interface Libnbd {
  /** For row labels: `"1.14"`, `"1.22"`. */
  version: string;
  /** The command line that runs `argv` with this install's tools. */
  wrap(argv: string[]): string[];
  /** nbdcopy runs. */
  nbdcopy: boolean;
  /** The environment nbdsh needs, or `null` when it cannot run. */
  nbdshEnv: Record<string, string> | null;
  /** Why a missing tool's rows are skipped. */
  missing: string;
}

/** A tool is usable when it runs with `--version`. */
export async function has(
  cmd: string,
  env?: Record<string, string>,
  args: string[] = ["--version"],
): Promise<boolean> {
  try {
    const r = await new Deno.Command(cmd, {
      args,
      stdout: "null",
      stderr: "null",
      ...(env ? { env } : {}),
    }).output();
    return r.success;
  } catch {
    return false;
  }
}

/** The first line `cmd --version` prints, or "not found". */
export async function versionOf(
  cmd: string,
  args = ["--version"],
): Promise<string> {
  try {
    const r = await new Deno.Command(cmd, { args, stderr: "null" }).output();
    return new TextDecoder().decode(r.stdout).trim().split("\n")[0] ?? "?";
  } catch {
    return "not found";
  }
}

/**
 * Runs a command and times it from spawn to exit, so the figure includes
 * the tool's start-up and handshake (a few milliseconds).
 *
 * This is the hook for the copy benchmark: `bench/copy.ts` times
 * `examples/copy.ts` and `nbdcopy` through it, and any other command-line
 * copy can be added the same way.
 *
 * @param argv The command and its arguments.
 * @param bytes Bytes the command moves, for the throughput.
 * @param requestSize The command's request size: `ops` counts requests of
 *   this size, so that IOPS compare with the in-process rows.
 * @param cwd Where to run it.
 * @param signal Kills the command when it aborts.
 * @returns The timing.
 * @throws {Error} when the command fails, with its stderr.
 */
export async function timeCommand(
  argv: string[],
  bytes: number,
  requestSize: number,
  cwd?: string,
  signal?: AbortSignal,
): Promise<Run> {
  // bash's `times` reports the CPU its children used: the tool's own cost;
  // GNU time, where there is one, the peak resident memory.
  const rssFile = await Deno.makeTempFile({ prefix: "nbd-bench-rss-" });
  const timed = await hasGnuTime()
    ? ["/usr/bin/time", "-f", "%M", "-o", rssFile, ...argv]
    : argv;
  const t0 = performance.now();
  const r = await new Deno.Command("bash", {
    args: ["-c", '"$@" >/dev/null; rc=$?; times; exit $rc', "bash", ...timed],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    ...(cwd ? { cwd } : {}),
    ...(signal ? { signal } : {}),
  }).output();
  const seconds = (performance.now() - t0) / 1000;
  if (!r.success) {
    await Deno.remove(rssFile).catch(() => {});
    throw new Error(
      `${argv.join(" ")} failed (exit ${r.code}): ${
        new TextDecoder().decode(r.stderr).trim()
      }`,
    );
  }
  const children = new TextDecoder().decode(r.stdout).trim().split("\n").at(-1);
  let cpu = 0;
  for (const m of children?.matchAll(/(\d+)m([\d.]+)s/g) ?? []) {
    cpu += Number(m[1]) * 60 + Number(m[2]);
  }
  const kib = Number(
    (await Deno.readTextFile(rssFile).catch(() => "")).trim().split("\n")
      .at(-1),
  );
  await Deno.remove(rssFile).catch(() => {});
  return {
    ops: bytes / requestSize,
    bytes,
    seconds,
    cpu,
    ...(kib > 0 ? { rss: kib * 1024 } : {}),
  };
}

let gnuTime: Promise<boolean> | undefined;
/** Whether `/usr/bin/time` is GNU time (it takes `-f` and `-o`). */
function hasGnuTime(): Promise<boolean> {
  gnuTime ??= has("/usr/bin/time", undefined, ["-f", "%M", "true"]);
  return gnuTime;
}

// ---------------------------------------------------------------------------
// The server.

/** A running benchmark server. */
export interface Server {
  /** Its NBD URI. */
  uri: string;
  /** Its Unix socket. */
  path: string;
  /** Stops it and waits for it to exit. */
  stop(): Promise<void>;
}

/**
 * Starts `nbdkit pattern` on a Unix socket in `dir`.
 *
 * @param dir A private directory for the socket and pid file.
 * @param size Export size in bytes.
 * @param threads nbdkit's `--threads`.
 * @returns The running server.
 */
export async function startServer(
  dir: string,
  size: number,
  threads: number,
  plugin: "pattern" | "memory" = "pattern",
  filters: string[] = [],
  params: string[] = [],
): Promise<Server> {
  const name = `${plugin}-${size}${filters.length ? "-filtered" : ""}`;
  const path = `${dir}/${name}.sock`;
  const pidFile = `${dir}/${name}.pid`;
  const child = new Deno.Command("nbdkit", {
    args: [
      "-U",
      path,
      "-P",
      pidFile,
      "-f",
      "--exit-with-parent",
      `--threads=${threads}`,
      ...filters,
      plugin,
      `size=${size}`,
      ...params,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  let exited = false;
  const status = child.status.finally(() => exited = true);
  const stop = async () => {
    if (!exited) child.kill("SIGTERM");
    await status;
  };
  // nbdkit writes its pid file once it accepts connections; poll, bounded.
  for (let i = 0;; i++) {
    const ready = await Deno.stat(pidFile).then((s) => s.size > 0, () => false);
    if (ready) break;
    if (exited || i >= 500) {
      await stop();
      throw new Error(
        exited ? "nbdkit exited at start" : "nbdkit did not start within 10 s",
      );
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { uri: `nbd+unix:///?socket=${path}`, path, stop };
}

/** The 1, 5 and 15 minute load averages, where /proc has them. */
export async function loadAverage(): Promise<string> {
  try {
    const text = await Deno.readTextFile("/proc/loadavg");
    return text.split(" ").slice(0, 3).join(" ");
  } catch {
    return "unknown";
  }
}

// ---------------------------------------------------------------------------
// Workloads.

/** The random offsets the random workloads read, and their file for nbdsh. */
export interface Offsets {
  /** {@linkcode randomOffsets} for the larger of the two read counts. */
  list: number[];
  /** The same, as little-endian u64s (see {@linkcode writeOffsets}). */
  file: string;
}

/** What the entry gives every workload. */
export interface BenchContext {
  /** The command line's choices. */
  readonly config: Config;
  /**
   * A private directory, under the Debian 13 root when there is one, so
   * that the root's tools reach the sockets in it.
   */
  readonly dir: string;
  /** The libnbd installs whose tools run beside ours. */
  readonly libs: readonly Libnbd[];
  /** Where nbdsh reads `bench/_libnbd.py` (a host path; wrap it per install). */
  readonly script: string;
  /** Reports progress on stderr, with the time since the start. */
  progress(text: string): void;
  /**
   * The `nbdkit pattern` server of `config.size` that several workloads
   * read, started on first use; the entry stops it.
   */
  pattern(): Promise<Server>;
  /** The random offsets, made on first use. */
  offsets(): Promise<Offsets>;
  /** {@linkcode runSection} with the configured runs and progress. */
  section(name: string, contenders: Contender[]): Promise<Row[]>;
}

/** A workload of the main table: whole sections, many clients each. */
export interface TableWorkload {
  /** Runs the workload's sections, in table order. */
  sections(ctx: BenchContext): Promise<Row[]>;
}

/**
 * A plug-in workload: one {@linkcode BenchRow} per comparison, printed in
 * a second table. Such a module may ignore `ctx` (`rows()` fits too).
 */
export interface RowsWorkload {
  /** Measures and returns the rows. */
  rows(ctx: BenchContext): Promise<BenchRow[]>;
}

/** Either shape; `bench/bench.ts` lists one per workload. */
export type Workload = TableWorkload | RowsWorkload;
