/**
 * Probing: questions asked in the option phase, after which the connection
 * is left with `NBD_OPT_ABORT` and no client is made: the exports a server
 * lists ({@linkcode listExports}), what one export offers
 * ({@linkcode probe}), and both for every export ({@linkcode probeExports}).
 *
 * @module
 */

import { OPT_INFO, OPT_LIST, REP_ERR_TLS_REQD } from "./constants.ts";
import { sizeNumber } from "./request_options.ts";
import type { ConnectOptions } from "./connect_options.ts";
import { NbdError, NbdOptionError } from "./errors.ts";
import type { BlockSize, Protocol } from "./export.ts";
import { type ExportDetails, infoOrGo } from "./options/_go.ts";
import { type ExportListing, listExports as optList } from "./options/list.ts";
import { listMetaContexts } from "./options/_meta_context.ts";
import type { OptionSession } from "./options/_session.ts";
import { negotiateReplies } from "./options/_structured_reply.ts";
import { resolveOptions, shown } from "./_resolve_options.ts";
import { inOptionPhase } from "./dial.ts";

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
 * import {
  listExports,
} from "@nbd/client";
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
 * import {
  probe,
} from "@nbd/client";
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
 * import {
  probeExports,
} from "@nbd/client";
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
