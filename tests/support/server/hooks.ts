/**
 * How a test scripts the server: its configuration, the hooks that replace a
 * correct answer with a misbehaviour, the actions they return, and the log a
 * test asserts on afterwards.
 *
 * @module
 */

import type { ExportConfig, TestDisk } from "./store.ts";

/**
 * What a hook asks the server to do, in order: send bytes, close the
 * connection (`"drop"`), wait until the server closes (`"stall"`), or pause.
 */
export type Action = Uint8Array | "drop" | "stall" | { delay: number };

/**
 * What an option hook may also ask: `"transmission"` moves the connection to
 * the transmission phase with the export named in the option (or the default
 * one), after the bytes before it were sent.
 */
export type OptionAction = Action | "transmission";

/** An option as received. */
export interface ReceivedOption {
  /** The option number. */
  option: number;
  /** "7 (NBD_OPT_GO)". */
  name: string;
  /** The option data. */
  payload: Uint8Array;
}

/** A request header as received (plus the write payload). */
export interface ReceivedRequest {
  /** The request magic (compact or extended). */
  magic: number;
  /** Whether the request used the 32-byte extended header. */
  extended: boolean;
  /** Command flags. */
  flags: number;
  /** Command type. */
  type: number;
  /** "1 (NBD_CMD_WRITE)". */
  name: string;
  /** The cookie to echo. */
  cookie: bigint;
  /** Offset. */
  offset: bigint;
  /** Length (u32 in compact requests, u64 in extended ones). */
  length: bigint;
  /** Index of this request on its connection, from 0. */
  index: number;
  /** The write payload, if any (not kept in the log). */
  data?: Uint8Array;
}

/** Everything one connection received, for assertions. */
export interface ConnectionLog {
  /** Connection number, from 0 in accept order. */
  readonly id: number;
  /** The 32-bit client flags, once received. */
  clientFlags: number | undefined;
  /** Every option, in order, with its data. */
  readonly options: ReceivedOption[];
  /** Every request header, in order (payloads are not kept). */
  readonly requests: Omit<ReceivedRequest, "data">[];
  /** The export in use once in transmission. */
  exportName: string | undefined;
  /** Whether structured replies were negotiated. */
  structuredReplies: boolean;
  /** Whether extended headers were negotiated. */
  extendedHeaders: boolean;
  /** Selected metadata contexts by id. */
  metaContexts: { id: number; name: string }[];
  /** Why the server closed the connection, when it did it on purpose. */
  readonly notes: string[];
  /** Set once the connection is over. */
  closed: boolean;
}

/** The negotiated state a hook can read. */
export interface ConnectionState {
  /** The log of this connection (also in `server.log`). */
  readonly log: ConnectionLog;
  /** `"handshake"` or `"transmission"`. */
  readonly phase: "handshake" | "transmission";
  /** Whether the client asked for NO_ZEROES. */
  readonly noZeroes: boolean;
  /** Whether structured replies are on. */
  readonly structuredReplies: boolean;
  /** Whether extended headers are on. */
  readonly extendedHeaders: boolean;
  /** The export in use, once in transmission. */
  readonly disk: TestDisk | undefined;
  /** The configuration of that export. */
  readonly export: ExportConfig | undefined;
}

/** What hooks get besides the message: state and a way to act at once. */
export interface HookContext {
  /** Negotiated state and the connection's log. */
  readonly state: ConnectionState;
  /** Sends bytes now, in order with everything else this connection sends. */
  send(...messages: Uint8Array[]): Promise<void>;
  /** Closes the connection at once. */
  drop(): void;
  /** Resolves when the connection or the server closes. */
  readonly closed: Promise<void>;
}

/** Extra for command hooks. */
export interface CommandContext extends HookContext {
  /**
   * Carries out the command as a correct server would (writes included) and
   * returns the reply messages without sending them.
   */
  defaultReply(): Promise<Uint8Array[]>;
}

/** Extra for option hooks. */
export interface OptionContext extends HookContext {
  /**
   * Carries out the option as a correct server would and returns the reply
   * bytes without sending them. For GO and EXPORT_NAME, pair it with
   * `"transmission"`.
   */
  defaultReply(): Uint8Array[];
}

/** A hook's answer: nothing for the default behaviour, or actions. */
export type HookResult<A> = undefined | A | A[];

