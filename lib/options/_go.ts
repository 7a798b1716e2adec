/**
 * `NBD_OPT_INFO` and `NBD_OPT_GO` (same request, same replies), with the
 * fallback a careful client makes to `NBD_OPT_LIST` and
 * `NBD_OPT_EXPORT_NAME` for servers that predate them.
 *
 * @module
 */

import {
  flagNames,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_EXPORT,
  INFO_NAME,
  INFO_NAMES,
  MAX_STRING_LENGTH,
  nameOrNumber,
  numberAndName,
  OPT_EXPORT_NAME,
  OPT_GO,
  OPTION_NAMES,
  REP_ACK,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  TRANSMISSION_FLAG_NAMES,
} from "../constants.ts";
import {
  NbdConnectionClosedError,
  NbdError,
  NbdOptionError,
  NbdProtocolError,
} from "../errors.ts";
import type { BlockSize } from "../export.ts";
import { encodeString, isPowerOfTwo, Reader, SIZES, Writer } from "../_wire.ts";
import { listExports } from "./list.ts";
import { isError, MAX_REPLIES, type OptionSession } from "./_session.ts";

/** What `NBD_OPT_INFO`/`NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) told us. */
export interface ExportDetails {
  size: bigint;
  flags: number;
  name?: string;
  description?: string;
  blockSize?: BlockSize;
}

/**
 * Checks advertised block sizes against the spec's rules.
 *
 * @throws {NbdProtocolError} naming the broken rule.
 */
export function validateBlockSize(
  minimum: number,
  preferred: number,
  maximum: number,
): BlockSize {
  const bad = (rule: string) =>
    new NbdProtocolError(
      "handshake",
      `Invalid NBD_INFO_BLOCK_SIZE (minimum ${minimum}, preferred ${preferred}, maximum ${maximum}): ${rule}`,
    );
  if (!isPowerOfTwo(minimum) || minimum > 65536) {
    throw bad("minimum must be a power of two no larger than 65536");
  }
  if (!isPowerOfTwo(preferred) || preferred < minimum) {
    throw bad("preferred must be a power of two at least the minimum");
  }
  if (maximum !== 0xffffffff && maximum % minimum !== 0) {
    throw bad("maximum must be a multiple of the minimum");
  }
  if (maximum < minimum) {
    throw bad("maximum must be at least the minimum");
  }
  return { minimum, preferred, maximum };
}

/** Encodes the shared INFO/GO request. */
export function encodeInfoRequest(
  exportName: string,
  infos: readonly number[],
): Uint8Array {
  const name = encodeString(exportName);
  if (name.length > MAX_STRING_LENGTH) {
    throw new RangeError(
      `Export name is ${name.length} bytes, longer than ${MAX_STRING_LENGTH}`,
    );
  }
  const w = new Writer(4 + name.length + 2 + 2 * infos.length)
    .u32(name.length)
    .bytes(name)
    .u16(infos.length);
  for (const info of infos) w.u16(info);
  return w.done();
}

/** Parses one NBD_REP_INFO into `details`; unknown types are skipped. */
export function parseInfo(
  payload: Uint8Array,
  details: Partial<ExportDetails>,
  session: OptionSession,
): void {
  const r = new Reader(payload, "NBD_REP_INFO", "handshake");
  const type = r.u16();
  const what = `NBD_REP_INFO ${numberAndName(INFO_NAMES, type)}`;
  const expectLength = (n: number) => {
    if (payload.length !== n) {
      throw new NbdProtocolError(
        "handshake",
        `${what} has length ${payload.length}, expected ${n}`,
      );
    }
  };
  const boundedString = (field: string) => {
    if (r.remaining > MAX_STRING_LENGTH) {
      throw new NbdProtocolError(
        "handshake",
        `${what} ${field} of ${r.remaining} bytes exceeds ${MAX_STRING_LENGTH}`,
      );
    }
    return r.restString(field);
  };
  let fields: Record<string, unknown>;
  switch (type) {
    case INFO_EXPORT:
      expectLength(2 + 8 + 2);
      details.size = r.u64();
      details.flags = r.u16();
      fields = {
        size: details.size,
        flags: flagNames(TRANSMISSION_FLAG_NAMES, details.flags),
      };
      break;
    case INFO_NAME:
      details.name = boundedString("export name");
      fields = { name: details.name };
      break;
    case INFO_DESCRIPTION:
      details.description = boundedString("description");
      fields = { description: details.description };
      break;
    case INFO_BLOCK_SIZE:
      expectLength(2 + 4 + 4 + 4);
      details.blockSize = validateBlockSize(r.u32(), r.u32(), r.u32());
      fields = { ...details.blockSize };
      break;
    default:
      session.trace?.("skip unknown info", {
        type: nameOrNumber(INFO_NAMES, type),
      });
      return;
  }
  session.trace?.("info", { type: INFO_NAMES[type], ...fields });
}

