/**
 * Reaching a server: open the stream that the options name, run the
 * handshake under one time limit, and either hand over the negotiated
 * connection ({@linkcode connect}, {@linkcode openTransport}) or ask a
 * question in the option phase and leave ({@linkcode listExports},
 * {@linkcode probe}).
 *
 * @module
 */

import {
  DEFAULT_PORT,
  FLAG_CAN_MULTI_CONN,
  OPT_INFO,
  OPT_LIST,
  REP_ERR_TLS_REQD,
} from "./constants.ts";
import {
  clientOver,
  DEFAULT_MAX_IN_FLIGHT,
  type NbdClient,
  sizeNumber,
} from "./client.ts";
import type { Link } from "./connections.ts";
import type { ConnectOptions } from "./connect_options.ts";
import { deadline, pause, untilAborted } from "./_deadline.ts";
import { makeTracer, type Tracer } from "./_debug.ts";
import {
  abortReason,
  errorText,
  NbdError,
  NbdOptionError,
  NbdUnsupportedError,
} from "./errors.ts";
import type { BlockSize, ExportInfo, Protocol } from "./export.ts";
import { type HandshakeOptions, negotiate, openSession } from "./_handshake.ts";
import { type ExportDetails, infoOrGo } from "./options/_go.ts";
import { type ExportListing, listExports as optList } from "./options/list.ts";
import { listMetaContexts } from "./options/_meta_context.ts";
import type { OptionSession } from "./options/_session.ts";
import { negotiateReplies } from "./options/_structured_reply.ts";
import {
  backoff,
  DEFAULT_RECONNECT,
  exportChanges,
  reconnectPolicy,
} from "./reconnect.ts";
import { resolveOptions, shown } from "./_resolve_options.ts";
import {
  type ServerProcess,
  spawnOnSocket,
  spawnOverPipes,
} from "./_subprocess.ts";
import { upgradingOnDemand } from "./options/_starttls.ts";
import { engineDial, upgradeToTls } from "./tls/upgrade.ts";
import { type ByteStream, Transport } from "./transport.ts";
import { formatUri } from "./uri.ts";

/** Connecting and negotiating may take this long unless told otherwise. */
const DEFAULT_CONNECT_TIMEOUT = 30_000;

/**
 * Whether Deno's `--unstable-vsock` flag is among its own arguments (before
 * the script's); `undefined` when the command line cannot be read (Deno
 * lets a program read it only under `--allow-all`).
 */
function vsockFlagSeen(): boolean | undefined {
  const path = "/proc/self/cmdline";
  try {
    // Query first: reading without permission could prompt the user.
    if (
      Deno.permissions.querySync({ name: "read", path }).state !== "granted"
    ) {
      return undefined;
    }
    const args = Deno.readTextFileSync(path).split("\0");
    const script = Deno.mainModule.split("/").at(-1);
    const end = args.findIndex((a, i) =>
      i > 0 && a.split("/").at(-1) === script
    );
    return args.slice(0, end < 0 ? args.length : end).includes(
      "--unstable-vsock",
    );
  } catch {
    return undefined;
  }
}

/**
 * Refuses vsock unless Deno can do it: without `--unstable-vsock`,
 * `Deno.connect` ends the process (status 70) past any `catch`, and Deno
 * offers no way to ask whether the flag is on.
 *
 * @throws {NbdUnsupportedError} (feature `"vsock"`) naming the flag.
 */
function checkVsock(o: ConnectOptions): void {
  if (o.unstableVsock === true) return;
  const seen = vsockFlagSeen();
  if (seen) return;
  throw new NbdUnsupportedError(
    "vsock",
    `Cannot connect over vsock: Deno needs the --unstable-vsock flag for it and ends the process without it, ${
      seen === false
        ? "and it is not on the command line"
        : "and this process cannot see its command line (it can under --allow-all)"
    }. Run deno with --unstable-vsock, and pass unstableVsock: true if the flag is set where the command line does not show it`,
  );
}

