/**
 * A scripted NBD server for the client's tests: correct by default, and able
 * to misbehave in every way a broken or hostile server might, one hook at a
 * time. Real servers are tested in `tests/interop/`; this one exists for what
 * real servers never do.
 *
 * ```ts
 * await using server = await startTestServer({
 *   exports: [{ name: "disk", size: 1 << 20 }],
 *   onCommand: (req) =>
 *     req.type === CMD_READ ? simpleReply(req.cookie, EIO) : undefined,
 * });
 * const client = await connect(server.uri);
 * ```
 *
 * Everything here is bounded: loops stop at a count, waits stop at a timer or
 * when the server closes, and `close()` leaves no resource open.
 *
 * The code lives in `tests/support/server/`, one file per section: the
 * encoders (`encode.ts`), what it parses from the client (`decode.ts`), the
 * exports' memory (`store.ts`), the hooks and records (`hooks.ts`), one
 * connection's plumbing (`connection.ts`), the two phases (`options.ts`,
 * `transmission.ts`) and the listeners (`listen.ts`). This entry lists what
 * tests use.
 *
 * @module
 */

export {
  blockStatusExtPayload,
  blockStatusPayload,
  Builder,
  concat,
  errorOffsetPayload,
  errorPayload,
  exportNameReply,
  extendedChunk,
  infoBlockSizePayload,
  infoExportPayload,
  infoStringPayload,
  metaContextPayload,
  newstyleGreeting,
  offsetDataPayload,
  offsetHolePayload,
  oldstyleGreeting,
  optionReply,
  repServerPayload,
  simpleReply,
  structuredChunk,
} from "./server/encode.ts";
export type { Extent } from "./server/encode.ts";
export { TestDisk } from "./server/store.ts";
export type { BlockSize, ExportConfig } from "./server/store.ts";
export type {
  Action,
  CommandContext,
  ConnectionLog,
  ConnectionState,
  HookContext,
  HookResult,
  OptionAction,
  OptionContext,
  ReceivedOption,
  ReceivedRequest,
  ReplyOverride,
  TestServer,
  TestServerConfig,
} from "./server/hooks.ts";
export { startTestServer } from "./server/listen.ts";
