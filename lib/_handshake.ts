/**
 * The handshake: the server's greeting, then (fixed newstyle) a ladder of
 * options, each in `options/`, ending in transmission. Read beside the
 * "Handshake" section of `doc/proto.md`.
 *
 * @module
 */

import {
  CLISERV_MAGIC,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_HAS_FLAGS,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  NBDMAGIC,
} from "./constants.ts";
import type { TlsMode } from "./connect_options.ts";
import type { Tracer } from "./_debug.ts";
import { NbdError, NbdProtocolError, NbdUnsupportedError } from "./errors.ts";
import { DEFAULT_BLOCK_SIZE, type ExportInfo } from "./export.ts";
import type { ByteStream, Transport } from "./transport.ts";
import { Reader, SIZES, viewOf } from "./_wire.ts";
import { enterTransmission } from "./options/_go.ts";
import { listMetaContexts, setMetaContexts } from "./options/_meta_context.ts";
import { OptionSession } from "./options/_session.ts";
import { negotiateTls, upgradingOnDemand } from "./options/_starttls.ts";
import { negotiateReplies } from "./options/_structured_reply.ts";

/** How to negotiate; see `ConnectOptions` for the user-facing names. */
export interface HandshakeOptions {
  exportName?: string;
  tls?: TlsMode;
  /** Upgrades the stream after the server accepts `NBD_OPT_STARTTLS`. */
  upgradeTls?: (stream: ByteStream) => Promise<ByteStream>;
  /**
   * With `tls` left at `"disable"`: when the server answers
   * `NBD_REP_ERR_TLS_REQD`, send `NBD_OPT_STARTTLS` and start over under TLS
   * (the NBD URI spec's "opportunistically TLS encrypted" `nbd:`).
   */
  tlsOnDemand?: boolean;
  structuredReplies?: boolean;
  extendedHeaders?: boolean;
  metaContexts?: string[];
  /** List the contexts the server offers before selecting any. */
  listMetaContexts?: boolean;
  blockSizes?: boolean;
  trace?: Tracer;
}

/** The server's greeting: oldstyle ends here; newstyle starts haggling. */
type Greeting =
  | { style: "oldstyle"; size: bigint; flags: number }
  | { style: "newstyle"; session: OptionSession };