/**
 * Sends `NBD_OPT_INFO` or `NBD_OPT_GO` and collects the replies.
 *
 * @returns The details, or `"unsupported"` for `NBD_REP_ERR_UNSUP`.
 * @throws {NbdOptionError} for any other refusal, with the server's text.
 */
export async function infoOrGo(
  session: OptionSession,
  option: number,
  exportName: string,
  blockSizes: boolean,
): Promise<ExportDetails | "unsupported"> {
  const infos = [INFO_NAME, INFO_DESCRIPTION];
  if (blockSizes) infos.push(INFO_BLOCK_SIZE);
  await session.send(option, encodeInfoRequest(exportName, infos));
  const details: Partial<ExportDetails> = {};
  for (let i = 0; i < MAX_REPLIES; i++) {
    const reply = await session.reply(option);
    if (reply.type === REP_INFO) {
      parseInfo(reply.payload, details, session);
      continue;
    }
    if (reply.type === REP_ACK) {
      if (details.size === undefined || details.flags === undefined) {
        throw new NbdProtocolError(
          "handshake",
          `Server acknowledged ${
            OPTION_NAMES[option]
          } without sending NBD_INFO_EXPORT`,
        );
      }
      return details as ExportDetails;
    }
    if (!isError(reply.type)) {
      throw session.unexpected(option, reply);
    }
    if (reply.type === REP_ERR_UNSUP) return "unsupported";
    throw session.refusal(
      option,
      reply,
      `Cannot use export "${exportName}"`,
    );
  }
  throw new NbdProtocolError(
    "handshake",
    `Server sent more than ${MAX_REPLIES} replies to ${OPTION_NAMES[option]}`,
  );
}

/** `NBD_OPT_EXPORT_NAME`: no error reply; a missing export hangs up. */
export async function exportName(
  session: OptionSession,
  name: string,
): Promise<ExportDetails> {
  const bytes = encodeString(name);
  if (bytes.length > MAX_STRING_LENGTH) {
    throw new RangeError(
      `Export name is ${bytes.length} bytes, longer than ${MAX_STRING_LENGTH}`,
    );
  }
  await session.send(OPT_EXPORT_NAME, bytes);
  session.ended = true;
  let reply: Uint8Array;
  try {
    reply = await session.transport.readExact(
      SIZES.exportNameReply,
      "the reply to NBD_OPT_EXPORT_NAME",
    );
  } catch (e) {
    if (e instanceof NbdConnectionClosedError) {
      throw new NbdError(
        `Server closed the connection after NBD_OPT_EXPORT_NAME: export "${name}" probably does not exist or is refused`,
        { cause: e },
      );
    }
    throw e;
  }
  if (!session.noZeroes) {
    await session.transport.skip(
      SIZES.exportNameZeroes,
      "the zeroes after the NBD_OPT_EXPORT_NAME reply",
    );
  }
  const r = new Reader(reply, "NBD_OPT_EXPORT_NAME reply", "handshake");
  const size = r.u64();
  const flags = r.u16();
  session.trace?.("export", {
    size,
    flags: flagNames(TRANSMISSION_FLAG_NAMES, flags),
  });
  return { size, flags };
}

/**
 * Enters transmission: `NBD_OPT_GO`, or for servers without it a check with
 * `NBD_OPT_LIST` (for a clear "no such export") and `NBD_OPT_EXPORT_NAME`.
 */
export async function enterTransmission(
  session: OptionSession,
  name: string,
  options: { blockSizes?: boolean },
): Promise<ExportDetails> {
  if (!session.fixed) return await exportName(session, name);
  const go = await infoOrGo(
    session,
    OPT_GO,
    name,
    options.blockSizes !== false,
  );
  if (go !== "unsupported") return go;
  session.trace?.("fallback", {
    from: "NBD_OPT_GO",
    to: "NBD_OPT_EXPORT_NAME",
  });
  const listed = await listExports(session);
  // A server that will not list cannot confirm the name; try it anyway.
  if (Array.isArray(listed) && !listed.some((e) => e.name === name)) {
    const names = listed.map((e) => JSON.stringify(e.name)).join(", ");
    throw new NbdOptionError(
      OPT_GO,
      REP_ERR_UNKNOWN,
      "",
      `Export "${name}" is not offered by the server (it offers: ${
        names || "none"
      })`,
    );
  }
  return await exportName(session, name);
}
