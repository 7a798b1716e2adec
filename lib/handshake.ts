/**
 * The handshake: the server's greeting, then (fixed newstyle) a ladder of
 * options, each in `options/`, ending in transmission. Read beside the
 * "Handshake" section of `doc/proto.md`.
 *
 * @module
 */

import {
  CLISERV_MAGIC,
  describe,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_HAS_FLAGS,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  nameOf,
  NBDMAGIC,
  OPT_ABORT,
  OPTION_NAMES,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_FLAG_ERROR,
  REPLY_TYPE_NAMES,
} from "./constants.ts";
import type { TlsMode } from "./connect_options.ts";
import type { Tracer } from "./debug.ts";
import { NbdError, NbdOptionError, NbdProtocolError } from "./errors.ts";
import type { ByteStream, Transport } from "./transport.ts";
import { decodeString, encodeOption, Reader, SIZES, viewOf } from "./wire.ts";
import { negotiateTls } from "./options/starttls.ts";
import { negotiateReplies } from "./options/structured_reply.ts";
import { setMetaContexts } from "./options/meta_context.ts";
import { type BlockSize, enterTransmission } from "./options/go.ts";

/** Which handshake the server spoke. */
export type Protocol = "oldstyle" | "newstyle" | "fixed newstyle";

export type { BlockSize };

/** What the handshake settled. */
export interface ExportInfo {
  /** The export name (the server's canonical name when it sent one). */
  exportName: string;
  /** The server's description of the export, or `""`. */
  description: string;
  /** Size in bytes. */
  size: bigint;
  /** Transmission flags. */
  flags: number;
  /** Block size constraints in force (defaults when none were advertised). */
  blockSize: BlockSize;
  /** Whether the server advertised `NBD_INFO_BLOCK_SIZE`. */
  blockSizeAdvertised: boolean;
  /** The greeting style. */
  protocol: Protocol;
  /** Whether structured replies are in use. */
  structuredReplies: boolean;
  /** Whether extended headers are in use. */
  extendedHeaders: boolean;
  /** Whether the connection runs over TLS. */
  tls: boolean;
  /** Negotiated metadata contexts, by the id the server gave them. */
  metaContexts: Map<number, string>;
}

/** How to negotiate; see `ConnectOptions` for the user-facing names. */
export interface HandshakeOptions {
  exportName?: string;
  tls?: TlsMode;
  /** Upgrades the stream after the server accepts `NBD_OPT_STARTTLS`. */
  upgradeTls?: (stream: ByteStream) => Promise<ByteStream>;
  structuredReplies?: boolean;
  extendedHeaders?: boolean;
  metaContexts?: string[];
  blockSizes?: boolean;
  trace?: Tracer;
}

/** Option replies are bounded: strings are at most 4096 bytes each. */
export const MAX_OPTION_REPLY = 64 * 1024;

/** One reply to an option. */
export interface OptionReply {
  type: number;
  payload: Uint8Array;
}

/**
 * Option haggling over one connection: sends options, reads and checks
 * replies. The functions in `options/` are written against this.
 */
export class OptionSession {
  readonly transport: Transport;
  readonly trace: Tracer;
  readonly fixed: boolean;
  readonly noZeroes: boolean;
  tls = false;
  structuredReplies = false;
  extendedHeaders = false;
  /** Set once transmission begins or the session was aborted. */
  ended = false;

  constructor(
    transport: Transport,
    trace: Tracer,
    fixed: boolean,
    noZeroes: boolean,
  ) {
    this.transport = transport;
    this.trace = trace;
    this.fixed = fixed;
    this.noZeroes = noZeroes;
  }

  /** Sends one option with its data. */
  async send(option: number, data?: Uint8Array): Promise<void> {
    this.trace?.("send option", {
      option: nameOf(OPTION_NAMES, option),
      length: data?.length ?? 0,
    });
    await this.transport.write(encodeOption(option, data));
  }

