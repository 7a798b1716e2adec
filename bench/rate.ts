/**
 * The backup options' costs. `copy --rate`: how close a 256 MiB copy comes
 * to the rate it was given, beside the nearest peer, nbdcopy reading
 * through nbdkit's rate filter (nbdcopy has no rate limit of its own; the
 * filter limits the server). Both copy `nbdkit pattern 256M` to `null:` at
 * the same target. `copy --blkhash`: a 1 GiB pattern hashed on its way to
 * `null:`, beside nbdcopy 1.24 (the Debian sid root) doing the same.
 *
 * ```sh
 * deno run -A bench/rate.ts              # 64 MiB/s
 * deno run -A bench/rate.ts --rate=32M
 * ```
 *
 * @module
 */

import { parseRate } from "../examples/copy/rate.ts";
import type { BenchRow } from "./_harness.ts";
import { formatBenchRows } from "./_table.ts";

const SIZE = 256 * 1024 * 1024;
const HASH_SIZE = 1024 * 1024 * 1024;
const SID_ROOT = (Deno.env.get("NBD_SID_ROOT") ??
  "/var/cache/nbd-deno/sid-root").replace(/\/+$/, "");
const MiB = 1024 * 1024;
const COPY = new URL("../examples/copy.ts", import.meta.url).pathname;

/** Starts nbdkit on a private socket; the caller stops it. */
async function startNbdkit(
  dir: string,
  args: string[],
): Promise<{ uri: string; stop: () => Promise<void> }> {
  const socket = `${dir}/nbdkit-${crypto.randomUUID().slice(0, 8)}.sock`;
  const child = new Deno.Command("nbdkit", {
    args: ["-f", "--exit-with-parent", "-U", socket, ...args],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      (await Deno.connect({ transport: "unix", path: socket })).close();
      break;
    } catch {
      if (Date.now() > deadline) {
        child.kill("SIGKILL");
        await child.status;
        throw new Error(`nbdkit ${args.join(" ")} did not start`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    stop: async () => {
      child.kill("SIGTERM");
      await child.status;
    },
  };
}

/** Runs a command to completion and returns the seconds it took. */
async function timed(cmd: string, args: string[]): Promise<number> {
  const started = performance.now();
  const out = await new Deno.Command(cmd, {
    args,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`,
    );
  }
  return (performance.now() - started) / 1000;
}

/**
 * `copy --blkhash` against nbdcopy 1.24's over the same 1 GiB pattern, the
 * server's socket under the sid root so its nbdcopy reaches it.
 */
async function blkhashRow(): Promise<BenchRow> {
  const dir = await Deno.makeTempDir({
    dir: `${SID_ROOT}/tmp`,
    prefix: "nbd-bench-",
  });
  try {
    const server = await startNbdkit(dir, ["pattern", String(HASH_SIZE)]);
    try {
      const ours = await timed(Deno.execPath(), [
        "run",
        "-A",
        "--quiet",
        COPY,
        "--blkhash",
        server.uri,
        "null:",
      ]);
      const peer = await timed("chroot", [
        SID_ROOT,
        "nbdcopy",
        "--blkhash",
        server.uri.replaceAll(`${SID_ROOT}/`, "/"),
        "null:",
      ]);
      return {
        name: "copy --blkhash (sha256/64k): 1 GiB pattern to null",
        unit: "MiB/s",
        higherIsBetter: true,
        ours: HASH_SIZE / ours / MiB,
        peer: HASH_SIZE / peer / MiB,
        peerName: "nbdcopy 1.24 --blkhash",
        note: "deno start-up included",
      };
    } finally {
      await server.stop();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * Measures both copies at `rate` bytes per second, and the blkhash copy.
 *
 * @param rate The target, bytes per second.
 * @returns Achieved over target, ours and the peer's, in percent; and
 * the blkhash copy's throughput.
 */
export async function rows(rate = 64 * MiB): Promise<BenchRow[]> {
  return [await rateRow(rate), await blkhashRow()];
}

/** The `--rate` row. */
async function rateRow(rate: number): Promise<BenchRow> {
  const dir = await Deno.makeTempDir({ prefix: "nbd-bench-rate-" });
  try {
    const plain = await startNbdkit(dir, ["pattern", String(SIZE)]);
    let ours: number;
    try {
      ours = await timed(Deno.execPath(), [
        "run",
        "-A",
        "--quiet",
        COPY,
        `--rate=${rate}`,
        plain.uri,
        "null:",
      ]);
    } finally {
      await plain.stop();
    }
    // nbdkit's rate filter counts bits per second.
    const limited = await startNbdkit(dir, [
      "--filter=rate",
      "pattern",
      String(SIZE),
      `rate=${rate * 8}`,
    ]);
    let peer: number;
    try {
      peer = await timed("nbdcopy", [limited.uri, "null:"]);
    } finally {
      await limited.stop();
    }
    const pct = (seconds: number) => 100 * (SIZE / seconds) / rate;
    return {
      name: `copy --rate=${
        (rate / MiB).toFixed(0)
      }M: 256 MiB pattern to null:, achieved/target`,
      unit: "%",
      // Closest to 100 is best; above it the limit leaks.
      higherIsBetter: false,
      ours: pct(ours),
      peer: pct(peer),
      // nbdkit 1.32's filter lets nbdcopy's connections past its limit;
      // the row shows the leak rather than hiding it.
      peerName: "nbdcopy via nbdkit --filter=rate",
      note: `ours ${(SIZE / ours / MiB).toFixed(1)} MiB/s in ${
        ours.toFixed(2)
      } s (deno start-up included), peer ${
        (SIZE / peer / MiB).toFixed(1)
      } MiB/s`,
    };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const arg = Deno.args.find((a) => a.startsWith("--rate="));
  const rate = arg ? parseRate(arg.slice("--rate=".length)) : 64 * MiB;
  console.log(formatBenchRows(await rows(rate)));
}