/** Opens the byte stream to the server that `options` names. */
async function openStream(o: ConnectOptions): Promise<ByteStream> {
  const dial = engineDial(o);
  if (dial !== undefined) return await dial();
  if (o.path !== undefined) {
    return await Deno.connect({ transport: "unix", path: o.path });
  }
  if (o.cid !== undefined) {
    return await Deno.connect({
      transport: "vsock",
      cid: o.cid,
      port: o.port ?? DEFAULT_PORT,
    });
  }
  const conn = await Deno.connect({
    hostname: o.hostname ?? "localhost",
    port: o.port ?? DEFAULT_PORT,
  });
  // Small headers must not wait for ACKs (doc/proto.md asks for TCP_NODELAY).
  conn.setNoDelay(true);
  return conn;
}

function handshakeOptions(o: ConnectOptions, trace: Tracer): HandshakeOptions {
  const tls = o.tls ?? "disable";
  // Left unset, TLS is opportunistic: taken when the server requires it.
  const onDemand = o.tls === undefined;
  return {
    ...(o.exportName !== undefined ? { exportName: o.exportName } : {}),
    tls,
    tlsOnDemand: onDemand,
    ...(tls !== "disable" || onDemand
      ? {
        upgradeTls: (stream: ByteStream) =>
          upgradeToTls(stream, {
            ...o,
            ...(trace ? { debug: trace } : {}),
          }),
      }
      : {}),
    ...(o.structuredReplies !== undefined
      ? { structuredReplies: o.structuredReplies }
      : {}),
    ...(o.extendedHeaders !== undefined
      ? { extendedHeaders: o.extendedHeaders }
      : {}),
    ...(o.metaContexts !== undefined ? { metaContexts: o.metaContexts } : {}),
    ...(o.listMetaContexts ? { listMetaContexts: true } : {}),
    ...(o.blockSizes !== undefined ? { blockSizes: o.blockSizes } : {}),
    trace,
  };
}

function describeTarget(o: ConnectOptions): string {
  // A command has no address; formatUri would make up nbd://localhost/.
  if (o.command !== undefined) return `the server command ${o.command[0]}`;
  try {
    return formatUri(o);
  } catch {
    return o.path ?? `${o.hostname ?? "localhost"}:${o.port ?? DEFAULT_PORT}`;
  }
}

/**
 * Opens a connection and runs `step` over it, closing it on failure, under
 * the caller's signal and the connect timeout together: a stalled server
 * cannot hang the caller.
 */
async function withConnection<T>(
  o: ConnectOptions,
  step: (transport: Transport) => Promise<T>,
  open: () => Promise<ByteStream> = () => openStream(o),
): Promise<{ transport: Transport; result: T }> {
  const limit = o.connectTimeout ?? DEFAULT_CONNECT_TIMEOUT;
  using time = deadline(
    o.signal,
    limit,
    () =>
      new NbdError(
        `Connecting to ${
          describeTarget(o)
        } and negotiating took longer than ${limit} ms`,
      ),
  );
  const signal = time.signal;
  if (signal.aborted) throw abortReason(signal);
  if (o.cid !== undefined) checkVsock(o);
  let transport: Transport | undefined;
  // Reads and writes in progress fail at once, with the reason.
  const onAbort = () => transport?.close(abortReason(signal));
  signal.addEventListener("abort", onAbort, { once: true });
  try {
    const opening = open();
    let stream: ByteStream;
    try {
      stream = await untilAborted(opening, signal);
    } catch (e) {
      // A connect that completes after the abort must not leak.
      opening.then((s) => s.close(), () => {});
      if (signal.aborted) throw abortReason(signal);
      throw new NbdError(
        `Cannot connect to ${describeTarget(o)}: ${errorText(e)}`,
        { cause: e },
      );
    }
    transport = new Transport(stream);
    const result = await untilAborted(step(transport), signal);
    return { transport, result };
  } catch (e) {
    transport?.close();
    if (signal.aborted) throw abortReason(signal);
    throw e;
  } finally {
    signal.removeEventListener("abort", onAbort);
  }
}

