/**
 * The client against a hostile or broken server: every misbehaviour ends in
 * the documented typed error (or the right data), within a bounded time and
 * without an unhandled rejection. The server is `tests/support/server.ts`,
 * which real clients validate in `tests/support/server_test.ts`; when a step
 * here fails, the client is wrong, not the step.
 */

import assert from "node:assert/strict";
import type { NbdClient } from "../lib/client.ts";
import { connect } from "../lib/connect.ts";
import type { ConnectOptions } from "../lib/connect_options.ts";
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_FLUSH,
  CMD_READ,
  CMD_WRITE,
  EIO,
  ENOSPC,
  EPERM,
  ESHUTDOWN,
  FLAG_SEND_FLUSH,
  FLAG_SEND_TRIM,
  IHAVEOPT,
  INFO_NAME,
  NBDMAGIC,
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_LIST,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_POLICY,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  STATE_HOLE,
  STATE_ZERO,
} from "../lib/constants.ts";
import {
  NbdCommandError,
  NbdConnectionClosedError,
  NbdError,
  NbdOptionError,
  NbdProtocolError,
  NbdUnsupportedError,
} from "../lib/errors.ts";
import {
  type Action,
  blockStatusExtPayload,
  blockStatusPayload,
  Builder,
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
  type ReceivedRequest,
  repServerPayload,
  simpleReply,
  startTestServer,
  structuredChunk,
  type TestServer,
  type TestServerConfig,
} from "./support/server.ts";
import { within } from "./support/wait.ts";

/** Generous for a Unix socket; a step that takes this long has hung. */
const BOUND_MS = 5000;
const MiB = 1024 * 1024;

// Rejections nobody handled are collected here and asserted empty per step.
const unhandled: unknown[] = [];
function onUnhandled(e: PromiseRejectionEvent): void {
  e.preventDefault();
  unhandled.push(e.reason);
}

