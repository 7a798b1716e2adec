/**
 * Connecting: the first connection (tried again until `openTimeout` with
 * the reconnect backoff), the further ones `connections` asks for, each
 * reaching the same export, and the client over them; or a client over a
 * server command started for it. `dial.ts` opens and negotiates each
 * connection; `probe.ts` asks questions without connecting a client.
 *
 * @module
 */

import { FLAG_CAN_MULTI_CONN } from "./constants.ts";
import { clientOver, DEFAULT_MAX_IN_FLIGHT, type NbdClient } from "./client.ts";
import type { Link } from "./connections.ts";
import type { ConnectOptions } from "./connect_options.ts";
import { makeTracer, type Tracer } from "./_debug.ts";
import { errorText, NbdError, NbdUnsupportedError } from "./errors.ts";
import {
  DEFAULT_RECONNECT,
  exportChanges,
  reconnectPolicy,
  retry,
} from "./reconnect.ts";
import { resolveOptions } from "./_resolve_options.ts";
import { DEFAULT_CONNECT_TIMEOUT, negotiated, withCommand } from "./dial.ts";

export { openTransport } from "./dial.ts";
export {
  type ExportProbe,
  type ListedExport,
  listExports,
  probe,
  probeExports,
  type ProbeOptions,
} from "./probe.ts";

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
  return await retry(
    // An attempt that stalls may not outlast what is left of openTimeout.
    (_n, left) =>
      negotiated(
        limit === 0
          ? o
          : { ...o, connectTimeout: cap(o.connectTimeout, Math.max(1, left)) },
        trace,
      ),
    {
      delay: DEFAULT_RECONNECT.delay,
      maxDelay: DEFAULT_RECONNECT.maxDelay,
      deadline: Date.now() + limit,
      signal: o.signal,
      retryable: (e) =>
        e instanceof NbdError && !(e instanceof NbdUnsupportedError),
      debug: (attempt, e, again) => {
        if (again) {
          trace?.("connect attempt failed", { attempt, error: errorText(e) });
        }
      },
    },
  );
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
 * import {
  connect,
} from "@nbd/client";
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