  /**
   * Reads one reply to `option`, checking the magic, that it answers
   * `option`, and its length before reading the payload.
   */
  async reply(option: number): Promise<OptionReply> {
    const name = describe(OPTION_NAMES, option);
    const header = await this.transport.readExact(
      SIZES.optionReplyHeader,
      `an option reply to ${name}`,
    );
    const r = new Reader(header, "option reply header", "handshake");
    const magic = r.u64();
    const replied = r.u32();
    const type = r.u32();
    const length = r.u32();
    if (magic !== OPTION_REPLY_MAGIC) {
      throw new NbdProtocolError(
        "handshake",
        `Bad option reply magic 0x${magic.toString(16)} in reply to ${name}`,
      );
    }
    if (replied !== option) {
      throw new NbdProtocolError(
        "handshake",
        `Unexpected option reply ${
          describe(OPTION_NAMES, replied)
        }, expected ${name}`,
      );
    }
    if (length > MAX_OPTION_REPLY) {
      throw new NbdProtocolError(
        "handshake",
        `Option reply ${
          describe(REPLY_TYPE_NAMES, type)
        } to ${name} claims ${length} bytes, more than the limit of ${MAX_OPTION_REPLY}`,
      );
    }
    if (type === REP_ACK && length !== 0) {
      throw new NbdProtocolError(
        "handshake",
        `NBD_REP_ACK to ${name} carries ${length} unexpected bytes`,
      );
    }
    const payload = await this.transport.readExact(
      length,
      `the ${length}-byte payload of a reply to ${name}`,
    );
    this.trace?.("recv option reply", {
      option: nameOf(OPTION_NAMES, option),
      reply: nameOf(REPLY_TYPE_NAMES, type),
      length,
    });
    return { type, payload };
  }

  /**
   * Turns an error reply into an exception that names the option and carries
   * the server's message. `NBD_REP_ERR_TLS_REQD` says how to get TLS.
   */
  refusal(
    option: number,
    reply: OptionReply,
    context?: string,
  ): NbdOptionError {
    const text = errorText(reply.payload);
    let what = context;
    if (reply.type === REP_ERR_TLS_REQD && !this.tls) {
      what = `${context ? context + ": " : ""}The server requires TLS; ` +
        `connect with tls: "require" (or an nbds:// URI)`;
    }
    return new NbdOptionError(option, reply.type, text, what);
  }

  /** The error for a reply type that `option` cannot have. */
  unexpected(option: number, reply: OptionReply): NbdProtocolError {
    return new NbdProtocolError(
      "handshake",
      `Unexpected reply type ${
        describe(REPLY_TYPE_NAMES, reply.type >>> 0)
      } to ${describe(OPTION_NAMES, option)}`,
    );
  }

  /** True for replies that end the whole negotiation, whatever the option. */
  isFatal(reply: OptionReply): boolean {
    return reply.type === REP_ERR_SHUTDOWN ||
      (reply.type === REP_ERR_TLS_REQD && !this.tls);
  }

  /**
   * Ends option haggling with `NBD_OPT_ABORT` (a soft disconnect), waiting
   * briefly for the server's ACK, which older servers never send.
   */
  async abort(): Promise<void> {
    if (this.ended || !this.fixed || this.transport.closed) return;
    this.ended = true;
    try {
      await this.send(OPT_ABORT);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, 1000);
      });
      await Promise.race([this.reply(OPT_ABORT).catch(() => {}), timeout]);
      clearTimeout(timer);
    } catch {
      // The server may already be gone; the connection is closed next anyway.
    }
  }
}

/** True if a reply type is an error. */
export function isError(type: number): boolean {
  return (type & REP_FLAG_ERROR) !== 0;
}

/** The message string of an error reply, never failing on bad UTF-8. */
function errorText(payload: Uint8Array): string {
  try {
    return decodeString(payload, "error message", "handshake");
  } catch {
    return new TextDecoder().decode(payload);
  }
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
    const flags = rest.u32() & 0xffff;
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
      blockSize: { minimum: 1, preferred: 4096, maximum: 0xffffffff },
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
    if (session.fixed) {
      await negotiateTls(session, mode, options.upgradeTls);
      await negotiateReplies(session, options);
    }
    const wanted = options.metaContexts ?? [];
    const contexts = session.structuredReplies && wanted.length > 0
      ? await setMetaContexts(session, exportName, wanted)
      : new Map<number, string>();
    const details = await enterTransmission(session, exportName, options);
    session.ended = true;
    return {
      exportName: details.name ?? exportName,
      description: details.description ?? "",
      size: details.size,
      flags: effectiveFlags(details.flags),
      blockSize: details.blockSize ??
        { minimum: 1, preferred: 4096, maximum: 0xffffffff },
      blockSizeAdvertised: details.blockSize !== undefined,
      protocol: session.fixed ? "fixed newstyle" : "newstyle",
      structuredReplies: session.structuredReplies,
      extendedHeaders: session.extendedHeaders,
      tls: session.tls,
      metaContexts: contexts,
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
 * @throws {NbdError} when the server cannot haggle options.
 */
export async function openSession(
  transport: Transport,
  options: HandshakeOptions,
): Promise<OptionSession> {
  transport.phase = "handshake";
  const greeting = await greet(transport, options.trace);
  if (greeting.style === "oldstyle" || !greeting.session.fixed) {
    throw new NbdError(
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