/**
 * Opens a connection, asks `ask` in the option phase, then leaves with
 * `NBD_OPT_ABORT` and closes: the one path of `listExports` and `probe`.
 */
async function inOptionPhase<T>(
  o: ConnectOptions,
  ask: (session: OptionSession) => Promise<T>,
): Promise<T> {
  const trace = makeTracer(o.debug);
  const run = async (open?: () => Promise<ByteStream>) => {
    const { transport, result } = await withConnection(o, async (t) => {
      const how = handshakeOptions(o, trace);
      const session = await openSession(t, how);
      try {
        return await upgradingOnDemand(
          session,
          how.tlsOnDemand === true,
          how.upgradeTls,
          () => ask(session),
        );
      } finally {
        await session.abort();
      }
    }, open);
    transport.close();
    return result;
  };
  if (o.command === undefined) return await run();
  return await withCommand(o, async (open, server) => {
    const result = await run(open);
    await server.stop();
    return result;
  });
}

/**
 * Opens a connection and runs the whole handshake, returning the transport
 * ready for transmission, for code that carries the transmission phase
 * itself (a relay, a proxy, a kernel handoff of its own).
 *
 * @param target An NBD URI or options object.
 * @param options Options that override the target's.
 * @returns The transport and what was negotiated.
 * @throws {NbdError} when the connection or the handshake fails.
 *
 * @example
 * ```ts
 * import { openTransport } from "@nbd/client";
 * const { transport, info } = await openTransport(
 *   "nbd+unix:///?socket=/tmp/nbd.sock",
 *   { structuredReplies: false },
 * );
 * console.log(info.size, info.flags);
 * transport.close();
 * ```
 */
export async function openTransport(
  target: string | ConnectOptions,
  options: ConnectOptions = {},
): Promise<{ transport: Transport; info: ExportInfo }> {
  const o = resolveOptions(target, options);
  return await negotiated(o, makeTracer(o.debug));
}

/** Connects as `o` says (or over `stream`) and runs the whole handshake. */
async function negotiated(
  o: ConnectOptions,
  trace: Tracer,
  stream?: () => Promise<ByteStream>,
): Promise<Link> {
  const { transport, result } = await withConnection(
    o,
    (t) => negotiate(t, handshakeOptions(o, trace)),
    stream,
  );
  return { transport, info: result };
}

/** `connectTimeout` (0 for none) limited to `ms`. */
function cap(connectTimeout: number | undefined, ms: number): number {
  const own = connectTimeout ?? DEFAULT_CONNECT_TIMEOUT;
  return own === 0 ? ms : Math.min(own, ms);
}

/**
 * The first connection; with `openTimeout`, attempts go on (with the
 * reconnect backoff) until one succeeds or the time is up.
 */
async function firstLink(o: ConnectOptions, trace: Tracer): Promise<Link> {
  const limit = o.openTimeout ?? 0;
  const end = Date.now() + limit;
  for (let attempt = 0;; attempt++) {
    // An attempt that stalls may not outlast what is left of openTimeout.
    const left = end - Date.now();
    const per = limit === 0
      ? o
      : { ...o, connectTimeout: cap(o.connectTimeout, Math.max(1, left)) };
    try {
      return await negotiated(per, trace);
    } catch (e) {
      const left = end - Date.now();
      if (
        left <= 0 || o.signal?.aborted || !(e instanceof NbdError) ||
        e instanceof NbdUnsupportedError
      ) {
        throw e;
      }
      trace?.("connect attempt failed", {
        attempt: attempt + 1,
        error: errorText(e),
      });
      await pause(backoff(attempt, DEFAULT_RECONNECT, left), o.signal);
    }
  }
}

/**
 * The other connections `connections` asks for, when the export allows
 * several (`NBD_FLAG_CAN_MULTI_CONN`), negotiated as `o` says (the first
 * connection's negotiation); each must reach the same export.
 */
