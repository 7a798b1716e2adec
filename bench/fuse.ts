/**
 * Benchmark rows for `examples/fuse.ts` beside libnbd's `nbdfuse` 1.14 (the
 * host's) and 1.22 (the Debian 13 root's, run with `chroot`), all on the
 * same 1 GiB `nbdkit --filter=cow pattern` export in the same run:
 * sequential read (buffered and O_DIRECT, `dd bs=1M`, caches dropped),
 * sequential write (`dd bs=1M conv=fsync`) and 4 KiB random reads
 * through a loop device. Needs root (mount, losetup, drop_caches).
 *
 * ```sh
 * deno run -A bench/fuse.ts
 * ```
 *
 * @module
 */

import { nbdkit, type Server, TRIXIE_ROOT } from "../tests/support/servers.ts";
import { until, within } from "../tests/support/wait.ts";
import type { BenchRow } from "./_harness.ts";
import { formatBenchRows } from "./_table.ts";

const GIB = 1 << 30;
const TOOL = new URL("../examples/fuse.ts", import.meta.url).pathname;
const decoder = new TextDecoder();
/** Each figure is the best of this many runs (the machine is shared). */
const TRIES = 3;
/** Random reads per run, and the most time they may take. */
const RANDOM_READS = 4000;
const RANDOM_SECONDS = 20;

async function sh(
  program: string,
  args: string[],
  ms = 120_000,
): Promise<string> {
  const out = await new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(ms),
  }).output();
  const err = decoder.decode(out.stderr);
  if (!out.success) {
    throw new Error(`${program} ${args.join(" ")} failed: ${err.trim()}`);
  }
  return decoder.decode(out.stdout) + err;
}

async function dropCaches(): Promise<void> {
  await sh("sync", []);
  await Deno.writeTextFile("/proc/sys/vm/drop_caches", "3\n");
}

/** MB/s from dd's own report ("N bytes ... copied, S s, ..."). */
async function dd(args: string[]): Promise<number> {
  const text = await sh("dd", args);
  const m = /(\d+) bytes .* copied, ([\d.e+-]+) s/.exec(text);
  if (!m) throw new Error(`dd said: ${text}`);
  return Number(m[1]) / Number(m[2]) / 1e6;
}

/** 4 KiB O_DIRECT reads at seeded random offsets, one at a time: IOPS. */
const RANDOM_READER = `
import mmap, os, random, sys, time
path, n, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buf = mmap.mmap(-1, 4096)
rng = random.Random(19)
start = time.monotonic()
done = 0
while done < n and time.monotonic() - start < limit:
    os.preadv(fd, [buf], rng.randrange(size // 4096) * 4096)
    done += 1
print(done / (time.monotonic() - start))
`;

async function randomReads(device: string): Promise<number> {
  const out = await sh("python3", [
    "-c",
    RANDOM_READER,
    device,
    String(RANDOM_READS),
    String(RANDOM_SECONDS),
  ]);
  return Number(out.trim());
}

/** A FUSE server under test. */
interface Contender {
  name: string;
  /** Where the file appears. */
  mnt: string;
  /** Starts it serving the export at `socket` (a host path). */
  start(socket: string): Deno.ChildProcess;
}

interface Figures {
  seqBuffered: number;
  seqDirect: number;
  seqWrite: number;
  random: number;
}

/** A contender, mounted. */
interface Mounted {
  c: Contender;
  child: Deno.ChildProcess;
  file: string;
  loop?: string;
}

async function mount(c: Contender, socket: string): Promise<Mounted> {
  await Deno.mkdir(c.mnt, { recursive: true });
  const m: Mounted = { c, child: c.start(socket), file: `${c.mnt}/nbd` };
  await until(`${c.name} to serve ${m.file}`, () => {
    try {
      return Deno.statSync(m.file).size === GIB;
    } catch {
      return false;
    }
  }, 30_000);
  m.loop = (await sh("losetup", ["-f", "--show", "--direct-io=on", m.file]))
    .trim();
  return m;
}

async function unmount(m: Mounted): Promise<void> {
  if (m.loop) await sh("losetup", ["-d", m.loop]).catch(() => {});
  await sh("fusermount3", ["-u", m.c.mnt]).catch(() => {});
  const exited = await within(20_000, `${m.c.name} to exit`, m.child.status)
    .then(() => true, () => false);
  if (!exited) {
    m.child.kill("SIGKILL");
    await m.child.status;
    await sh("umount", ["-l", m.c.mnt]).catch(() => {});
  }
}

