/**
 * Netlink and generic netlink as bytes: attributes, messages, acks with the
 * kernel's extended-ack text, and the controller's `CTRL_CMD_GETFAMILY`
 * that resolves a family by name. Nothing here knows the `nbd` family
 * (`_family.ts`) and nothing does I/O (the socket is in `_socket.ts`), so
 * every decoder can be fed truncated input and every byte split in a test.
 *
 * Netlink is in host byte order; this module supports the little-endian
 * hosts the rest of `ffi/` supports (x86-64, arm64). Layouts and numbers are
 * those of `linux/netlink.h` and `linux/genetlink.h`.
 *
 * @module
 */

import { NbdKernelError, NbdSystemCallError } from "../errors.ts";
// linux/netlink.h
export const NLMSG_ERROR = 0x2;
export const NLMSG_DONE = 0x3;
export const NLMSG_OVERRUN = 0x4;
export const NLM_F_REQUEST = 0x01;
export const NLM_F_MULTI = 0x02;
export const NLM_F_ACK = 0x04;
/** On an error message: the original request was not echoed back. */
export const NLM_F_CAPPED = 0x100;
/** On an error message: extended-ack attributes follow. */
export const NLM_F_ACK_TLVS = 0x200;
export const NLA_F_NESTED = 1 << 15;
export const NLA_F_NET_BYTEORDER = 1 << 14;
export const NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xffff;
export const NLMSGERR_ATTR_MSG = 1;
export const NLMSGERR_ATTR_OFFS = 2;

// linux/genetlink.h
export const GENL_ID_CTRL = 0x10;
export const CTRL_CMD_GETFAMILY = 3;
export const CTRL_ATTR_FAMILY_ID = 1;
export const CTRL_ATTR_FAMILY_NAME = 2;
export const CTRL_ATTR_VERSION = 3;
export const CTRL_ATTR_MAXATTR = 5;
export const CTRL_ATTR_MCAST_GROUPS = 7;
export const CTRL_ATTR_MCAST_GRP_NAME = 1;
export const CTRL_ATTR_MCAST_GRP_ID = 2;

/** Header sizes, asserted in the tests. */
export const SIZES = {
  /** struct nlmsghdr: len, type, flags, seq, pid. */
  nlmsghdr: 4 + 2 + 2 + 4 + 4,
  /** struct genlmsghdr: cmd, version, reserved. */
  genlmsghdr: 1 + 1 + 2,
  /** struct nlattr: len, type. */
  nlattr: 2 + 2,
  /** struct nlmsgerr without the echoed header: error. */
  nlmsgerr: 4,
} as const;

/** Rounds up to netlink's 4-byte alignment (NLMSG_ALIGN, NLA_ALIGN). */
export function align4(n: number): number {
  return (n + 3) & ~3;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: false });

/** A malformed message from the kernel: what was being read, and why. */
export function malformed(what: string, why: string): NbdSystemCallError {
  return new NbdSystemCallError(
    "",
    0,
    `Malformed netlink message (${what}): ${why}`,
  );
}

// --- attributes -------------------------------------------------------------

/** One encoded attribute, padding included. */
function attr(type: number, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  const length = SIZES.nlattr + payload.length;
  const out = new Uint8Array(align4(length));
  const view = new DataView(out.buffer);
  if (length > 0xffff) {
    throw new RangeError(`Netlink attribute ${type} is too long: ${length}`);
  }
  view.setUint16(0, length, true);
  view.setUint16(2, type, true);
  out.set(payload, SIZES.nlattr);
  return out;
}

/** A `u8` attribute. */
export function attrU8(type: number, value: number): Uint8Array<ArrayBuffer> {
  return attr(type, Uint8Array.of(value));
}

/** A `u16` attribute. */
export function attrU16(type: number, value: number): Uint8Array<ArrayBuffer> {
  const p = new Uint8Array(2);
  new DataView(p.buffer).setUint16(0, value, true);
  return attr(type, p);
}

/** A `u32` attribute. */
export function attrU32(type: number, value: number): Uint8Array<ArrayBuffer> {
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw new RangeError(
      `Netlink u32 attribute ${type} out of range: ${value}`,
    );
  }
  const p = new Uint8Array(4);
  new DataView(p.buffer).setUint32(0, value, true);
  return attr(type, p);
}

