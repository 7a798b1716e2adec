/**
 * Real NBD servers for the interop suite, the tools' tests and the stream
 * tests: nbdkit, qemu-nbd and nbd-server, each started by the test on a
 * private Unix socket (or a loopback port) in a fresh temporary directory,
 * and stopped in `finally`.
 *
 * Two sets of peers: the host's (Debian 12: nbdkit 1.32, qemu 7.2, libnbd
 * 1.14) and those of the Debian 13 root that `.ci/setup` makes (nbdkit
 * 1.42, qemu 10.0, libnbd 1.22), run with `chroot`. A server or tool from
 * the root works in a directory under the root, which the host reaches at
 * `${TRIXIE_ROOT}/…` and the root at `/…`: paths in its arguments are
 * translated, so callers pass host paths and host-path URIs throughout.
 *
 * Readiness is polled (until a connect succeeds), never slept for; every
 * wait has a deadline; a server that dies early fails the test with its
 * own stderr. Each server's stderr goes to a log file in its
 * directory rather than a pipe: nbd-server forks a child per client, and a
 * child holding a pipe open would keep the test waiting.
 *
 * @module
 */

import type { ConnectOptions } from "../../mod.ts";
import { until } from "./wait.ts";

/**
 * Where the Debian 13 root is (`.ci/setup` makes it there);
 * `NBD_TRIXIE_ROOT` moves it.
 */
export const TRIXIE_ROOT: string = (Deno.env.get("NBD_TRIXIE_ROOT") ??
  "/var/cache/nbd-deno/trixie-root").replace(/\/+$/, "");

/** Whose programs: the host's (Debian 12) or the Debian 13 root's. */
export type Peers = "host" | "trixie";

/** For names and messages: `"Debian 13"`. */
export function peersName(peers: Peers): string {
  return peers === "host" ? "Debian 12" : "Debian 13";
}

/**
 * Translates host paths under the root into the root's own view; anything
 * else is left alone (and is out of the chroot'd program's reach).
 */
export function insideRoot(arg: string): string {
  return arg.replaceAll(`${TRIXIE_ROOT}/`, "/");
}

/** The root must be there: a test never skips for want of it. */
function needRoot(): void {
  try {
    Deno.statSync(`${TRIXIE_ROOT}/.nbd-deno-root`);
  } catch {
    throw new Error(
      `The Debian 13 root is missing at ${TRIXIE_ROOT}: run "bash .ci/setup" ` +
        "as root (tests/run.sh does)",
    );
  }
}

/** The command line that runs `program` from `peers`. */
function command(
  program: string,
  args: string[],
  peers: Peers,
): [string, string[]] {
  if (peers === "host") return [program, args];
  needRoot();
  return ["chroot", [TRIXIE_ROOT, program, ...args.map(insideRoot)]];
}

/** How long a server may take to start or to stop. */
const START_DEADLINE_MS = 10_000;
const STOP_DEADLINE_MS = 5_000;
const POLL_MS = 10;

/** A running server; stop it in `finally`. */
export interface Server {
  /** For messages: `"nbdkit memory"`. */
  readonly program: string;
  /** Whose program it is. */
  readonly peers: Peers;
  /** The server's private directory (socket, images, config, log). */
  readonly dir: string;
  /** The Unix socket, when the server listens on one. */
  readonly socket: string | undefined;
  /** The loopback port, when the server listens on TCP. */
  readonly port: number | undefined;
  /** The process id. */
  readonly pid: number;
  /** Where `connect()` should go for `exportName`. */
  target(exportName?: string): ConnectOptions;
  /** An NBD URI for `exportName`, for the reference tools. */
  uri(exportName?: string): string;
  /** Sends a signal to the server process. */
  kill(signal: Deno.Signal): void;
  /** Waits for the process to exit, at most `ms`; true if it did. */
  waitForExit(ms: number): Promise<boolean>;
  /** What the server wrote to stderr so far. */
  log(): Promise<string>;
  /** Stops the server (SIGTERM, then SIGKILL) and removes its directory. */
  stop(): Promise<void>;
}

/**
 * A fresh private directory for one server. For `"trixie"` it is under the
 * root's `/tmp`, where both the host and the root's programs reach it.
 */
export function tempDir(peers: Peers = "host"): Promise<string> {
  if (peers === "host") return Deno.makeTempDir({ prefix: "nbd-test-" });
  needRoot();
  return Deno.makeTempDir({ dir: `${TRIXIE_ROOT}/tmp`, prefix: "nbd-test-" });
}