/** Reads the greeting and, for newstyle, answers with the client flags. */
export async function greet(
  transport: Transport,
  trace: Tracer,
): Promise<Greeting> {
  const hello = await transport.readExact(
    SIZES.greeting,
    "the server greeting",
  );
  const v = viewOf(hello);
  const magic = v.getBigUint64(0);
  const second = v.getBigUint64(8);
  if (magic !== NBDMAGIC) {
    throw new NbdProtocolError(
      "handshake",
      `Bad greeting magic 0x${
        magic.toString(16)
      }: the server does not speak NBD`,
    );
  }
  if (second === CLISERV_MAGIC) {
    const rest = new Reader(
      await transport.readExact(SIZES.oldstyleRest, "the oldstyle greeting"),
      "oldstyle greeting",
      "handshake",
    );
    const size = rest.u64();
    const flags = rest.u32();
    // Only the 16 transmission-flag bits exist; QEMU's client refuses more.
    if (flags > 0xffff) {
      throw new NbdProtocolError(
        "handshake",
        `Unexpected export flags 0x${
          flags.toString(16)
        } in the oldstyle greeting: only the low 16 bits are defined`,
      );
    }
    trace?.("recv oldstyle greeting", { size, flags });
    return { style: "oldstyle", size, flags };
  }
  if (second !== IHAVEOPT) {
    throw new NbdProtocolError(
      "handshake",
      `Bad second greeting magic 0x${second.toString(16)}`,
    );
  }
  const hs = viewOf(
    await transport.readExact(SIZES.handshakeFlags, "the handshake flags"),
  ).getUint16(0);
  const fixed = (hs & FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (hs & FLAG_NO_ZEROES) !== 0;
  // Client flags only for what the server offered.
  const clientFlags = (fixed ? FLAG_C_FIXED_NEWSTYLE : 0) |
    (noZeroes ? FLAG_C_NO_ZEROES : 0);
  trace?.("recv newstyle greeting", { fixed, noZeroes });
  const out = new Uint8Array(SIZES.clientFlags);
  viewOf(out).setUint32(0, clientFlags);
  await transport.write(out);
  return {
    style: "newstyle",
    session: new OptionSession(transport, trace, fixed, noZeroes),
  };
}

/** Clears every flag bit when the server did not set NBD_FLAG_HAS_FLAGS. */
export function effectiveFlags(flags: number): number {
  return flags & FLAG_HAS_FLAGS ? flags : 0;
}

/**
 * Runs the whole handshake and returns what was negotiated. On failure in
 * fixed newstyle it sends `NBD_OPT_ABORT` once, here, and closes nothing:
 * the caller owns the transport.
 *
 * @throws {NbdOptionError} when the server refuses what is required.
 * @throws {NbdProtocolError} when the server breaks the protocol.
 */
export async function negotiate(
  transport: Transport,
  options: HandshakeOptions,
): Promise<ExportInfo> {
  const trace = options.trace;
  const mode = options.tls ?? "disable";
  const exportName = options.exportName ?? "";
  transport.phase = "handshake";
  const greeting = await greet(transport, trace);
  if (greeting.style === "oldstyle") {
    if (mode === "require") {
      throw new NbdError(
        "TLS is required but the server uses the oldstyle handshake, which cannot do TLS",
      );
    }
    return {
      exportName,
      description: "",
      size: greeting.size,
      flags: effectiveFlags(greeting.flags),
      blockSize: { ...DEFAULT_BLOCK_SIZE },
      blockSizeAdvertised: false,
      protocol: "oldstyle",
      structuredReplies: false,
      extendedHeaders: false,
      tls: false,
      metaContexts: new Map(),
    };
  }
  const session = greeting.session;
  try {
    if (!session.fixed && mode === "require") {
      throw new NbdError(
        "TLS is required but the server does not support fixed newstyle negotiation, which TLS needs",
      );
    }
    if (session.fixed) await negotiateTls(session, mode, options.upgradeTls);
    const { contexts, details, listed } = await upgradingOnDemand(
      session,
      mode === "disable" && options.tlsOnDemand === true,
      options.upgradeTls,
      async () => {
        if (session.fixed) await negotiateReplies(session, options);
        // Listed only where they can be used: over structured replies.
        const listed = options.listMetaContexts && session.structuredReplies
          ? await listMetaContexts(session, exportName, [])
          : undefined;
        const wanted = options.metaContexts ?? [];
        const contexts = session.structuredReplies && wanted.length > 0
          ? await setMetaContexts(session, exportName, wanted)
          : new Map<number, string>();
        const details = await enterTransmission(session, exportName, options);
        return { contexts, details, listed };
      },
    );
    session.ended = true;
    return {
      exportName: details.name ?? exportName,
      description: details.description ?? "",
      size: details.size,
      flags: effectiveFlags(details.flags),
      blockSize: details.blockSize ?? { ...DEFAULT_BLOCK_SIZE },
      blockSizeAdvertised: details.blockSize !== undefined,
      protocol: session.fixed ? "fixed newstyle" : "newstyle",
      structuredReplies: session.structuredReplies,
      extendedHeaders: session.extendedHeaders,
      tls: session.tls,
      metaContexts: contexts,
      // A server without NBD_OPT_LIST_META_CONTEXT offers none to list.
      ...(listed !== undefined
        ? { availableMetaContexts: listed === "unsupported" ? [] : listed }
        : {}),
    };
  } catch (e) {
    // A protocol violation is answered by hanging up; anything else gets a
    // polite NBD_OPT_ABORT, sent from this one place.
    if (!(e instanceof NbdProtocolError)) await session.abort();
    throw e;
  }
}

/**
 * Greets a fixed-newstyle server and upgrades to TLS as asked, leaving the
 * session open for options that do not enter transmission (list, info).
 *
 * @throws {NbdUnsupportedError} (feature `"fixed newstyle"`) when the
 *   server cannot haggle options (oldstyle, non-fixed newstyle).
 */
export async function openSession(
  transport: Transport,
  options: HandshakeOptions,
): Promise<OptionSession> {
  transport.phase = "handshake";
  const greeting = await greet(transport, options.trace);
  if (greeting.style === "oldstyle" || !greeting.session.fixed) {
    throw new NbdUnsupportedError(
      "fixed newstyle",
      `The server speaks ${
        greeting.style === "oldstyle" ? "the oldstyle" : "non-fixed newstyle"
      } handshake, which cannot list exports or describe them`,
    );
  }
  const session = greeting.session;
  try {
    await negotiateTls(session, options.tls ?? "disable", options.upgradeTls);
    return session;
  } catch (e) {
    if (!(e instanceof NbdProtocolError)) await session.abort();
    throw e;
  }
}
