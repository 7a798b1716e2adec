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
 * To compare another command-line copy, add a {@linkcode Contender} in
 * {@linkcode copyContenders}, timed by {@linkcode timeCommand}. To see where
 * our time goes, `bench/profile.ts` runs one workload alone under
 * `--cpu-prof` and summarises the profile.
 *
 * ```sh
 * deno task bench
 * deno task bench --quick          # 256 MiB, fewer reads: a smoke test
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

import { cpuUsage } from "node:process";
import { connect, type NbdClient } from "../mod.ts";
import { makeTestPki } from "../tests/support/certs.ts";
import { insideRoot, nbdkit, TRIXIE_ROOT } from "../tests/support/servers.ts";

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
}

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const RANDOM_SIZE = 4 * KiB;

const USAGE = `Usage: deno task bench [OPTIONS]

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
`;

function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(text);
  if (!m) throw new RangeError(`Bad size ${text}`);
  const unit = { "": 1, K: KiB, M: MiB, G: GiB, T: 1024 * GiB }[
    m[2]!.toUpperCase() as "" | "K" | "M" | "G" | "T"
  ];
  return Number(m[1]) * unit;
}

function parseConfig(args: string[]): Config {
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
      case "-h":
      case "--help":
        console.log(USAGE);
        Deno.exit(0);
        break;
      default:
        throw new TypeError(`Unknown option ${arg}\n\n${USAGE}`);
    }
  }
  if (c.size % c.requestSize !== 0) {
    throw new RangeError(`--size must be a multiple of ${c.requestSize}`);
  }
  return c;
}

// ---------------------------------------------------------------------------
// Data checks: nbdkit's pattern plugin stores, in each 8-byte word, that
// word's own offset, big-endian.

/** Checks the 8-byte word at `at` (relative, 8-aligned) of `buf`, read from `base`. */
function checkWord(buf: Uint8Array, base: number, at: number): void {
  const v = new DataView(buf.buffer, buf.byteOffset + at, 8);
  const want = base + at;
  const hi = v.getUint32(0);
  const lo = v.getUint32(4);
  if (hi !== Math.floor(want / 0x1_0000_0000) || lo !== want >>> 0) {
    throw new Error(
      `Data check failed at offset ${want}: read 0x${
        hi.toString(16).padStart(8, "0")
      }${lo.toString(16).padStart(8, "0")}, the pattern says ${want}`,
    );
  }
}

/** Checks one word of a request, a different one each time. */
function checkOne(buf: Uint8Array, base: number, salt: number): void {
  const words = buf.length >>> 3;
  checkWord(buf, base, ((salt * 2654435761) >>> 0) % words * 8);
}

/** Checks up to `samples` words spread over `buf`, or all of them. */
function checkMany(buf: Uint8Array, base: number, samples = Infinity): void {
  const words = buf.length >>> 3;
  const step = Math.max(1, Math.floor(words / samples));
  for (let w = 0; w < words; w += step) checkWord(buf, base, w * 8);
  checkWord(buf, base, (words - 1) * 8);
}

// ---------------------------------------------------------------------------
// The random offsets, shared with the nbdsh script through a file.

/** mulberry32: small, seedable, and good enough to scatter reads. */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 0x1_0000_0000;
  };
}

/**
 * 4 KiB-aligned offsets inside the export, the same for every seed.
 *
 * @param count How many.
 * @param size Export size in bytes.
 * @param seed Generator seed.
 * @returns The offsets.
 */
export function randomOffsets(
  count: number,
  size: number,
  seed: number,
): number[] {
  const next = mulberry32(seed);
  const blocks = Math.floor(size / RANDOM_SIZE);
  const out = new Array<number>(count);
  for (let i = 0; i < count; i++) {
    out[i] = Math.floor(next() * blocks) * RANDOM_SIZE;
  }
  return out;
}

/** Little-endian u64s, as `array("Q")` reads them on x86 and arm64. */
async function writeOffsets(path: string, offsets: number[]): Promise<void> {
  const bytes = new Uint8Array(offsets.length * 8);
  const view = new DataView(bytes.buffer);
  offsets.forEach((o, i) => view.setBigUint64(i * 8, BigInt(o), true));
  await Deno.writeFile(path, bytes);
}

// ---------------------------------------------------------------------------
// Our client.

/** How much read data to check: one word per request, or many. */
export type Check = "one" | "full";

/** CPU seconds of this process (every thread: V8's and Deno's I/O) since `from`. */
function cpuSince(from: { user: number; system: number }): number {
  const d = cpuUsage(from);
  return (d.user + d.system) / 1e6;
}

/** Sequential read with `readInto()`, `depth` requests in flight. */
export async function oursSequential(
  nbd: NbdClient,
  size: number,
  request: number,
  depth: number,
  seconds: number,
  check: Check,
): Promise<Run> {
  let next = 0;
  let stopAt = size;
  let ops = 0;
  const t0 = performance.now();
  const cpu0 = cpuUsage();
  const deadline = t0 + seconds * 1000;
  const worker = async (buf: Uint8Array) => {
    while (next < stopAt) {
      const at = next;
      next += request;
      await nbd.readInto(buf, at);
      if (check === "full") checkMany(buf, at, 64);
      else checkOne(buf, at, ops);
      ops++;
      if ((ops & 63) === 0 && performance.now() > deadline) stopAt = next;
    }
  };
  const bufs = Array.from({ length: depth }, () => new Uint8Array(request));
  await Promise.all(bufs.map(worker));
  const elapsed = (performance.now() - t0) / 1000;
  return { ops, bytes: ops * request, seconds: elapsed, cpu: cpuSince(cpu0) };
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

/** 4 KiB reads at `offsets`, `depth` in flight (1: await each). */
export async function oursRandom(
  nbd: NbdClient,
  offsets: number[],
  count: number,
  depth: number,
  seconds: number,
  check: Check,
): Promise<Run> {
  let next = 0;
  let stopAt = Math.min(count, offsets.length);
  let ops = 0;
  const t0 = performance.now();
  const cpu0 = cpuUsage();
  const deadline = t0 + seconds * 1000;
  const worker = async (buf: Uint8Array) => {
    while (next < stopAt) {
      const at = offsets[next++]!;
      await nbd.readInto(buf, at);
      if (check === "full") checkMany(buf, at);
      else checkOne(buf, at, ops);
      ops++;
      if ((ops & 255) === 0 && performance.now() > deadline) stopAt = next;
    }
  };
  const bufs = Array.from({ length: depth }, () => new Uint8Array(RANDOM_SIZE));
  await Promise.all(bufs.map(worker));
  const elapsed = (performance.now() - t0) / 1000;
  return {
    ops,
    bytes: ops * RANDOM_SIZE,
    seconds: elapsed,
    cpu: cpuSince(cpu0),
  };
}

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
  let next = 0;
  let stopAt = count;
  let ops = 0;
  const t0 = performance.now();
  const cpu0 = cpuUsage();
  const deadline = t0 + seconds * 1000;
  const worker = async (buf: Uint8Array) => {
    const view = new DataView(buf.buffer);
    while (next < stopAt) {
      const offset = at(next++);
      view.setUint32(0, Math.floor(offset / 0x1_0000_0000));
      view.setUint32(4, offset >>> 0);
      await nbd.write(offset, buf);
      ops++;
      if ((ops & 63) === 0 && performance.now() > deadline) stopAt = next;
    }
  };
  const bufs = Array.from({ length: depth }, () => new Uint8Array(request));
  await Promise.all(bufs.map(worker));
  const elapsed = (performance.now() - t0) / 1000;
  const cpu = cpuSince(cpu0);
  // Untimed: every request written is there.
  let check = 0;
  const checker = async () => {
    const word = new Uint8Array(8);
    while (check < next) {
      const offset = at(check++);
      await nbd.readInto(word, offset);
      checkWord(word, offset, 0);
    }
  };
  await Promise.all(Array.from({ length: 64 }, checker));
  return { ops, bytes: ops * request, seconds: elapsed, cpu };
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
async function runSection(
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
// libnbd: nbdcopy and nbdsh, the host's and the Debian 13 root's.

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

/** libnbd's version as `nbdcopy --version` prints it ("1.22.2" -> "1.22"). */
async function libnbdVersion(wrap: (argv: string[]) => string[]) {
  const [cmd, ...args] = wrap(["nbdcopy", "--version"]);
  const line = await versionOf(cmd!, args);
  return /(\d+\.\d+)\.\d+/.exec(line)?.[1] ?? "?";
}

/**
 * The host's libnbd, then the root's when `.ci/setup` made it (the
 * benchmark directory must be under the root for that one to reach it).
 */
async function libnbds(dir: string, enabled: boolean): Promise<Libnbd[]> {
  const off = "--no-libnbd";
  const host = (argv: string[]) => argv;
  const hostEnv = enabled ? await nbdshEnv(dir) : null;
  const out: Libnbd[] = [{
    version: enabled ? await libnbdVersion(host) : "host",
    wrap: host,
    nbdcopy: enabled && await has("nbdcopy"),
    nbdshEnv: hostEnv !== null && await has("nbdsh", hostEnv) ? hostEnv : null,
    missing: enabled ? "not found on the host" : off,
  }];
  const rooted = dir.startsWith(`${TRIXIE_ROOT}/`);
  const root = (argv: string[]) => [
    "chroot",
    TRIXIE_ROOT,
    ...argv.map(insideRoot),
  ];
  // Inside the root, its own PATH, whatever the host's holds.
  const rootEnv = { PATH: "/usr/sbin:/usr/bin:/sbin:/bin" };
  const usable = enabled && rooted;
  out.push({
    version: usable ? await libnbdVersion(root) : "1.22",
    wrap: root,
    nbdcopy: usable && await has("chroot", undefined, [
      TRIXIE_ROOT,
      "nbdcopy",
      "--version",
    ]),
    nbdshEnv: usable &&
        await has("chroot", rootEnv, [TRIXIE_ROOT, "nbdsh", "--version"])
      ? rootEnv
      : null,
    missing: !enabled
      ? off
      : rooted
      ? "not found in the Debian 13 root"
      : `no Debian 13 root at ${TRIXIE_ROOT} (run .ci/setup)`,
  });
  return out;
}

/** A tool is usable when it runs with `--version`. */
async function has(
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

async function versionOf(cmd: string, args = ["--version"]): Promise<string> {
  try {
    const r = await new Deno.Command(cmd, { args, stderr: "null" }).output();
    return new TextDecoder().decode(r.stdout).trim().split("\n")[0] ?? "?";
  } catch {
    return "not found";
  }
}

/**
 * nbdsh runs `python3 -m nbd` from PATH; where the first python3 on PATH
 * (a pyenv shim, say) lacks the module, put the system one first.
 */
async function nbdshEnv(dir: string): Promise<Record<string, string> | null> {
  const path = Deno.env.get("PATH") ?? "/usr/bin:/bin";
  const imports = async (python: string) => {
    try {
      const r = await new Deno.Command(python, {
        args: ["-c", "import nbd"],
        stdout: "null",
        stderr: "null",
      }).output();
      return r.success;
    } catch {
      return false;
    }
  };
  if (await imports("python3")) return { PATH: path };
  for (const python of ["/usr/bin/python3", "/usr/local/bin/python3"]) {
    if (await imports(python)) {
      const bin = `${dir}/bin`;
      await Deno.mkdir(bin, { recursive: true });
      await Deno.symlink(python, `${bin}/python3`);
      return { PATH: `${bin}:${path}` };
    }
  }
  return null;
}

/**
 * Runs a command and times it from spawn to exit, so the figure includes
 * the tool's start-up and handshake (a few milliseconds).
 *
 * This is the hook for the copy benchmark: {@linkcode benchCopies} times
 * `examples/copy.ts` and `nbdcopy` through it, and any other command-line
 * copy can be added the same way.
 *
 * @param argv The command and its arguments.
 * @param bytes Bytes the command moves, for the throughput.
 * @param requestSize The command's request size: `ops` counts requests of
 *   this size, so that IOPS compare with the in-process rows.
 * @param cwd Where to run it.
 * @returns The timing.
 * @throws {Error} when the command fails, with its stderr.
 */
export async function timeCommand(
  argv: string[],
  bytes: number,
  requestSize: number,
  cwd?: string,
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

interface NbdshJob {
  mode: "seq" | "rand";
  /** Write instead of read. */
  write?: boolean;
  request: number;
  depth: number;
  runs: number;
  seconds: number;
  size?: number;
  warmSize?: number;
  count?: number;
  warmCount?: number;
  offsetsFile?: string;
}

/**
 * Runs bench/_libnbd.py inside nbdsh; it warms up and times each run.
 * `script` is a copy of it where `lib`'s nbdsh can read it.
 */
async function runNbdsh(
  uri: string,
  lib: Libnbd,
  script: string,
  job: NbdshJob,
): Promise<Run[]> {
  const env = lib.nbdshEnv!;
  const vars: Record<string, string> = {
    ...env,
    NBD_BENCH_MODE: job.mode,
    NBD_BENCH_REQUEST: String(job.request),
    NBD_BENCH_QD: String(job.depth),
    NBD_BENCH_RUNS: String(job.runs),
    NBD_BENCH_SECONDS: String(job.seconds),
    NBD_BENCH_SIZE: String(job.size ?? 0),
    NBD_BENCH_WARM_SIZE: String(job.warmSize ?? 0),
    NBD_BENCH_COUNT: String(job.count ?? 0),
    NBD_BENCH_WRITE: job.write ? "1" : "0",
    NBD_BENCH_WARM_COUNT: String(job.warmCount ?? 0),
    NBD_BENCH_OFFSETS: lib.wrap([job.offsetsFile ?? ""]).at(-1)!,
  };
  const [cmd, ...args] = lib.wrap([
    "nbdsh",
    "-u",
    uri,
    "-c",
    `exec(open(${JSON.stringify(script)}).read())`,
  ]);
  const r = await new Deno.Command(cmd!, {
    args,
    env: vars,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(r.stdout).trim();
  if (!r.success) {
    throw new Error(
      `nbdsh failed (exit ${r.code}): ${
        new TextDecoder().decode(r.stderr).trim()
      }`,
    );
  }
  const last = text.split("\n").at(-1) ?? "";
  return (JSON.parse(last) as { runs: Run[] }).runs;
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

// ---------------------------------------------------------------------------
// The table.

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

interface Rates {
  mibs: number;
  iops: number;
  secs: number;
  /** Client CPU microseconds per request, when every run measured it. */
  cpuPerOp: number | undefined;
  /** Peak RSS in MiB of a command line, when every run measured it. */
  rss: number | undefined;
}

function rates(row: Row): Rates {
  const cpu = row.runs.every((r) => r.cpu !== undefined)
    ? median(row.runs.map((r) => r.cpu! / r.ops * 1e6))
    : undefined;
  return {
    mibs: median(row.runs.map((r) => r.bytes / MiB / r.seconds)),
    iops: median(row.runs.map((r) => r.ops / r.seconds)),
    secs: median(row.runs.map((r) => r.seconds)),
    cpuPerOp: cpu,
    rss: row.runs.every((r) => r.rss !== undefined)
      ? median(row.runs.map((r) => r.rss! / MiB))
      : undefined,
  };
}

function fmt(n: number, digits = 0): string {
  return n.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

/** The table, as Markdown: each section's first row of ours is the reference. */
export function formatTable(rows: Row[], runs: number): string {
  const head = [
    "test",
    "client",
    "MiB/s",
    "IOPS",
    "median s",
    "CPU us/req",
    "peak RSS MiB",
    "ref/this",
  ];
  const numeric = [false, false, true, true, true, true, true, true];
  const lines: string[][] = [];
  const notes: string[] = [];
  let section = "";
  let ref: Rates | undefined;
  for (const row of rows) {
    if (row.section !== section) {
      section = row.section;
      ref = undefined;
    }
    if (row.runs.length === 0) {
      lines.push([section, row.client, "-", "-", "-", "-", "-", "-"]);
      notes.push(`${row.client}: ${row.note ?? "skipped"}`);
      continue;
    }
    const r = rates(row);
    if (row.ours && !ref) ref = r;
    const ratio = ref === r
      ? "ref"
      : ref
      ? `${fmt(ref.mibs / r.mibs, 2)}x`
      : "";
    lines.push([
      section,
      row.client,
      fmt(r.mibs, 1),
      fmt(r.iops),
      fmt(r.secs, 3),
      r.cpuPerOp === undefined ? "-" : fmt(r.cpuPerOp, 1),
      r.rss === undefined ? "-" : fmt(r.rss, 1),
      ratio,
    ]);
  }
  const widths = head.map((h, i) =>
    Math.max(h.length, ...lines.map((l) => l[i]!.length))
  );
  const show = (cells: string[]) =>
    "| " +
    cells.map((x, i) =>
      numeric[i] ? x.padStart(widths[i]!) : x.padEnd(widths[i]!)
    ).join(" | ") + " |";
  const rule = "|" +
    widths.map((w, i) =>
      numeric[i] ? "-".repeat(w + 1) + ":" : "-".repeat(w + 2)
    )
      .join("|") +
    "|";
  return [
    show(head),
    rule,
    ...lines.map(show),
    "",
    `Median of ${runs} runs after one warm-up, clients taking turns. ` +
    '"ref/this": MiB/s of the section\'s "ref" row (our client) over ' +
    "this row's (above 1: ours is faster). CPU us/req: the client process's user + " +
    "system time per request (nbdkit's excluded); for command lines, the " +
    "whole process, start-up included, per 256 KiB of data. Command lines " +
    "(nbdcopy, deno run) are timed from spawn to exit; peak RSS: their " +
    "largest resident set (GNU time's %M). nbdcopy and examples/copy.ts " +
    "alike open at most one connection per thread, and one thread per " +
    "processor, whatever -C says (-T raises it).",
    ...notes.map((n) => `Skipped: ${n}`),
  ].join("\n");
}

/**
 * Both ratios per section: our reference row over the fastest row of each
 * libnbd version (the hardest comparison), e.g.
 * `seq read 2,048 MiB: 1.14 0.92x (nbdcopy 1.14 (defaults)), 1.22 …`.
 */
export function ratioSummary(rows: Row[], versions: string[]): string {
  const lines: string[] = [];
  const sections = [...new Set(rows.map((r) => r.section))];
  for (const section of sections) {
    const mine = rows.filter((r) => r.section === section && r.runs.length);
    const ref = mine.find((r) => r.ours);
    if (!ref) continue;
    const refRate = rates(ref).mibs;
    const parts: string[] = [];
    for (const v of versions) {
      const theirs = mine.filter((r) =>
        !r.ours && r.client.split(" ").includes(v)
      );
      if (theirs.length === 0) {
        parts.push(`${v} -`);
        continue;
      }
      const best = theirs.reduce((a, b) =>
        rates(a).mibs >= rates(b).mibs ? a : b
      );
      parts.push(
        `${v} ${fmt(refRate / rates(best).mibs, 2)}x (${best.client})`,
      );
    }
    lines.push(`${section}: ${parts.join(", ")}`);
  }
  return [
    "Ours over the fastest libnbd row of each version (above 1: ours is faster):",
    ...lines.map((l) => `- ${l}`),
  ].join("\n");
}

// ---------------------------------------------------------------------------
// The copy benchmark.

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
  libs: Libnbd[],
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

// ---------------------------------------------------------------------------

/** The size of the copy whose peak memory is shown. */
const RSS_SIZE = 4 * GiB;
/** Bytes read over TLS. */
const TLS_SIZE = GiB;

/**
 * Sequential read over TLS on TCP loopback (`nbds://`), ours against
 * nbdcopy with the same request size and depth: a throwaway PKI, the
 * server's certificate verified against its CA, no client certificate.
 * Ours runs twice: in this process with the CA given (`tls-certificates=`,
 * so `node:tls`, which trusts only that CA), and as a command line with
 * the CA made a system root (`DENO_CERT`), which takes `Deno.startTls`.
 */