async function moreLinks(
  o: ConnectOptions,
  trace: Tracer,
  first: Link,
): Promise<Link[]> {
  const wanted = o.connections ?? 1;
  if (wanted === 1) return [];
  if (!(first.info.flags & FLAG_CAN_MULTI_CONN)) {
    trace?.("connections", {
      count: 1,
      wanted,
      reason: "the export does not advertise NBD_FLAG_CAN_MULTI_CONN",
    });
    return [];
  }
  const settled = await Promise.allSettled(
    Array.from({ length: wanted - 1 }, () => negotiated(o, trace)),
  );
  const links = settled.flatMap((r) =>
    r.status === "fulfilled" ? [r.value] : []
  );
  const failed = settled.find((r) => r.status === "rejected");
  const changes = links.flatMap((l) => exportChanges(first.info, l.info, true));
  if (failed || changes.length > 0) {
    for (const l of links) l.transport.close();
    if (failed) throw (failed as PromiseRejectedResult).reason;
    throw new NbdError(
      `Another connection to the same target reached a different export: ${
        changes.join("; ")
      }`,
    );
  }
  trace?.("connections", {
    count: wanted,
    reason: "the export advertises NBD_FLAG_CAN_MULTI_CONN",
  });
  return links;
}

/**
 * Runs `use` over the server of `o.command`, started for it: on failure the
 * server's own words (exit status, stderr) become the error, and the server
 * is stopped; on success `use` decides when it stops.
 */
async function withCommand<T>(
  o: ConnectOptions,
  use: (
    open: () => Promise<ByteStream>,
    server: ServerProcess,
  ) => Promise<T>,
): Promise<T> {
  const command = o.command!;
  let server: ServerProcess;
  let open: () => Promise<ByteStream>;
  if (o.socketActivation) {
    const started = await spawnOnSocket(command, o.signal);
    server = started.server;
    open = () => Promise.resolve(started.conn);
  } else {
    const started = spawnOverPipes(command);
    server = started.server;
    open = () => Promise.resolve(started.stream);
  }
  try {
    return await use(open, server);
  } catch (e) {
    const err = e instanceof TypeError || o.signal?.aborted
      ? e
      : await server.explain(e);
    await server.stop();
    throw err;
  }
}

/** Starts the server of `o.command` and negotiates over it. */
function overCommand(o: ConnectOptions, trace: Tracer): Promise<NbdClient> {
  return withCommand(o, async (open, server) => {
    const link = await negotiated(o, trace, open);
    return clientOver(
      {
        links: [link],
        maxInFlight: o.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
        trace,
      },
      () => server.stop(),
    );
  });
}

/**
 * Connects to an NBD server and negotiates an export.
 *
 * @param target An NBD URI (`nbd://host/export`,
 *   `nbd+unix:///export?socket=/path`, ...) or an options object.
 * @param options Options that override what the URI says.
 * @returns A connected client.
 * @throws {NbdOptionError} when the server refuses the export.
 * @throws {NbdProtocolError} when the server breaks the protocol.
 * @throws {NbdError} when the server cannot be reached.
 * @throws {TypeError} for a malformed URI or option.
 *
 * @example
 * ```ts
 * import { connect } from "@nbd/client";
 * await using nbd = await connect("nbd+unix:///?socket=/tmp/nbd.sock", {
 *   signal: AbortSignal.timeout(5000),
 * });
 * const first = await nbd.read(0, 512);
 * ```
 */
export async function connect(
  target: string | ConnectOptions,
  options: ConnectOptions = {},
): Promise<NbdClient> {
  const o = resolveOptions(target, options);
  const trace = makeTracer(o.debug);
  if (o.command !== undefined) return await overCommand(o, trace);
  const first = await firstLink(o, trace);
  // Every later connection negotiates as the first did, and what was
  // encrypted stays encrypted: a server without TLS is refused then, never
  // sent requests in clear text. The first has listed the contexts.
  const same = {
    ...o,
    ...(first.info.tls ? { tls: "require" as const } : {}),
    listMetaContexts: false,
  };
  let links: Link[];
  try {
    links = [first, ...await moreLinks(same, trace, first)];
  } catch (e) {
    first.transport.close();
    throw e;
  }
  const reconnect = reconnectPolicy(o.reconnect);
  // A new connection must not be bound by the signal of the first connect.
  const { signal: _once, ...again } = same;
  return clientOver({
    links,
    maxInFlight: o.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
    trace,
    reconnect,
    dial: reconnect
      ? (signal) => negotiated({ ...again, signal }, trace)
      : undefined,
  });
}