/**
 * A loopback port nobody listens on: bind port 0, note the port, close.
 * Another process could take it before the server does; the server then
 * fails to start and says so, which is better than a silent collision.
 */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Resolves after `ms`; only ever one step of a bounded poll. */
function tick(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function isSocket(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isSocket === true;
  } catch {
    return false;
  }
}

/**
 * Whether something accepts connections there. The socket file appears at
 * bind(), a moment before listen(): a connect in between is refused, so
 * the file alone does not say the server is ready.
 */
export async function accepts(
  where: { path: string } | { port: number },
): Promise<boolean> {
  try {
    const c = "path" in where
      ? await Deno.connect({ transport: "unix", path: where.path })
      : await Deno.connect({ hostname: "127.0.0.1", port: where.port });
    c.close();
    return true;
  } catch {
    return false;
  }
}

/** What to start and where it will listen. */
interface Spawn {
  program: string;
  peers: Peers;
  args: string[];
  dir: string;
  /** Remove `dir` on stop (true when the helper made it). */
  ownDir: boolean;
  socket?: string;
  port?: number;
  label: string;
  /**
   * The server daemonizes and writes its pid here (nbd-server: its `-d`
   * serves a single connection and then exits, so it must fork per client).
   */
  pidFile?: string;
}

/** Whether a process is gone: no `/proc` entry, or a zombie nobody reaps. */
async function processGone(pid: number): Promise<boolean> {
  try {
    const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
    return /^\d+ \(.*\) Z/.test(stat);
  } catch {
    return true;
  }
}

/** The running process, however it was started. */
export interface Proc {
  pid: number;
  kill(signal: Deno.Signal): void;
  /** Whether it has exited; never waits. */
  gone(): Promise<boolean>;
  /** Waits for exit, at most `ms`; true if it exited. */
  wait(ms: number): Promise<boolean>;
}

/** A {@linkcode Proc} over a child this process spawned. */
export function childProc(child: Deno.ChildProcess): Proc {
  let exited = false;
  const status = child.status.then(() => {
    exited = true;
  });
  return {
    pid: child.pid,
    kill: (signal) => {
      if (exited) return;
      try {
        child.kill(signal);
      } catch {
        // Exited before `status` said so.
      }
    },
    gone: () => Promise.resolve(exited),
    wait: async (ms) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, ms);
      });
      await Promise.race([status, late]);
      clearTimeout(timer);
      return exited;
    },
  };
}

function daemonProc(pid: number): Proc {
  return {
    pid,
    kill: (signal) => {
      try {
        Deno.kill(pid, signal);
      } catch {
        // Already gone.
      }
    },
    gone: () => processGone(pid),
    wait: async (ms) => {
      try {
        await until(`process ${pid} to exit`, () => processGone(pid), ms);
        return true;
      } catch {
        return false;
      }
    },
  };
}

/**
 * Sends `signal`, waits at most `ms` for the exit, then SIGKILL and at most
 * `ms` again.
 */
export async function stopProc(
  proc: Proc,
  signal: Deno.Signal,
  ms: number,
): Promise<void> {
  proc.kill(signal);
  if (!await proc.wait(ms)) {
    proc.kill("SIGKILL");
    await proc.wait(ms);
  }
}

/**
 * Spawns `program` with its stderr in the file `logPath` (see the module
 * doc: not a pipe) and nothing on stdin or stdout.
 */
