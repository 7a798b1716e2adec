/**
 * An NBD export as a copy's source or destination.
 *
 * @module
 */

import {
  connect,
  NbdError,
  type NbdStats,
  probe,
  STATE_ZERO,
} from "../../mod.ts";
import { type ServerCommand, tlsEngineOption } from "../_cli.ts";
import type { StatusQuery } from "./dirty.ts";
import type {
  Destination,
  Extent,
  LaneSpec,
  Settings,
  Source,
  ZeroMode,
} from "./endpoint.ts";

type Client = Awaited<ReturnType<typeof connect>>;

/**
 * GnuTLS when run with --allow-ffi (libnbd's trust, revocation lists,
 * TLS-PSK), Deno's own TLS otherwise.
 */

/** Where an export is: at a URI, or behind a server the tool starts. */
export type NbdTarget = string | ServerCommand;

/** Whether a command-line word is an NBD URI (rather than a path). */
export function isNbdUri(word: string): boolean {
  return /^nbds?(\+(unix|vsock))?:\/\//.test(word);
}

/** An NBD export as either side, over one or more connections. */
export class NbdEndpoint implements Source, Destination {
  readonly name: string;
  readonly sequential = false;
  readonly hasExtents: boolean;
  readonly zeroMode: ZeroMode;
  #target: NbdTarget;
  #requests: number;
  #contexts: string[];
  #conns: Client[];
  #allocated: boolean;
  #role: "source" | "destination";
  #settings: Settings;

  private constructor(
    target: NbdTarget,
    first: Client,
    requests: number,
    contexts: string[],
    settings: Settings,
    role: "source" | "destination",
  ) {
    this.name = typeof target === "string" ? target : target.text;
    this.#target = target;
    this.#role = role;
    this.#conns = [first];
    this.#requests = requests;
    this.#contexts = contexts;
    this.hasExtents = first.metaContexts.includes("base:allocation");
    this.zeroMode = settings.destinationIsZero && !settings.allocated
      ? "skip"
      : first.canWriteZeroes
      ? "command"
      : "write";
    this.#allocated = settings.allocated;
    this.#settings = settings;
  }

  static async open(
    target: NbdTarget,
    role: "source" | "destination",
    settings: Settings,
    signal: AbortSignal,
  ): Promise<NbdEndpoint> {
    const contexts = role !== "source" ? [] : settings.dirty !== undefined
      // Beside the dirty context, so that what the guest zeroed is zeroed
      // on the destination rather than read.
      ? [...new Set([settings.dirty, "base:allocation"])]
      : settings.extents
      ? ["base:allocation"]
      : [];
    // The signal, so that ^C ends a handshake the server never answers
    // instead of waiting out the connect timeout.
    const uri = typeof target === "string" ? target : target.text;
    const first = await connect(where(target), {
      ...await tlsEngineOption(where(target)),
      metaContexts: contexts,
      maxInFlight: settings.requests,
      signal,
      ...reconnectOption(settings),
    });
    if (first.sizeBigInt > BigInt(Number.MAX_SAFE_INTEGER)) {
      // Offsets are numbers throughout the copy; info and dump go further.
      await first.close({ signal });
      throw new Error(
        `${uri}: the export has ${first.sizeBigInt} bytes; copy handles exports below 2^53 bytes (8 PiB) only`,
      );
    }
    if (
      role === "source" && settings.dirty !== undefined &&
      !first.metaContexts.includes(settings.dirty)
    ) {
      await first.close({ signal });
      throw new Error(
        `${uri}: the source does not offer ${settings.dirty}; ${await offered(
          target,
          first.structuredReplies,
          signal,
        )}`,
      );
    }
    return new NbdEndpoint(
      target,
      first,
      settings.requests,
      contexts,
      settings,
      role,
    );
  }

