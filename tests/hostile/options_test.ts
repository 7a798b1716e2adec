/**
 * The option haggling: option replies that are malformed, cut or late,
 * the negotiation ladder's fallbacks when a server supports less, and
 * refusals that become an `NbdOptionError`.
 */

import assert from "node:assert/strict";
import {
  OPT_ABORT,
  OPT_EXPORT_NAME,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_LIST,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_SHUTDOWN,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
} from "../../lib/constants.ts";
import { NbdError, NbdOptionError } from "../../lib/errors.ts";
import { Builder, optionReply } from "../support/server.ts";
import {
  assertClosed,
  config,
  DATA,
  handshakeFails,
  hostileTest,
  MiB,
  onGo,
  open,
  optionsSent,
  rejection,
  WITH_ALLOCATION,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "connect() refuses a broken, cut or stalled option reply",
  async (step) => {
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
        onOption: onGo(optionReply(OPT_LIST, REP_ACK)),
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
        onOption: onGo(
          new Builder().u64(0x3e889045565a9n).u32(OPT_GO).u32(REP_INFO)
            .u32(0xffffffff).done(),
        ),
      }),
      (server) => handshakeFails(server, /4294967295/),
    );

    await step(
      "connect() fails when the server drops mid option reply",
      config({
        onOption: onGo([optionReply(OPT_GO, REP_ACK).subarray(0, 7), "drop"]),
      }),
      (server) => handshakeFails(server, /7 of 20 bytes/),
    );

    await step(
      "connect() fails with NbdConnectionClosedError when the server hangs up between replies",
      config({
        onOption: onGo("drop"),
      }),
      async (server) => {
        const e = await rejection(open(server), "connect()");
        assertClosed(e);
      },
    );

    await step(
      "connect() gives up on a stall after NBD_OPT_GO when its signal aborts",
      config({
        onOption: onGo("stall"),
      }),
      async (server) => {
        const e = await rejection(
          open(server, { signal: AbortSignal.timeout(500) }),
          "connect()",
        );
        assert.equal(e.name, "TimeoutError", e.message);
      },
    );
  },
);

hostileTest(
  "negotiate() falls back when the server supports less",
  async (step) => {
    await step(
      "connect() works without structured replies (NBD_REP_ERR_UNSUP)",
      config({ structuredReplies: false }),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (client) => {
          assert.equal(client.structuredReplies, false);
          assert.equal(client.canBlockStatus, false);
          assert.equal(client.canDf, false);
          assert.deepEqual(
            await client.read(512, 1024),
            DATA.slice(512, 1536),
          );
        });
        await server.settled();
        const sent = optionsSent(server);
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
        const sent = optionsSent(server);
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
        const sent = optionsSent(server);
        assert.ok(sent.includes(OPT_LIST));
        assert.ok(!sent.includes(OPT_EXPORT_NAME), "EXPORT_NAME not sent");
        assert.equal(sent.filter((o) => o === OPT_ABORT).length, 1);
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
      "connect() falls back from extended headers to structured replies",
      config(),
      async (server) => {
        await withClient(server, {}, (client) => {
          assert.equal(client.extendedHeaders, false);
          assert.equal(client.structuredReplies, true);
          return Promise.resolve();
        });
        await server.settled();
        const sent = optionsSent(server);
        assert.deepEqual(sent.slice(0, 2), [
          OPT_EXTENDED_HEADERS,
          OPT_STRUCTURED_REPLY,
        ]);
      },
    );
  },
);

hostileTest(
  "connect() turns an option refusal into an NbdOptionError",
  async (step) => {
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
        const sent = optionsSent(server);
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
      "connect() reports NBD_REP_ERR_TLS_REQD with the option and reply",
      config({
        optionReplies: {
          [OPT_GO]: { reply: REP_ERR_TLS_REQD, message: "TLS first" },
        },
      }),
      async (server) => {
        const e = await rejection(
          open(server, { tls: "disable" }),
          "connect()",
        );
        assert.ok(e instanceof NbdOptionError, `${e.name}: ${e.message}`);
        assert.equal(e.option, OPT_GO);
        assert.equal(e.reply, REP_ERR_TLS_REQD);
        assert.equal(e.replyName, "NBD_REP_ERR_TLS_REQD");
        assert.equal(e.serverMessage, "TLS first");
      },
    );

    await step(
      "connect() with TLS left unset answers NBD_REP_ERR_TLS_REQD with NBD_OPT_STARTTLS",
      config({
        optionReplies: {
          [OPT_GO]: { reply: REP_ERR_TLS_REQD, message: "TLS first" },
        },
      }),
      async (server) => {
        const e = await rejection(open(server), "connect()");
        // The scripted server has no TLS: its refusal of STARTTLS ends it.
        assert.ok(e instanceof NbdOptionError, `${e.name}: ${e.message}`);
        assert.equal(e.option, OPT_STARTTLS);
      },
    );
  },
);
