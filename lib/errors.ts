/**
 * Every error the library throws on purpose is an {@linkcode NbdError};
 * subclasses carry what callers branch on. Caller mistakes are plain
 * `TypeError`/`RangeError`.
 *
 * @module
 */

import {
  ERRNO_NAMES,
  numberAndName,
  OPTION_NAMES,
  REPLY_TYPE_NAMES,
} from "./constants.ts";

/**
 * Base class of every error the library throws on purpose.
 *
 * @example
 * ```ts
 * import { connect, NbdError } from "@nbd/client";
 * try {
 *   await connect("nbd://127.0.0.1/missing");
 * } catch (e) {
 *   if (e instanceof NbdError) console.error(e.message);
 * }
 * ```
 */
export class NbdError extends Error {
  /**
   * Creates an error.
   *
   * @param message What failed, then the state it was in.
   * @param options The underlying cause, if any.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NbdError";
  }
}

/**
 * The server refused an option during the handshake (an `NBD_REP_ERR_*`
 * reply). Carries the option, the reply type and the server's own text.
 */
export class NbdOptionError extends NbdError {
  /** The option that was refused, e.g. 7 for `NBD_OPT_GO`. */
  readonly option: number;
  /** The reply type, e.g. `0x80000006` for `NBD_REP_ERR_UNKNOWN`. */
  readonly reply: number;
  /** The error reply's name, e.g. `"NBD_REP_ERR_UNKNOWN"`. */
  readonly replyName: string;
  /** The message the server sent with the error, possibly empty. */
  readonly serverMessage: string;

  /**
   * Creates the error for a refused option.
   *
   * @param option The option number.
   * @param reply The error reply type.
   * @param serverMessage The text the server sent.
   * @param context Optional words on what the client was doing.
   */
  constructor(
    option: number,
    reply: number,
    serverMessage: string,
    context?: string,
  ) {
    const what = context ? `${context}: ` : "";
    const text = serverMessage ? `: ${serverMessage}` : "";
    super(
      `${what}Server refused option ${
        numberAndName(OPTION_NAMES, option)
      } with 0x${(reply >>> 0).toString(16)} (${
        REPLY_TYPE_NAMES[reply >>> 0] ?? "unknown"
      })${text}`,
    );
    this.name = "NbdOptionError";
    this.option = option;
    this.reply = reply >>> 0;
    this.replyName = REPLY_TYPE_NAMES[this.reply] ?? "unknown";
    this.serverMessage = serverMessage;
  }
}

/** Where a command failed: the server's errno, and the request it answered. */
export interface CommandErrorDetails {
  /** Command name, e.g. `"NBD_CMD_WRITE"`. */
  command: string;
  /** Error number as sent by the server (NBD numbering, e.g. 5 for EIO). */
  errno: number;
  /** Offset of the request: a bigint for a request made with bigints. */
  offset: number | bigint;
  /** Length of the request: a bigint when the offset is one. */
  length: number | bigint;
  /** The server's message, if it sent one in a structured error chunk. */
  serverMessage?: string;
  /** For `NBD_REPLY_TYPE_ERROR_OFFSET`, where in the range the error is. */
  errorOffset?: number | bigint;
}

/**
 * The server failed one command with an error number. The connection stays
 * usable.
 */
export class NbdCommandError extends NbdError {
  /** Command name, e.g. `"NBD_CMD_READ"`. */
  readonly command: string;
  /** Error number as sent by the server (5 for EIO, 28 for ENOSPC ...). */
  readonly errno: number;
  /** Name of the error number: `"EIO"`, or `"unknown"`. */
  readonly errnoName: string;
  /**
   * Offset of the failed request: a bigint for a request made with bigint
   * offsets (block status or a read at or past 2^53).
   */
  readonly offset: number | bigint;
  /** Length of the failed request: a bigint when the offset is one. */
  readonly length: number | bigint;
  /** The server's own text, or `""`. */
  readonly serverMessage: string;
  /** The offset the server blamed, if it sent `NBD_REPLY_TYPE_ERROR_OFFSET`. */
  readonly errorOffset: number | bigint | undefined;

  /**
   * Creates the error for a failed command.
   *
   * @param details What failed and how.
   */
  constructor(details: CommandErrorDetails) {
    const name = ERRNO_NAMES[details.errno] ?? "unknown";
    const at = details.errorOffset !== undefined
      ? ` (at offset ${details.errorOffset})`
      : "";
    const text = details.serverMessage ? `: ${details.serverMessage}` : "";
    super(
      `${details.command} of ${details.length} bytes at offset ${details.offset} failed with ${details.errno} (${name})${at}${text}`,
    );
    this.name = "NbdCommandError";
    this.command = details.command;
    this.errno = details.errno;
    this.errnoName = name;
    this.offset = details.offset;
    this.length = details.length;
    this.serverMessage = details.serverMessage ?? "";
    this.errorOffset = details.errorOffset;
  }
}

/** The phase of the protocol in which a violation was seen. */
export type ProtocolPhase = "handshake" | "transmission";

/**
 * The server broke the protocol (a bad magic, a length out of bounds, a reply
 * to an unknown cookie, ...). The connection is dead; every pending request
 * fails with this error.
 */
export class NbdProtocolError extends NbdError {
  /** Whether it happened while negotiating or while carrying commands. */
  readonly phase: ProtocolPhase;

  /**
   * Creates the error for a protocol violation.
   *
   * @param phase Where it happened.
   * @param message What was wrong.
   * @param options The cause, if any.
   */
  constructor(phase: ProtocolPhase, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NbdProtocolError";
    this.phase = phase;
  }
}

/**
 * The connection is closed: by `close()`, by the server, by a transport
 * failure, or by an earlier fatal error (then given as `cause`).
 */
export class NbdConnectionClosedError extends NbdError {
  /**
   * Creates the error for a closed connection.
   *
   * @param message What was attempted and why it cannot go on.
   * @param options The error that closed the connection, if any.
   */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NbdConnectionClosedError";
  }
}

/** Converts an `AbortSignal`'s reason into an error to throw. */
export function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error) return reason;
  return new DOMException(
    String(reason ?? "The operation was aborted"),
    "AbortError",
  );
}

/**
 * The export does not offer what was asked (a write to a read-only export,
 * a trim where `NBD_FLAG_SEND_TRIM` is clear, ...). Nothing was sent.
 */
export class NbdUnsupportedError extends NbdError {
  /** The missing feature, e.g. `"trim"` or `"fua"`. */
  readonly feature: string;

  /**
   * Creates the error for a missing feature.
   *
   * @param feature The missing feature.
   * @param message What was attempted and why it cannot be.
   */
  constructor(feature: string, message: string) {
    super(message);
    this.name = "NbdUnsupportedError";
    this.feature = feature;
  }
}

/** A short text for any thrown value, for messages that wrap a cause. */
export function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
