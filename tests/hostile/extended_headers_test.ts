/**
 * Extended headers: 32-byte requests and replies, the compact chunks a
 * server may still send, and every mismatch a protocol error.
 */

import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  CMD_READ,
  EIO,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_OFFSET_DATA,
  STATE_HOLE,
} from "../../lib/constants.ts";
import {
  blockStatusExtPayload,
  blockStatusPayload,
  errorPayload,
  extendedChunk,
  offsetDataPayload,
  type ReceivedRequest,
  simpleReply,
  structuredChunk,
} from "../support/server.ts";
import {
  assertCommand,
  assertProtocol,
  config,
  DATA,
  hostileTest,
  MiB,
  onRead,
  rejection,
  WITH_ALLOCATION,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "extended headers: the client reads, writes and maps",
  async (step) => {
    await step(
      "extended headers: the client reads, writes and maps with 32-byte headers",
      config({ extendedHeaders: true }),
      async (server) => {
        await withClient(server, WITH_ALLOCATION, async (client) => {
          assert.equal(client.extendedHeaders, true);
          assert.deepEqual(await client.read(0, 8192), DATA.slice(0, 8192));
          await client.write(8192, new Uint8Array(4096).fill(5));
          await client.flush();
          const map = await client.blockStatus(0, MiB);
          assert.equal(map["base:allocation"]?.[0]?.offset, 0);
        });
        await server.settled();
        const log = server.log[0]!;
        assert.equal(log.extendedHeaders, true);
        assert.ok(log.requests.every((r) => r.extended));
      },
    );

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
        await withClient(server, WITH_ALLOCATION, async (client) => {
          assert.equal(client.extendedHeaders, true);
          const map = await client.blockStatus(512, 512);
          assert.deepEqual(map["base:allocation"], [
            { offset: 512, length: 512, flags: STATE_HOLE },
          ]);
        });
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
  },
);

hostileTest(
  "extended headers: a reply that does not match is a protocol error",
  async (step) => {
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
          await withClient(server, WITH_ALLOCATION, async (client) => {
            assert.equal(client.extendedHeaders, true);
            const e = await rejection(
              command === CMD_READ
                ? client.read(512, 512)
                : client.blockStatus(512, 512),
              "request",
            );
            assertProtocol(e, "transmission", v.message);
          });
        },
      );
    }
  },
);
