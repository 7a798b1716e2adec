/**
 * What `info` learns about a server and its exports: the facts of a session
 * and of one export, gathered by a probe (`NBD_OPT_INFO`) or, where a server
 * will not answer one, by connecting.
 *
 * @module
 */

import {
  type Capabilities,
  capabilities,
  connect,
  type ExportProbe,
  NbdUnsupportedError,
  probe,
  type TlsEngine,
} from "../../mod.ts";
import { type ServerCommand, tlsEngineOption } from "../_cli.ts";

/** nbdinfo runs file(1) on this much of the start of the export. */
const CONTENT_BYTES = 8192;

/** Connecting and negotiating, probe and fallback together, take at most this. */
export const CONNECT_TIMEOUT_MS = 30_000;

/** What a session negotiated, the same for every export of a server. */
export interface SessionFacts {
  protocol: string;
  tls: boolean;
  structuredReplies: boolean;
  extendedHeaders: boolean;
}

/** What the server says about one export. */
export interface ExportFacts {
  exportName: string;
  description: string;
  /** Exactly, whatever the size (nbdinfo prints 2^63 - 1 as it is). */
  size: bigint;
  flags: number;
  /** What the flags allow, as the library reads them. */
  can: Capabilities;
  blockSize: { minimum: number; preferred: number; maximum: number } | null;
  /** `null` when the server would not list its contexts. */
  contexts: string[] | null;
  /** What file(1) says of the first bytes; `null` when not asked or unknown. */
  content: string | null;
}

/**
 * What the tool is asked about: a server at a URI, or one it starts itself.
 */
export type Target = string | ServerCommand;

/** The target as `connect()` takes it. */
export function connectTarget(t: Target): string | ServerCommand["options"] {
  return typeof t === "string" ? t : t.options;
}

/** The target in messages. */
function targetText(t: Target): string {
  return typeof t === "string" ? t : t.text;
}

export type Client = Awaited<ReturnType<typeof connect>>;

/** nbdinfo's names for the protocol styles. */
const PROTOCOL_NAMES: Readonly<Record<string, string>> = {
  "oldstyle": "oldstyle",
  "newstyle": "newstyle",
  "fixed newstyle": "newstyle-fixed",
};

/** The session facts of a probe or a connection, in nbdinfo's words. */
function sessionFacts(s: SessionFacts): SessionFacts {
  return {
    protocol: PROTOCOL_NAMES[s.protocol] ?? s.protocol,
    tls: s.tls,
    structuredReplies: s.structuredReplies,
    extendedHeaders: s.extendedHeaders,
  };
}

/**
 * Asks the server about one export without entering transmission
 * (`NBD_OPT_INFO` plus `NBD_OPT_LIST_META_CONTEXT`). An oldstyle server,
 * or one that refuses `NBD_OPT_INFO`, is asked the long way: by connecting.
 */
export async function gather(
  target: Target,
  exportName: string | undefined,
  interrupt: AbortSignal,
  content = false,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  // One time limit for the probe and the fallback together: a server that
  // accepts and never speaks costs one timeout, reported once.
  const limit = new AbortController();
  const timer = setTimeout(
    () =>
      limit.abort(
        new Error(
          `Connecting to ${
            targetText(target)
          } and negotiating took longer than ${CONNECT_TIMEOUT_MS} ms`,
        ),
      ),
    CONNECT_TIMEOUT_MS,
  );
  const signal = AbortSignal.any([interrupt, limit.signal]);
  try {
    if (typeof target !== "string") {
      // One server start for a command: one connection lists the
      // contexts, then goes on to transmission (for the content), where
      // probe() and then a connection would start the server twice.
      return await connected(target, {
        ...await tlsEngineOption(connectTarget(target)),
        signal,
        connectTimeout: 0,
        listMetaContexts: true,
      }, content);
    }
    return await probeOrConnect(target, exportName, signal, content);
  } finally {
    clearTimeout(timer);
  }
}

async function probeOrConnect(
  uri: string,
  exportName: string | undefined,
  signal: AbortSignal,
  content: boolean,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  // The library's own limit would start again for the fallback.
  const options = {
    ...await tlsEngineOption(uri),
    ...(exportName !== undefined ? { exportName } : {}),
    signal,
    connectTimeout: 0,
  };
  let probeError: unknown;
  try {
    const p = await probe(uri, { ...options, listMetaContexts: true });
    // As nbdinfo, which reads the content after NBD_OPT_INFO, with GO.
    let said: string | null = null;
    if (content) {
      const nbd = await connect(uri, options);
      try {
        said = await contentOf(nbd, signal);
      } finally {
        await nbd.close();
      }
    }
    return probeFacts(p, said);
  } catch (e) {
    probeError = e;
  }
  // Out of time (or interrupted): asking again would only wait again.
  if (signal.aborted) throw probeError;
  try {
    return await connected(uri, options, content);
  } catch (e) {
    throw e instanceof ConnectFailed ? probeError : e;
  }
}