/** Lets pending rejection events fire. */
function tick(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** Settles `p` and returns its error, failing if it resolved. */
async function rejection(
  p: Promise<unknown>,
  what: string,
  bound = BOUND_MS,
): Promise<Error> {
  try {
    await within(bound, what, p);
  } catch (e) {
    assert.ok(e instanceof Error, `${what}: threw a non-Error ${String(e)}`);
    assert.doesNotMatch(e.message, /\(hang\)$/, `${what} hung`);
    return e;
  }
  assert.fail(`${what}: resolved, expected a rejection`);
}

function assertProtocol(
  e: Error,
  phase: "handshake" | "transmission",
  message?: RegExp,
): asserts e is NbdProtocolError {
  assert.ok(
    e instanceof NbdProtocolError,
    `expected NbdProtocolError, got ${e.name}: ${e.message}`,
  );
  assert.equal(e.phase, phase, e.message);
  if (message) assert.match(e.message, message);
}

function assertCommand(
  e: Error,
  errno: number,
  errnoName: string,
): asserts e is NbdCommandError {
  assert.ok(
    e instanceof NbdCommandError,
    `expected NbdCommandError, got ${e.name}: ${e.message}`,
  );
  assert.equal(e.errno, errno);
  assert.equal(e.errnoName, errnoName);
}

/** A fatal error, or the closed-connection error that carries it. */
function rootCause(e: Error): Error {
  if (e instanceof NbdConnectionClosedError && e.cause instanceof Error) {
    return e.cause;
  }
  return e;
}

/** Closes a client, bounded; errors from an already broken client are fine. */
async function closeClient(client: NbdClient): Promise<void> {
  await within(BOUND_MS, "close()", client.close().catch(() => {}));
}

async function open(
  server: TestServer,
  options: ConnectOptions = {},
): Promise<NbdClient> {
  return await within(
    BOUND_MS,
    "connect()",
    connect({ path: server.path!, exportName: "disk", ...options }),
  );
}

/** Runs `body` with a client, closing it afterwards. */
async function withClient(
  server: TestServer,
  options: ConnectOptions,
  body: (client: NbdClient) => Promise<void>,
): Promise<void> {
  const client = await open(server, options);
  try {
    await within(BOUND_MS, "step body", body(client));
  } finally {
    await closeClient(client);
  }
}

/** connect() fails in the handshake with an NbdProtocolError. */
async function handshakeFails(
  server: TestServer,
  message?: RegExp,
  options: ConnectOptions = {},
): Promise<void> {
  const e = await rejection(open(server, options), "connect()");
  assertProtocol(e, "handshake", message);
}

/** read(0, length) fails with a transmission NbdProtocolError. */
async function readBreaks(
  server: TestServer,
  length: number,
  message: RegExp,
): Promise<void> {
  await withClient(server, {}, async (client) => {
    const e = await rejection(client.read(0, length), "read()");
    assertProtocol(e, "transmission", message);
  });
}

/** Polls (bounded) until the client records a fatal failure. */
async function failureOf(client: NbdClient): Promise<Error> {
  for (let i = 0; i < 200; i++) {
    if (client.failure) return client.failure;
    await new Promise((r) => setTimeout(r, 10));
  }
  assert.fail("the client never recorded a failure");
}

const DATA = (() => {
  const d = new Uint8Array(MiB);
  for (let i = 0; i < d.length; i++) d[i] = (i * 7 + (i >> 9)) & 0xff;
  return d;
})();

/**
 * A compact-header server (the steps build compact replies); steps about
 * extended headers turn them back on.
 */
function config(extra: TestServerConfig = {}): TestServerConfig {
  return {
    extendedHeaders: false,
    exports: [{
      name: "disk",
      size: MiB,
      data: DATA,
      description: "hostile test disk",
    }],
    ...extra,
  };
}

/** Answers READs with `reply(req)` and everything else correctly. */
function onRead(
  reply: (req: ReceivedRequest) => Action | Action[] | undefined,
): NonNullable<TestServerConfig["onCommand"]> {
  return (req) => req.type === CMD_READ ? reply(req) : undefined;
}

const NO_DATA = new Uint8Array(0);

Deno.test("NbdClient against a hostile server", async (t) => {
  globalThis.addEventListener("unhandledrejection", onUnhandled);
  try {
    await steps(t);
  } finally {
    globalThis.removeEventListener("unhandledrejection", onUnhandled);
  }
});

async function steps(t: Deno.TestContext): Promise<void> {
  /** One step with its own server; checks for unhandled rejections. */
  const step = (
    name: string,
    cfg: TestServerConfig,
    body: (server: TestServer) => Promise<void>,
    bound = BOUND_MS * 2,
  ) =>
    t.step(name, async () => {
      await using server = await startTestServer(cfg);
      await within(bound, name, body(server));
      await tick();
      assert.deepEqual(unhandled.splice(0), [], "unhandled rejections");
    });

  // --- Handshake -----------------------------------------------------------

  await step(
    "connect() fails with a handshake NbdProtocolError on a bad NBDMAGIC",
    config({
      greeting: new Builder().u64(0x4e42444d41474943n + 1n).u64(IHAVEOPT)
        .u16(3).done(),
    }),
    (server) => handshakeFails(server),
  );

  await step(
    "connect() fails on an unknown second magic",
    config({
      greeting: new Builder().u64(NBDMAGIC).u64(0x1234n).u16(3).done(),
    }),
    (server) => handshakeFails(server),
  );

  await step(
    "connect() fails on an option reply with a bad magic",
    config({
      onOption: (opt, ctx) =>
        ctx.state.log.options.length === 1
          ? new Builder().u64(0x3e889045565a8n).u32(opt.option).u32(REP_ACK)
            .u32(0).done()
          : undefined,
    }),
    (server) => handshakeFails(server, /magic/i),
  );

  await step(
    "connect() fails on a reply to the wrong option",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO ? optionReply(OPT_LIST, REP_ACK) : undefined,
    }),
    (server) =>
      handshakeFails(
        server,
        /Unexpected option reply 3 \(NBD_OPT_LIST\), expected 7 \(NBD_OPT_GO\)/,
      ),
  );

  await step(
    "connect() refuses an option reply claiming 0xffffffff bytes",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? new Builder().u64(0x3e889045565a9n).u32(OPT_GO).u32(REP_INFO)
            .u32(0xffffffff).done()
          : undefined,
    }),
    (server) => handshakeFails(server, /4294967295/),
  );

  await step(
    "connect() fails when the server drops mid option reply",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [optionReply(OPT_GO, REP_ACK).subarray(0, 7), "drop"]
          : undefined,
    }),
    (server) => handshakeFails(server, /7 of 20 bytes/),
  );

  await step(
    "connect() fails with NbdConnectionClosedError when the server hangs up between replies",
    config({
      onOption: (opt) => opt.option === OPT_GO ? "drop" : undefined,
    }),
    async (server) => {
      const e = await rejection(open(server), "connect()");
      assert.ok(
        e instanceof NbdConnectionClosedError,
        `${e.name}: ${e.message}`,
      );
    },
  );

  await step(
    "connect() gives up on a stalled handshake when its signal aborts",
    config({ stallHandshake: true }),
    async (server) => {
      const started = Date.now();
      const e = await rejection(
        open(server, { signal: AbortSignal.timeout(500) }),
        "connect()",
      );
      assert.equal(e.name, "TimeoutError", e.message);
      assert.ok(Date.now() - started < 3000);
      await server.settled();
    },
  );

  await step(
    "connect() gives up on a stall after NBD_OPT_GO when its signal aborts",
    config({ onOption: (opt) => opt.option === OPT_GO ? "stall" : undefined }),
    async (server) => {
      const e = await rejection(
        open(server, { signal: AbortSignal.timeout(500) }),
        "connect()",
      );
      assert.equal(e.name, "TimeoutError", e.message);
    },
  );

  await step(
    "connect() speaks oldstyle",
    config({ style: "oldstyle" }),
    async (server) => {
      await withClient(server, { exportName: "" }, async (client) => {
        assert.equal(client.protocol, "oldstyle");
        assert.equal(client.structuredReplies, false);
        assert.equal(client.size, MiB);
        assert.deepEqual(
          await client.read(4096, 8192),
          DATA.slice(4096, 12288),
        );
        await client.write(0, new Uint8Array(512).fill(9));
        assert.deepEqual(
          server.disk().read(0, 512),
          new Uint8Array(512).fill(9),
        );
      });
      await server.settled();
      assert.equal(server.log[0]?.requests.at(-1)?.type, CMD_DISC);
    },
  );

  await step(
    "connect() speaks non-fixed newstyle with only NBD_OPT_EXPORT_NAME",
    config({ style: "newstyle" }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        assert.equal(client.protocol, "newstyle");
        assert.deepEqual(await client.read(0, 4096), DATA.slice(0, 4096));
      });
      await server.settled();
      const log = server.log[0]!;
      assert.equal(log.clientFlags, 0, "no flag the server did not offer");
      assert.deepEqual(log.options.map((o) => o.option), [OPT_EXPORT_NAME]);
    },
  );

  await step(
    "connect() reads the 124 zeroes when NO_ZEROES is not offered",
    config({ handshakeFlags: 1 }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
      });
    },
  );

  await step(
    "connect() works without structured replies (NBD_REP_ERR_UNSUP)",
    config({ structuredReplies: false }),
    async (server) => {
      await withClient(
        server,
        { metaContexts: ["base:allocation"] },
        async (client) => {
          assert.equal(client.structuredReplies, false);
          assert.equal(client.canBlockStatus, false);
          assert.equal(client.canDf, false);
          assert.deepEqual(await client.read(512, 1024), DATA.slice(512, 1536));
        },
      );
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.ok(!sent.includes(10), "no SET_META_CONTEXT without structured");
    },
  );

  await step(
    "negotiate() falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported",
    config({ optionReplies: { [OPT_GO]: REP_ERR_UNSUP } }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        assert.equal(client.size, MiB);
        assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
      });
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.equal(sent.at(-1), OPT_EXPORT_NAME);
      assert.ok(sent.includes(OPT_GO));
    },
  );

  await step(
    "negotiate() names the missing export via NBD_OPT_LIST when GO is unsupported",
    config({ optionReplies: { [OPT_GO]: REP_ERR_UNSUP } }),
    async (server) => {
      const e = await rejection(
        open(server, { exportName: "nope" }),
        "connect()",
      );
      assert.ok(e instanceof NbdOptionError, `${e.name}: ${e.message}`);
      assert.equal(e.option, OPT_GO);
      assert.equal(e.reply, REP_ERR_UNKNOWN);
      assert.match(e.message, /"nope"/);
      assert.match(e.message, /"disk"/);
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.ok(sent.includes(OPT_LIST));
      assert.ok(!sent.includes(OPT_EXPORT_NAME), "EXPORT_NAME not sent");
      assert.equal(sent.filter((o) => o === OPT_ABORT).length, 1);
    },
  );

  await step(
    "connect() fails with NbdOptionError for an unknown export, aborting once",
    config(),
    async (server) => {
      const e = await rejection(
        open(server, { exportName: "missing" }),
        "connect()",
      );
      assert.ok(e instanceof NbdOptionError, `${e.name}: ${e.message}`);
      assert.equal(e.option, OPT_GO);
      assert.equal(e.reply, REP_ERR_UNKNOWN);
      assert.equal(e.replyName, "NBD_REP_ERR_UNKNOWN");
      assert.match(e.serverMessage, /missing/);
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.equal(sent.filter((o) => o === OPT_ABORT).length, 1);
    },
  );

  await step(
    "connect() surfaces NBD_REP_ERR_SHUTDOWN as an NbdOptionError",
    config({
      optionReplies: {
        [OPT_GO]: { reply: REP_ERR_SHUTDOWN, message: "going down" },
      },
    }),
    async (server) => {
      const e = await rejection(open(server), "connect()");
      assert.ok(e instanceof NbdOptionError, `${e.name}: ${e.message}`);
      assert.equal(e.reply, REP_ERR_SHUTDOWN);
      assert.equal(e.serverMessage, "going down");
    },
  );

  await step(
    "connect() skips unknown NBD_REP_INFO types",
    config({
      unknownInfos: [
        { type: 0x7777, data: new Uint8Array(100) },
        { type: 42 },
      ],
    }),
    async (server) => {
      await withClient(server, {}, (client) => {
        assert.equal(client.size, MiB);
        return Promise.resolve();
      });
    },
  );

  await step(
    "connect() fails when NBD_OPT_GO succeeds without NBD_INFO_EXPORT",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [optionReply(OPT_GO, REP_ACK), "transmission"]
          : undefined,
    }),
    (server) => handshakeFails(server, /NBD_INFO_EXPORT/),
  );

  await step(
    "connect() fails on a short NBD_INFO_EXPORT",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [
            optionReply(
              OPT_GO,
              REP_INFO,
              infoExportPayload(MiB, 1).subarray(0, 10),
            ),
            optionReply(OPT_GO, REP_ACK),
          ]
          : undefined,
    }),
    (server) => handshakeFails(server),
  );

  await step(
    "connect() with tls: require sends no export name in clear when STARTTLS is refused",
    config({ starttls: { reply: REP_ERR_POLICY } }),
    async (server) => {
      const e = await rejection(open(server, { tls: "require" }), "connect()");
      assert.ok(e instanceof NbdError, `${e.name}: ${e.message}`);
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.equal(sent[0], OPT_STARTTLS);
      for (const o of [OPT_EXPORT_NAME, OPT_GO, OPT_LIST, 6, 9, 10]) {
        assert.ok(!sent.includes(o), `option ${o} sent in clear`);
      }
    },
  );

  await step(
    "connect() fails with a handshake NbdProtocolError when the greeting is cut short",
    config({ greeting: [newstyleGreeting().subarray(0, 11), "drop"] }),
    (server) => handshakeFails(server, /11 of 16/),
  );

  await step(
    "connect() fails when an oldstyle greeting is cut short",
    config({
      style: "oldstyle",
      greeting: [oldstyleGreeting(MiB, 1).subarray(0, 40), "drop"],
    }),
    (server) => handshakeFails(server),
  );

  await step(
    "connect() fails with NbdConnectionClosedError when the server hangs up at once",
    config({ greeting: ["drop"] }),
    async (server) => {
      const e = await rejection(open(server), "connect()");
      assert.ok(
        e instanceof NbdConnectionClosedError,
        `${e.name}: ${e.message}`,
      );
    },
  );

  await step(
    "connect() falls back from extended headers to structured replies",
    config(),
    async (server) => {
      await withClient(server, {}, (client) => {
        assert.equal(client.extendedHeaders, false);
        assert.equal(client.structuredReplies, true);
        return Promise.resolve();
      });
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.deepEqual(sent.slice(0, 2), [
        OPT_EXTENDED_HEADERS,
        OPT_STRUCTURED_REPLY,
      ]);
    },
  );

  await step(
    "negotiate() reports a missing export when GO and LIST are both unsupported",
    config({
      optionReplies: { [OPT_GO]: REP_ERR_UNSUP, [OPT_LIST]: REP_ERR_UNSUP },
    }),
    async (server) => {
      const e = await rejection(
        open(server, { exportName: "nope" }),
        "connect()",
      );
      assert.ok(e instanceof NbdError, `${e.name}: ${e.message}`);
      assert.match(e.message, /"nope"/);
      await server.settled();
      assert.equal(server.log[0]!.options.at(-1)?.option, OPT_EXPORT_NAME);
    },
  );

  await step(
    "connect() keeps an export size beyond 2^53 exact in sizeBigInt",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [
            optionReply(OPT_GO, REP_INFO, infoExportPayload(1n << 60n, 1)),
            optionReply(OPT_GO, REP_ACK),
            "transmission",
          ]
          : undefined,
    }),
    async (server) => {
      await withClient(server, {}, (client) => {
        assert.equal(client.sizeBigInt, 1n << 60n);
        assert.throws(() => client.size, RangeError);
        return Promise.resolve();
      });
    },
  );

  await step(
    "connect() rejects an invalid NBD_INFO_BLOCK_SIZE",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [
            optionReply(OPT_GO, REP_INFO, infoBlockSizePayload(3, 4096, 65536)),
            optionReply(OPT_GO, REP_INFO, infoExportPayload(MiB, 1)),
            optionReply(OPT_GO, REP_ACK),
            "transmission",
          ]
          : undefined,
    }),
    (server) => handshakeFails(server, /minimum/),
  );

  await step(
    "connect() rejects an unexpected reply type to NBD_OPT_GO",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? optionReply(OPT_GO, REP_SERVER, repServerPayload("disk"))
          : undefined,
    }),
    (server) => handshakeFails(server),
  );

  await step(
    "connect() bounds the number of NBD_REP_INFO replies",
    config({
      unknownInfos: Array.from({ length: 65540 }, () => ({ type: 0x4444 })),
    }),
    async (server) => {
      // 1.4 MB of replies: slower than the other steps, but still bounded.
      const e = await rejection(
        connect({ path: server.path!, exportName: "disk" }),
        "connect()",
        30_000,
      );
      assertProtocol(e, "handshake", /more than/);
    },
    40_000,
  );

  await step(
    "connect() rejects one metadata context id given to two contexts",
    config({
      onOption: (opt) =>
        opt.option === OPT_SET_META_CONTEXT
          ? [
            optionReply(
              opt.option,
              REP_META_CONTEXT,
              metaContextPayload(1, "base:allocation"),
            ),
            optionReply(
              opt.option,
              REP_META_CONTEXT,
              metaContextPayload(1, "qemu:dirty-bitmap:x"),
            ),
            optionReply(opt.option, REP_ACK),
          ]
          : undefined,
    }),
    (server) =>
      handshakeFails(server, /id 1/, { metaContexts: ["base:allocation"] }),
  );

  await step(
    "connect() takes the server's nbd+unix:// and nbd:// URIs",
    config({ listen: "both" }),
    async (server) => {
      for (const uri of [server.uriFor("disk"), server.uriFor("disk", "tcp")]) {
        const client = await within(BOUND_MS, `connect(${uri})`, connect(uri));
        try {
          assert.equal(client.exportName, "disk");
          assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
        } finally {
          await closeClient(client);
        }
      }
    },
  );

  await step(
    "connect() with tls: prefer goes on in clear when STARTTLS is refused",
    config({ starttls: { reply: REP_ERR_POLICY } }),
    async (server) => {
      await withClient(server, { tls: "prefer" }, async (client) => {
        assert.equal(client.tls, false);
        assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
      });
      await server.settled();
      assert.equal(server.log[0]!.options[0]?.option, OPT_STARTTLS);
    },
  );

  await step(
    "connect() fails cleanly when STARTTLS is acknowledged but no TLS follows",
    config({ starttls: { reply: REP_ACK } }),
    async (server) => {
      const e = await rejection(open(server, { tls: "require" }), "connect()");
      assert.ok(e instanceof NbdError, `${e.name}: ${e.message}`);
      await server.settled();
      const sent = server.log[0]!.options.map((o) => o.option);
      assert.deepEqual(sent, [OPT_STARTTLS], "nothing sent in clear after ACK");
    },
  );

  await step(
    "zeroes sent despite NO_ZEROES surface as a transmission protocol error",
    config({
      optionReplies: { [OPT_GO]: REP_ERR_UNSUP },
      onOption: (opt) =>
        opt.option === OPT_EXPORT_NAME
          ? [exportNameReply(MiB, 1 | FLAG_SEND_FLUSH, false), "transmission"]
          : undefined,
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        // The zeroes arrive before any request, so the reader fails first
        // and the read reports the closed connection with that cause.
        const e = await rejection(client.read(0, 512), "read()");
        assertProtocol(rootCause(e), "transmission", /magic/i);
      });
      await server.settled();
      assert.equal(server.log[0]!.clientFlags! & 2, 2, "NO_ZEROES was asked");
    },
  );

  await step(
    "connect() goes on without block status when SET_META_CONTEXT is unsupported",
    config({ optionReplies: { [OPT_SET_META_CONTEXT]: REP_ERR_UNSUP } }),
    async (server) => {
      await withClient(
        server,
        { metaContexts: ["base:allocation"] },
        async (client) => {
          assert.equal(client.canBlockStatus, false);
          await assert.rejects(
            () => client.blockStatus(0, 512),
            NbdUnsupportedError,
          );
        },
      );
      await server.settled();
      assert.ok(
        !server.log[0]!.requests.some((r) => r.type === CMD_BLOCK_STATUS),
      );
    },
  );

  await step(
    "connect() reports NBD_REP_ERR_TLS_REQD with the option and reply",
    config({
      optionReplies: {
        [OPT_GO]: { reply: REP_ERR_TLS_REQD, message: "TLS first" },
      },
    }),
    async (server) => {
      const e = await rejection(open(server), "connect()");
      assert.ok(e instanceof NbdOptionError, `${e.name}: ${e.message}`);
      assert.equal(e.option, OPT_GO);
      assert.equal(e.reply, REP_ERR_TLS_REQD);
      assert.equal(e.replyName, "NBD_REP_ERR_TLS_REQD");
      assert.equal(e.serverMessage, "TLS first");
    },
  );

  await step(
    "connect() bounds an NBD_INFO_NAME longer than 4096 bytes",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [
            optionReply(
              OPT_GO,
              REP_INFO,
              infoStringPayload(INFO_NAME, "n".repeat(5000)),
            ),
            optionReply(OPT_GO, REP_INFO, infoExportPayload(MiB, 1)),
            optionReply(OPT_GO, REP_ACK),
            "transmission",
          ]
          : undefined,
    }),
    (server) => handshakeFails(server, /4096/),
  );

  // --- Transmission: typed errors that keep the connection ------------------

  await step(
    "read() fails with NbdCommandError (EIO) from a simple reply; the connection stays usable",
    config({
      structuredReplies: false,
      onCommand: (req) =>
        req.type === CMD_READ && req.offset === 0n
          ? simpleReply(req.cookie, EIO)
          : undefined,
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(client.read(0, 512), "read()");
        assertCommand(e, EIO, "EIO");
        assert.equal(e.command, "NBD_CMD_READ");
        assert.deepEqual(await client.read(512, 512), DATA.slice(512, 1024));
      });
    },
  );

  await step(
    "write() fails with ENOSPC and EPERM while other requests succeed",
    config({
      onCommand: (req) => {
        if (req.type !== CMD_WRITE) return undefined;
        if (req.offset === 0n) return simpleReply(req.cookie, ENOSPC);
        if (req.offset === 4096n) return simpleReply(req.cookie, EPERM);
        return undefined;
      },
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const block = new Uint8Array(4096).fill(1);
        const [a, b, c] = await Promise.allSettled([
          client.write(0, block),
          client.write(4096, block),
          client.write(8192, block),
        ]);
        assert.equal(a.status, "rejected");
        assert.equal(b.status, "rejected");
        assert.equal(c.status, "fulfilled");
        assertCommand((a as PromiseRejectedResult).reason, ENOSPC, "ENOSPC");
        assertCommand((b as PromiseRejectedResult).reason, EPERM, "EPERM");
        assert.deepEqual(server.disk().read(8192, 4096), block);
      });
    },
  );

  await step(
    "read() reports a structured error chunk's errno and message",
    config({
      onCommand: onRead((req) =>
        req.offset === 0n
          ? structuredChunk(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            errorPayload(EIO, "disk on fire"),
          )
          : []
      ),
    }),
    async (server) => {
      const client = await open(server);
      try {
        const e = await rejection(client.read(0, 512), "read()");
        assertCommand(e, EIO, "EIO");
        assert.equal(e.serverMessage, "disk on fire");
        assert.match(e.message, /disk on fire/);
        assert.equal(client.failure, undefined);
      } finally {
        await closeClient(client);
      }
    },
  );

  await step(
    "read() reports NBD_REPLY_TYPE_ERROR_OFFSET with its offset",
    config({
      onCommand: onRead((req) => [
        structuredChunk(
          req.cookie,
          0,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, DATA.slice(0, 512)),
        ),
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_ERROR_OFFSET,
          errorOffsetPayload(EIO, "bad sector", req.offset + 512n),
        ),
      ]),
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(client.read(0, 1024), "read()");
        assertCommand(e, EIO, "EIO");
        assert.equal(e.errorOffset, 512);
        assert.equal(e.serverMessage, "bad sector");
      });
    },
  );

  await step(
    "read() treats an unknown chunk type with the error bit as a command error",
    config({
      onCommand: onRead((req) =>
        req.offset === 0n
          ? structuredChunk(
            req.cookie,
            REPLY_FLAG_DONE,
            0x8000 | 77,
            errorPayload(EIO, "new kind of error"),
          )
          : undefined
      ),
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(client.read(0, 512), "read()");
        assert.ok(e instanceof NbdCommandError, `${e.name}: ${e.message}`);
        assert.deepEqual(await client.read(512, 512), DATA.slice(512, 1024));
      });
    },
  );

  await step(
    "ESHUTDOWN fails the request and makes the client disconnect softly",
    config({
      onCommand: onRead((req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_ERROR,
          errorPayload(ESHUTDOWN, "shutting down"),
        )
      ),
    }),
    async (server) => {
      const client = await open(server);
      try {
        const e = await rejection(client.read(0, 512), "read()");
        assertCommand(e, ESHUTDOWN, "ESHUTDOWN");
        const later = await rejection(client.read(0, 512), "read() after");
        assert.ok(
          later instanceof NbdConnectionClosedError,
          `${later.name}: ${later.message}`,
        );
        await within(BOUND_MS, "server sees the disconnect", server.settled());
        assert.equal(server.log[0]?.requests.at(-1)?.type, CMD_DISC);
      } finally {
        await closeClient(client);
      }
    },
  );

  // --- Transmission: protocol violations ------------------------------------

  await step(
    "a protocol violation fails every pending request with the same error",
    config({
      onCommand: (req) =>
        req.type !== CMD_READ
          ? undefined
          : req.index < 2
          ? []
          : new Builder().u32(0xdeadbeef).u32(0).u64(req.cookie).done(),
    }),
    async (server) => {
      const client = await open(server);
      try {
        const results = await within(
          BOUND_MS,
          "three reads",
          Promise.allSettled([
            client.read(0, 512),
            client.read(512, 512),
            client.read(1024, 512),
          ]),
        );
        const reasons = results.map((r) => {
          assert.equal(r.status, "rejected");
          return (r as PromiseRejectedResult).reason as Error;
        });
        assertProtocol(reasons[0]!, "transmission", /magic/i);
        assert.equal(reasons[1], reasons[0]);
        assert.equal(reasons[2], reasons[0]);
        const after = await rejection(client.read(0, 512), "read() after");
        assert.ok(after instanceof NbdConnectionClosedError);
        assert.equal(rootCause(after), reasons[0]);
      } finally {
        await closeClient(client);
      }
    },
  );

  const violations: {
    name: string;
    reply: (req: ReceivedRequest) => Uint8Array | Uint8Array[];
    message?: RegExp;
  }[] = [
    {
      name: "a bad reply magic",
      reply: (req) =>
        new Builder().u32(0x12345678).u32(0).u64(req.cookie).done(),
      message: /magic/i,
    },
    {
      name: "a reply to an unknown cookie",
      reply: (req) => simpleReply(req.cookie + 1000n, 0),
      message: /cookie/,
    },
    {
      name: "a data chunk claiming 0xffffffff bytes",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, new Uint8Array(16)),
          0xffffffff,
        ),
    },
    {
      name: "a data chunk shorter than its offset field",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, NO_DATA),
        ),
    },
    {
      name: "a hole chunk of 11 bytes",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_HOLE,
          offsetHolePayload(req.offset, 512).subarray(0, 11),
        ),
    },
    {
      name: "a hole of length 0",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_HOLE,
          offsetHolePayload(req.offset, 0),
        ),
    },
    {
      name: "a data chunk before the request's offset",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset - 512n, new Uint8Array(512)),
        ),
      message: /outside the request/,
    },
    {
      name: "a hole past the request's end",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_HOLE,
          offsetHolePayload(req.offset + 512n, Number(req.length)),
        ),
      message: /outside the request/,
    },
    {
      name: "overlapping data chunks",
      reply: (req) => [
        structuredChunk(
          req.cookie,
          0,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, new Uint8Array(768)),
        ),
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset + 512n, new Uint8Array(512)),
        ),
      ],
      message: /overlaps/,
    },
    {
      name: "DONE before the data covers the request",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, new Uint8Array(512)),
        ),
      message: /covered 512 of 1024/,
    },
    {
      name: "an unknown chunk type without the error bit",
      reply: (req) =>
        structuredChunk(req.cookie, REPLY_FLAG_DONE, 99, new Uint8Array(4)),
      message: /unknown chunk type/,
    },
    {
      name: "a NONE chunk with a payload",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_NONE,
          new Uint8Array(4),
        ),
    },
    {
      name: "a NONE chunk without DONE",
      reply: (req) => structuredChunk(req.cookie, 0, REPLY_TYPE_NONE),
    },
    {
      name: "an error chunk whose message overruns it",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_ERROR,
          new Builder().u32(EIO).u16(200).string("short").done(),
        ),
    },
    {
      name: "an error offset outside the request",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_ERROR_OFFSET,
          errorOffsetPayload(EIO, "", req.offset + req.length),
        ),
      message: /outside the request/,
    },
    {
      name: "block status extents for a read",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_BLOCK_STATUS,
          blockStatusPayload(1, [{ length: 1024, flags: 0 }]),
        ),
    },
    {
      name: "a simple reply with data to a structured read",
      reply: (req) =>
        simpleReply(req.cookie, 0, new Uint8Array(Number(req.length))),
    },
  ];

  for (const v of violations) {
    await step(
      `read() fails with a transmission NbdProtocolError on ${v.name}`,
      config({ onCommand: onRead(v.reply) }),
      async (server) => {
        const client = await open(server);
        try {
          const e = await rejection(client.read(1024, 1024), "read()");
          assertProtocol(e, "transmission", v.message);
          assert.equal(client.failure, e);
        } finally {
          await closeClient(client);
        }
        await within(BOUND_MS, "the client hangs up", server.settled());
      },
    );
  }

  await step(
    "a structured chunk without structured replies is a protocol error",
    config({
      structuredReplies: false,
      onCommand: onRead((req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_NONE,
        )
      ),
    }),
    (server) => readBreaks(server, 512, /magic/i),
  );

  await step(
    "a cookie answered twice: the read succeeds, then the duplicate is a violation",
    config({
      structuredReplies: false,
      onCommand: async (req, ctx) =>
        req.type === CMD_READ && req.index === 0
          ? [...await ctx.defaultReply(), ...await ctx.defaultReply()]
          : undefined,
    }),
    async (server) => {
      const client = await open(server);
      try {
        assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
        const failure = await failureOf(client);
        assertProtocol(failure, "transmission", /cookie/);
        const later = await rejection(client.read(0, 512), "read() after");
        assert.ok(later instanceof NbdConnectionClosedError);
        assert.equal(rootCause(later), failure);
      } finally {
        await closeClient(client);
      }
    },
  );

  await step(
    "DONE twice: the second chunk is for an unknown cookie",
    config({
      onCommand: onRead((req) => [
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, DATA.slice(0, Number(req.length))),
        ),
        structuredChunk(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE),
      ]),
    }),
    async (server) => {
      const client = await open(server);
      try {
        assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
        assertProtocol(await failureOf(client), "transmission", /cookie/);
      } finally {
        await closeClient(client);
      }
    },
  );

  await step(
    "read() fails with a protocol error when the server drops mid-payload",
    config({
      structuredReplies: false,
      onCommand: onRead((req) => [
        simpleReply(req.cookie, 0, DATA.slice(0, 100)),
        "drop",
      ]),
    }),
    (server) => readBreaks(server, 4096, /100 of 4096/),
  );

  await step(
    "read() fails with a protocol error when the server drops mid-header",
    config({
      onCommand: onRead((req) => [
        structuredChunk(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE)
          .subarray(0, 7),
        "drop",
      ]),
    }),
    (server) => readBreaks(server, 4096, /7 of 16/),
  );

  await step(
    "a missing DONE and a hang-up fail the read with NbdConnectionClosedError",
    config({
      onCommand: onRead((req) => [
        structuredChunk(
          req.cookie,
          0,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, DATA.slice(0, Number(req.length))),
        ),
        "drop",
      ]),
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(client.read(0, 512), "read()");
        assert.ok(
          e instanceof NbdConnectionClosedError,
          `${e.name}: ${e.message}`,
        );
      });
    },
  );

  await step(
    "read() gives up on a stalled reply when its signal aborts, and close() still returns",
    config({ onCommand: onRead(() => "stall") }),
    async (server) => {
      const client = await open(server);
      try {
        const e = await rejection(
          client.read(0, 512, { signal: AbortSignal.timeout(300) }),
          "read()",
        );
        assert.equal(e.name, "TimeoutError", e.message);
      } finally {
        // The server never answers; close() must not wait for it forever.
        await within(
          BOUND_MS,
          "close() after an abandoned request",
          client.close().catch(() => {}),
        );
      }
    },
  );

  await step(
    "write() on a read-only export fails before any traffic",
    {
      extendedHeaders: false,
      exports: [{ name: "disk", size: MiB, readOnly: true }],
    },
    async (server) => {
      await withClient(server, {}, async (client) => {
        assert.equal(client.readOnly, true);
        const e = await rejection(
          client.write(0, new Uint8Array(512)),
          "write()",
        );
        assert.ok(e instanceof NbdUnsupportedError, `${e.name}: ${e.message}`);
        await assert.rejects(
          () => client.trim(0, 512),
          NbdUnsupportedError,
        );
      });
      await server.settled();
      const types = server.log[0]!.requests.map((r) => r.type);
      assert.deepEqual(types, [CMD_DISC]);
    },
  );

  await step(
    "transmission flags without NBD_FLAG_HAS_FLAGS advertise nothing",
    config({
      onOption: (opt) =>
        opt.option === OPT_GO
          ? [
            optionReply(
              OPT_GO,
              REP_INFO,
              infoExportPayload(MiB, FLAG_SEND_FLUSH | FLAG_SEND_TRIM),
            ),
            optionReply(OPT_GO, REP_ACK),
            "transmission",
          ]
          : undefined,
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        assert.equal(client.canFlush, false);
        await assert.rejects(() => client.flush(), NbdUnsupportedError);
      });
      await server.settled();
      assert.ok(!server.log[0]!.requests.some((r) => r.type === CMD_FLUSH));
    },
  );

  await step(
    "a reply that arrives after its caller gave up is absorbed",
    config({ delay: (req) => req.index === 0 ? 600 : 0 }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(
          client.read(0, 512, { signal: AbortSignal.timeout(100) }),
          "read()",
        );
        assert.equal(e.name, "TimeoutError", e.message);
        assert.deepEqual(await client.read(512, 512), DATA.slice(512, 1024));
        // Let the late reply arrive, then the connection must still be fine.
        for (let i = 0; i < 100 && server.log[0]!.requests.length < 2; i++) {
          await new Promise((r) => setTimeout(r, 10));
        }
        await new Promise((r) => setTimeout(r, 700));
        assert.equal(client.failure, undefined);
        assert.deepEqual(await client.read(1024, 512), DATA.slice(1024, 1536));
      });
    },
  );

  await step(
    "an error chunk fails a read even when data and DONE follow",
    config({
      onCommand: onRead((req) =>
        req.offset === 0n
          ? [
            structuredChunk(
              req.cookie,
              0,
              REPLY_TYPE_ERROR,
              errorPayload(EIO, "early error"),
            ),
            structuredChunk(
              req.cookie,
              0,
              REPLY_TYPE_OFFSET_DATA,
              offsetDataPayload(req.offset, DATA.slice(0, Number(req.length))),
            ),
            structuredChunk(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE),
          ]
          : undefined
      ),
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(client.read(0, 512), "read()");
        assertCommand(e, EIO, "EIO");
        assert.equal(client.failure, undefined);
        assert.deepEqual(await client.read(512, 512), DATA.slice(512, 1024));
      });
    },
  );

  await step(
    "write() fails with a protocol error on a data chunk",
    config({
      onCommand: (req) =>
        req.type === CMD_WRITE
          ? structuredChunk(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            offsetDataPayload(req.offset, new Uint8Array(512)),
          )
          : undefined,
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(
          client.write(0, new Uint8Array(512)),
          "write()",
        );
        assertProtocol(e, "transmission");
      });
    },
  );

  // --- Ordering and data ----------------------------------------------------

  await step(
    "read() reassembles split, reversed, interleaved chunks and holes",
    {
      exports: [{
        name: "disk",
        size: 4 * MiB,
        data: (() => {
          const d = new Uint8Array(4 * MiB);
          d.set(DATA.subarray(0, 256 * 1024), 0);
          d.set(DATA.subarray(0, 128 * 1024), 2 * MiB);
          return d;
        })(),
      }],
      readChunkSize: 4096,
      shuffleChunks: true,
      readHoles: true,
      reorder: true,
      delay: (req) => req.index % 3,
    },
    async (server) => {
      await withClient(server, {}, async (client) => {
        const expected = server.disk().read(0, 4 * MiB);
        const reads = [];
        for (let i = 0; i < 16; i++) {
          const offset = i * 256 * 1024;
          reads.push(
            client.read(offset, 256 * 1024).then((got) =>
              assert.deepEqual(
                got,
                expected.subarray(offset, offset + 256 * 1024),
              )
            ),
          );
        }
        await Promise.all(reads);
      });
    },
  );

  await step(
    "requests never exceed the advertised maximum block size",
    {
      exports: [{
        name: "disk",
        size: MiB,
        data: DATA,
        blockSize: { minimum: 512, preferred: 4096, maximum: 65536 },
      }],
    },
    async (server) => {
      await withClient(server, {}, async (client) => {
        assert.deepEqual(client.blockSize, {
          minimum: 512,
          preferred: 4096,
          maximum: 65536,
        });
        assert.deepEqual(
          await client.read(0, 256 * 1024),
          DATA.slice(0, 256 * 1024),
        );
        await client.write(0, DATA.slice(0, 200 * 1024));
        await assert.rejects(() => client.read(1, 512), RangeError);
      });
      await server.settled();
      const requests = server.log[0]!.requests;
      assert.ok(requests.some((r) => r.type === CMD_READ));
      for (const r of requests) {
        if (r.type === CMD_READ || r.type === CMD_WRITE) {
          assert.ok(r.length <= 65536n, `${r.name} of ${r.length}`);
          assert.equal(r.offset % 512n, 0n);
        }
      }
    },
  );

  await step(
    "blockStatus() returns the server's extents",
    {
      exports: [{
        name: "disk",
        size: MiB,
        data: DATA.slice(0, 128 * 1024),
        contexts: {
          "qemu:dirty-bitmap:b": [{ length: 4096, flags: 1 }],
        },
      }],
    },
    async (server) => {
      await withClient(
        server,
        { metaContexts: ["base:allocation", "qemu:dirty-bitmap:b"] },
        async (client) => {
          const map = await client.blockStatus(0, MiB);
          assert.deepEqual(map["base:allocation"], [
            { offset: 0, length: 128 * 1024, flags: 0 },
            {
              offset: 128 * 1024,
              length: MiB - 128 * 1024,
              flags: STATE_HOLE | STATE_ZERO,
            },
          ]);
          assert.deepEqual(map["qemu:dirty-bitmap:b"], [
            { offset: 0, length: 4096, flags: 1 },
            { offset: 4096, length: MiB - 4096, flags: 0 },
          ]);
          const one = await client.blockStatus(0, MiB, { reqOne: true });
          assert.equal(one["base:allocation"]?.length, 1);
        },
      );
    },
  );

  const statusViolations: {
    name: string;
    reply: (req: ReceivedRequest) => Uint8Array;
  }[] = [
    {
      name: "an unknown context id",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_BLOCK_STATUS,
          blockStatusPayload(99, [{ length: 512, flags: 0 }]),
        ),
    },
    {
      name: "an extent of length 0",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_BLOCK_STATUS,
          blockStatusPayload(1, [{ length: 0, flags: 0 }]),
        ),
    },
    {
      name: "two extents despite REQ_ONE",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_BLOCK_STATUS,
          blockStatusPayload(1, [
            { length: 512, flags: 0 },
            { length: 512, flags: 3 },
          ]),
        ),
    },
    {
      name: "a payload that is not whole descriptors",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_BLOCK_STATUS,
          blockStatusPayload(1, [{ length: 512, flags: 0 }]).subarray(0, 10),
        ),
    },
    {
      name: "no extents at all (NONE only)",
      reply: (req) =>
        structuredChunk(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE),
    },
    {
      name: "a simple reply",
      reply: (req) => simpleReply(req.cookie, 0),
    },
  ];

  for (const v of statusViolations) {
    await step(
      `blockStatus() fails with a protocol error on ${v.name}`,
      config({
        onCommand: (req) =>
          req.type === CMD_BLOCK_STATUS ? v.reply(req) : undefined,
      }),
      async (server) => {
        await withClient(
          server,
          { metaContexts: ["base:allocation"] },
          async (client) => {
            const e = await rejection(
              client.blockStatus(0, 4096, { reqOne: true }),
              "blockStatus()",
            );
            assertProtocol(e, "transmission");
          },
        );
      },
    );
  }

  // --- Extended headers -----------------------------------------------------

  await step(
    "extended headers: the client reads, writes and maps with 32-byte headers",
    config({ extendedHeaders: true }),
    async (server) => {
      await withClient(
        server,
        { metaContexts: ["base:allocation"] },
        async (client) => {
          assert.equal(client.extendedHeaders, true);
          assert.deepEqual(await client.read(0, 8192), DATA.slice(0, 8192));
          await client.write(8192, new Uint8Array(4096).fill(5));
          await client.flush();
          const map = await client.blockStatus(0, MiB);
          assert.equal(map["base:allocation"]?.[0]?.offset, 0);
        },
      );
      await server.settled();
      const log = server.log[0]!;
      assert.equal(log.extendedHeaders, true);
      assert.ok(log.requests.every((r) => r.extended));
    },
  );

  const extendedViolations: {
    name: string;
    reply: (req: ReceivedRequest) => Uint8Array | Uint8Array[];
    command?: number;
    message?: RegExp;
  }[] = [
    {
      name: "a simple reply",
      reply: (req) => simpleReply(req.cookie, 0, new Uint8Array(512)),
    },
    {
      name: "a compact structured chunk",
      reply: (req) =>
        structuredChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          offsetDataPayload(req.offset, new Uint8Array(512)),
        ),
    },
    {
      name: "an offset field that differs from the request's",
      reply: (req) =>
        extendedChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          req.offset + 512n,
          offsetDataPayload(req.offset, new Uint8Array(512)),
        ),
      message: /offset/,
    },
    {
      name: "a 2^63-byte payload length",
      reply: (req) =>
        extendedChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_OFFSET_DATA,
          req.offset,
          offsetDataPayload(req.offset, new Uint8Array(16)),
          1n << 63n,
        ),
    },
    {
      name: "a descriptor count that does not match",
      command: CMD_BLOCK_STATUS,
      reply: (req) =>
        extendedChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          6,
          req.offset,
          blockStatusExtPayload(1, [{ length: 512, flags: 0 }], 5),
        ),
    },
  ];

  for (const v of extendedViolations) {
    const command = v.command ?? CMD_READ;
    await step(
      `extended headers: ${v.name} is a protocol error`,
      config({
        extendedHeaders: true,
        onCommand: (req) => req.type === command ? v.reply(req) : undefined,
      }),
      async (server) => {
        await withClient(
          server,
          { metaContexts: ["base:allocation"] },
          async (client) => {
            assert.equal(client.extendedHeaders, true);
            const e = await rejection(
              command === CMD_READ
                ? client.read(512, 512)
                : client.blockStatus(512, 512),
              "request",
            );
            assertProtocol(e, "transmission", v.message);
          },
        );
      },
    );
  }

  await step(
    // The extension lets a server answer either way, even for a request
    // under 4 GiB; the client MUST accept both.
    "extended headers: compact block status chunks are accepted too",
    config({
      extendedHeaders: true,
      onCommand: (req) =>
        req.type === CMD_BLOCK_STATUS
          ? extendedChunk(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.offset,
            blockStatusPayload(1, [{ length: 512, flags: STATE_HOLE }]),
          )
          : undefined,
    }),
    async (server) => {
      await withClient(
        server,
        { metaContexts: ["base:allocation"] },
        async (client) => {
          assert.equal(client.extendedHeaders, true);
          const map = await client.blockStatus(512, 512);
          assert.deepEqual(map["base:allocation"], [
            { offset: 512, length: 512, flags: STATE_HOLE },
          ]);
        },
      );
    },
  );

  await step(
    "extended headers: an error is an extended error chunk",
    config({
      extendedHeaders: true,
      onCommand: onRead((req) =>
        extendedChunk(
          req.cookie,
          REPLY_FLAG_DONE,
          REPLY_TYPE_ERROR,
          req.offset,
          errorPayload(EIO, "extended failure"),
        )
      ),
    }),
    async (server) => {
      await withClient(server, {}, async (client) => {
        const e = await rejection(client.read(0, 512), "read()");
        assertCommand(e, EIO, "EIO");
        assert.equal(e.serverMessage, "extended failure");
        await client.write(0, new Uint8Array(512));
      });
    },
  );
}