/** A `u64` attribute. */
export function attrU64(type: number, value: bigint): Uint8Array<ArrayBuffer> {
  if (value < 0n || value > 0xffffffffffffffffn) {
    throw new RangeError(
      `Netlink u64 attribute ${type} out of range: ${value}`,
    );
  }
  const p = new Uint8Array(8);
  new DataView(p.buffer).setBigUint64(0, value, true);
  return attr(type, p);
}

/** A NUL-terminated string attribute. */
export function attrString(
  type: number,
  value: string,
): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(value);
  const p = new Uint8Array(bytes.length + 1);
  p.set(bytes);
  return attr(type, p);
}

/** A nested attribute holding `children` (already encoded). */
export function attrNested(
  type: number,
  children: readonly Uint8Array[],
): Uint8Array<ArrayBuffer> {
  return attr(type | NLA_F_NESTED, concat(children));
}

function concat(parts: readonly Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A decoded attribute: its type without the flag bits, and its payload. */
export interface Attribute {
  type: number;
  nested: boolean;
  payload: Uint8Array;
}

/**
 * Splits a run of attributes. Every length is checked against what is
 * left; the last attribute's padding may be missing (the kernel pads, but
 * a message may end exactly at the payload).
 *
 * @throws {NbdSystemCallError} for a length that runs past the end.
 */
export function parseAttributes(bytes: Uint8Array, what: string): Attribute[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: Attribute[] = [];
  let at = 0;
  while (at < bytes.length) {
    const left = bytes.length - at;
    if (left < SIZES.nlattr) {
      throw malformed(
        what,
        `${left} bytes left, less than an attribute header`,
      );
    }
    const length = view.getUint16(at, true);
    const rawType = view.getUint16(at + 2, true);
    if (length < SIZES.nlattr || length > left) {
      throw malformed(
        what,
        `attribute ${
          rawType & NLA_TYPE_MASK
        } says ${length} bytes, ${left} are left`,
      );
    }
    out.push({
      type: rawType & NLA_TYPE_MASK,
      nested: (rawType & NLA_F_NESTED) !== 0,
      payload: bytes.subarray(at + SIZES.nlattr, at + length),
    });
    at += Math.min(align4(length), left);
  }
  return out;
}

function payloadView(a: Attribute): DataView {
  return new DataView(
    a.payload.buffer,
    a.payload.byteOffset,
    a.payload.byteLength,
  );
}

/** A fixed-size integer attribute, its size checked. */
export function readUint(a: Attribute, size: 1 | 2 | 4, what: string): number {
  if (a.payload.length !== size) {
    throw malformed(
      what,
      `attribute ${a.type} has ${a.payload.length} bytes, expected ${size}`,
    );
  }
  const v = payloadView(a);
  return size === 1
    ? v.getUint8(0)
    : size === 2
    ? v.getUint16(0, true)
    : v.getUint32(0, true);
}

/** A string attribute, up to its first NUL. */
function readString(a: Attribute): string {
  const nul = a.payload.indexOf(0);
  return decoder.decode(nul < 0 ? a.payload : a.payload.subarray(0, nul));
}

// --- messages ---------------------------------------------------------------

/** One netlink message as read from a datagram. */
export interface NetlinkMessage {
  type: number;
  flags: number;
  seq: number;
  pid: number;
  /** Everything after the 16-byte header, up to `nlmsg_len`. */
  payload: Uint8Array;
}

/**
 * Splits one datagram into its messages, each length checked against the
 * datagram (NLMSG_OK): a reply cut short, a length below the header or
 * past the end is an error, never a short read.
 *
 * @throws {NbdSystemCallError} for a malformed datagram.
 */
export function parseMessages(bytes: Uint8Array): NetlinkMessage[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: NetlinkMessage[] = [];
  let at = 0;
  if (bytes.length === 0) throw malformed("datagram", "it is empty");
  while (at < bytes.length) {
    const left = bytes.length - at;
    if (left < SIZES.nlmsghdr) {
      throw malformed(
        "header",
        `${left} bytes left, a header takes ${SIZES.nlmsghdr}`,
      );
    }
    const length = view.getUint32(at, true);
    if (length < SIZES.nlmsghdr || length > left) {
      throw malformed(
        "header",
        `the message says ${length} bytes, ${left} arrived`,
      );
    }
    out.push({
      type: view.getUint16(at + 4, true),
      flags: view.getUint16(at + 6, true),
      seq: view.getUint32(at + 8, true),
      pid: view.getUint32(at + 12, true),
      payload: bytes.subarray(at + SIZES.nlmsghdr, at + length),
    });
    at += Math.min(align4(length), left);
  }
  return out;
}

/** A generic netlink message: command, version and attributes. */
export interface GenlMessage {
  cmd: number;
  version: number;
  attributes: Attribute[];
}

/**
 * The generic netlink header and attributes of a message's payload.
 *
 * @throws {NbdSystemCallError} when shorter than the header or malformed.
 */
export function parseGenl(payload: Uint8Array, what: string): GenlMessage {
  if (payload.length < SIZES.genlmsghdr) {
    throw malformed(
      what,
      `${payload.length} bytes of payload, a generic netlink header takes ${SIZES.genlmsghdr}`,
    );
  }
  return {
    cmd: payload[0]!,
    version: payload[1]!,
    attributes: parseAttributes(payload.subarray(SIZES.genlmsghdr), what),
  };
}

/** Options for {@linkcode encodeGenl}. */
export interface GenlRequest {
  /** The family id (`GENL_ID_CTRL` for the controller). */
  family: number;
  cmd: number;
  version: number;
  seq: number;
  /** Attributes, already encoded. */
  attributes: readonly Uint8Array[];
  /** Extra `nlmsg_flags` beside `NLM_F_REQUEST | NLM_F_ACK`. */
  flags?: number;
}

/**
 * A generic netlink request. It always asks for an ack, so success and
 * failure both end in one `NLMSG_ERROR` message for the same sequence.
 */
export function encodeGenl(request: GenlRequest): Uint8Array<ArrayBuffer> {
  const body = concat(request.attributes);
  const length = SIZES.nlmsghdr + SIZES.genlmsghdr + body.length;
  const out = new Uint8Array(length);
  const view = new DataView(out.buffer);
  view.setUint32(0, length, true);
  view.setUint16(4, request.family, true);
  view.setUint16(6, NLM_F_REQUEST | NLM_F_ACK | (request.flags ?? 0), true);
  view.setUint32(8, request.seq >>> 0, true);
  view.setUint32(12, 0, true); // pid: the kernel is 0
  out[16] = request.cmd;
  out[17] = request.version;
  out.set(body, SIZES.nlmsghdr + SIZES.genlmsghdr);
  return out;
}

// --- acks and errors --------------------------------------------------------

/** What an `NLMSG_ERROR` message says. */
export interface Ack {
  /** 0 for an ack; otherwise the positive errno. */
  errno: number;
  /** The kernel's extended-ack text (`NLMSGERR_ATTR_MSG`), if sent. */
  message: string | undefined;
  /** Offset of the offending attribute in the request, if sent. */
  offset: number | undefined;
  /** The sequence number of the request it answers. */
  seq: number;
}

/**
 * Decodes an `NLMSG_ERROR` message: the error, the echoed request header,
 * the request itself unless `NLM_F_CAPPED`, then extended-ack attributes
 * when `NLM_F_ACK_TLVS`.
 *
 * @throws {NbdSystemCallError} when the message is cut short.
 */
export function decodeAck(message: NetlinkMessage): Ack {
  const p = message.payload;
  const view = new DataView(p.buffer, p.byteOffset, p.byteLength);
  const head = SIZES.nlmsgerr + SIZES.nlmsghdr;
  if (p.length < head) {
    throw malformed(
      "NLMSG_ERROR",
      `${p.length} bytes, the error and the echoed header take ${head}`,
    );
  }
  const error = view.getInt32(0, true);
  const echoedLength = view.getUint32(SIZES.nlmsgerr, true);
  const seq = view.getUint32(SIZES.nlmsgerr + 8, true);
  let message_: string | undefined;
  let offset: number | undefined;
  if (message.flags & NLM_F_ACK_TLVS) {
    // A success, or a capped error, echoes the header only.
    const echoed = error === 0 || (message.flags & NLM_F_CAPPED)
      ? SIZES.nlmsghdr
      : align4(echoedLength);
    const at = SIZES.nlmsgerr + echoed;
    if (at > p.length) {
      throw malformed(
        "NLMSG_ERROR",
        `the echoed request of ${echoed} bytes runs past the ${p.length} bytes of the message`,
      );
    }
    for (const a of parseAttributes(p.subarray(at), "extended ack")) {
      if (a.type === NLMSGERR_ATTR_MSG) message_ = readString(a);
      if (a.type === NLMSGERR_ATTR_OFFS) {
        offset = readUint(a, 4, "extended ack");
      }
    }
  }
  if (error > 0) {
    throw malformed("NLMSG_ERROR", `positive error ${error}`);
  }
  return { errno: error === 0 ? 0 : -error, message: message_, offset, seq };
}

/**
 * The typed error for a refused request: {@linkcode NbdKernelError} naming
 * the command, the device and the errno, with the kernel's own text.
 *
 * @param ack The decoded refusal (`errno` not 0).
 * @param call The command, e.g. `"NBD_CMD_CONNECT"`.
 * @param device The device path, or `""` when none is concerned yet.
 * @param doing What was being done, e.g. `"Cannot connect /dev/nbd0"`.
 */
export function refusal(
  ack: Ack,
  call: string,
  device: string,
  doing: string,
): NbdKernelError {
  const text = ack.message ? ` (the kernel says: ${ack.message})` : "";
  return new NbdKernelError(device, call, ack.errno, `${doing}${text}`);
}

// --- the controller: resolving the family -----------------------------------

/** What `CTRL_CMD_GETFAMILY` says about a family. */
export interface Family {
  id: number;
  name: string;
  version: number;
  maxAttribute: number;
  /** Multicast groups by name. */
  groups: Map<string, number>;
}

/** `CTRL_CMD_GETFAMILY` for `name`. */
export function encodeGetFamily(
  seq: number,
  name: string,
): Uint8Array<ArrayBuffer> {
  return encodeGenl({
    family: GENL_ID_CTRL,
    cmd: CTRL_CMD_GETFAMILY,
    version: 1,
    seq,
    attributes: [attrString(CTRL_ATTR_FAMILY_NAME, name)],
  });
}

/**
 * Decodes the controller's answer to `CTRL_CMD_GETFAMILY`.
 *
 * @throws {NbdSystemCallError} when malformed or without a family id.
 */
export function decodeFamily(message: NetlinkMessage): Family {
  const what = "CTRL_CMD_GETFAMILY reply";
  const genl = parseGenl(message.payload, what);
  let id: number | undefined;
  let name = "";
  let version = 0;
  let maxAttribute = 0;
  const groups = new Map<string, number>();
  for (const a of genl.attributes) {
    switch (a.type) {
      case CTRL_ATTR_FAMILY_ID:
        id = readUint(a, 2, what);
        break;
      case CTRL_ATTR_FAMILY_NAME:
        name = readString(a);
        break;
      case CTRL_ATTR_VERSION:
        version = readUint(a, 4, what);
        break;
      case CTRL_ATTR_MAXATTR:
        maxAttribute = readUint(a, 4, what);
        break;
      case CTRL_ATTR_MCAST_GROUPS:
        // An array: each entry's type is its position, its content a group.
        for (const entry of parseAttributes(a.payload, what)) {
          let groupName: string | undefined;
          let groupId: number | undefined;
          for (const g of parseAttributes(entry.payload, what)) {
            if (g.type === CTRL_ATTR_MCAST_GRP_NAME) groupName = readString(g);
            if (g.type === CTRL_ATTR_MCAST_GRP_ID) {
              groupId = readUint(g, 4, what);
            }
          }
          if (groupName !== undefined && groupId !== undefined) {
            groups.set(groupName, groupId);
          }
        }
        break;
    }
  }
  if (id === undefined) throw malformed(what, "no CTRL_ATTR_FAMILY_ID");
  return { id, name, version, maxAttribute, groups };
}
