/**
 * `NBD_OPT_LIST`: the server's exports with their descriptions.
 *
 * @module
 */

import { OPT_LIST, REP_ACK, REP_SERVER } from "../constants.ts";
import { NbdProtocolError } from "../errors.ts";
import { Reader } from "../_wire.ts";
import {
  isError,
  MAX_REPLIES,
  type OptionReply,
  type OptionSession,
} from "./_session.ts";

/** One export as `NBD_OPT_LIST` describes it. */
export interface ExportListing {
  /** The name to connect with. */
  name: string;
  /** Free text from the server, or `""`. */
  description: string;
}

/**
 * Lists exports.
 *
 * @returns The exports, or the server's error reply when it will not list
 *   (the caller decides whether that is fatal).
 * @throws {NbdOptionError} for a fatal refusal (TLS required, shutdown).
 */
export async function listExports(
  session: OptionSession,
): Promise<ExportListing[] | OptionReply> {
  await session.send(OPT_LIST);
  const out: ExportListing[] = [];
  for (let i = 0; i < MAX_REPLIES; i++) {
    const reply = await session.reply(OPT_LIST);
    if (reply.type === REP_ACK) return out;
    if (isError(reply.type)) {
      if (session.isFatal(reply)) throw session.refusal(OPT_LIST, reply);
      return reply;
    }
    if (reply.type !== REP_SERVER) {
      throw session.unexpected(OPT_LIST, reply);
    }
    const r = new Reader(reply.payload, "NBD_REP_SERVER", "handshake");
    const name = r.lengthPrefixedString("export name");
    const description = r.restString("export description");
    out.push({ name, description });
  }
  throw new NbdProtocolError(
    "handshake",
    `Server listed more than ${MAX_REPLIES} exports`,
  );
}