/** How `NBD_OPT_STARTTLS` (or any option) is refused. */
export interface ReplyOverride {
  /** The reply type to send. */
  reply: number;
  /** Optional text (for error replies). */
  message?: string;
}

/** Configuration of {@linkcode startTestServer}. */
export interface TestServerConfig {
  /** Negotiation style; fixed newstyle by default. */
  style?: "oldstyle" | "newstyle" | "fixed";
  /** Where to listen; a Unix socket by default. */
  listen?: "unix" | "tcp" | "both";
  /** The exports; one 1 MiB export named "" by default. */
  exports?: ExportConfig[];
  /**
   * Handshake flags to advertise. Default: FIXED_NEWSTYLE | NO_ZEROES for
   * fixed newstyle, 0 for newstyle.
   */
  handshakeFlags?: number;
  /**
   * Raw bytes sent instead of the greeting (the rest goes on as usual), or
   * actions, e.g. `[bytes.subarray(0, 11), "drop"]`.
   */
  greeting?: Uint8Array | Action[];
  /** Accept connections but send nothing until closed. */
  stallHandshake?: boolean;
  /** Accept `NBD_OPT_STRUCTURED_REPLY` (default true). */
  structuredReplies?: boolean;
  /** Accept `NBD_OPT_EXTENDED_HEADERS` (default true). */
  extendedHeaders?: boolean;
  /** How to answer STARTTLS; `NBD_REP_ERR_POLICY` by default. */
  starttls?: ReplyOverride;
  /** Fixed replies per option number, replacing the default handling. */
  optionReplies?: Record<number, number | ReplyOverride>;
  /** Extra `NBD_REP_INFO` replies sent before NBD_INFO_EXPORT in INFO/GO. */
  unknownInfos?: { type: number; data?: Uint8Array }[];
  /** Send NBD_INFO_BLOCK_SIZE even if the client did not ask. */
  alwaysSendBlockSize?: boolean;
  /** Refuse GO with ERR_BLOCK_SIZE_REQD unless the client asks for sizes. */
  blockSizeRequired?: boolean;
  /** Answer requests in reverse order of arrival within a short window. */
  reorder?: boolean;
  /** The reorder window in milliseconds (default 5). */
  reorderWindowMs?: number;
  /** Delay before handling each request, in milliseconds. */
  delay?: number | ((req: ReceivedRequest) => number);
  /** Split structured read replies into chunks of this many bytes. */
  readChunkSize?: number;
  /** Send the chunks of one read in reverse order. */
  shuffleChunks?: boolean;
  /** Send unwritten pages as NBD_REPLY_TYPE_OFFSET_HOLE in structured reads. */
  readHoles?: boolean;
  /** End successful non-read replies with a NONE chunk instead of a simple reply. */
  noneChunks?: boolean;
  /** Called on every option before the default handling. */
  onOption?: (
    opt: ReceivedOption,
    ctx: OptionContext,
  ) => HookResult<OptionAction> | Promise<HookResult<OptionAction>>;
  /** Called on every request (after its payload was read). */
  onCommand?: (
    req: ReceivedRequest,
    ctx: CommandContext,
  ) => HookResult<Action> | Promise<HookResult<Action>>;
  /** Bound on options per connection (default 64). */
  maxOptions?: number;
  /** Bound on requests per connection (default 1,000,000). */
  maxRequests?: number;
  /** Bound on accepted connections (default 1000). */
  maxConnections?: number;
}

/** The running server. */
export interface TestServer extends AsyncDisposable {
  /** The Unix socket path, when listening on one. */
  readonly path: string | undefined;
  /** The TCP port on 127.0.0.1, when listening on TCP. */
  readonly port: number | undefined;
  /** A URI for the first export (Unix socket preferred). */
  readonly uri: string;
  /** A URI for a given export. */
  uriFor(exportName: string, transport?: "unix" | "tcp"): string;
  /** One record per accepted connection. */
  readonly log: readonly ConnectionLog[];
  /** The backing memory of an export (the first one by default). */
  disk(name?: string): TestDisk;
  /**
   * Waits until every accepted connection is over.
   *
   * @throws {Error} after `timeoutMs` (default 5000).
   */
  settled(timeoutMs?: number): Promise<void>;
  /** Closes the listeners and every connection, and waits for them. */
  close(): Promise<void>;
}
