/**
 * Numbers of the NBD protocol, named as in `doc/proto.md`, with lookup
 * tables so that every message can say "3 (NBD_OPT_LIST)" instead of "3".
 *
 * @module
 */

/** "NBDMAGIC", sent first by every server. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle server magic and the prefix of every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** The oldstyle server magic (`cliserv_magic`). */
export const CLISERV_MAGIC = 0x00420281861253n;
/** Magic of every fixed-newstyle option reply. */
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

/** The IANA port for NBD. */
export const DEFAULT_PORT = 10809;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags.
export const FLAG_HAS_FLAGS = 1 << 0;
export const FLAG_READ_ONLY = 1 << 1;
export const FLAG_SEND_FLUSH = 1 << 2;
export const FLAG_SEND_FUA = 1 << 3;
export const FLAG_ROTATIONAL = 1 << 4;
export const FLAG_SEND_TRIM = 1 << 5;
export const FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const FLAG_SEND_DF = 1 << 7;
export const FLAG_CAN_MULTI_CONN = 1 << 8;
export const FLAG_SEND_RESIZE = 1 << 9;
export const FLAG_SEND_CACHE = 1 << 10;
export const FLAG_SEND_FAST_ZERO = 1 << 11;
export const FLAG_BLOCK_STAT_PAYLOAD = 1 << 12;

/** Transmission flag names, lowest bit first. */
export const TRANSMISSION_FLAG_NAMES: Readonly<Record<number, string>> = {
  [FLAG_HAS_FLAGS]: "NBD_FLAG_HAS_FLAGS",
  [FLAG_READ_ONLY]: "NBD_FLAG_READ_ONLY",
  [FLAG_SEND_FLUSH]: "NBD_FLAG_SEND_FLUSH",
  [FLAG_SEND_FUA]: "NBD_FLAG_SEND_FUA",
  [FLAG_ROTATIONAL]: "NBD_FLAG_ROTATIONAL",
  [FLAG_SEND_TRIM]: "NBD_FLAG_SEND_TRIM",
  [FLAG_SEND_WRITE_ZEROES]: "NBD_FLAG_SEND_WRITE_ZEROES",
  [FLAG_SEND_DF]: "NBD_FLAG_SEND_DF",
  [FLAG_CAN_MULTI_CONN]: "NBD_FLAG_CAN_MULTI_CONN",
  [FLAG_SEND_RESIZE]: "NBD_FLAG_SEND_RESIZE",
  [FLAG_SEND_CACHE]: "NBD_FLAG_SEND_CACHE",
  [FLAG_SEND_FAST_ZERO]: "NBD_FLAG_SEND_FAST_ZERO",
  [FLAG_BLOCK_STAT_PAYLOAD]: "NBD_FLAG_BLOCK_STAT_PAYLOAD",
};

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_PEEK_EXPORT = 4;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

export const OPTION_NAMES: Readonly<Record<number, string>> = {
  [OPT_EXPORT_NAME]: "NBD_OPT_EXPORT_NAME",
  [OPT_ABORT]: "NBD_OPT_ABORT",
  [OPT_LIST]: "NBD_OPT_LIST",
  [OPT_PEEK_EXPORT]: "NBD_OPT_PEEK_EXPORT",
  [OPT_STARTTLS]: "NBD_OPT_STARTTLS",
  [OPT_INFO]: "NBD_OPT_INFO",
  [OPT_GO]: "NBD_OPT_GO",
  [OPT_STRUCTURED_REPLY]: "NBD_OPT_STRUCTURED_REPLY",
  [OPT_LIST_META_CONTEXT]: "NBD_OPT_LIST_META_CONTEXT",
  [OPT_SET_META_CONTEXT]: "NBD_OPT_SET_META_CONTEXT",
  [OPT_EXTENDED_HEADERS]: "NBD_OPT_EXTENDED_HEADERS",
};

// Option reply types; errors have bit 31 set.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
export const REP_FLAG_ERROR = 0x80000000;
export const REP_ERR_UNSUP = REP_FLAG_ERROR + 1;
export const REP_ERR_POLICY = REP_FLAG_ERROR + 2;
export const REP_ERR_INVALID = REP_FLAG_ERROR + 3;
export const REP_ERR_PLATFORM = REP_FLAG_ERROR + 4;
export const REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5;
export const REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6;
export const REP_ERR_SHUTDOWN = REP_FLAG_ERROR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8;
export const REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9;
export const REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR + 10;

export const REPLY_TYPE_NAMES: Readonly<Record<number, string>> = {
  [REP_ACK]: "NBD_REP_ACK",
  [REP_SERVER]: "NBD_REP_SERVER",
  [REP_INFO]: "NBD_REP_INFO",
  [REP_META_CONTEXT]: "NBD_REP_META_CONTEXT",
  [REP_ERR_UNSUP]: "NBD_REP_ERR_UNSUP",
  [REP_ERR_POLICY]: "NBD_REP_ERR_POLICY",
  [REP_ERR_INVALID]: "NBD_REP_ERR_INVALID",
  [REP_ERR_PLATFORM]: "NBD_REP_ERR_PLATFORM",
  [REP_ERR_TLS_REQD]: "NBD_REP_ERR_TLS_REQD",
  [REP_ERR_UNKNOWN]: "NBD_REP_ERR_UNKNOWN",
  [REP_ERR_SHUTDOWN]: "NBD_REP_ERR_SHUTDOWN",
  [REP_ERR_BLOCK_SIZE_REQD]: "NBD_REP_ERR_BLOCK_SIZE_REQD",
  [REP_ERR_TOO_BIG]: "NBD_REP_ERR_TOO_BIG",
  [REP_ERR_EXT_HEADER_REQD]: "NBD_REP_ERR_EXT_HEADER_REQD",
};

