/**
 * TLS rows: sequential read over `nbds://` on TCP loopback through the
 * GnuTLS engine (`tlsEngine: gnutls`), against nbdcopy 1.14 (the host's
 * libnbd) and 1.22 (the Debian 13 root's) in the same run, with the same
 * request size, depth and one connection. Two kinds of TLS:
 *
 * - own CA: a throwaway PKI, the server verified against its CA only (the
 *   case that used to take `node:tls`);
 * - TLS-PSK: `nbdkit --tls-psk`, a `username:hexkey` file.
 *
 * Ours reads in this process with `readInto()`; nbdcopy is timed as a whole
 * process to `null:`, its CPU from bash's `times`. CPU per request is the
 * client's own (user + system) time over the requests it made.
 *
 * The copy rows time `examples/copy.ts` (with `--allow-ffi`, so GnuTLS)
 * and `nbdcopy` to `null:` as whole processes, `-C 1` and `-C 4`, each
 * with its defaults otherwise.
 *
 * ```sh
 * deno run -A bench/gnutls.ts [SIZE_MIB] [RUNS] [--no-copy]
 * ```
 *
 * @module
 */

import { connect, type NbdClient } from "../mod.ts";
import { gnutls } from "../ffi/mod.ts";
import { makeTestPki } from "../tests/support/certs.ts";
import {
  type BenchRow,
  KiB,
  median,
  MiB,
  timeCommand as timeCommandRun,
  timedRequests,
} from "./_harness.ts";
import { nbdcopyMatched } from "./_peers.ts";
import { formatBenchRows } from "./_table.ts";
import {
  insideRoot,
  nbdkit,
  type Server,
  TRIXIE_ROOT,
} from "../tests/support/servers.ts";

const REQUEST = 256 * KiB;
const DEPTH = 16;
const PSK_KEY =
  "8f6a0c4b1e2d3c5a7b9e0f1d2c3b4a5968778695a4b3c2d1e0f9a8b7c6d5e4f3";

interface Run {
  seconds: number;
  /** CPU seconds the client spent. */
  cpu: number;
  requests: number;
}

/** A tool the benchmark compares with, or why it cannot run. */
interface Peer {
  name: string;
  wrap(argv: string[]): string[];
  usable: boolean;
}

/** Sequential `readInto()` of `size` bytes, `DEPTH` requests in flight. */
async function readAll(nbd: NbdClient, size: number): Promise<Run> {
  const run = await timedRequests(
    Math.ceil(size / REQUEST),
    DEPTH,
    REQUEST,
    Infinity,
    64,
    async (i, buf) => {
      await nbd.readInto(buf, i * REQUEST);
    },
  );
  return { seconds: run.seconds, cpu: run.cpu, requests: run.ops };
}

/** Runs a command to completion; wall time and its children's CPU time. */
async function timeCommand(argv: string[], size: number): Promise<Run> {
  const run = await timeCommandRun(
    argv,
    size,
    REQUEST,
    undefined,
    AbortSignal.timeout(600_000),
  );
  return { seconds: run.seconds, cpu: run.cpu ?? 0, requests: run.ops };
}

async function works(argv: string[]): Promise<boolean> {
  try {
    const [cmd, ...args] = argv;
    return (await new Deno.Command(cmd!, {
      args,
      stdout: "null",
      stderr: "null",
    }).output()).success;
  } catch {
    return false;
  }
}

async function versionOf(wrap: (argv: string[]) => string[]): Promise<string> {
  const [cmd, ...args] = wrap(["nbdcopy", "--version"]);
  try {
    const out = await new Deno.Command(cmd!, { args, stderr: "null" })
      .output();
    const line = new TextDecoder().decode(out.stdout);
    return /(\d+\.\d+)\.\d+/.exec(line)?.[1] ?? "?";
  } catch {
    return "?";
  }
}

/** The host's nbdcopy, and the Debian 13 root's when `dir` is inside it. */
async function peers(dir: string): Promise<Peer[]> {
  const host = (argv: string[]) => argv;
  const root = (argv: string[]) => [
    "chroot",
    TRIXIE_ROOT,
    ...argv.map(insideRoot),
  ];
  const rooted = dir.startsWith(`${TRIXIE_ROOT}/`);
  const out: Peer[] = [{
    name: `nbdcopy ${await versionOf(host)}`,
    wrap: host,
    usable: await works(["nbdcopy", "--version"]),
  }];
  if (rooted && await works(root(["nbdcopy", "--version"]))) {
    out.push({
      name: `nbdcopy ${await versionOf(root)}`,
      wrap: root,
      usable: true,
    });
  }
  return out;
}