/**
 * Lists a server's exports with `NBD_OPT_LIST`.
 *
 * @param target An NBD URI or options object (its export name is ignored).
 * @param options Options that override the target's.
 * @returns Each export's name and description.
 * @throws {NbdOptionError} when the server refuses to list.
 * @throws {NbdError} when the server cannot list (oldstyle, non-fixed newstyle).
 *
 * @example
 * ```ts
 * import { listExports } from "@nbd/client";
 * for (const e of await listExports("nbd://127.0.0.1")) console.log(e.name);
 * ```
 */
export async function listExports(
  target: string | ConnectOptions,
  options: ConnectOptions = {},
): Promise<ExportListing[]> {
  const o = resolveOptions(target, options);
  return await inOptionPhase(o, async (session) => {
    const listed = await optList(session);
    if (!Array.isArray(listed)) {
      throw session.refusal(OPT_LIST, listed, "Cannot list exports");
    }
    return listed;
  });
}

/** What {@linkcode probe} learns about an export without connecting to it. */
export interface ExportProbe {
  /** The export name (canonical when the server sent one). */
  exportName: string;
  /** The server's description, or `""`. */
  description: string;
  /**
   * Size in bytes, as {@linkcode NbdClient.size}.
   *
   * @throws {RangeError} beyond `Number.MAX_SAFE_INTEGER` (read `sizeBigInt`).
   */
  readonly size: number;
  /** Size in bytes, exactly. */
  sizeBigInt: bigint;
  /** Transmission flags. */
  flags: number;
  /** Block size constraints, when advertised. */
  blockSize: BlockSize | undefined;
  /** Metadata contexts offered (`NBD_OPT_LIST_META_CONTEXT`). */
  metaContexts: string[];
  /** The handshake style. */
  protocol: Protocol;
  /** Whether TLS was negotiated. */
  tls: boolean;
  /** Whether the server agreed to structured replies. */
  structuredReplies: boolean;
  /** Whether the server agreed to extended headers. */
  extendedHeaders: boolean;
}

/** Options of {@linkcode probe}. */
export interface ProbeOptions extends ConnectOptions {
  /** Also list metadata contexts (default true). */
  listMetaContexts?: boolean;
}

/** One export described in a session whose reply format is settled. */
async function describeExport(
  session: OptionSession,
  o: ConnectOptions,
  name: string,
  listContexts: boolean,
): Promise<ExportProbe> {
  let metaContexts: string[] = [];
  if (listContexts && session.structuredReplies) {
    const listed = await listMetaContexts(session, name, []);
    if (listed !== "unsupported") metaContexts = listed;
  }
  const info: ExportDetails | "unsupported" = await infoOrGo(
    session,
    OPT_INFO,
    name,
    o.blockSizes !== false,
  );
  if (info === "unsupported") {
    throw new NbdError(
      "The server does not support NBD_OPT_INFO; connect() to learn about the export",
    );
  }
  const sizeBigInt = info.size;
  return {
    exportName: info.name ?? name,
    description: info.description ?? "",
    get size(): number {
      return sizeNumber(sizeBigInt);
    },
    sizeBigInt,
    flags: info.flags,
    blockSize: info.blockSize,
    metaContexts,
    protocol: "fixed newstyle",
    tls: session.tls,
    structuredReplies: session.structuredReplies,
    extendedHeaders: session.extendedHeaders,
  };
}

