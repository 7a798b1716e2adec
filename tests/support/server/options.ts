/**
 * The handshake: the greeting, the option haggling, and the correct answer
 * to every option, unless a hook or an override answers instead.
 *
 * @module
 */

import {
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_NAME,
  numberAndName,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  OPTION_NAMES,
  REP_ACK,
  REP_ERR_BLOCK_SIZE_REQD,
  REP_ERR_INVALID,
  REP_ERR_POLICY,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
} from "../../../lib/constants.ts";
import type { Connection } from "./connection.ts";
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  optionExportName,
} from "./decode.ts";
import {
  exportNameReply,
  infoBlockSizePayload,
  infoExportPayload,
  infoStringPayload,
  metaContextPayload,
  newstyleGreeting,
  oldstyleGreeting,
  optionReply,
  repServerPayload,
} from "./encode.ts";
import type { OptionContext, ReceivedOption } from "./hooks.ts";
import {
  BASE_ALLOCATION,
  type ExportState,
  transmissionFlags,
} from "./store.ts";

/** Option data beyond this is a hostile client; the server hangs up. */
const MAX_OPTION_DATA = 1 << 20;

/** Sends the greeting, or what the configuration has instead. */
async function greet(conn: Connection, standard: Uint8Array): Promise<void> {
  const g = conn.config.greeting ?? standard;
  await conn.act(g instanceof Uint8Array ? [g] : g);
}

/**
 * Runs the handshake to its end: the connection is then in transmission, or
 * closed.
 */
export async function handshake(conn: Connection): Promise<void> {
  const cfg = conn.config;
  if (cfg.stallHandshake) {
    await conn.stallReading();
    return;
  }
  const style = cfg.style ?? "fixed";
  if (style === "oldstyle") {
    const ex = conn.server.defaultExport();
    conn.current = ex;
    await greet(
      conn,
      oldstyleGreeting(
        ex.config.size,
        transmissionFlags(ex.config, conn.structured),
      ),
    );
    if (conn.isClosed) return;
    conn.log.exportName = ex.config.name;
    conn.phase = "transmission";
    return;
  }
  const advertised = cfg.handshakeFlags ??
    (style === "fixed" ? FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES : 0);
  await greet(conn, newstyleGreeting(advertised));
  if (conn.isClosed) return;
  const flagBytes = await conn.mustRead(4);
  const clientFlags = new DataView(flagBytes.buffer).getUint32(0);
  conn.log.clientFlags = clientFlags;
  const allowed =
    (advertised & FLAG_FIXED_NEWSTYLE ? FLAG_C_FIXED_NEWSTYLE : 0) |
    (advertised & FLAG_NO_ZEROES ? FLAG_C_NO_ZEROES : 0);
  if (clientFlags & ~allowed) {
    conn.close(
      `client flags 0x${clientFlags.toString(16)} not advertised; hung up`,
    );
    return;
  }
  conn.fixed = (clientFlags & FLAG_C_FIXED_NEWSTYLE) !== 0 &&
    style === "fixed";
  conn.noZeroes = (clientFlags & FLAG_C_NO_ZEROES) !== 0;
  const max = cfg.maxOptions ?? 64;
  for (let i = 0; i < max; i++) {
    const header = await conn.readExact(16);
    if (header === null) {
      conn.log.notes.push("client closed during the handshake");
      return;
    }
    const view = new DataView(header.buffer);
    if (view.getBigUint64(0) !== IHAVEOPT) {
      conn.close("bad option magic; hung up");
      return;
    }
    const option = view.getUint32(8);
    const length = view.getUint32(12);
    if (length > MAX_OPTION_DATA) {
      conn.close(`option data of ${length} bytes; hung up`);
      return;
    }
    const payload = await conn.mustRead(length);
    const received: ReceivedOption = {
      option,
      name: numberAndName(OPTION_NAMES, option),
      payload,
    };
    conn.log.options.push(received);
    const done = await handleOption(conn, received);
    if (done || conn.isClosed) return;
  }
  conn.close(`more than ${max} options; hung up`);
}

