/**
 * `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: which kinds
 * of block status the server can report (`base:allocation`,
 * `qemu:dirty-bitmap:NAME`, ...), and choosing them.
 *
 * @module
 */

import {
  MAX_STRING_LENGTH,
  nameOrNumber,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  REP_ACK,
  REP_META_CONTEXT,
  REPLY_TYPE_NAMES,
} from "../constants.ts";
import { NbdProtocolError } from "../errors.ts";
import { encodeString, Reader, Writer } from "../_wire.ts";
import { isError, MAX_REPLIES, type OptionSession } from "./_session.ts";

/** Encodes export name and queries, as both meta-context options take. */
export function encodeMetaContextRequest(
  exportName: string,
  queries: readonly string[],
): Uint8Array {
  const name = encodeString(exportName);
  const encoded = queries.map(encodeString);
  for (const [i, q] of encoded.entries()) {
    if (q.length > MAX_STRING_LENGTH) {
      throw new RangeError(
        `Metadata context query "${
          queries[i]
        }" is longer than ${MAX_STRING_LENGTH} bytes`,
      );
    }
  }
  const size = 4 + name.length + 4 +
    encoded.reduce((sum, q) => sum + 4 + q.length, 0);
  const w = new Writer(size).u32(name.length).bytes(name).u32(encoded.length);
  for (const q of encoded) w.u32(q.length).bytes(q);
  return w.done();
}

async function exchange(
  session: OptionSession,
  option: number,
  exportName: string,
  queries: readonly string[],
): Promise<Map<number, string> | "unsupported"> {
  await session.send(option, encodeMetaContextRequest(exportName, queries));
  const contexts = new Map<number, string>();
  const names: string[] = [];
  for (let i = 0; i < MAX_REPLIES; i++) {
    const reply = await session.reply(option);
    if (reply.type === REP_ACK) {
      if (option === OPT_LIST_META_CONTEXT) {
        return new Map(names.map((n, j) => [j, n]));
      }
      return contexts;
    }
    if (isError(reply.type)) {
      if (session.isFatal(reply)) throw session.refusal(option, reply);
      session.trace?.("meta context refused", {
        reply: nameOrNumber(REPLY_TYPE_NAMES, reply.type >>> 0),
      });
      return "unsupported";
    }
    if (reply.type !== REP_META_CONTEXT) {
      throw session.unexpected(option, reply);
    }
    const r = new Reader(reply.payload, "NBD_REP_META_CONTEXT", "handshake");
    const id = r.u32();
    if (r.remaining > MAX_STRING_LENGTH || r.remaining === 0) {
      throw new NbdProtocolError(
        "handshake",
        `NBD_REP_META_CONTEXT name of ${r.remaining} bytes is out of range`,
      );
    }
    const name = r.restString("metadata context name");
    session.trace?.("meta context", { id, name });
    if (option === OPT_LIST_META_CONTEXT) {
      names.push(name);
      continue;
    }
    if (contexts.has(id)) {
      throw new NbdProtocolError(
        "handshake",
        `Server gave metadata context id ${id} to both "${
          contexts.get(id)
        }" and "${name}"`,
      );
    }
    contexts.set(id, name);
  }
  throw new NbdProtocolError(
    "handshake",
    `Server sent more than ${MAX_REPLIES} metadata contexts`,
  );
}

/**
 * Selects metadata contexts for `exportName`. A server that cannot is not
 * an error: block status is then simply unavailable.
 *
 * @returns The selected contexts by id (empty when refused).
 */
export async function setMetaContexts(
  session: OptionSession,
  exportName: string,
  queries: readonly string[],
): Promise<Map<number, string>> {
  const result = await exchange(
    session,
    OPT_SET_META_CONTEXT,
    exportName,
    queries,
  );
  return result === "unsupported" ? new Map() : result;
}

/**
 * Lists the metadata contexts the server offers for `exportName`
 * (all of them when `queries` is empty).
 *
 * @returns Context names, or `"unsupported"`.
 */
export async function listMetaContexts(
  session: OptionSession,
  exportName: string,
  queries: readonly string[],
): Promise<string[] | "unsupported"> {
  const result = await exchange(
    session,
    OPT_LIST_META_CONTEXT,
    exportName,
    queries,
  );
  return result === "unsupported" ? result : [...result.values()];
}