function mbps(size: number, run: Run): number {
  return size / run.seconds / 1e6;
}

function usPerRequest(run: Run): number {
  return run.cpu / run.requests * 1e6;
}

interface Case {
  label: string;
  server: Server;
  /** The URI nbdcopy is given (paths as the host sees them). */
  uri: string;
  options: { tlsCertificates?: string; tlsPskFile?: string };
}

async function measure(
  c: Case,
  size: number,
  runs: number,
  tools: Peer[],
  log: (text: string) => void,
): Promise<BenchRow[]> {
  const target = {
    hostname: "127.0.0.1",
    port: c.server.port!,
    tls: "require" as const,
    tlsUsername: "alice",
    ...c.options,
  };
  let cipher = "?";
  const nbd = await connect(target, {
    tlsEngine: gnutls,
    maxInFlight: 64,
    debug: (event, fields) => {
      if (event === "tls.handshake") cipher = String(fields.cipher);
    },
  });
  const usable = tools.filter((t) => t.usable);
  const argv = (tool: Peer) => tool.wrap(nbdcopyMatched(c.uri, REQUEST, DEPTH));
  const ours: Run[] = [];
  const theirs: Run[][] = usable.map(() => []);
  try {
    await readAll(nbd, Math.min(size, 256 * MiB)); // warm up
    // Interleaved, so that a change in the machine's load hits every
    // client alike.
    for (let i = 0; i < runs; i++) {
      const run = await readAll(nbd, size);
      log(`${c.label} ours: ${mbps(size, run).toFixed(0)} MB/s`);
      ours.push(run);
      for (const [k, tool] of usable.entries()) {
        const peer = await timeCommand(argv(tool), size);
        log(`${c.label} ${tool.name}: ${mbps(size, peer).toFixed(0)} MB/s`);
        theirs[k]!.push(peer);
      }
    }
  } finally {
    await nbd.close();
  }
  const oursMbps = median(ours.map((r) => mbps(size, r)));
  const oursCpu = median(ours.map(usPerRequest));
  return usable.map((tool, k) => ({
    name: `${c.label}: sequential read ${size / MiB} MiB, ${
      REQUEST / KiB
    }K x${DEPTH}, one connection`,
    unit: "MB/s",
    higherIsBetter: true,
    ours: oursMbps,
    peer: median(theirs[k]!.map((r) => mbps(size, r))),
    peerName: tool.name,
    note: `CPU per request: ours ${oursCpu.toFixed(1)} us, ${tool.name} ${
      median(theirs[k]!.map(usPerRequest)).toFixed(1)
    } us; ours negotiated ${cipher}`,
  }));
}

/** This checkout's copy tool, run as nbdcopy is: a whole process. */
const COPY_TOOL = new URL("../examples/copy.ts", import.meta.url).pathname;

/**
 * `copy URI null:` against `nbdcopy URI null:`, both whole processes with
 * their defaults (64 requests of 256 KiB per connection) and `-C n`; ours
 * with `--allow-ffi`, so GnuTLS.
 */
