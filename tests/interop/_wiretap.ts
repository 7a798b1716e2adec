/**
 * A relay between the client and a real server that reads both directions
 * on its own: every request (compact or extended) and every reply header
 * (simple, structured or extended), with the cookie, offset and length as
 * they crossed the socket. The client's debug hook says what the client
 * thinks it did; the tap says what the server was sent and answered, so a
 * check against it cannot share a misreading with the client's decoder.
 *
 * Only the fixed newstyle handshake ending in `NBD_OPT_GO` is followed (the
 * rows that use the tap speak nothing else).
 *
 * @module
 */

import { connect, type NbdClient } from "../../mod.ts";
import { type Server, tempDir } from "../support/servers.ts";
import { within } from "../support/wait.ts";
import type { Trace } from "./_support.ts";

const IHAVEOPT_HI = 0x49484156; // "IHAV"
const OPTION_REPLY_HI = 0x0003e889;
const REQUEST_MAGIC = 0x25609513;
const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const EXTENDED_REPLY_MAGIC = 0x6e8a278c;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_FLAG_PAYLOAD_LEN = 1 << 5;

/** One request as the server received it. */
export interface TappedRequest {
  extended: boolean;
  flags: number;
  type: number;
  cookie: bigint;
  offset: bigint;
  length: bigint;
}

/** One reply header (a simple reply or one chunk) as the client received it. */
export interface TappedReply {
  kind: "simple" | "structured" | "extended";
  flags: number;
  /** The chunk type; 0 for a simple reply. */
  type: number;
  cookie: bigint;
  /** Only extended replies carry one. */
  offset: bigint | undefined;
  /** Payload length (for a simple reply to a read, the read's length). */
  length: bigint;
}

/** A growing byte buffer that hands out whole messages. */
class Bytes {
  #buf = new Uint8Array(0);
  #at = 0;

  push(chunk: Uint8Array): void {
    const rest = this.#buf.subarray(this.#at);
    const next = new Uint8Array(rest.length + chunk.length);
    next.set(rest);
    next.set(chunk, rest.length);
    this.#buf = next;
    this.#at = 0;
  }

  get available(): number {
    return this.#buf.length - this.#at;
  }

  view(n: number): DataView | undefined {
    if (this.available < n) return undefined;
    return new DataView(
      this.#buf.buffer,
      this.#buf.byteOffset + this.#at,
      n,
    );
  }

  skip(n: number): void {
    this.#at += n;
  }
}

/** Parses one connection's two directions. */
class Conversation {
  readonly #tap: WireTap;
  readonly #up = new Bytes();
  readonly #down = new Bytes();
  #clientFlagsSeen = false;
  #greetingSeen = false;
  /** Payload bytes still to skip in each direction. */
  #upSkip = 0;
  #downSkip = 0;
  readonly #requests = new Map<bigint, TappedRequest>();

  constructor(tap: WireTap) {
    this.#tap = tap;
  }

