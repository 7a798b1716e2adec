/**
 * A server that a test can kill and start again on the same Unix socket, as
 * an administrator restarting `nbdkit` or `qemu-nbd` would: what the
 * reconnect tests need and `servers.ts` (one start per server) does not do.
 *
 * @module
 */

import {
  accepts,
  childProc,
  type Proc,
  spawnLogged,
  stopProc,
} from "./servers.ts";
import { until } from "./wait.ts";

/** How long a start may take before the test fails. */
const START_MS = 10_000;
/** How long a signalled server may take to exit. */
const EXIT_MS = 10_000;

/** A server process bound to one socket path across restarts. */
export interface Restartable {
  /** The socket every incarnation listens on. */
  readonly socket: string;
  /** The private directory (socket, images, logs). */
  readonly dir: string;
  /** How many times the server was started. */
  readonly starts: number;
  /** Starts it (again), with `args` for this incarnation if given. */
  start(args?: string[]): Promise<void>;
  /** Sends `signal` and waits until the process has exited. */
  kill(signal: Deno.Signal): Promise<void>;
  /** What the current incarnation wrote to stderr. */
  log(): Promise<string>;
  /** Stops the server if it runs and removes the directory. */
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * Prepares a restartable server; call `start()` to run it.
 *
 * @param program `"nbdkit"` or `"qemu-nbd"`.
 * @param argsFor The arguments for a socket path (listening options
 *   included), e.g. `(s) => ["-f", "-U", s, "memory", "1M"]`.
 * @param dir An existing directory to use instead of a new one.
 */
export async function restartable(
  program: string,
  argsFor: (socket: string, dir: string) => string[],
  dir?: string,
): Promise<Restartable> {
  const own = dir === undefined;
  const home = dir ?? await Deno.makeTempDir({ prefix: "nbd-restart-" });
  const socket = `${home}/server.sock`;
  let child: { spawned: Deno.ChildProcess; proc: Proc } | undefined;
  let logPath = "";
  let starts = 0;
  const readLog = () => Deno.readTextFile(logPath).catch(() => "");
  const stop = async (signal: Deno.Signal) => {
    if (!child) return;
    await stopProc(child.proc, signal, EXIT_MS);
    await child.spawned.status;
    child = undefined;
  };
  return {
    socket,
    dir: home,
    get starts() {
      return starts;
    },
    async start(args) {
      if (child) throw new Error(`${program} is already running`);
      await Deno.remove(socket).catch(() => {});
      starts++;
      logPath = `${home}/${program}-${starts}.log`;
      const spawned = spawnLogged(
        program,
        args ?? argsFor(socket, home),
        logPath,
      );
      const proc = childProc(spawned);
      child = { spawned, proc };
      await until(`${program} to accept on ${socket}`, async () => {
        if (await proc.gone()) {
          throw new Error(
            `${program} exited before listening: ${await readLog()}`,
          );
        }
        return await accepts({ path: socket });
      }, START_MS);
    },
    kill: stop,
    log: readLog,
    async [Symbol.asyncDispose]() {
      await stop("SIGTERM");
      if (own) await Deno.remove(home, { recursive: true }).catch(() => {});
    },
  };
}

/**
 * The arguments of an `nbdkit` in the foreground on `socket` that goes
 * away with this process, followed by `args` (filters, plugin, parameters).
 */
export function nbdkitOn(socket: string, args: readonly string[]): string[] {
  return ["-f", "--exit-with-parent", "-U", socket, ...args];
}
