/**
 * The floor under queue depth 1: the cheapest request/reply loop Deno can
 * run over a Unix socket, with none of the library in it, beside the
 * library's own `readInto()` loop on the same server and offsets. The raw
 * loop speaks just enough NBD by hand (fixed newstyle,
 * `NBD_OPT_EXPORT_NAME`, simple replies) to send 4 KiB reads one at a
 * time to `nbdkit pattern`: one `conn.write()` and as few `conn.read()`
 * calls as the data needs per request. The two take turns for `--rounds`
 * rounds (the machine's load drifts) and the medians are printed: what
 * the library spends above the raw loop is its own; the raw loop's cost
 * is Deno's op and event-loop cost (and the kernel's), which no library
 * code can cut.
 *
 * ```sh
 * deno run -A bench/floor.ts                     # 7 rounds of 10000 reads
 * deno run -A bench/floor.ts --count=N --rounds=N
 * ```
 *
 * Every raw reply is checked (magic, error, cookie) and one word of every
 * request's data against the pattern, on both sides.
 *
 * @module
 */

import { cpuUsage } from "node:process";
import { connect, type NbdClient } from "../mod.ts";
import { randomOffsets, startServer } from "./_harness.ts";

const SIZE = 1024 * 1024 * 1024;
const READ = 4096;

async function readFull(conn: Deno.Conn, buf: Uint8Array): Promise<number> {
  let got = 0;
  let ops = 0;
  while (got < buf.length) {
    const n = await conn.read(buf.subarray(got));
    ops++;
    if (n === null) throw new Error(`EOF after ${got} of ${buf.length} bytes`);
    got += n;
  }
  return ops;
}

/** Fixed newstyle by hand: flags, then NBD_OPT_EXPORT_NAME "". */
async function handshake(conn: Deno.Conn): Promise<void> {
  const greeting = new Uint8Array(8 + 8 + 2);
  await readFull(conn, greeting);
  const g = new DataView(greeting.buffer);
  if (g.getBigUint64(8) !== 0x49484156454f5054n) {
    throw new Error("Not a newstyle server");
  }
  const noZeroes = (g.getUint16(16) & 2) !== 0;
  // Client flags FIXED_NEWSTYLE (and NO_ZEROES where offered), then the
  // option: magic, NBD_OPT_EXPORT_NAME, an empty name.
  const out = new Uint8Array(4 + 8 + 4 + 4);
  const o = new DataView(out.buffer);
  o.setUint32(0, 1 | (noZeroes ? 2 : 0));
  o.setBigUint64(4, 0x49484156454f5054n);
  o.setUint32(12, 1);
  o.setUint32(16, 0);
  await conn.write(out);
  // Export size, transmission flags, and the zeroes unless NO_ZEROES.
  await readFull(conn, new Uint8Array(8 + 2 + (noZeroes ? 0 : 124)));
}

interface Cost {
  cpu: number;
  wall: number;
  reads: number;
}

/** `count` reads at `offsets[from...]` by hand. */
async function rawLoop(
  conn: Deno.Conn,
  offsets: number[],
  count: number,
): Promise<Cost> {
  const req = new Uint8Array(4 + 2 + 2 + 8 + 8 + 4);
  const r = new DataView(req.buffer);
  r.setUint32(0, 0x25609513); // request magic; flags 0, NBD_CMD_READ 0
  r.setUint32(24, READ);
  const reply = new Uint8Array(4 + 4 + 8 + READ);
  const v = new DataView(reply.buffer);
  let reads = 0;
  const t0 = performance.now();
  const c0 = cpuUsage();
  for (let i = 0; i < count; i++) {
    const at = offsets[i]!;
    r.setUint32(12, i); // cookie
    r.setUint32(16, Math.floor(at / 2 ** 32));
    r.setUint32(20, at >>> 0);
    // Not awaited before the read, as the library does not.
    const sent = conn.write(req);
    reads += await readFull(conn, reply);
    await sent;
    if (
      v.getUint32(0) !== 0x67446698 || v.getUint32(4) !== 0 ||
      v.getUint32(12) !== i || v.getUint32(16 + 4) !== (at >>> 0)
    ) {
      throw new Error(`Bad reply to the read at ${at}`);
    }
  }
  const c = cpuUsage(c0);
  return {
    cpu: (c.user + c.system) / count,
    wall: (performance.now() - t0) * 1000 / count,
    reads: reads / count,
  };
}

/** The same reads through the library. */
async function libLoop(
  nbd: NbdClient,
  offsets: number[],
  count: number,
): Promise<Cost> {
  const buf = new Uint8Array(READ);
  const v = new DataView(buf.buffer);
  const t0 = performance.now();
  const c0 = cpuUsage();
  for (let i = 0; i < count; i++) {
    const at = offsets[i]!;
    await nbd.readInto(buf, at);
    if (v.getUint32(4) !== (at >>> 0)) throw new Error(`Bad data at ${at}`);
  }
  const c = cpuUsage(c0);
  return {
    cpu: (c.user + c.system) / count,
    wall: (performance.now() - t0) * 1000 / count,
    reads: NaN,
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

async function main(): Promise<void> {
  const arg = (name: string, fallback: number) => {
    const a = Deno.args.find((x) => x.startsWith(`--${name}=`));
    return a ? Number(a.slice(name.length + 3)) : fallback;
  };
  const count = arg("count", 10_000);
  const rounds = arg("rounds", 7);
  const dir = await Deno.makeTempDir({ prefix: "nbd-floor-" });
  const server = await startServer(dir, SIZE, 16);
  try {
    const offsets = randomOffsets(count, SIZE, 1);
    const conn = await Deno.connect({ transport: "unix", path: server.path });
    // Simple replies, as the raw loop gets: the server's side of each
    // reply is then the same too.
    const nbd = await connect({ path: server.path, structuredReplies: false });
    try {
      await handshake(conn);
      const raw: Cost[] = [];
      const lib: Cost[] = [];
      // Warm both up, then take turns.
      await rawLoop(conn, offsets, Math.min(count, 2000));
      await libLoop(nbd, offsets, Math.min(count, 2000));
      for (let i = 0; i < rounds; i++) {
        raw.push(await rawLoop(conn, offsets, count));
        lib.push(await libLoop(nbd, offsets, count));
      }
      const show = (what: string, xs: Cost[]) =>
        console.log(
          `${what}: ${median(xs.map((x) => x.cpu)).toFixed(1)} us CPU, ${
            median(xs.map((x) => x.wall)).toFixed(1)
          } us wall per request`,
        );
      show("raw Deno loop       ", raw);
      show("library readInto()  ", lib);
      console.log(
        `library over raw: ${
          median(lib.map((x, i) => x.cpu / raw[i]!.cpu)).toFixed(2)
        }x CPU, ${
          median(lib.map((x, i) => x.wall / raw[i]!.wall)).toFixed(2)
        }x wall (median of the rounds' ratios); raw reads per request ${
          median(raw.map((x) => x.reads)).toFixed(2)
        }`,
      );
    } finally {
      conn.close();
      await nbd.close();
    }
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) await main();
