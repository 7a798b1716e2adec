/**
 * A server run as the client's own subprocess, as libnbd's
 * `nbd_connect_command` and `nbd_connect_systemd_socket_activation` do:
 * either NBD over the child's stdin and stdout (`nbdkit -s`, `qemu-nbd`
 * cannot), or a private Unix socket the child listens on. The child is
 * stopped when the connection closes, and what it wrote to stderr becomes
 * part of the error when it dies before the handshake is done.
 *
 * @module
 */

import { pause, within } from "./_deadline.ts";
import { errorText, NbdConnectionClosedError, NbdError } from "./errors.ts";
import type { ByteStream } from "./transport.ts";

/** Keep at most this much of a child's stderr for error messages. */
const MAX_STDERR = 16 * 1024;
/** A child gets this long to exit after SIGTERM, then SIGKILL. */
const STOP_GRACE_MS = 2_000;
/** How long a server may take to start listening on its socket. */
const LISTEN_MS = 30_000;

/** A running server subprocess. */
export interface ServerProcess {
  /** The command as given. */
  readonly command: readonly string[];
  /** Stops the child (SIGTERM, then SIGKILL) and waits for it. */
  stop(): Promise<void>;
  /**
   * Wraps a failure of the connection to the child with what the child said
   * (its exit status and stderr), once it has had a moment to exit.
   */
  explain(e: unknown): Promise<Error>;
}

/** Checks a `command` option: a non-empty array of strings. */
export function checkCommand(command: unknown): readonly string[] {
  if (
    !Array.isArray(command) || command.length === 0 ||
    !command.every((a) => typeof a === "string") || command[0] === ""
  ) {
    throw new TypeError(
      "command must be a non-empty array of strings, the program first",
    );
  }
  return command;
}

function spawnChild(
  command: readonly string[],
  stdio: "pipe" | "null",
): Deno.ChildProcess {
  try {
    return new Deno.Command(command[0]!, {
      args: command.slice(1),
      stdin: stdio === "pipe" ? "piped" : "null",
      stdout: stdio === "pipe" ? "piped" : "null",
      stderr: "piped",
    }).spawn();
  } catch (e) {
    throw new NbdError(
      `Cannot start the server command ${command[0]}: ${errorText(e)}`,
      { cause: e },
    );
  }
}

/** The child's stderr, kept in full up to a bound. */
function collect(stream: ReadableStream<Uint8Array>): () => string {
  const parts: Uint8Array[] = [];
  let kept = 0;
  (async () => {
    try {
      for await (const chunk of stream) {
        if (kept >= MAX_STDERR) continue;
        const part = chunk.subarray(0, MAX_STDERR - kept);
        parts.push(part.slice());
        kept += part.length;
      }
    } catch {
      // The child is gone; what it said so far is what we have.
    }
  })();
  return () => {
    const all = new Uint8Array(kept);
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    return new TextDecoder().decode(all).trim();
  };
}

function control(
  command: readonly string[],
  child: Deno.ChildProcess,
  stderr: () => string,
  cleanup: () => Promise<void>,
): ServerProcess {
  let exited: Deno.CommandStatus | undefined;
  const status = child.status.then((s) => exited = s);
  const waitExit = async (ms: number) => {
    await within(status, ms);
    return exited;
  };
  let stopping: Promise<void> | undefined;
  return {
    command,
    stop() {
      stopping ??= (async () => {
        if (!exited) {
          try {
            child.kill("SIGTERM");
          } catch {
            // Exited on its own meanwhile.
          }
          if (!await waitExit(STOP_GRACE_MS)) {
            try {
              child.kill("SIGKILL");
            } catch {
              // Exited on its own meanwhile.
            }
            await status;
          }
        }
        await cleanup();
      })();
      return stopping;
    },
    async explain(e) {
      const s = await waitExit(500);
      const said = stderr();
      const how = s
        ? `exited with status ${s.code}${s.signal ? ` (${s.signal})` : ""}`
        : "is still running";
      return new NbdConnectionClosedError(
        `The server command ${command[0]} ${how}: ${said || errorText(e)}`,
        { cause: e },
      );
    },
  };
}