// NBD_REP_INFO types.
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

export const INFO_NAMES: Readonly<Record<number, string>> = {
  [INFO_EXPORT]: "NBD_INFO_EXPORT",
  [INFO_NAME]: "NBD_INFO_NAME",
  [INFO_DESCRIPTION]: "NBD_INFO_DESCRIPTION",
  [INFO_BLOCK_SIZE]: "NBD_INFO_BLOCK_SIZE",
};

// Commands.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;
export const CMD_RESIZE = 8;

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [CMD_READ]: "NBD_CMD_READ",
  [CMD_WRITE]: "NBD_CMD_WRITE",
  [CMD_DISC]: "NBD_CMD_DISC",
  [CMD_FLUSH]: "NBD_CMD_FLUSH",
  [CMD_TRIM]: "NBD_CMD_TRIM",
  [CMD_CACHE]: "NBD_CMD_CACHE",
  [CMD_WRITE_ZEROES]: "NBD_CMD_WRITE_ZEROES",
  [CMD_BLOCK_STATUS]: "NBD_CMD_BLOCK_STATUS",
  [CMD_RESIZE]: "NBD_CMD_RESIZE",
};

// Command flags.
/**
 * The name of a command for messages and errors: `"NBD_CMD_READ"`, or
 * `"command 99"` for a type the table does not know.
 */
export function commandName(type: number): string {
  return COMMAND_NAMES[type] ?? `command ${type}`;
}

export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;
export const CMD_FLAG_PAYLOAD_LEN = 1 << 5;

export const COMMAND_FLAG_NAMES: Readonly<Record<number, string>> = {
  [CMD_FLAG_FUA]: "FUA",
  [CMD_FLAG_NO_HOLE]: "NO_HOLE",
  [CMD_FLAG_DF]: "DF",
  [CMD_FLAG_REQ_ONE]: "REQ_ONE",
  [CMD_FLAG_FAST_ZERO]: "FAST_ZERO",
  [CMD_FLAG_PAYLOAD_LEN]: "PAYLOAD_LEN",
};

// Structured reply chunks.
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_FLAG_ERROR = 1 << 15;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const REPLY_TYPE_ERROR = REPLY_TYPE_FLAG_ERROR + 1;
export const REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_FLAG_ERROR + 2;

export const CHUNK_TYPE_NAMES: Readonly<Record<number, string>> = {
  [REPLY_TYPE_NONE]: "NBD_REPLY_TYPE_NONE",
  [REPLY_TYPE_OFFSET_DATA]: "NBD_REPLY_TYPE_OFFSET_DATA",
  [REPLY_TYPE_OFFSET_HOLE]: "NBD_REPLY_TYPE_OFFSET_HOLE",
  [REPLY_TYPE_BLOCK_STATUS]: "NBD_REPLY_TYPE_BLOCK_STATUS",
  [REPLY_TYPE_BLOCK_STATUS_EXT]: "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
  [REPLY_TYPE_ERROR]: "NBD_REPLY_TYPE_ERROR",
  [REPLY_TYPE_ERROR_OFFSET]: "NBD_REPLY_TYPE_ERROR_OFFSET",
};

/** `base:allocation` extent flag: the extent is not allocated. */
export const STATE_HOLE = 1 << 0;
/** `base:allocation` extent flag: the extent reads as zeroes. */
export const STATE_ZERO = 1 << 1;

// Error numbers on the wire (not the host's errno values).
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

export const ERRNO_NAMES: Readonly<Record<number, string>> = {
  [EPERM]: "EPERM",
  [EIO]: "EIO",
  [ENOMEM]: "ENOMEM",
  [EINVAL]: "EINVAL",
  [ENOSPC]: "ENOSPC",
  [EOVERFLOW]: "EOVERFLOW",
  [ENOTSUP]: "ENOTSUP",
  [ESHUTDOWN]: "ESHUTDOWN",
};

/** Strings (names, messages) may be at most this long on the wire. */
export const MAX_STRING_LENGTH = 4096;
/** The spec's interoperable ceiling for a read or write payload. */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;

/**
 * Formats a number with its name from a table: "3 (NBD_OPT_LIST)", or
 * "12 (unknown)" when the table has no entry.
 */
export function numberAndName(
  table: Readonly<Record<number, string>>,
  value: number,
): string {
  return `${value} (${table[value] ?? "unknown"})`;
}

/** The name of a value for traces: its name, or "99 (unknown)". */
export function nameOrNumber(
  table: Readonly<Record<number, string>>,
  value: number,
): string {
  return table[value] ?? numberAndName(table, value);
}

/** Names the bits of a flags word: "NBD_FLAG_HAS_FLAGS|NBD_FLAG_SEND_FLUSH". */
export function flagNames(
  table: Readonly<Record<number, string>>,
  flags: number,
): string {
  const names: string[] = [];
  for (let bit = 1; bit <= flags && bit !== 0; bit <<= 1) {
    if (flags & bit) names.push(table[bit] ?? `0x${bit.toString(16)}`);
  }
  return names.length === 0 ? "0" : names.join("|");
}