  /**
   * Block status in one negotiated context, for the walk of an
   * incremental copy.
   */
  status(context: string): StatusQuery {
    return async (offset, length, signal) => {
      const reply = await this.#conns[0]!.blockStatus(offset, length, {
        signal,
      });
      return reply[context] ?? [];
    };
  }

  get size(): number {
    return this.#conns[0]!.size;
  }
  get alignment(): number {
    return this.#conns[0]!.blockSize?.minimum || 1;
  }
  get preferred(): number {
    return this.#conns[0]!.blockSize?.preferred || 4096;
  }
  get maxLanes(): number {
    // Another connect() to a command would start another server: another
    // disk, for nbdkit memory.
    if (typeof this.#target !== "string") return 1;
    return this.#conns[0]!.canMultiConn ? Infinity : 1;
  }

  /**
   * What went over the wire, all connections together (`nbd.stats`), those
   * of other threads included once they report ({@linkcode absorb}).
   */
  get stats(): NbdStats {
    const all: NbdStats = {
      bytesSent: 0,
      bytesReceived: 0,
      chunksSent: 0,
      chunksReceived: 0,
      requests: {},
    };
    for (const s of [...this.#conns.map((c) => c.stats), ...this.#others]) {
      all.bytesSent += s.bytesSent;
      all.bytesReceived += s.bytesReceived;
      all.chunksSent += s.chunksSent;
      all.chunksReceived += s.chunksReceived;
      for (const [name, n] of Object.entries(s.requests)) {
        all.requests[name] = (all.requests[name] ?? 0) + n;
      }
    }
    return all;
  }

  /** Stats of this end's connections in another thread. */
  absorb(stats: NbdStats): void {
    this.#others.push(stats);
  }
  #others: NbdStats[] = [];

  async addLanes(n: number, signal: AbortSignal): Promise<void> {
    while (this.#conns.length < n) {
      this.#conns.push(
        await connect(where(this.#target), {
          ...await tlsEngineOption(where(this.#target)),
          metaContexts: this.#contexts,
          maxInFlight: this.#requests,
          signal,
          ...reconnectOption(this.#settings),
        }),
      );
    }
  }

  lane(): LaneSpec {
    // maxLanes keeps a [ CMD ] end to one connection, in this thread.
    if (typeof this.#target !== "string") {
      throw new Error("A server run as [ CMD ] serves one connection");
    }
    return { kind: "nbd", uri: this.#target, role: this.#role };
  }

  #lane(lane: number): Client {
    return this.#conns[lane % this.#conns.length]!;
  }

  async extents(
    offset: number,
    length: number,
    signal: AbortSignal,
  ): Promise<Extent[]> {
    const reply = await this.#conns[0]!.blockStatus(offset, length, { signal });
    return (reply["base:allocation"] ?? []).map((e) => ({
      length: e.length,
      zero: (e.flags & STATE_ZERO) !== 0,
    }));
  }

  async read(
    offset: number,
    length: number,
    lane: number,
    signal: AbortSignal,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    if (!into) return await this.#lane(lane).read(offset, length, { signal });
    const buf = into.length === length ? into : into.subarray(0, length);
    await this.#lane(lane).readInto(buf, offset, { signal });
    return buf;
  }

  next(): Promise<Uint8Array | null> {
    throw new Error("not a stream");
  }

  prepare(size: number | undefined): Promise<void> {
    const c = this.#conns[0]!;
    if (c.readOnly) {
      return Promise.reject(
        new Error(`${this.name}: the export is read-only`),
      );
    }
    if (size !== undefined && size > c.size) {
      return Promise.reject(
        new Error(
          `destination is too small: ${c.size} bytes, the source has ${size}`,
        ),
      );
    }
    return Promise.resolve();
  }

  write(
    offset: number,
    data: Uint8Array,
    lane: number,
    signal: AbortSignal,
  ): Promise<void> {
    return this.#lane(lane).write(offset, data, { signal });
  }

  zero(
    offset: number,
    length: number,
    lane: number,
    signal: AbortSignal,
  ): Promise<void> {
    return this.#lane(lane).writeZeroes(offset, length, {
      noHole: this.#allocated,
      signal,
    });
  }

  async finish(
    _total: number,
    flush: boolean,
    signal: AbortSignal,
  ): Promise<void> {
    // With multi-conn a flush on one connection covers the writes of all.
    if (flush && this.#conns[0]!.canFlush) {
      await this.#conns[0]!.flush({ signal });
    }
  }

  async close(signal: AbortSignal): Promise<void> {
    await Promise.allSettled(this.#conns.map((c) => c.close({ signal })));
  }
}

/**
 * `--reconnect` as `connect()` takes it: a server restarted mid-copy is
 * dialled again and what was in flight replayed.
 */
function reconnectOption(
  settings: Settings,
): { reconnect: true | { timeout: number } } | Record<never, never> {
  const r = settings.reconnect;
  if (r === undefined) return {};
  return { reconnect: r === true ? true : { timeout: r * 1000 } };
}

/** The target as `connect()` takes it. */
function where(target: NbdTarget): string | ServerCommand["options"] {
  return typeof target === "string" ? target : target.options;
}

/**
 * What a source that refused a context offers instead, in words: the
 * contexts `NBD_OPT_LIST_META_CONTEXT` names, or why there are none to name.
 */
async function offered(
  target: NbdTarget,
  structuredReplies: boolean,
  signal: AbortSignal,
): Promise<string> {
  if (!structuredReplies) {
    return "it has no structured replies, so no metadata contexts at all";
  }
  // probe() cannot start a server; the list needs a URI.
  if (typeof target !== "string") {
    return "the ones a server run as [ CMD ] offers cannot be listed";
  }
  const uri = target;
  try {
    const { metaContexts } = await probe(uri, {
      ...await tlsEngineOption(uri),
      signal,
    });
    return metaContexts.length === 0
      ? "it offers no metadata contexts"
      : `it offers ${metaContexts.join(", ")}`;
  } catch (e) {
    if (!(e instanceof NbdError)) throw e;
    return `and it would not list the ones it offers (${e.message})`;
  }
}
