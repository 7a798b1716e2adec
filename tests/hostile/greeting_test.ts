/**
 * The greeting and the handshake styles: every way the first bytes can be
 * wrong, cut or late, and every style a server may speak (oldstyle,
 * newstyle, fixed newstyle with or without NO_ZEROES).
 */

import assert from "node:assert/strict";
import { connect } from "../../lib/connect.ts";
import {
  CMD_DISC,
  FLAG_SEND_FLUSH,
  IHAVEOPT,
  NBDMAGIC,
  OPT_EXPORT_NAME,
  OPT_GO,
  REP_ERR_UNSUP,
} from "../../lib/constants.ts";
import {
  Builder,
  exportNameReply,
  newstyleGreeting,
  oldstyleGreeting,
} from "../support/server.ts";
import { within } from "../support/wait.ts";
import {
  assertClosed,
  assertProtocol,
  BOUND_MS,
  closeClient,
  config,
  DATA,
  handshakeFails,
  hostileTest,
  MiB,
  open,
  rejection,
  rootCause,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "connect() refuses a broken, cut or stalled greeting",
  async (step) => {
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
        assertClosed(e);
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
  },
);

hostileTest(
  "connect() speaks oldstyle, newstyle and fixed newstyle",
  async (step) => {
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
  },
);

hostileTest(
  "connect() reaches the server by its URIs",
  async (step) => {
    await step(
      "connect() takes the server's nbd+unix:// and nbd:// URIs",
      config({ listen: "both" }),
      async (server) => {
        for (
          const uri of [server.uriFor("disk"), server.uriFor("disk", "tcp")]
        ) {
          const client = await within(
            BOUND_MS,
            `connect(${uri})`,
            connect(uri),
          );
          try {
            assert.equal(client.exportName, "disk");
            assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
          } finally {
            await closeClient(client);
          }
        }
      },
    );
  },
);
