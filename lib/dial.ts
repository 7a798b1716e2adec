/**
 * Dialling a server: open the stream that the options name (a socket, vsock,
 * or a server command's pipes or socket), run the handshake under one time
 * limit (the caller's signal and the connect timeout together), and hand
 * over the negotiated connection ({@linkcode openTransport}) or ask a
 * question in the option phase and leave (`inOptionPhase`, for
 * `probe.ts`). `connect.ts` builds a client on what this dials.
 *
 * @module
 */

import { DEFAULT_PORT } from "./constants.ts";
import type { Link } from "./connections.ts";
import type { ConnectOptions } from "./connect_options.ts";
import { deadline, untilAborted } from "./_deadline.ts";
import { makeTracer, type Tracer } from "./_debug.ts";
import {
  abortReason,
  errorText,
  NbdError,
  NbdUnsupportedError,
} from "./errors.ts";
import type { ExportInfo } from "./export.ts";
import { type HandshakeOptions, negotiate, openSession } from "./_handshake.ts";
import type { OptionSession } from "./options/_session.ts";
import { resolveOptions } from "./_resolve_options.ts";
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
export const DEFAULT_CONNECT_TIMEOUT = 30_000;

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
  // An engine that owns its sockets (GnuTLS through FFI) dials itself.
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
export async function inOptionPhase<T>(
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
 * import {
  openTransport,
} from "@nbd/client";
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
export async function negotiated(
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

/**
 * Runs `use` over the server of `o.command`, started for it: on failure the
 * server's own words (exit status, stderr) become the error, and the server
 * is stopped; on success `use` decides when it stops.
 */
export async function withCommand<T>(
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