async function benchTls(
  dir: string,
  c: Config,
  libs: Libnbd[],
  progress: (text: string) => void,
): Promise<Row[]> {
  const pki = await makeTestPki();
  const root = new URL("..", import.meta.url).pathname;
  try {
    // The client's CA where every libnbd install can read it.
    const ca = `${dir}/tls-client`;
    await Deno.mkdir(ca);
    await Deno.copyFile(
      `${pki.clientNoCertDir}/ca-cert.pem`,
      `${ca}/ca-cert.pem`,
    );
    const size = Math.min(TLS_SIZE, c.size);
    const server = await nbdkit([
      "--tls=require",
      `--tls-certificates=${pki.serverDir}`,
      `--threads=${c.threads}`,
      "pattern",
      `size=${size}`,
    ], { tcp: true });
    try {
      const uri = `nbds://127.0.0.1:${server.port}/?tls-certificates=${ca}`;
      const req = c.requestSize;
      const qd = c.seqDepth;
      const nbd = await connect(uri, { maxInFlight: 64 });
      try {
        const matched = [
          "nbdcopy",
          `--request-size=${req}`,
          `--requests=${qd}`,
          "--connections=1",
          uri,
          "null:",
        ];
        return await runSection(
          `seq read ${fmt(size / MiB)} MiB over TLS (TCP)`,
          [
            {
              client: `ours readInto() ${req / KiB}K x${qd}, node:tls ` +
                "(own CA)",
              ours: true,
              warm: () =>
                oursSequential(
                  nbd,
                  Math.min(size, 256 * MiB),
                  req,
                  qd,
                  60,
                  "full",
                ),
              once: () => oursSequential(nbd, size, req, qd, c.seconds, "one"),
            },
            {
              // The CA as a system root: the server verified against the
              // system's roots, so the client takes Deno.startTls.
              client: `deno run bench/_tls_read.ts ${req / KiB}K x${qd}, ` +
                "Deno.startTls",
              ours: true,
              once: () =>
                timeCommand(
                  [
                    "env",
                    `DENO_CERT=${ca}/ca-cert.pem`,
                    Deno.execPath(),
                    "run",
                    "-A",
                    "bench/_tls_read.ts",
                    `nbds://localhost:${server.port}/`,
                    String(size),
                    String(req),
                    String(qd),
                  ],
                  size,
                  req,
                  root,
                ),
            },
            ...libs.map((lib) => ({
              client: `nbdcopy ${lib.version} --request-size=${req} ` +
                `--requests=${qd} -C 1`,
              ours: false,
              ...(lib.nbdcopy ? {} : { skip: `nbdcopy ${lib.missing}` }),
              once: () => timeCommand(lib.wrap(matched), size, req),
            })),
          ],
          c.runs,
          progress,
        );
      } finally {
        await nbd.close();
      }
    } finally {
      await server.stop();
    }
  } finally {
    await pki.remove();
  }
}