/** Handles one option; `true` once the handshake is over. */
async function handleOption(
  conn: Connection,
  opt: ReceivedOption,
): Promise<boolean> {
  const cfg = conn.config;
  const ctx: OptionContext = {
    ...conn.hookContext(),
    defaultReply: () => defaultOption(conn, opt).replies,
  };
  const hooked = cfg.onOption ? await cfg.onOption(opt, ctx) : undefined;
  if (hooked !== undefined) {
    const actions = Array.isArray(hooked) ? hooked : [hooked];
    await conn.act(actions);
    if (actions.includes("transmission")) {
      const name = optionExportName(opt) ?? "";
      const ex = conn.server.findExport(name) ??
        conn.server.defaultExport();
      enterTransmission(conn, ex);
      return true;
    }
    return actions.includes("drop") || actions.includes("stall");
  }
  const override = cfg.optionReplies?.[opt.option];
  if (
    override !== undefined && (conn.fixed || opt.option !== OPT_EXPORT_NAME)
  ) {
    const o = typeof override === "number" ? { reply: override } : override;
    await conn.send(optionReply(opt.option, o.reply, o.message));
    if (opt.option === OPT_ABORT) {
      conn.close("client aborted");
      return true;
    }
    return false;
  }
  const result = defaultOption(conn, opt);
  await conn.send(...result.replies);
  if (result.hangup) {
    conn.close(result.hangup);
    return true;
  }
  if (result.enter) {
    enterTransmission(conn, result.enter);
    return true;
  }
  return false;
}

function enterTransmission(conn: Connection, ex: ExportState): void {
  conn.current = ex;
  conn.log.exportName = ex.config.name;
  if (conn.contextsExport !== ex.config.name) conn.contexts = [];
  conn.log.metaContexts = [...conn.contexts];
  conn.log.structuredReplies = conn.structured;
  conn.log.extendedHeaders = conn.extended;
  conn.phase = "transmission";
}

/**
 * The correct answer to an option, as bytes, plus what follows it. Side
 * effects on negotiated state happen here (structured replies, contexts).
 */