/**
 * Describes an export with `NBD_OPT_INFO` (and lists its metadata contexts)
 * without entering transmission, then leaves with `NBD_OPT_ABORT`.
 *
 * @param target An NBD URI or options object.
 * @param options Options that override the target's.
 * @returns What the server says about the export.
 * @throws {NbdOptionError} when the server refuses (for example, no such export).
 *
 * @example
 * ```ts
 * import { probe } from "@nbd/client";
 * const p = await probe("nbd://127.0.0.1/disk");
 * console.log(p.size, p.metaContexts);
 * ```
 */
export async function probe(
  target: string | ConnectOptions,
  options: ProbeOptions = {},
): Promise<ExportProbe> {
  const { listMetaContexts, ...rest } = options;
  const o = resolveOptions(target, rest);
  const listContexts = listContextsOption(target, listMetaContexts);
  return await inOptionPhase(o, async (session) => {
    await negotiateReplies(session, o);
    return await describeExport(
      session,
      o,
      o.exportName ?? "",
      listContexts,
    );
  });
}

/** `listMetaContexts` of probe options: `true` unless given. */
function listContextsOption(
  target: string | ConnectOptions,
  given: unknown,
): boolean {
  const listContexts: unknown = given ??
    (typeof target === "string" ? undefined : (target as ProbeOptions)
      .listMetaContexts) ??
    true;
  if (typeof listContexts !== "boolean") {
    throw new TypeError(
      `listMetaContexts must be true or false, not ${shown(listContexts)}`,
    );
  }
  return listContexts;
}

/** One export of {@linkcode probeExports}: as listed, and as described. */
export interface ListedExport {
  /** The name `NBD_OPT_LIST` gave. */
  name: string;
  /** The description `NBD_OPT_LIST` gave, or `""`. */
  description: string;
  /** What `NBD_OPT_INFO` said of it, unless the server refused. */
  probe?: ExportProbe;
  /** The server's refusal of `NBD_OPT_INFO` for it, if it refused. */
  error?: NbdOptionError;
}

/**
 * Lists a server's exports and describes each, as {@linkcode probe} does,
 * all on one connection (`NBD_OPT_LIST`, then `NBD_OPT_INFO` for each), as
 * nbdinfo's `--list` does: one server start for a `command`.
 *
 * @param target An NBD URI or options object (its export name is ignored).
 * @param options Options that override the target's.
 * @returns The exports in the server's order; one the server will not
 *   describe carries its refusal in `error`.
 * @throws {NbdOptionError} when the server refuses to list.
 * @throws {NbdError} when the server cannot list or describe exports
 *   (oldstyle, non-fixed newstyle, no `NBD_OPT_INFO`).
 *
 * @example
 * ```ts
 * import { probeExports } from "@nbd/client";
 * for (const e of await probeExports("nbd://127.0.0.1")) {
 *   console.log(e.name, e.probe?.size ?? e.error?.message);
 * }
 * ```
 */
export async function probeExports(
  target: string | ConnectOptions,
  options: ProbeOptions = {},
): Promise<ListedExport[]> {
  const { listMetaContexts, ...rest } = options;
  const o = resolveOptions(target, rest);
  const listContexts = listContextsOption(target, listMetaContexts);
  return await inOptionPhase(o, async (session) => {
    await negotiateReplies(session, o);
    const listed = await optList(session);
    if (!Array.isArray(listed)) {
      throw session.refusal(OPT_LIST, listed, "Cannot list exports");
    }
    const out: ListedExport[] = [];
    for (const { name, description } of listed) {
      const item = { name, description: description ?? "" };
      try {
        out.push({
          ...item,
          probe: await describeExport(session, o, name, listContexts),
        });
      } catch (e) {
        // A refusal is about that export; anything else ends the session.
        // So does "TLS required" when TLS is left to the server: the
        // session upgrades and starts over, as probe() does.
        if (
          !(e instanceof NbdOptionError) ||
          (e.reply === REP_ERR_TLS_REQD && o.tls === undefined && !session.tls)
        ) {
          throw e;
        }
        out.push({ ...item, error: e });
      }
    }
    return out;
  });
}
