/**
 * Generic netlink messages for the kernel's `nbd` family, as bytes: the
 * requests the kernel handoff sends and the replies it reads. No I/O here
 * (the socket is in `_socket.ts`), so every decoder can be fed truncated
 * input and every byte split in a test.
 *
 * Netlink is in host byte order; this module supports the little-endian
 * hosts the rest of `ffi/` supports (x86-64, arm64). Layouts and numbers are
 * those of `linux/netlink.h`, `linux/genetlink.h` and `linux/nbd-netlink.h`.
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

// linux/nbd-netlink.h
export const NBD_GENL_FAMILY_NAME = "nbd";
export const NBD_GENL_VERSION = 1;
export const NBD_GENL_MCAST_GROUP_NAME = "nbd_mc_group";
export const NBD_ATTR_INDEX = 1;
export const NBD_ATTR_SIZE_BYTES = 2;
export const NBD_ATTR_BLOCK_SIZE_BYTES = 3;
export const NBD_ATTR_TIMEOUT = 4;
export const NBD_ATTR_SERVER_FLAGS = 5;
export const NBD_ATTR_CLIENT_FLAGS = 6;
export const NBD_ATTR_SOCKETS = 7;
export const NBD_ATTR_DEAD_CONN_TIMEOUT = 8;
export const NBD_ATTR_DEVICE_LIST = 9;
export const NBD_DEVICE_ITEM = 1;
export const NBD_DEVICE_INDEX = 1;
export const NBD_DEVICE_CONNECTED = 2;
export const NBD_SOCK_ITEM = 1;
export const NBD_SOCK_FD = 1;
export const NBD_CMD_CONNECT = 1;
export const NBD_CMD_DISCONNECT = 2;
export const NBD_CMD_RECONFIGURE = 3;
export const NBD_CMD_LINK_DEAD = 4;
export const NBD_CMD_STATUS = 5;
// linux/nbd.h: client flags of NBD_ATTR_CLIENT_FLAGS.
/** Client flag: the kernel deletes the device once it is disconnected. */
export const NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0;
/** Client flag: disconnect when the last opener closes the device. */
export const NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1;

