/**
 * The server: listeners on a private Unix socket or 127.0.0.1:0, one
 * {@linkcode Connection} per client run through both phases, and a close
 * that leaves no resource open.
 *
 * @module
 */

import { REP_INFO } from "../../../lib/constants.ts";
import { Connection, type ServerSide } from "./connection.ts";
import { Builder, concat, optionReply } from "./encode.ts";
import type { ConnectionLog, TestServer, TestServerConfig } from "./hooks.ts";
import { handshake } from "./options.ts";
import { type ExportState, TestDisk, writeSparse } from "./store.ts";
import { transmission } from "./transmission.ts";

class ServerImpl implements TestServer, ServerSide {
  readonly exports: ExportState[];
  readonly log: ConnectionLog[] = [];
  #config: TestServerConfig;
  #listeners: Deno.Listener[] = [];
  #dir: string | undefined;
  #path: string | undefined;
  #port: number | undefined;
  #connections = new Set<Connection>();
  #running = new Set<Promise<void>>();
  #acceptLoops: Promise<void>[] = [];
  #closing: Promise<void> | undefined;
  #infoCache = new Map<number, Uint8Array[]>();

  constructor(config: TestServerConfig) {
    this.#config = config;
    const list = config.exports ?? [{ name: "", size: 1 << 20 }];
    if (list.length === 0) throw new TypeError("At least one export needed");
    this.exports = list.map((c) => {
      const disk = new TestDisk(c.size);
      if (c.data) writeSparse(disk, c.data);
      return { config: c, disk };
    });
  }

  async start(): Promise<void> {
    const where = this.#config.listen ?? "unix";
    if (where === "unix" || where === "both") {
      this.#dir = await Deno.makeTempDir({ prefix: "nbd-test-server-" });
      this.#path = `${this.#dir}/nbd.sock`;
      this.#listeners.push(
        Deno.listen({ transport: "unix", path: this.#path }),
      );
    }
    if (where === "tcp" || where === "both") {
      const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      this.#port = l.addr.port;
      this.#listeners.push(l);
    }
    for (const l of this.#listeners) this.#acceptLoops.push(this.#accept(l));
  }

  async #accept(listener: Deno.Listener): Promise<void> {
    const max = this.#config.maxConnections ?? 1000;
    while (this.log.length < max) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      if (this.#closing) {
        conn.close();
        return;
      }
      const c = new Connection(this.log.length, conn, this, this.#config);
      this.log.push(c.log);
      this.#connections.add(c);
      const running: Promise<void> = serve(c).finally(() => {
        this.#connections.delete(c);
        this.#running.delete(running);
      });
      this.#running.add(running);
    }
  }

  get path(): string | undefined {
    return this.#path;
  }

  get port(): number | undefined {
    return this.#port;
  }

  get uri(): string {
    // Oldstyle has no export names; qemu refuses a URI that gives one.
    if (this.#config.style === "oldstyle") return this.uriFor("");
    return this.uriFor(this.exports[0]?.config.name ?? "");
  }

  uriFor(exportName: string, transport?: "unix" | "tcp"): string {
    const name = encodeURIComponent(exportName);
    if (this.#path !== undefined && transport !== "tcp") {
      return `nbd+unix:///${name}?socket=${encodeURIComponent(this.#path)}`;
    }
    if (this.#port === undefined) throw new TypeError("Not listening on TCP");
    return `nbd://127.0.0.1:${this.#port}/${name}`;
  }

  /** The configured unknown NBD_REP_INFO replies, built once per option. */
  unknownInfoReplies(option: number): Uint8Array[] {
    let replies = this.#infoCache.get(option);
    if (!replies) {
      replies = (this.#config.unknownInfos ?? []).map((info) =>
        optionReply(
          option,
          REP_INFO,
          concat(
            new Builder().u16(info.type).done(),
            info.data ?? new Uint8Array(0),
          ),
        )
      );
      this.#infoCache.set(option, replies);
    }
    return replies;
  }

  findExport(name: string): ExportState | undefined {
    return this.exports.find((e) => e.config.name === name) ??
      (name === "" ? this.exports[0] : undefined);
  }

  defaultExport(): ExportState {
    const ex = this.findExport("");
    if (!ex) throw new TypeError("No exports");
    return ex;
  }

  disk(name?: string): TestDisk {
    const ex = name === undefined ? this.exports[0] : this.findExport(name);
    if (!ex) throw new TypeError(`No export named "${name}"`);
    return ex.disk;
  }

  async settled(timeoutMs = 5000): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`Connections still open after ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      // Connections accepted while waiting are waited for too, a bounded
      // number of times.
      for (let i = 0; i < 100 && this.#running.size > 0; i++) {
        await Promise.race([Promise.all([...this.#running]), timeout]);
      }
    } finally {
      clearTimeout(timer);
    }
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    for (const l of this.#listeners) {
      try {
        l.close();
      } catch {
        // Already closed.
      }
    }
    await Promise.all(this.#acceptLoops);
    for (const c of this.#connections) c.close("server closed");
    await Promise.all([...this.#running]);
    if (this.#dir) await Deno.remove(this.#dir, { recursive: true });
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Runs one connection through both phases, then closes it. */
async function serve(c: Connection): Promise<void> {
  try {
    await handshake(c);
    if (c.phase === "transmission") await transmission(c);
  } catch (e) {
    c.noteError(e);
  } finally {
    await c.drainHandlers();
    await c.flushed();
    c.close();
  }
}

/**
 * Starts a test server on a private Unix socket (or 127.0.0.1:0).
 *
 * @param config Exports, style and hooks; all optional.
 * @returns The running server; close it with `await using` or `close()`.
 * @example
 * ```ts
 * await using server = await startTestServer({ style: "oldstyle" });
 * console.log(server.uri);
 * ```
 */
export async function startTestServer(
  config: TestServerConfig = {},
): Promise<TestServer> {
  const server = new ServerImpl(config);
  await server.start();
  return server;
}
