/**
 * `NBD_OPT_EXTENDED_HEADERS` and `NBD_OPT_STRUCTURED_REPLY`: ask for the
 * richest reply format the server has, falling back step by step.
 *
 * @module
 */

import {
  nameOrNumber,
  OPT_EXTENDED_HEADERS,
  OPT_STRUCTURED_REPLY,
  OPTION_NAMES,
  REP_ACK,
  REPLY_TYPE_NAMES,
} from "../constants.ts";
import { isError, type OptionSession } from "./_session.ts";

/**
 * Sends an option without data whose only success is a bare ACK.
 *
 * @returns `"ok"` on ACK, `"unsupported"` on any non-fatal error reply.
 */
export async function simpleOption(
  session: OptionSession,
  option: number,
): Promise<"ok" | "unsupported"> {
  await session.send(option);
  const reply = await session.reply(option);
  if (reply.type === REP_ACK) return "ok";
  if (!isError(reply.type)) throw session.unexpected(option, reply);
  if (session.isFatal(reply)) throw session.refusal(option, reply);
  session.trace?.("option unsupported", {
    option: OPTION_NAMES[option],
    reply: nameOrNumber(REPLY_TYPE_NAMES, reply.type >>> 0),
  });
  return "unsupported";
}

/**
 * Extended headers first (they imply structured replies), then structured
 * replies; plain simple replies when the server has neither.
 */
export async function negotiateReplies(
  session: OptionSession,
  options: { structuredReplies?: boolean; extendedHeaders?: boolean },
): Promise<void> {
  if (options.structuredReplies === false) return;
  if (
    options.extendedHeaders !== false &&
    await simpleOption(session, OPT_EXTENDED_HEADERS) === "ok"
  ) {
    session.extendedHeaders = true;
    session.structuredReplies = true;
    return;
  }
  if (await simpleOption(session, OPT_STRUCTURED_REPLY) === "ok") {
    session.structuredReplies = true;
  }
}
