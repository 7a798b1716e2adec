/**
 * The option session: one connection in option haggling. It sends options,
 * reads and checks their replies, and turns refusals into typed errors. Every
 * file in `options/` is written against it; it imports none of them.
 *
 * @module
 */

import {
  nameOrNumber,
  numberAndName,
  OPT_ABORT,
  OPTION_NAMES,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_FLAG_ERROR,
  REPLY_TYPE_NAMES,
} from "../constants.ts";
import { within } from "../_deadline.ts";
import type { Tracer } from "../_debug.ts";
import { NbdOptionError, NbdProtocolError } from "../errors.ts";
import type { Transport } from "../transport.ts";
import { decodeString, encodeOption, Reader, SIZES } from "../_wire.ts";

/** A bound on replies to one option, so a hostile server cannot loop us. */
export const MAX_REPLIES = 65536;

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
      option: nameOrNumber(OPTION_NAMES, option),
      length: data?.length ?? 0,
    });
    await this.transport.write(encodeOption(option, data));
  }

  /**
   * Reads one reply to `option`, checking the magic, that it answers
   * `option`, and its length before reading the payload.
   */
  async reply(option: number): Promise<OptionReply> {
    const name = numberAndName(OPTION_NAMES, option);
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
          numberAndName(OPTION_NAMES, replied)
        }, expected ${name}`,
      );
    }
    if (length > MAX_OPTION_REPLY) {
      throw new NbdProtocolError(
        "handshake",
        `Option reply ${
          numberAndName(REPLY_TYPE_NAMES, type)
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
      option: nameOrNumber(OPTION_NAMES, option),
      reply: nameOrNumber(REPLY_TYPE_NAMES, type),
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
    const text = replyText(reply.payload);
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
        numberAndName(REPLY_TYPE_NAMES, reply.type >>> 0)
      } to ${numberAndName(OPTION_NAMES, option)}`,
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
      await within(this.reply(OPT_ABORT).catch(() => {}), 1000);
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
function replyText(payload: Uint8Array): string {
  try {
    return decodeString(payload, "error message", "handshake");
  } catch {
    return new TextDecoder().decode(payload);
  }
}