  /** Client to server. */
  fromClient(chunk: Uint8Array): void {
    const b = this.#up;
    b.push(chunk);
    while (true) {
      if (this.#upSkip > 0) {
        const n = Math.min(this.#upSkip, b.available);
        b.skip(n);
        this.#upSkip -= n;
        if (this.#upSkip > 0) return;
      }
      if (!this.#clientFlagsSeen) {
        if (!b.view(4)) return;
        b.skip(4);
        this.#clientFlagsSeen = true;
        continue;
      }
      const head = b.view(4);
      if (!head) return;
      const magic = head.getUint32(0);
      if (magic === IHAVEOPT_HI) {
        const v = b.view(16);
        if (!v) return;
        b.skip(16);
        this.#upSkip = v.getUint32(12);
      } else if (magic === REQUEST_MAGIC || magic === EXTENDED_REQUEST_MAGIC) {
        const extended = magic === EXTENDED_REQUEST_MAGIC;
        const size = extended ? 32 : 28;
        const v = b.view(size);
        if (!v) return;
        b.skip(size);
        const r: TappedRequest = {
          extended,
          flags: v.getUint16(4),
          type: v.getUint16(6),
          cookie: v.getBigUint64(8),
          offset: v.getBigUint64(16),
          length: extended ? v.getBigUint64(24) : BigInt(v.getUint32(24)),
        };
        this.#requests.set(r.cookie, r);
        this.#tap.requests.push(r);
        // A write carries its data whatever its flags say (servers read it
        // by type, as qemu-nbd does); the flag rule is reported apart.
        const flagged = (r.flags & CMD_FLAG_PAYLOAD_LEN) !== 0;
        if (extended && r.type === CMD_WRITE && !flagged) {
          this.#tap.writesWithoutPayloadLen++;
        }
        if (r.type === CMD_WRITE || (extended && flagged)) {
          this.#upSkip = Number(r.length);
        }
      } else {
        this.#tap.problems.push(`client sent unknown magic 0x${hex(magic)}`);
        b.skip(b.available);
        return;
      }
    }
  }

  /** Server to client. */
  fromServer(chunk: Uint8Array): void {
    const b = this.#down;
    b.push(chunk);
    while (true) {
      if (this.#downSkip > 0) {
        const n = Math.min(this.#downSkip, b.available);
        b.skip(n);
        this.#downSkip -= n;
        if (this.#downSkip > 0) return;
      }
      if (!this.#greetingSeen) {
        if (!b.view(18)) return; // NBDMAGIC, IHAVEOPT, handshake flags
        b.skip(18);
        this.#greetingSeen = true;
        continue;
      }
      const head = b.view(4);
      if (!head) return;
      const magic = head.getUint32(0);
      if (magic === OPTION_REPLY_HI) {
        const v = b.view(20);
        if (!v) return;
        b.skip(20);
        this.#downSkip = v.getUint32(16);
      } else if (magic === SIMPLE_REPLY_MAGIC) {
        const v = b.view(16);
        if (!v) return;
        b.skip(16);
        const cookie = v.getBigUint64(8);
        const req = this.#requests.get(cookie);
        const data = v.getUint32(4) === 0 && req?.type === CMD_READ;
        const length = data ? req!.length : 0n;
        this.#reply({
          kind: "simple",
          flags: 0,
          type: 0,
          cookie,
          offset: undefined,
          length,
        }, true);
        this.#downSkip = Number(length);
      } else if (magic === STRUCTURED_REPLY_MAGIC) {
        const v = b.view(20);
        if (!v) return;
        b.skip(20);
        const r: TappedReply = {
          kind: "structured",
          flags: v.getUint16(4),
          type: v.getUint16(6),
          cookie: v.getBigUint64(8),
          offset: undefined,
          length: BigInt(v.getUint32(16)),
        };
        this.#reply(r, (r.flags & 1) !== 0);
        this.#downSkip = Number(r.length);
      } else if (magic === EXTENDED_REPLY_MAGIC) {
        const v = b.view(32);
        if (!v) return;
        b.skip(32);
        const r: TappedReply = {
          kind: "extended",
          flags: v.getUint16(4),
          type: v.getUint16(6),
          cookie: v.getBigUint64(8),
          offset: v.getBigUint64(16),
          length: v.getBigUint64(24),
        };
        this.#reply(r, (r.flags & 1) !== 0);
        this.#downSkip = Number(r.length);
      } else {
        this.#tap.problems.push(`server sent unknown magic 0x${hex(magic)}`);
        b.skip(b.available);
        return;
      }
    }
  }

  #reply(r: TappedReply, done: boolean): void {
    this.#tap.replies.push(r);
    const req = this.#requests.get(r.cookie);
    if (!req) {
      this.#tap.problems.push(`reply to unknown cookie ${r.cookie}`);
      return;
    }
    if (r.offset !== undefined && r.offset !== req.offset) {
      this.#tap.problems.push(
        `reply (type ${r.type}) to cookie ${r.cookie} names offset ${r.offset}, the request was at ${req.offset}`,
      );
    }
    if (done) this.#requests.delete(r.cookie);
  }
}

function hex(n: number): string {
  return n.toString(16).padStart(8, "0");
}

