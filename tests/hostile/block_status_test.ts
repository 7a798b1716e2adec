/**
 * `NBD_CMD_BLOCK_STATUS`: the server's extents, and every malformed
 * descriptor a protocol error.
 */

import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_NONE,
  STATE_HOLE,
  STATE_ZERO,
} from "../../lib/constants.ts";
import {
  blockStatusPayload,
  type ReceivedRequest,
  simpleReply,
  structuredChunk,
} from "../support/server.ts";
import {
  assertProtocol,
  config,
  DATA,
  hostileTest,
  MiB,
  rejection,
  WITH_ALLOCATION,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "blockStatus() returns the server's extents",
  async (step) => {
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
        await withClient(server, {
          metaContexts: ["base:allocation", "qemu:dirty-bitmap:b"],
        }, async (client) => {
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
        });
      },
    );
  },
);

hostileTest(
  "blockStatus() fails with a protocol error on malformed extents",
  async (step) => {
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
          await withClient(server, WITH_ALLOCATION, async (client) => {
            const e = await rejection(
              client.blockStatus(0, 4096, { reqOne: true }),
              "blockStatus()",
            );
            assertProtocol(e, "transmission");
          });
        },
      );
    }
  },
);
