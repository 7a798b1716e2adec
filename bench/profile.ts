/**
 * Runs one of the benchmark's workloads of our client alone, long enough
 * to profile, and with `--summary` prints where a V8 CPU profile spent its
 * time.
 *
 * ```sh
 * deno run -A --cpu-prof --cpu-prof-dir=/tmp/nbd-prof bench/profile.ts qd1
 * deno run -A bench/profile.ts --summary /tmp/nbd-prof/*.cpuprofile
 * ```
 *
 * Workloads: `seq` (readInto, 256 KiB x16), `stream` (readable() with a
 * BYOB reader), `qd1` and `qd64` (random 4 KiB reads) against `nbdkit
 * pattern`; `write` (256 KiB x16) and `wqd64` (random 4 KiB writes)
 * against `nbdkit memory`. `--size=N` in bytes (1 GiB), `--count=N`
 * (50000), `--socket=PATH` to use a running server of that size (and
 * plugin) instead of starting one (so that `strace -f` sees the client
 * alone).
 *
 * @module
 */

import { cpuUsage } from "node:process";
import { connect } from "../mod.ts";
import { randomOffsets, type Run, startServer } from "./_harness.ts";
import { oursRandom } from "./random_read.ts";
import { oursSequential, oursStream } from "./seq_read.ts";
import { oursWrite } from "./write.ts";

/** A node of a `.cpuprofile` (Chrome DevTools format). */
interface ProfileNode {
  id: number;
  callFrame: {
    functionName: string;
    url: string;
    lineNumber: number;
  };
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

/** Self time by function and by file, largest first. */
async function summary(files: string[], top = 30): Promise<void> {
  for (const file of files) {
    const p = JSON.parse(await Deno.readTextFile(file)) as CpuProfile;
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    const self = new Map<number, number>();
    p.samples.forEach((id, i) => {
      self.set(id, (self.get(id) ?? 0) + (p.timeDeltas[i] ?? 0));
    });
    let total = 0;
    const byFn = new Map<string, number>();
    const byFile = new Map<string, number>();
    for (const [id, us] of self) {
      const f = byId.get(id)!.callFrame;
      total += us;
      const where = f.url ? f.url.replace(/^.*\/(lib|bench|ext)\//, "$1/") : "";
      const fn = `${f.functionName || "(anonymous)"} ${where}:${
        f.lineNumber + 1
      }`;
      byFn.set(fn, (byFn.get(fn) ?? 0) + us);
      const key = where || f.functionName;
      byFile.set(key, (byFile.get(key) ?? 0) + us);
    }
    const show = (title: string, m: Map<string, number>) => {
      console.log(`\n${title}`);
      for (const [k, us] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top)) {
        const pct = (100 * us / total).toFixed(1).padStart(5);
        console.log(`${pct}%  ${(us / 1000).toFixed(0).padStart(6)} ms  ${k}`);
      }
    };
    console.log(`${file}: ${(total / 1000).toFixed(0)} ms sampled`);
    show("Self time by function:", byFn);
    show("Self time by file:", byFile);
  }
}

async function main(): Promise<void> {
  const args = Deno.args;
  if (args[0] === "--summary") return await summary(args.slice(1));
  const workload = args.find((a) => !a.startsWith("-")) ?? "qd1";
  const flag = (name: string, fallback: number) => {
    const a = args.find((x) => x.startsWith(`--${name}=`));
    return a ? Number(a.split("=")[1]) : fallback;
  };
  const size = flag("size", 1024 * 1024 * 1024);
  const count = flag("count", 50_000);
  // --socket=PATH uses a server started by hand (to strace the client alone).
  const given = args.find((x) => x.startsWith("--socket="))?.slice(9);
  const dir = await Deno.makeTempDir({ prefix: "nbd-prof-" });
  const server = given
    ? { path: given, stop: () => Promise.resolve() }
    : await startServer(
      dir,
      size,
      16,
      workload === "write" || workload === "wqd64" ? "memory" : "pattern",
    );
  try {
    const nbd = await connect({ path: server.path, maxInFlight: 64 });
    try {
      const offsets = randomOffsets(count, size, 1);
      let run: Run;
      const cpu0 = cpuUsage();
      switch (workload) {
        case "seq":
          run = await oursSequential(nbd, size, 256 * 1024, 16, 60, "one");
          break;
        case "stream":
          run = await oursStream(nbd, size, 256 * 1024, 16, 60, "one");
          break;
        case "qd1":
          run = await oursRandom(nbd, offsets, count, 1, 60, "one");
          break;
        case "qd64":
          run = await oursRandom(nbd, offsets, count, 64, 60, "one");
          break;
        case "write":
          run = await oursWrite(
            nbd,
            (i) => i * 256 * 1024,
            size / (256 * 1024),
            256 * 1024,
            16,
            60,
          );
          break;
        case "wqd64":
          run = await oursWrite(nbd, (i) => offsets[i]!, count, 4096, 64, 60);
          break;
        default:
          throw new TypeError(`Unknown workload ${workload}`);
      }
      // CPU time per request moves less than wall time on a busy machine.
      const cpu = cpuUsage(cpu0);
      console.log(
        `${workload}: ${run.ops} requests, ${
          (run.bytes / 1048576 / run.seconds).toFixed(1)
        } MiB/s, ${(run.ops / run.seconds).toFixed(0)} IOPS, CPU per request ${
          (cpu.user / run.ops).toFixed(1)
        } us user + ${(cpu.system / run.ops).toFixed(1)} us system${
          // The write workloads read every request back after the timing.
          workload === "write" || workload === "wqd64"
            ? ` with the read-back, ${
              ((run.cpu ?? 0) * 1e6 / run.ops).toFixed(1)
            } us without`
            : ""}`,
      );
    } finally {
      await nbd.close();
    }
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  await main();
}
