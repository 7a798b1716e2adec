/**
 * A Network Block Device (NBD) client for Deno: TCP, Unix sockets and
 * vsock; oldstyle, newstyle and fixed newstyle handshakes; TLS; structured
 * replies and extended headers; block status; many requests in flight.
 * No dependencies beyond Deno itself.
 *
 * The kernel handoff (`/dev/nbdX`) lives in the second entry point,
 * `@nbd/client/ffi`, so that plain use never needs `--allow-ffi`.
 *
 * @example
 * ```ts
 * import { connect, NbdCommandError } from "@nbd/client";
 *
 * await using nbd = await connect("nbd+unix:///disk?socket=/run/nbd.sock", {
 *   signal: AbortSignal.timeout(5000),
 *   metaContexts: ["base:allocation"],
 * });
 * console.log(nbd.size, nbd.blockSize, nbd.canTrim);
 * await nbd.write(0, new Uint8Array(4096).fill(0xab), { fua: nbd.canFua });
 * const back = await nbd.read(0, 4096);
 * const map = await nbd.blockStatus(0, nbd.size);
 * try {
 *   await nbd.flush();
 * } catch (e) {
 *   if (e instanceof NbdCommandError) console.error(e.errnoName);
 * }
 * ```
 *
 * @module
 */

export { connect } from "./lib/connect.ts";
export { openTransport } from "./lib/dial.ts";
export { listExports, probe, probeExports } from "./lib/probe.ts";
export type { ExportProbe, ListedExport, ProbeOptions } from "./lib/probe.ts";
export { NbdClient } from "./lib/client.ts";
export type {
  BlockStatus,
  BlockStatusBigInt,
  BlockStatusOf,
  BlockStatusOptions,
  ClientState,
  ReadOptions,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from "./lib/client.ts";
export { capabilities, transmissionFlagNames } from "./lib/capabilities.ts";
export type { Capabilities, CapabilityFacts } from "./lib/capabilities.ts";
export type {
  ConnectOptions,
  ConnectTarget,
  DebugHook,
  NegotiationOptions,
  ReconnectOptions,
  TlsMode,
  TlsOptions,
} from "./lib/connect_options.ts";
export {
  NbdCommandError,
  NbdConnectionClosedError,
  NbdError,
  NbdOptionError,
  NbdProtocolError,
  NbdUnsupportedError,
} from "./lib/errors.ts";
export type { CommandErrorDetails, ProtocolPhase } from "./lib/errors.ts";
export { NbdExportChangedError } from "./lib/reconnect.ts";
export type { NbdStats } from "./lib/connections.ts";
export { formatUri, parseUri } from "./lib/uri.ts";
export { loadTlsCredentials } from "./lib/tls/credentials.ts";
export type { TlsCredentials } from "./lib/tls/credentials.ts";
export { NbdTlsError } from "./lib/tls/error.ts";
export { refuseUnsupportedTls } from "./lib/tls/upgrade.ts";
export type { UpgradeOptions } from "./lib/tls/upgrade.ts";
export type { TlsStream } from "./lib/tls/stream.ts";
export type { TlsEngine } from "./lib/connect_options.ts";
export { readableFrom, writableTo } from "./lib/streams.ts";
export type {
  ReadableFromOptions,
  StreamableClient,
  WritableToOptions,
} from "./lib/streams.ts";
export { STATE_HOLE, STATE_ZERO } from "./lib/constants.ts";
export type { ByteStream, Transport } from "./lib/transport.ts";
export type { BlockSize, ExportInfo, Protocol } from "./lib/export.ts";
export type { ExportListing } from "./lib/options/list.ts";
export type { Extent, ExtentBigInt } from "./lib/transmission.ts";
export {
  blkhash,
  BLKHASH_DEFAULT_BLOCK_SIZE,
  Blkhasher,
  checkBlkhash,
  isBlkhashDigest,
  MAX_BLKHASH_TABLE,
  toHex,
} from "./lib/blkhash.ts";
export type {
  BlkhashDigest,
  BlkhashOptions,
  BlkhashPiece,
  BlkhashShared,
} from "./lib/blkhash.ts";
