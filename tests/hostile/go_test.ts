/**
 * `NBD_OPT_GO`: the `NBD_REP_INFO` replies that describe the export, and
 * their bounds.
 */

import assert from "node:assert/strict";
import { connect } from "../../lib/connect.ts";
import {
  INFO_NAME,
  OPT_GO,
  REP_ACK,
  REP_INFO,
  REP_SERVER,
} from "../../lib/constants.ts";
import {
  infoBlockSizePayload,
  infoExportPayload,
  infoStringPayload,
  optionReply,
  repServerPayload,
} from "../support/server.ts";
import {
  assertProtocol,
  config,
  handshakeFails,
  hostileTest,
  MiB,
  onGo,
  rejection,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "connect() takes what NBD_OPT_GO describes",
  async (step) => {
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
      "connect() keeps an export size beyond 2^53 exact in sizeBigInt",
      config({
        onOption: onGo([
          optionReply(OPT_GO, REP_INFO, infoExportPayload(1n << 60n, 1)),
          optionReply(OPT_GO, REP_ACK),
          "transmission",
        ]),
      }),
      async (server) => {
        await withClient(server, {}, (client) => {
          assert.equal(client.sizeBigInt, 1n << 60n);
          assert.throws(() => client.size, RangeError);
          return Promise.resolve();
        });
      },
    );
  },
);

hostileTest(
  "connect() refuses a malformed or unbounded NBD_OPT_GO answer",
  async (step) => {
    await step(
      "connect() fails when NBD_OPT_GO succeeds without NBD_INFO_EXPORT",
      config({
        onOption: onGo([optionReply(OPT_GO, REP_ACK), "transmission"]),
      }),
      (server) => handshakeFails(server, /NBD_INFO_EXPORT/),
    );

    await step(
      "connect() fails on a short NBD_INFO_EXPORT",
      config({
        onOption: onGo([
          optionReply(
            OPT_GO,
            REP_INFO,
            infoExportPayload(MiB, 1).subarray(0, 10),
          ),
          optionReply(OPT_GO, REP_ACK),
        ]),
      }),
      (server) => handshakeFails(server),
    );

    await step(
      "connect() rejects an invalid NBD_INFO_BLOCK_SIZE",
      config({
        onOption: onGo([
          optionReply(
            OPT_GO,
            REP_INFO,
            infoBlockSizePayload(3, 4096, 65536),
          ),
          optionReply(OPT_GO, REP_INFO, infoExportPayload(MiB, 1)),
          optionReply(OPT_GO, REP_ACK),
          "transmission",
        ]),
      }),
      (server) => handshakeFails(server, /minimum/),
    );

    await step(
      "connect() rejects an unexpected reply type to NBD_OPT_GO",
      config({
        onOption: onGo(
          optionReply(OPT_GO, REP_SERVER, repServerPayload("disk")),
        ),
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
      "connect() bounds an NBD_INFO_NAME longer than 4096 bytes",
      config({
        onOption: onGo([
          optionReply(
            OPT_GO,
            REP_INFO,
            infoStringPayload(INFO_NAME, "n".repeat(5000)),
          ),
          optionReply(OPT_GO, REP_INFO, infoExportPayload(MiB, 1)),
          optionReply(OPT_GO, REP_ACK),
          "transmission",
        ]),
      }),
      (server) => handshakeFails(server, /4096/),
    );
  },
);