/** A listening relay; point the client at {@linkcode WireTap.path}. */
export class WireTap {
  /** Every request the server was sent, in order. */
  readonly requests: TappedRequest[] = [];
  /** Every reply header the client was sent, in order. */
  readonly replies: TappedReply[] = [];
  /** What broke a rule the tap checks (offsets, cookies, magics). */
  readonly problems: string[] = [];
  /**
   * Extended `NBD_CMD_WRITE` requests without `NBD_CMD_FLAG_PAYLOAD_LEN`,
   * which the extended-headers spec requires on every write ("the flag
   * MUST be set for NBD_CMD_WRITE").
   */
  writesWithoutPayloadLen = 0;
  /** The relay's socket. */
  readonly path: string;
  readonly #listener: Deno.Listener;
  readonly #upstream: string;
  readonly #conns = new Set<Deno.Conn>();
  readonly #pumps: Promise<void>[] = [];
  readonly #accepting: Promise<void>;

  private constructor(path: string, upstream: string) {
    this.path = path;
    this.#upstream = upstream;
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#accepting = this.#accept();
  }

  /** Listens on `path` and relays every connection to `upstream`. */
  static open(path: string, upstream: string): WireTap {
    return new WireTap(path, upstream);
  }

  /** The requests of `type` the server received while `body` ran. */
  async requestsDuring(
    type: number,
    body: () => Promise<unknown>,
  ): Promise<TappedRequest[]> {
    const before = this.requests.length;
    await body();
    return this.requests.slice(before).filter((r) => r.type === type);
  }

  /** The reply chunks the tap saw for one cookie. */
  chunksOf(cookie: bigint): TappedReply[] {
    return this.replies.filter((r) => r.cookie === cookie);
  }

  async #accept(): Promise<void> {
    try {
      for await (const client of this.#listener) {
        this.#conns.add(client);
        let server: Deno.Conn;
        try {
          server = await Deno.connect({
            transport: "unix",
            path: this.#upstream,
          });
        } catch (e) {
          this.problems.push(`cannot reach the server: ${e}`);
          client.close();
          this.#conns.delete(client);
          continue;
        }
        this.#conns.add(server);
        const talk = new Conversation(this);
        this.#pumps.push(
          this.#pump(client, server, (c) => talk.fromClient(c)),
          this.#pump(server, client, (c) => talk.fromServer(c)),
        );
      }
    } catch {
      // The listener closed.
    }
  }

  /** Copies `from` to `to`, reading every chunk first; closes both at EOF. */
  async #pump(
    from: Deno.Conn,
    to: Deno.Conn,
    read: (chunk: Uint8Array) => void,
  ): Promise<void> {
    const buf = new Uint8Array(256 * 1024);
    try {
      while (true) {
        const n = await from.read(buf);
        if (n === null) break;
        const chunk = buf.subarray(0, n);
        read(chunk);
        let at = 0;
        while (at < n) at += await to.write(chunk.subarray(at));
      }
    } catch {
      // Either side went away; the other follows.
    }
    for (const c of [from, to]) {
      if (this.#conns.delete(c)) c.close();
    }
  }

  /** Stops listening, closes every relayed connection, waits for the pumps. */
  async close(): Promise<void> {
    this.#listener.close();
    await this.#accepting;
    for (const c of this.#conns) c.close();
    this.#conns.clear();
    await Promise.all(this.#pumps);
  }
}

/**
 * Runs `body` with a tap in front of the server `serve` starts in a fresh
 * directory under the Debian 13 root (where its programs reach it), then
 * closes the tap, stops the server and removes the directory.
 */
export async function withTap(
  serve: (dir: string) => Promise<Server>,
  body: (tap: WireTap) => Promise<void>,
): Promise<void> {
  const dir = await tempDir("trixie");
  let server: Server | undefined;
  let tap: WireTap | undefined;
  try {
    server = await serve(dir);
    tap = WireTap.open(`${dir}/tap.sock`, server.socket!);
    await body(tap);
  } finally {
    await tap?.close();
    await server?.stop();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Connects through `tap` with `metaContexts` and `trace`'s hook, bounded. */
export function connectThrough(
  tap: WireTap,
  trace: Trace,
  metaContexts: string[],
  exportName = "",
): Promise<NbdClient> {
  return within(
    10_000,
    "connect()",
    connect({ path: tap.path, exportName }, {
      metaContexts,
      debug: trace.hook,
    }),
  );
}