export function spawnLogged(
  program: string,
  args: string[],
  logPath: string,
): Deno.ChildProcess {
  // `exec` keeps the pid the server's own, so signals reach it directly
  // (chroot execs the program too).
  return new Deno.Command("sh", {
    args: [
      "-c",
      'log="$1"; shift; exec "$@" 2>"$log"',
      "sh",
      logPath,
      program,
      ...args,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
}

async function spawn(s: Spawn): Promise<Server> {
  const logPath = `${s.dir}/${s.program}-${
    crypto.randomUUID().slice(0, 8)
  }.log`;
  const log = () => Deno.readTextFile(logPath).catch(() => "");
  const [program, args] = command(s.program, s.args, s.peers);
  const child = spawnLogged(program, args, logPath);
  let proc = childProc(child);
  const deadline = Date.now() + START_DEADLINE_MS;
  const late = async (what: string) => {
    if (Date.now() > deadline) {
      throw new Error(
        `${s.label} did not ${what} within ${START_DEADLINE_MS} ms: ${await log()}`,
      );
    }
    await tick(POLL_MS);
  };
  let stopped: Promise<void> | undefined;
  const stop = () => {
    stopped ??= (async () => {
      await stopProc(proc, "SIGTERM", STOP_DEADLINE_MS);
      // The launcher of a daemon has its own status to collect.
      await child.status;
      if (s.ownDir) {
        await Deno.remove(s.dir, { recursive: true }).catch(() => {});
      }
    })();
    return stopped;
  };
  try {
    if (s.pidFile !== undefined) {
      const status = await child.status;
      if (!status.success) {
        throw new Error(
          `${s.label} exited with ${status.code} before listening: ${await log()}`,
        );
      }
      let pid = NaN;
      while (!(pid > 0)) {
        pid = Number.parseInt(
          await Deno.readTextFile(s.pidFile).catch(() => ""),
          10,
        );
        if (!(pid > 0)) await late("write its pid file");
      }
      proc = daemonProc(pid);
    }
    while (true) {
      if (await proc.gone()) {
        throw new Error(`${s.label} exited before listening: ${await log()}`);
      }
      const ready = s.socket !== undefined
        ? await isSocket(s.socket) && await accepts({ path: s.socket })
        : await accepts({ port: s.port! });
      if (ready) break;
      await late("listen");
    }
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    program: s.label,
    peers: s.peers,
    dir: s.dir,
    socket: s.socket,
    port: s.port,
    pid: proc.pid,
    target: (exportName = "") =>
      s.socket !== undefined
        ? { path: s.socket, exportName }
        : { hostname: "127.0.0.1", port: s.port!, exportName },
    uri: (exportName = "") =>
      s.socket !== undefined
        ? `nbd+unix:///${encodeURIComponent(exportName)}?socket=${s.socket}`
        : `nbd://127.0.0.1:${s.port}/${encodeURIComponent(exportName)}`,
    kill: (signal) => proc.kill(signal),
    waitForExit: (ms) => proc.wait(ms),
    log,
    stop,
  };
}

/** Where a server should listen. */
export interface Listen {
  /** Put socket, images and log here instead of a new temporary directory. */
  dir?: string;
  /** Listen on a loopback TCP port instead of a Unix socket. */
  tcp?: boolean;
  /** Run the server from the host (the default) or the Debian 13 root. */
  peers?: Peers;
  /**
   * Whose tools must reach the socket: `"trixie"` puts a host server's
   * directory under the root too (a root server's always is).
   */
  reach?: Peers;
}

async function place(
  program: string,
  where: Listen,
): Promise<Pick<Spawn, "dir" | "ownDir" | "socket" | "port" | "peers">> {
  const peers = where.peers ?? "host";
  const ownDir = where.dir === undefined;
  const dir = where.dir ?? await tempDir(where.reach ?? peers);
  if (peers === "trixie" && !dir.startsWith(`${TRIXIE_ROOT}/`)) {
    throw new Error(
      `A server from the Debian 13 root needs a directory under ${TRIXIE_ROOT}, not ${dir} (use tempDir("trixie"))`,
    );
  }
  if (where.tcp) return { dir, ownDir, peers, port: freePort() };
  return {
    dir,
    ownDir,
    peers,
    socket: `${dir}/${program}-${crypto.randomUUID().slice(0, 8)}.sock`,
  };
}

function label(peers: Peers): string {
  return peers === "host" ? "" : ` (${peersName(peers)})`;
}

/**
 * Starts `nbdkit` in the foreground.
 *
 * @param args Options, plugin, filters and parameters, e.g.
 *   `["--filter=delay", "memory", "64M", "rdelay=50ms"]`.
 */
export async function nbdkit(
  args: string[],
  where: Listen = {},
): Promise<Server> {
  const p = await place("nbdkit", where);
  const listen = p.socket !== undefined
    ? ["-U", p.socket]
    : ["-i", "127.0.0.1", "-p", String(p.port)];
  return await spawn({
    program: "nbdkit",
    args: ["-f", "--exit-with-parent", ...listen, ...args],
    ...p,
    label: `nbdkit ${args.join(" ")}${label(p.peers)}`,
  });
}

/**
 * Starts `qemu-nbd` serving an image, for any number of connections in turn
 * (`--persistent`) and several at once (`--shared`).
 *
 * @param args Options and the image, e.g. `["-f", "qcow2", "-B", "b0", img]`.
 */
export async function qemuNbd(
  args: string[],
  where: Listen = {},
): Promise<Server> {
  const p = await place("qemu-nbd", where);
  const listen = p.socket !== undefined
    ? ["-k", p.socket]
    : ["-b", "127.0.0.1", "-p", String(p.port)];
  return await spawn({
    program: "qemu-nbd",
    args: ["--persistent", "--shared=8", ...listen, ...args],
    ...p,
    label: `qemu-nbd ${args.join(" ")}${label(p.peers)}`,
  });
}

/** One `[section]` of an nbd-server configuration file. */
export type NbdServerExport = Record<string, string | number | boolean>;

/**
 * Starts `nbd-server` with a configuration file written into its directory.
 * It runs as a daemon (found by its pid file): in the foreground (`-d`) it
 * serves one connection and exits, while the suite connects many times.
 *
 * @param exports Export sections by name, e.g.
 *   `{ disk: { exportname: "/tmp/x/disk.img", trim: true } }`.
 * @param settings More of the `[generic]` section, e.g. `{ allowlist: false }`.
 */
export async function nbdServer(
  exports: Record<string, NbdServerExport>,
  where: Listen = {},
  settings: NbdServerExport = {},
): Promise<Server> {
  const p = await place("nbd-server", where);
  const generic: NbdServerExport = {
    allowlist: true,
    ...settings,
    ...(p.socket !== undefined
      ? { unixsock: p.socket }
      : { listenaddr: "127.0.0.1", port: p.port! }),
  };
  const section = (name: string, kv: NbdServerExport) =>
    `[${name}]\n` +
    Object.entries(kv).map(([k, v]) => `${k} = ${v}\n`).join("");
  const conf = `${p.dir}/nbd-server.conf`;
  const pidFile = `${p.dir}/nbd-server.pid`;
  await Deno.writeTextFile(
    conf,
    section("generic", generic) +
      Object.entries(exports).map(([n, kv]) => section(n, kv)).join(""),
  );
  return await spawn({
    program: "nbd-server",
    args: ["-C", conf, "-p", pidFile],
    ...p,
    pidFile,
    label: `nbd-server (${Object.keys(exports).join(", ")})`,
  });
}

/**
 * Runs a program to prepare a fixture (`qemu-img`, `qemu-io`) or to ask a
 * reference tool (`nbdcopy`), with a deadline, and returns its stdout as
 * bytes; a failure throws with its stderr. From the Debian 13 root, host
 * paths under the root in `args` are translated (see the module doc).
 */
export async function runBytes(
  program: string,
  args: string[],
  peers: Peers = "host",
): Promise<Uint8Array> {
  const [cmd, cmdArgs] = command(program, args, peers);
  const out = await new Deno.Command(cmd, {
    args: cmdArgs,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(30_000),
  }).output();
  if (!out.success) {
    throw new Error(
      `${program} ${args.join(" ")}${label(peers)} failed with ${out.code}: ${
        new TextDecoder().decode(out.stderr)
      }`,
    );
  }
  return out.stdout;
}

/** {@linkcode runBytes}, with stdout as text. */
export async function run(
  program: string,
  args: string[],
  peers: Peers = "host",
): Promise<string> {
  return new TextDecoder().decode(await runBytes(program, args, peers));
}

/**
 * Makes a qcow2 image of `size` (qemu-img's notation, "32M") and runs the
 * `qemu-io` commands given on it, in one process: a fixture with data,
 * holes and zeroed clusters where the test wants them.
 */
export async function makeQcow2(
  image: string,
  size: string,
  commands: string[] = [],
): Promise<void> {
  await run("qemu-img", ["create", "-q", "-f", "qcow2", image, size]);
  if (commands.length === 0) return;
  await run("qemu-io", [
    "-f",
    "qcow2",
    ...commands.flatMap((c) => ["-c", c]),
    image,
  ]);
}

/** Makes a sparse file of `size` bytes. */
export async function sparseFile(path: string, size: number): Promise<void> {
  const f = await Deno.open(path, {
    create: true,
    write: true,
    truncate: true,
  });
  try {
    await f.truncate(size);
  } finally {
    f.close();
  }
}