async function measureCopy(
  c: Case,
  size: number,
  runs: number,
  tools: Peer[],
  connections: number,
  log: (text: string) => void,
): Promise<BenchRow[]> {
  const usable = tools.filter((t) => t.usable);
  const ours: Run[] = [];
  const theirs: Run[][] = usable.map(() => []);
  const oursArgv = [
    Deno.execPath(),
    "run",
    "--allow-net",
    "--allow-read",
    "--allow-write",
    "--allow-ffi",
    COPY_TOOL,
    `--connections=${connections}`,
    c.uri,
    "null:",
  ];
  for (let i = 0; i < runs; i++) {
    const run = await timeCommand(oursArgv, size);
    log(`${c.label} copy -C${connections}: ${mbps(size, run).toFixed(0)} MB/s`);
    ours.push(run);
    for (const [k, tool] of usable.entries()) {
      const argv = tool.wrap([
        "nbdcopy",
        `--connections=${connections}`,
        c.uri,
        "null:",
      ]);
      const peer = await timeCommand(argv, size);
      log(
        `${c.label} ${tool.name} -C${connections}: ${
          mbps(size, peer).toFixed(0)
        } MB/s`,
      );
      theirs[k]!.push(peer);
    }
  }
  const oursCpu = median(ours.map(usPerRequest));
  return usable.map((tool, k) => ({
    name: `${c.label}: copy ${size / MiB} MiB to null:, -C ${connections}, ` +
      "whole process",
    unit: "MB/s",
    higherIsBetter: true,
    ours: median(ours.map((r) => mbps(size, r))),
    peer: median(theirs[k]!.map((r) => mbps(size, r))),
    peerName: tool.name,
    note: `CPU per 256 KiB: ours ${oursCpu.toFixed(1)} us, ${tool.name} ${
      median(theirs[k]!.map(usPerRequest)).toFixed(1)
    } us`,
  }));
}

/**
 * Measures the TLS rows: own CA and TLS-PSK, each against every nbdcopy
 * found.
 *
 * @param size Bytes read per run (1 GiB by default).
 * @param runs Runs per client; the median is reported.
 * @param log Progress lines.
 * @param copies Also time `copy` against `nbdcopy`, `-C 1` and `-C 4`.
 * @returns One row per kind of TLS and peer.
 */
export async function rows(
  size = 1024 * MiB,
  runs = 3,
  log: (text: string) => void = () => {},
  copies = true,
): Promise<BenchRow[]> {
  // Under the Debian 13 root when there is one, so its nbdcopy reads the
  // CA and the key file too.
  const rooted = await Deno.stat(`${TRIXIE_ROOT}/tmp`).then(
    (st) => st.isDirectory,
    () => false,
  );
  const dir = await Deno.makeTempDir({
    prefix: "nbd-bench-tls-",
    ...(rooted ? { dir: `${TRIXIE_ROOT}/tmp` } : {}),
  });
  await using pki = await makeTestPki();
  const servers: Server[] = [];
  try {
    const ca = `${dir}/ca`;
    await Deno.mkdir(ca);
    await Deno.copyFile(
      `${pki.clientNoCertDir}/ca-cert.pem`,
      `${ca}/ca-cert.pem`,
    );
    const keys = `${dir}/keys.psk`;
    await Deno.writeTextFile(keys, `alice:${PSK_KEY}\n`);
    const start = async (args: string[]) => {
      const s = await nbdkit(
        [...args, "--threads=16", "pattern", `size=${size}`],
        { tcp: true },
      );
      servers.push(s);
      return s;
    };
    const x509 = await start([
      "--tls=require",
      `--tls-certificates=${pki.serverDir}`,
    ]);
    const psk = await start(["--tls=require", `--tls-psk=${keys}`]);
    const tools = await peers(dir);
    const cases: Case[] = [
      {
        label: "TLS own CA (GnuTLS engine)",
        server: x509,
        uri: `nbds://127.0.0.1:${x509.port}/?tls-certificates=${ca}`,
        options: { tlsCertificates: ca },
      },
      {
        label: "TLS-PSK (GnuTLS engine)",
        server: psk,
        // libnbd 1.14 takes the PSK user from the URI's user part only.
        uri: `nbds://alice@127.0.0.1:${psk.port}/?tls-psk-file=${keys}`,
        options: { tlsPskFile: keys },
      },
    ];
    const out: BenchRow[] = [];
    for (const c of cases) {
      out.push(...await measure(c, size, runs, tools, log));
      if (copies) {
        for (const n of [1, 4]) {
          out.push(...await measureCopy(c, size, runs, tools, n, log));
        }
      }
    }
    return out;
  } finally {
    await Promise.all(servers.map((s) => s.stop()));
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const [sizeArg, runsArg] = Deno.args.filter((a) => !a.startsWith("--"));
  const size = Number(sizeArg ?? 1024) * MiB;
  const runs = Number(runsArg ?? 3);
  const table = await rows(
    size,
    runs,
    (t) => console.error(t),
    !Deno.args.includes("--no-copy"),
  );
  console.log(formatBenchRows(table));
}
