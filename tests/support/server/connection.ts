/**
 * One connection's plumbing: ordered writes, exact reads, the hook actions,
 * timers that die with the connection, and the reorder window. The phases
 * (`options.ts`, `transmission.ts`) drive it; it knows neither.
 *
 * @module
 */

import { concat } from "./encode.ts";
import type {
  Action,
  ConnectionLog,
  ConnectionState,
  HookContext,
  OptionAction,
  TestServerConfig,
} from "./hooks.ts";
import type { ExportConfig, ExportState, TestDisk } from "./store.ts";

/** Messages are joined into writes of up to this many bytes. */
const COALESCE_LIMIT = 256 * 1024;
/** A stalled connection drops at most this much client data, then hangs up. */
const STALL_DRAIN_LIMIT = 16 * 1024 * 1024;

/** The client hung up, or the server closed the connection: stop quietly. */
export class Hangup extends Error {}

/** What a connection asks of the server it belongs to. */
export interface ServerSide {
  /** Every export, in configuration order. */
  readonly exports: readonly ExportState[];
  /** The export named `name`; `""` also finds the first one. */
  findExport(name: string): ExportState | undefined;
  /** The export served when the client names none. */
  defaultExport(): ExportState;
  /** The configured unknown NBD_REP_INFO replies, built once per option. */
  unknownInfoReplies(option: number): Uint8Array[];
}

/** A read-only window on a connection's negotiated state. */
class StateView implements ConnectionState {
  #c: Connection;

  constructor(c: Connection) {
    this.#c = c;
  }

  get log(): ConnectionLog {
    return this.#c.log;
  }

  get phase(): "handshake" | "transmission" {
    return this.#c.phase;
  }

  get noZeroes(): boolean {
    return this.#c.noZeroes;
  }

  get structuredReplies(): boolean {
    return this.#c.structured;
  }

  get extendedHeaders(): boolean {
    return this.#c.extended;
  }

  get disk(): TestDisk | undefined {
    return this.#c.current?.disk;
  }

  get export(): ExportConfig | undefined {
    return this.#c.current?.config;
  }
}

/** One accepted client: its socket, its negotiated state and its log. */
export class Connection {
  readonly log: ConnectionLog;
  readonly server: ServerSide;
  readonly config: TestServerConfig;
  #conn: Deno.Conn;
  #closed = Promise.withResolvers<void>();
  #isClosed = false;
  #writeTail: Promise<void> = Promise.resolve();
  #timers = new Set<ReturnType<typeof setTimeout>>();
  #handlers = new Set<Promise<void>>();
  #batch: Uint8Array[][] = [];
  #batchTimer: ReturnType<typeof setTimeout> | undefined;
  phase: "handshake" | "transmission" = "handshake";
  noZeroes = false;
  fixed = false;
  structured = false;
  extended = false;
  current: ExportState | undefined;
  /** Contexts chosen by SET_META_CONTEXT, with the export they were set for. */
  contexts: { id: number; name: string }[] = [];
  contextsExport: string | undefined;

  constructor(
    id: number,
    conn: Deno.Conn,
    server: ServerSide,
    config: TestServerConfig,
  ) {
    this.log = {
      id,
      clientFlags: undefined,
      options: [],
      requests: [],
      exportName: undefined,
      structuredReplies: false,
      extendedHeaders: false,
      metaContexts: [],
      notes: [],
      closed: false,
    };
    this.#conn = conn;
    this.server = server;
    this.config = config;
  }

  get closed(): Promise<void> {
    return this.#closed.promise;
  }

  /** Whether the connection is over; the phases stop when it is. */
  get isClosed(): boolean {
    return this.#isClosed;
  }

  get state(): ConnectionState {
    return new StateView(this);
  }

  /** What every hook gets, whatever it is called for. */
  hookContext(): HookContext {
    return {
      state: this.state,
      send: (...m) => this.send(...m),
      drop: () => this.close("dropped by hook"),
      closed: this.#closed.promise,
    };
  }

  /** Resolves once everything queued so far was written (or failed). */
  flushed(): Promise<void> {
    return this.#writeTail;
  }

  /** Records a server-side failure; a hang-up is no failure. */
  noteError(e: unknown): void {
    if (!(e instanceof Hangup)) {
      this.log.notes.push(`server error: ${String(e)}`);
    }
  }