/** The 1, 5 and 15 minute load averages, where /proc has them. */
async function loadAverage(): Promise<string> {
  try {
    const text = await Deno.readTextFile("/proc/loadavg");
    return text.split(" ").slice(0, 3).join(" ");
  } catch {
    return "unknown";
  }
}

async function main(): Promise<void> {
  const c = parseConfig(Deno.args);
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
  let versions: string[] = [];
  const progress = (text: string) =>
    console.error(
      `[${((performance.now() - started) / 1000).toFixed(1)}s] ${text}`,
    );
  let server: Server | undefined;
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

    server = await startServer(dir, c.size, c.threads);
    const s = server;
    const req = c.requestSize;
    const qd = c.seqDepth;
    const warmSize = Math.min(c.size, 256 * MiB);
    const nbdsh = (
      lib: Libnbd,
      job: Omit<NbdshJob, "runs">,
      uri = s.uri,
    ) => ({
      ...(lib.nbdshEnv ? {} : { skip: `nbdsh ${lib.missing}` }),
      warm: () =>
        runNbdsh(uri, lib, lib.wrap([script]).at(-1)!, { ...job, runs: 0 }),
      once: async () => {
        const [run] = await runNbdsh(uri, lib, lib.wrap([script]).at(-1)!, {
          ...job,
          runs: 1,
          warmSize: 0,
          warmCount: 0,
        });
        return run!;
      },
    });

    const offsets = randomOffsets(
      Math.max(c.qd1Count, c.qd64Count),
      c.size,
      c.seed,
    );
    const offsetsFile = `${dir}/offsets.u64le`;
    await writeOffsets(offsetsFile, offsets);

    const nbd = await connect({ path: s.path, maxInFlight: 64 });
    try {
      const matched = [
        "nbdcopy",
        `--request-size=${req}`,
        `--requests=${qd}`,
        "--connections=1",
        s.uri,
        "null:",
      ];
      const defaults = ["nbdcopy", s.uri, "null:"];
      rows.push(
        ...await runSection(
          `seq read ${fmt(c.size / MiB)} MiB`,
          [
            {
              client: `ours readInto() ${req / KiB}K x${qd}`,
              ours: true,
              warm: () =>
                oursSequential(nbd, warmSize, req, qd, c.seconds, "full"),
              once: () =>
                oursSequential(nbd, c.size, req, qd, c.seconds, "one"),
            },
            {
              client: `ours readable() BYOB ${req / KiB}K ahead ${qd}`,
              ours: true,
              warm: () => oursStream(nbd, warmSize, req, qd, c.seconds, "full"),
              once: () => oursStream(nbd, c.size, req, qd, c.seconds, "one"),
            },
            ...libs.flatMap((lib) => [
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
                ...nbdsh(lib, {
                  mode: "seq",
                  request: req,
                  depth: qd,
                  seconds: c.seconds,
                  size: c.size,
                  warmSize,
                }),
              },
            ]),
          ],
          c.runs,
          progress,
        ),
      );

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
          offsetsFile,
        } as const;
        rows.push(
          ...await runSection(
            `rand 4K QD${depth}, ${fmt(count)} reads`,
            [
              {
                client: depth === 1
                  ? "ours readInto(), await each"
                  : `ours readInto(), window of ${depth}`,
                ours: true,
                warm: () =>
                  oursRandom(nbd, offsets, warmCount, depth, c.seconds, "full"),
                once: () =>
                  oursRandom(nbd, offsets, count, depth, c.seconds, "one"),
              },
              ...libs.map((lib) => ({
                client: depth === 1
                  ? `nbdsh ${lib.version} h.pread loop`
                  : `nbdsh ${lib.version} h.aio_pread window of ${depth}`,
                ours: false,
                ...nbdsh(lib, job),
              })),
            ],
            c.runs,
            progress,
          ),
        );
      }
    } finally {
      await nbd.close();
    }

    // Writes: into `nbdkit memory`, the same server for every client.
    const mem = await startServer(dir, c.size, c.threads, "memory");
    try {
      const w = await connect({ path: mem.path, maxInFlight: 64 });
      try {
        const seqCount = c.size / req;
        rows.push(
          ...await runSection(
            `seq write ${fmt(c.size / MiB)} MiB into memory`,
            [
              {
                client: `ours write() ${req / KiB}K x${qd}`,
                ours: true,
                warm: () =>
                  oursWrite(w, (i) => i * req, warmSize / req, req, qd, 60),
                once: () =>
                  oursWrite(w, (i) => i * req, seqCount, req, qd, c.seconds),
              },
              ...libs.map((lib) => ({
                client: `nbdsh ${lib.version} aio_pwrite ${req / KiB}K x${qd}`,
                ours: false,
                ...nbdsh(lib, {
                  mode: "seq",
                  write: true,
                  request: req,
                  depth: qd,
                  seconds: c.seconds,
                  size: c.size,
                  warmSize,
                }, mem.uri),
              })),
            ],
            c.runs,
            progress,
          ),
        );
        const count = c.qd64Count;
        const warmCount = Math.min(count, Math.max(1000, count / 10));
        rows.push(
          ...await runSection(
            `rand 4K write QD64, ${fmt(count)} writes`,
            [
              {
                client: "ours write(), window of 64",
                ours: true,
                warm: () =>
                  oursWrite(
                    w,
                    (i) => offsets[i]!,
                    warmCount,
                    RANDOM_SIZE,
                    64,
                    60,
                  ),
                once: () =>
                  oursWrite(
                    w,
                    (i) => offsets[i]!,
                    count,
                    RANDOM_SIZE,
                    64,
                    c.seconds,
                  ),
              },
              ...libs.map((lib) => ({
                client: `nbdsh ${lib.version} h.aio_pwrite window of 64`,
                ours: false,
                ...nbdsh(lib, {
                  mode: "rand",
                  write: true,
                  request: RANDOM_SIZE,
                  depth: 64,
                  seconds: c.seconds,
                  count,
                  warmCount,
                  offsetsFile,
                }, mem.uri),
              })),
            ],
            c.runs,
            progress,
          ),
        );
      } finally {
        await w.close();
      }
    } finally {
      await mem.stop();
    }

    // Several connections per client, where they pay: a server that serves
    // one request at a time per connection, each taking a millisecond.
    const slow = await startServer(dir, c.size, c.threads, "pattern", [
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
        rows.push(
          ...await runSection(
            `rand 4K QD64 on a one-at-a-time server (1 ms each), ${
              fmt(count)
            } reads`,
            [
              ...clients.map((nbd) => ({
                client:
                  `ours readInto(), window of 64, ${nbd.connections} conn`,
                ours: true,
                warm: () =>
                  oursRandom(nbd, offsets, 256, 64, c.seconds, "full"),
                once: () =>
                  oursRandom(nbd, offsets, count, 64, c.seconds, "one"),
              })),
              ...libs.map((lib) => ({
                client: `nbdsh ${lib.version} h.aio_pread window of 64`,
                ours: false,
                ...nbdsh(lib, {
                  mode: "rand",
                  request: RANDOM_SIZE,
                  depth: 64,
                  seconds: c.seconds,
                  count,
                  warmCount: 256,
                  offsetsFile,
                }, slow.uri),
              })),
            ],
            c.runs,
            progress,
          ),
        );
      } finally {
        for (const nbd of clients) await nbd.close();
      }
    } finally {
      await slow.stop();
    }

    if (c.tls) rows.push(...await benchTls(dir, c, libs, progress));

    if (c.copy) {
      for (const conns of [1, 4]) {
        rows.push(
          ...await runSection(
            `copy ${fmt(c.size / MiB)} MiB to null:, ${conns} conn`,
            await copyContenders(s, c, conns, libs),
            c.runs,
            progress,
          ),
        );
      }
      // Memory stays flat whatever the size: 4 GiB, peak RSS beside nbdcopy's.
      const big = await startServer(dir, RSS_SIZE, c.threads);
      try {
        const cb = { ...c, size: RSS_SIZE };
        for (const conns of [1, undefined]) {
          rows.push(
            ...await runSection(
              `copy ${fmt(RSS_SIZE / MiB)} MiB to null:, ${
                conns ? `${conns} conn` : "defaults"
              } (RSS)`,
              await copyContenders(big, cb, conns, libs),
              c.runs,
              progress,
            ),
          );
        }
      } finally {
        await big.stop();
      }
    }
  } finally {
    await server?.stop();
    await Deno.remove(dir, { recursive: true });
  }
  console.log("");
  console.log(formatTable(rows, c.runs));
  console.log("");
  console.log(ratioSummary(rows, versions));
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