/** NBD over the child's stdin and stdout. */
class PipeStream implements ByteStream {
  #reader: ReadableStreamDefaultReader<Uint8Array>;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #left: Uint8Array = new Uint8Array(0);
  #onClose: () => void;

  constructor(child: Deno.ChildProcess, onClose: () => void) {
    this.#reader = child.stdout.getReader();
    this.#writer = child.stdin.getWriter();
    this.#onClose = onClose;
  }

  async read(p: Uint8Array): Promise<number | null> {
    if (this.#left.length === 0) {
      const { value, done } = await this.#reader.read();
      if (done) return null;
      this.#left = value;
    }
    const n = Math.min(p.length, this.#left.length);
    p.set(this.#left.subarray(0, n));
    this.#left = this.#left.subarray(n);
    return n;
  }

  async write(p: Uint8Array): Promise<number> {
    // The stream may hold the chunk after this returns; the caller may not.
    await this.#writer.write(p.slice());
    return p.length;
  }

  close(): void {
    this.#reader.cancel().catch(() => {});
    this.#writer.close().catch(() => {});
    this.#onClose();
  }
}

/**
 * Starts `command` with NBD on its stdin and stdout (`nbdkit -s ...`).
 *
 * @returns The stream to negotiate over and the child's controls.
 */
export function spawnOverPipes(
  command: readonly string[],
): { stream: ByteStream; server: ServerProcess } {
  const child = spawnChild(command, "pipe");
  const server = control(
    command,
    child,
    collect(child.stderr),
    () => Promise.resolve(),
  );
  const stream = new PipeStream(child, () => {
    server.stop();
  });
  return { stream, server };
}

/**
 * How to tell a known server to listen on a Unix socket, and to go away with
 * us if this process dies first (qemu-nbd without `--persistent` exits when
 * its one client hangs up).
 */
const LISTEN_FLAGS: Readonly<Record<string, readonly string[]>> = {
  "nbdkit": ["--exit-with-parent", "-U"],
  "qemu-nbd": ["-k"],
};

/**
 * Starts `command` listening on a private Unix socket, as systemd socket
 * activation would hand it one: the socket option of the known servers
 * (`nbdkit -U`, `qemu-nbd -k`) is added after the program name. Connects
 * once the child listens; that first connection is the client's.
 *
 * @returns The connection and the child's controls.
 * @throws {TypeError} for a program whose socket option is unknown.
 * @throws {NbdConnectionClosedError} when the child exits or never listens.
 */
export async function spawnOnSocket(
  command: readonly string[],
  signal?: AbortSignal,
): Promise<{ conn: Deno.UnixConn; server: ServerProcess }> {
  const program = command[0]!.split("/").pop()!;
  const flags = LISTEN_FLAGS[program];
  if (flags === undefined) {
    throw new TypeError(
      `socketActivation knows how to start ${
        Object.keys(LISTEN_FLAGS).join(" and ")
      }, not ${program}; a server that speaks over stdin and stdout needs command alone`,
    );
  }
  const dir = await Deno.makeTempDir({ prefix: "nbd-command-" });
  const path = `${dir}/server.sock`;
  const child = spawnChild(
    [command[0]!, ...flags, path, ...command.slice(1)],
    "null",
  );
  const server = control(
    command,
    child,
    collect(child.stderr),
    () => Deno.remove(dir, { recursive: true }).catch(() => {}),
  );
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = Date.now() + LISTEN_MS;
  try {
    while (true) {
      if (signal?.aborted) throw signal.reason;
      if (exited) throw new Error("it exited before listening");
      try {
        const conn = await Deno.connect({ transport: "unix", path });
        return { conn, server };
      } catch (e) {
        // Not listening yet, unless this process may not connect at all.
        if (refused(e)) throw e;
      }
      if (Date.now() > deadline) {
        throw new Error(`it did not listen within ${LISTEN_MS} ms`);
      }
      await pause(10, signal);
    }
  } catch (e) {
    // An abort is the caller's doing: its reason, at once.
    const err = refused(e) || signal?.aborted ? e : await server.explain(e);
    await server.stop();
    throw err;
  }
}

/** A permission this process lacks: no waiting will help. */
function refused(e: unknown): boolean {
  return e instanceof Deno.errors.NotCapable ||
    e instanceof Deno.errors.PermissionDenied;
}