const WORKLOADS: Record<keyof Figures, (m: Mounted) => Promise<number>> = {
  seqBuffered: async (m) => {
    await dropCaches();
    return await dd([`if=${m.file}`, "of=/dev/null", "bs=1M"]);
  },
  seqDirect: async (m) => {
    await dropCaches();
    return await dd([`if=${m.file}`, "of=/dev/null", "bs=1M", "iflag=direct"]);
  },
  seqWrite: (m) =>
    dd([
      "if=/dev/zero",
      `of=${m.file}`,
      "bs=1M",
      "count=512",
      "conv=notrunc,fsync",
    ]),
  random: (m) => randomReads(m.loop!),
};

/**
 * Every contender is mounted at once and each workload runs on them in
 * turn, `TRIES` rounds, keeping each one's best: load from elsewhere on a
 * shared machine then falls on all of them alike.
 */
async function measureAll(
  contenders: Contender[],
  socket: string,
): Promise<Figures[]> {
  const mounted: Mounted[] = [];
  try {
    for (const c of contenders) mounted.push(await mount(c, socket));
    const figures = contenders.map(() => ({
      seqBuffered: 0,
      seqDirect: 0,
      seqWrite: 0,
      random: 0,
    }));
    for (const key of Object.keys(WORKLOADS) as Array<keyof Figures>) {
      for (let i = 0; i < TRIES; i++) {
        for (const [j, m] of mounted.entries()) {
          const f = figures[j]!;
          f[key] = Math.max(f[key], await WORKLOADS[key](m));
        }
      }
    }
    return figures;
  } finally {
    for (const m of mounted) await unmount(m);
  }
}

function spawn(program: string, args: string[]): Deno.ChildProcess {
  return new Deno.Command(program, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
}

/** Makes `/dev/fuse` inside the Debian 13 root, for its nbdfuse. */
async function fuseInRoot(): Promise<void> {
  try {
    await Deno.stat(`${TRIXIE_ROOT}/dev/fuse`);
  } catch {
    await sh("mknod", [
      "-m",
      "666",
      `${TRIXIE_ROOT}/dev/fuse`,
      "c",
      "10",
      "229",
    ]);
  }
}

/** Runs every workload on ours and both nbdfuses; one row per peer. */
export async function rows(): Promise<BenchRow[]> {
  await fuseInRoot();
  const server: Server = await nbdkit(
    ["--filter=cow", "pattern", "1G"],
    { reach: "trixie" },
  );
  const inRoot = (p: string) => p.replace(`${TRIXIE_ROOT}/`, "/");
  try {
    const socket = server.socket!;
    const base = server.dir;
    const uri = (s: string) => `nbd+unix:///?socket=${s}`;
    const ours: Contender = {
      name: "fuse.ts",
      mnt: `${base}/ours`,
      start: (s) =>
        spawn(Deno.execPath(), [
          "run",
          "-A",
          "--quiet",
          TOOL,
          `${base}/ours`,
          uri(s),
        ]),
    };
    const peers: Contender[] = [
      {
        name: "nbdfuse 1.14",
        mnt: `${base}/n114`,
        start: (s) => spawn("nbdfuse", [`${base}/n114`, uri(s)]),
      },
      {
        name: "nbdfuse 1.22",
        mnt: `${base}/n122`,
        start: (s) =>
          spawn("chroot", [
            TRIXIE_ROOT,
            "nbdfuse",
            inRoot(`${base}/n122`),
            uri(inRoot(s)),
          ]),
      },
    ];
    const [mine, ...others] = await measureAll([ours, ...peers], socket);
    const out: BenchRow[] = [];
    for (const [i, p] of peers.entries()) {
      const theirs = others[i]!;
      const row = (
        name: string,
        unit: string,
        key: keyof Figures,
      ): BenchRow => ({
        name: `fuse: ${name}`,
        unit,
        higherIsBetter: true,
        ours: Math.round(mine![key]),
        peer: Math.round(theirs[key]),
        peerName: p.name,
      });
      out.push(
        row(
          "sequential read 1 GiB, buffered (dd bs=1M)",
          "MB/s",
          "seqBuffered",
        ),
        row("sequential read 1 GiB, O_DIRECT (dd bs=1M)", "MB/s", "seqDirect"),
        row(
          "sequential write 512 MiB (dd bs=1M conv=fsync)",
          "MB/s",
          "seqWrite",
        ),
        row("4 KiB random reads through a loop device, QD1", "IOPS", "random"),
      );
    }
    return out;
  } finally {
    await server.stop();
  }
}

if (import.meta.main) console.log(formatBenchRows(await rows()));