/** What a probe tells, with the content read apart (or `null`). */
export function probeFacts(
  p: ExportProbe,
  content: string | null,
): { session: SessionFacts; export: ExportFacts } {
  // Contexts are only listed over structured replies.
  const contexts = p.structuredReplies ? p.metaContexts : null;
  return {
    session: sessionFacts(p),
    export: {
      exportName: p.exportName,
      description: p.description,
      size: p.sizeBigInt,
      flags: p.flags,
      can: capabilities({
        flags: p.flags,
        structuredReplies: p.structuredReplies,
        metaContexts: contexts?.length ?? 0,
        extendedHeaders: p.extendedHeaders,
      }),
      blockSize: p.blockSize ?? null,
      contexts,
      content,
    },
  };
}

/** connect() itself failed (rather than what came after). */
class ConnectFailed extends Error {}

/** What a connection to the export tells, and its content if asked. */
async function connected(
  target: Target,
  options: {
    exportName?: string;
    signal: AbortSignal;
    connectTimeout: number;
    listMetaContexts?: boolean;
    tlsEngine?: TlsEngine;
  },
  content: boolean,
): Promise<{ session: SessionFacts; export: ExportFacts }> {
  let nbd: Client;
  try {
    nbd = await connect(connectTarget(target), options);
  } catch (e) {
    // A URI target falls back to the probe's error; a command has none.
    if (typeof target === "string") throw new ConnectFailed();
    throw e;
  }
  try {
    return {
      session: sessionFacts(nbd),
      export: {
        exportName: nbd.exportName,
        description: nbd.description,
        size: nbd.sizeBigInt,
        flags: nbd.flags,
        can: capabilities({
          flags: nbd.flags,
          structuredReplies: nbd.structuredReplies,
          // As for a probe: what the server offers, where it was listed.
          metaContexts: (nbd.availableMetaContexts ?? nbd.metaContexts).length,
          extendedHeaders: nbd.extendedHeaders,
        }),
        // The client's defaults are not the server's word.
        blockSize: nbd.blockSizeAdvertised ? nbd.blockSize : null,
        // Listed for a command; a URI's probe lists them instead.
        contexts: nbd.availableMetaContexts ?? null,
        content: content ? await contentOf(nbd, options.signal) : null,
      },
    };
  } finally {
    await nbd.close();
  }
}

/**
 * What file(1) says of the first bytes of the export, as nbdinfo shows it:
 * the first line of `file -b`, or `null` when the bytes cannot be read or
 * there is no `file` program to ask (nbdinfo leaves the field out then too).
 */
export async function contentOf(
  nbd: Client,
  signal: AbortSignal,
): Promise<string | null> {
  const length = Number(
    nbd.sizeBigInt < BigInt(CONTENT_BYTES)
      ? nbd.sizeBigInt
      : BigInt(CONTENT_BYTES),
  );
  let data: Uint8Array = new Uint8Array(0);
  try {
    if (length > 0) data = await nbd.read(0, length, { signal });
  } catch (e) {
    if (signal.aborted) throw e;
    return null;
  }
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("file", {
      args: ["-b", "-"],
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
      signal,
    }).spawn();
  } catch {
    // Not installed, or no --allow-run: the content is best effort.
    return null;
  }
  const writer = child.stdin.getWriter();
  // file(1) may stop reading once it knows; that is its answer.
  await writer.write(data).catch(() => {});
  await writer.close().catch(() => {});
  const out = await child.output();
  if (!out.success) return null;
  const line = new TextDecoder().decode(out.stdout).split("\n")[0]!;
  return line === "" ? null : line;
}

/** Whether `e` (or what it wraps) says the server has no option phase. */
export function cannotHaggle(e: unknown): boolean {
  for (let at = e, i = 0; at instanceof Error && i < 8; at = at.cause, i++) {
    if (at instanceof NbdUnsupportedError && at.feature === "fixed newstyle") {
      return true;
    }
  }
  return false;
}
