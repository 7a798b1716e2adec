/**
 * `NBD_OPT_LIST`: the server's exports with their descriptions.
 *
 * @module
 */

import {
  MAX_STRING_LENGTH,
  OPT_LIST,
  REP_ACK,
  REP_SERVER,
} from "../constants.ts";
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
 * Parses one `NBD_REP_SERVER`. A name over 4096 bytes could be neither
 * described nor connected to (no request may carry it), so the listing is
 * refused before anyone tries.
 *
 * @throws {NbdProtocolError} for a cut payload, bad UTF-8 or a name over
 *   4096 bytes.
 */
function parseServer(payload: Uint8Array): ExportListing {
  const r = new Reader(payload, "NBD_REP_SERVER", "handshake");
  const name = r.lengthPrefixedString("export name");
  // The prefix's length, known good now that the bytes were there.
  const length = payload.length - 4 - r.remaining;
  if (length > MAX_STRING_LENGTH) {
    throw new NbdProtocolError(
      "handshake",
      `NBD_REP_SERVER export name of ${length} bytes exceeds ${MAX_STRING_LENGTH}`,
    );
  }
  return { name, description: r.restString("export description") };
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
    out.push(parseServer(reply.payload));
  }
  throw new NbdProtocolError(
    "handshake",
    `Server listed more than ${MAX_REPLIES} exports`,
  );
}