function defaultOption(
  conn: Connection,
  opt: ReceivedOption,
): { replies: Uint8Array[]; enter?: ExportState; hangup?: string } {
  const cfg = conn.config;
  const o = opt.option;
  const err = (type: number, message: string) => ({
    replies: [optionReply(o, type, message)],
  });
  if (!conn.fixed && o !== OPT_EXPORT_NAME) {
    // Non-fixed newstyle servers knew no other option and hung up.
    return {
      replies: [],
      hangup: `option ${opt.name} in non-fixed newstyle; hung up`,
    };
  }
  switch (o) {
    case OPT_EXPORT_NAME: {
      const name = optionExportName(opt) ?? "";
      const ex = conn.server.findExport(name);
      if (!ex) {
        return { replies: [], hangup: `no export "${name}"; hung up` };
      }
      return {
        replies: [
          exportNameReply(
            ex.config.size,
            transmissionFlags(ex.config, conn.structured),
            conn.noZeroes,
          ),
        ],
        enter: ex,
      };
    }
    case OPT_ABORT:
      return { replies: [optionReply(o, REP_ACK)], hangup: "client aborted" };
    case OPT_LIST: {
      if (opt.payload.length !== 0) {
        return err(REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
      }
      const replies = conn.server.exports.map((ex) =>
        optionReply(
          o,
          REP_SERVER,
          repServerPayload(ex.config.name, ex.config.description ?? ""),
        )
      );
      replies.push(optionReply(o, REP_ACK));
      return { replies };
    }
    case OPT_STARTTLS: {
      const r = cfg.starttls ?? { reply: REP_ERR_POLICY };
      return {
        replies: [
          optionReply(o, r.reply, r.message ?? "TLS is not available"),
        ],
      };
    }
    case OPT_INFO:
    case OPT_GO:
      return infoOrGo(conn, opt);
    case OPT_STRUCTURED_REPLY:
      if (cfg.structuredReplies === false) {
        return err(REP_ERR_UNSUP, "structured replies are off");
      }
      if (opt.payload.length !== 0) {
        return err(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
      }
      conn.structured = true;
      return { replies: [optionReply(o, REP_ACK)] };
    case OPT_EXTENDED_HEADERS:
      if (cfg.extendedHeaders === false) {
        return err(REP_ERR_UNSUP, "extended headers are off");
      }
      if (opt.payload.length !== 0) {
        return err(REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
      }
      conn.extended = true;
      conn.structured = true;
      return { replies: [optionReply(o, REP_ACK)] };
    case OPT_LIST_META_CONTEXT:
    case OPT_SET_META_CONTEXT:
      return metaContext(conn, opt);
    default:
      return err(REP_ERR_UNSUP, `option ${opt.name} is not supported`);
  }
}

/**
 * Decodes option data that names an export and finds that export; when the
 * data is malformed or names no export, the refusal to send instead.
 */
function namedExport<T extends { name: string }>(
  conn: Connection,
  o: number,
  decode: () => T,
): { request: T; ex: ExportState } | { replies: Uint8Array[] } {
  let request: T;
  try {
    request = decode();
  } catch {
    return {
      replies: [optionReply(o, REP_ERR_INVALID, "malformed option data")],
    };
  }
  const ex = conn.server.findExport(request.name);
  if (!ex) {
    return {
      replies: [
        optionReply(o, REP_ERR_UNKNOWN, `no export named "${request.name}"`),
      ],
    };
  }
  return { request, ex };
}

function infoOrGo(
  conn: Connection,
  opt: ReceivedOption,
): { replies: Uint8Array[]; enter?: ExportState } {
  const o = opt.option;
  const found = namedExport(conn, o, () => decodeInfoRequest(opt.payload));
  if ("replies" in found) return found;
  const { request: { requested }, ex } = found;
  const cfg = conn.config;
  const c = ex.config;
  const wantsSizes = requested.includes(INFO_BLOCK_SIZE);
  if (cfg.blockSizeRequired && !wantsSizes) {
    return {
      replies: [
        optionReply(o, REP_ERR_BLOCK_SIZE_REQD, "block sizes required"),
      ],
    };
  }
  const replies: Uint8Array[] = [];
  replies.push(...conn.server.unknownInfoReplies(o));
  if (requested.includes(INFO_NAME)) {
    replies.push(
      optionReply(o, REP_INFO, infoStringPayload(INFO_NAME, c.name)),
    );
  }
  if (requested.includes(INFO_DESCRIPTION) && c.description !== undefined) {
    replies.push(
      optionReply(
        o,
        REP_INFO,
        infoStringPayload(INFO_DESCRIPTION, c.description),
      ),
    );
  }
  if ((wantsSizes || cfg.alwaysSendBlockSize) && c.blockSize) {
    const b = c.blockSize;
    replies.push(
      optionReply(
        o,
        REP_INFO,
        infoBlockSizePayload(b.minimum, b.preferred, b.maximum),
      ),
    );
  }
  replies.push(
    optionReply(
      o,
      REP_INFO,
      infoExportPayload(c.size, transmissionFlags(ex.config, conn.structured)),
    ),
  );
  replies.push(optionReply(o, REP_ACK));
  return o === OPT_GO ? { replies, enter: ex } : { replies };
}

function metaContext(
  conn: Connection,
  opt: ReceivedOption,
): { replies: Uint8Array[] } {
  const o = opt.option;
  if (!conn.structured) {
    return {
      replies: [
        optionReply(o, REP_ERR_INVALID, "negotiate structured replies first"),
      ],
    };
  }
  const found = namedExport(
    conn,
    o,
    () => decodeMetaContextRequest(opt.payload),
  );
  if ("replies" in found) return found;
  const { request: { queries }, ex } = found;
  const available = [
    BASE_ALLOCATION,
    ...Object.keys(ex.config.contexts ?? {}),
  ];
  const matches = (q: string) =>
    available.filter((a) => q.endsWith(":") ? a.startsWith(q) : a === q);
  const replies: Uint8Array[] = [];
  if (o === OPT_LIST_META_CONTEXT) {
    const listed = queries.length === 0
      ? available
      : [...new Set(queries.flatMap(matches))];
    for (const n of listed) {
      replies.push(
        optionReply(o, REP_META_CONTEXT, metaContextPayload(0, n)),
      );
    }
  } else {
    const chosen = [
      ...new Set(queries.flatMap((q) => q.endsWith(":") ? [] : matches(q))),
    ];
    conn.contexts = chosen.map((n, i) => ({ id: i + 1, name: n }));
    conn.contextsExport = ex.config.name;
    for (const ctx of conn.contexts) {
      replies.push(
        optionReply(
          o,
          REP_META_CONTEXT,
          metaContextPayload(ctx.id, ctx.name),
        ),
      );
    }
  }
  replies.push(optionReply(o, REP_ACK));
  return { replies };
}