  close(note?: string): void {
    if (note) this.log.notes.push(note);
    if (this.#isClosed) return;
    this.#isClosed = true;
    this.log.closed = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    if (this.#batchTimer !== undefined) clearTimeout(this.#batchTimer);
    this.#batchTimer = undefined;
    this.#batch = [];
    try {
      this.#conn.close();
    } catch {
      // The client closed first.
    }
    this.#closed.resolve();
  }

  /** Waits `ms`, or less if the connection closes first. */
  sleep(ms: number): Promise<void> {
    if (this.#isClosed || ms <= 0) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.#timers.delete(t);
        resolve();
      }, ms);
      this.#timers.add(t);
      this.#closed.promise.then(() => {
        clearTimeout(t);
        this.#timers.delete(t);
        resolve();
      });
    });
  }

  /**
   * Waits until the server closes or the client hangs up, dropping whatever
   * the client sends meanwhile (up to a bound), then closes.
   */
  async stallReading(): Promise<void> {
    const scratch = new Uint8Array(4096);
    const draining = (async () => {
      for (let total = 0; total < STALL_DRAIN_LIMIT;) {
        let n: number | null;
        try {
          n = await this.#conn.read(scratch);
        } catch {
          return;
        }
        if (n === null) {
          this.log.notes.push("client closed during a stall");
          return;
        }
        total += n;
      }
    })();
    await Promise.race([this.#closed.promise, draining]);
    this.close();
    await draining;
  }

  /** Reads exactly `n` bytes; `null` on a clean end before the first byte. */
  async readExact(n: number): Promise<Uint8Array | null> {
    const out = new Uint8Array(n);
    let got = 0;
    while (got < n) {
      if (this.#isClosed) throw new Hangup();
      let r: number | null;
      try {
        r = await this.#conn.read(out.subarray(got));
      } catch {
        throw new Hangup();
      }
      if (r === null) {
        if (got === 0) return null;
        this.log.notes.push(`client closed after ${got} of ${n} bytes`);
        throw new Hangup();
      }
      got += r;
    }
    return out;
  }

  async mustRead(n: number): Promise<Uint8Array> {
    const b = await this.readExact(n);
    if (b === null) throw new Hangup();
    return b;
  }

  /** Queues one message; messages never interleave. */
  send(...messages: Uint8Array[]): Promise<void> {
    const run = this.#writeTail.then(async () => {
      for (const m of coalesce(messages)) {
        let at = 0;
        while (at < m.length) {
          if (this.#isClosed) throw new Hangup();
          try {
            at += await this.#conn.write(m.subarray(at));
          } catch {
            throw new Hangup();
          }
        }
      }
    });
    this.#writeTail = run.catch(() => {});
    return run;
  }

  /** Carries out hook actions in order. */
  async act(actions: readonly (Action | OptionAction)[]): Promise<void> {
    for (const a of actions) {
      if (this.#isClosed) return;
      if (a instanceof Uint8Array) await this.send(a);
      else if (a === "drop") {
        await this.#writeTail;
        this.close("dropped by hook");
      } else if (a === "stall") {
        // In transmission the request loop notices a hang-up; before it,
        // nothing is reading, so the stall reads (and drops) by itself.
        if (this.phase === "handshake") await this.stallReading();
        else await this.#closed.promise;
      } else if (a === "transmission") continue;
      else await this.sleep(a.delay);
    }
  }

  track(p: Promise<void>): void {
    const tracked = p.catch((e) => this.noteError(e)).finally(() => {
      this.#handlers.delete(tracked);
    });
    this.#handlers.add(tracked);
  }

  async drainHandlers(): Promise<void> {
    // Each round waits for what was in flight; handlers never spawn others.
    await Promise.all([...this.#handlers]);
  }

  /** Sends a reply now, or holds it for the reorder window. */
  reply(messages: Uint8Array[]): Promise<void> {
    if (!this.config.reorder) return this.send(...messages);
    this.#batch.push(messages);
    if (this.#batchTimer === undefined) {
      this.#batchTimer = setTimeout(() => {
        this.#batchTimer = undefined;
        this.flushBatch().catch(() => {});
      }, this.config.reorderWindowMs ?? 5);
    }
    return Promise.resolve();
  }

  /** Sends held replies: last request first, chunks interleaved. */
  async flushBatch(): Promise<void> {
    if (this.#batchTimer !== undefined) clearTimeout(this.#batchTimer);
    this.#batchTimer = undefined;
    const batch = this.#batch.reverse();
    this.#batch = [];
    const order: Uint8Array[] = [];
    let longest = 0;
    for (const r of batch) longest = Math.max(longest, r.length);
    for (let i = 0; i < longest; i++) {
      for (const r of batch) {
        const m = r[i];
        if (m) order.push(m);
      }
    }
    await this.send(...order);
  }
}

/** Joins runs of small messages so that thousands cost few writes. */
function coalesce(messages: Uint8Array[]): Uint8Array[] {
  if (messages.length < 2) return messages;
  const out: Uint8Array[] = [];
  let run: Uint8Array[] = [];
  let size = 0;
  const flush = () => {
    if (run.length === 1) out.push(run[0]!);
    else if (run.length > 1) out.push(concat(...run));
    run = [];
    size = 0;
  };
  for (const m of messages) {
    if (size + m.length > COALESCE_LIMIT) flush();
    run.push(m);
    size += m.length;
  }
  flush();
  return out;
}
