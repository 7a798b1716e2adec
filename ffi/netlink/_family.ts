/**
 * The kernel's `nbd` generic netlink family as bytes (`linux/nbd-netlink.h`):
 * the device settings `NBD_CMD_CONNECT` and `NBD_CMD_RECONFIGURE` carry,
 * the index in a connect reply or a `NBD_CMD_LINK_DEAD` notification, and
 * the device list of `NBD_CMD_STATUS`. Built on the generic netlink codec
 * in `_genl.ts`; no I/O.
 *
 * @module
 */

import {
  attrNested,
  attrU32,
  attrU64,
  encodeGenl,
  malformed,
  type NetlinkMessage,
  NLMSG_OVERRUN,
  parseAttributes,
  parseGenl,
  parseMessages,
  readUint,
} from "./_genl.ts";

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