/** Names for messages, number and name together. */
export const NBD_CMD_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_CONNECT]: "NBD_CMD_CONNECT",
  [NBD_CMD_DISCONNECT]: "NBD_CMD_DISCONNECT",
  [NBD_CMD_RECONFIGURE]: "NBD_CMD_RECONFIGURE",
  [NBD_CMD_LINK_DEAD]: "NBD_CMD_LINK_DEAD",
  [NBD_CMD_STATUS]: "NBD_CMD_STATUS",
};

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
function malformed(what: string, why: string): NbdSystemCallError {
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
function readUint(a: Attribute, size: 1 | 2 | 4, what: string): number {
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

// --- the nbd family ---------------------------------------------------------

/** What `NBD_CMD_CONNECT` and `NBD_CMD_RECONFIGURE` carry. */
export interface DeviceSettings {
  /** The device index; for a connect, absent means any free device. */
  index?: number;
  /** Socket descriptors for the kernel to take. */
  sockets?: readonly number[];
  /** Size in bytes. */
  size?: bigint;
  /** Logical block size in bytes. */
  blockSize?: number;
  /** Seconds before a request times out. */
  timeout?: number;
  /** Transmission flags as the server sent them (plus read-only). */
  serverFlags?: number;
  /** `NBD_CFLAG_*`. */
  clientFlags?: number;
  /** Seconds I/O waits for a dead connection to be replaced. */
  deadConnectionTimeout?: number;
}

function settingsAttributes(s: DeviceSettings): Uint8Array[] {
  const out: Uint8Array[] = [];
  if (s.index !== undefined) out.push(attrU32(NBD_ATTR_INDEX, s.index));
  if (s.size !== undefined) out.push(attrU64(NBD_ATTR_SIZE_BYTES, s.size));
  if (s.blockSize !== undefined) {
    out.push(attrU64(NBD_ATTR_BLOCK_SIZE_BYTES, BigInt(s.blockSize)));
  }
  if (s.timeout !== undefined) {
    out.push(attrU64(NBD_ATTR_TIMEOUT, BigInt(s.timeout)));
  }
  if (s.serverFlags !== undefined) {
    out.push(attrU64(NBD_ATTR_SERVER_FLAGS, BigInt(s.serverFlags)));
  }
  if (s.clientFlags !== undefined) {
    out.push(attrU64(NBD_ATTR_CLIENT_FLAGS, BigInt(s.clientFlags)));
  }
  if (s.sockets !== undefined) {
    out.push(
      attrNested(
        NBD_ATTR_SOCKETS,
        s.sockets.map((fd) =>
          attrNested(NBD_SOCK_ITEM, [attrU32(NBD_SOCK_FD, fd)])
        ),
      ),
    );
  }
  if (s.deadConnectionTimeout !== undefined) {
    out.push(
      attrU64(NBD_ATTR_DEAD_CONN_TIMEOUT, BigInt(s.deadConnectionTimeout)),
    );
  }
  return out;
}

/** A request of the nbd family. */
export function encodeNbd(
  family: number,
  seq: number,
  cmd: number,
  settings: DeviceSettings,
): Uint8Array<ArrayBuffer> {
  return encodeGenl({
    family,
    cmd,
    version: NBD_GENL_VERSION,
    seq,
    attributes: settingsAttributes(settings),
  });
}

/** The index in a message of the nbd family (connect reply, link dead). */
export function decodeIndex(
  message: NetlinkMessage,
  cmd: number,
): number {
  const what = `${NBD_CMD_NAMES[cmd] ?? cmd} message`;
  const genl = parseGenl(message.payload, what);
  if (genl.cmd !== cmd) {
    throw malformed(
      what,
      `command ${genl.cmd} (${NBD_CMD_NAMES[genl.cmd] ?? "unknown"})`,
    );
  }
  for (const a of genl.attributes) {
    if (a.type === NBD_ATTR_INDEX) return readUint(a, 4, what);
  }
  throw malformed(what, "no NBD_ATTR_INDEX");
}

/** One device in an `NBD_CMD_STATUS` reply. */
export interface DeviceState {
  /** The device index, `N` of `/dev/nbdN`. */
  index: number;
  /**
   * Whether the kernel holds a configuration for it: true from
   * `NBD_CMD_CONNECT` until `NBD_CMD_DISCONNECT`, dead server or not.
   */
  connected: boolean;
}

/**
 * Decodes an `NBD_CMD_STATUS` reply: `NBD_ATTR_DEVICE_LIST`, holding one
 * `NBD_DEVICE_ITEM` per device with its index and whether it is connected.
 *
 * @throws {NbdSystemCallError} when malformed.
 */
export function decodeStatus(message: NetlinkMessage): DeviceState[] {
  const what = "NBD_CMD_STATUS reply";
  const genl = parseGenl(message.payload, what);
  if (genl.cmd !== NBD_CMD_STATUS) {
    throw malformed(what, `command ${genl.cmd}`);
  }
  const out: DeviceState[] = [];
  for (const list of genl.attributes) {
    if (list.type !== NBD_ATTR_DEVICE_LIST) continue;
    for (const item of parseAttributes(list.payload, what)) {
      if (item.type !== NBD_DEVICE_ITEM) continue;
      let index: number | undefined;
      let connected: boolean | undefined;
      for (const f of parseAttributes(item.payload, what)) {
        if (f.type === NBD_DEVICE_INDEX) index = readUint(f, 4, what);
        if (f.type === NBD_DEVICE_CONNECTED) {
          connected = readUint(f, 1, what) !== 0;
        }
      }
      if (index === undefined || connected === undefined) {
        throw malformed(
          what,
          "an NBD_DEVICE_ITEM lacks NBD_DEVICE_INDEX or NBD_DEVICE_CONNECTED",
        );
      }
      out.push({ index, connected });
    }
  }
  return out.sort((a, b) => a.index - b.index);
}

/** What a multicast datagram says: a dead link's device index, or that
 * notifications were lost (the socket's queue overflowed). */
export type LinkDeadEvent = { index: number } | { overrun: true };

/**
 * The `NBD_CMD_LINK_DEAD` notifications in one multicast datagram; other
 * families' and other commands' messages are skipped.
 *
 * @throws {NbdSystemCallError} when a datagram or a notification is
 *   malformed.
 */
export function decodeLinkDead(
  datagram: Uint8Array,
  family: number,
): LinkDeadEvent[] {
  const out: LinkDeadEvent[] = [];
  for (const m of parseMessages(datagram)) {
    if (m.type === NLMSG_OVERRUN) {
      out.push({ overrun: true });
      continue;
    }
    if (m.type !== family) continue;
    if (
      parseGenl(m.payload, "NBD_CMD_LINK_DEAD message").cmd !==
        NBD_CMD_LINK_DEAD
    ) {
      continue;
    }
    out.push({ index: decodeIndex(m, NBD_CMD_LINK_DEAD) });
  }
  return out;
}
