/**
 * Replies: chunks reassembled in any order, and every malformed, duplicate
 * or cut reply a protocol violation that fails the whole connection.
 */

import assert from "node:assert/strict";
import {
  CMD_READ,
  CMD_WRITE,
  EIO,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
} from "../../lib/constants.ts";
import {
  blockStatusPayload,
  Builder,
  errorOffsetPayload,
  offsetDataPayload,
  offsetHolePayload,
  type ReceivedRequest,
  simpleReply,
  structuredChunk,
} from "../support/server.ts";
import { within } from "../support/wait.ts";
import {
  assertClosed,
  assertProtocol,
  BOUND_MS,
  config,
  DATA,
  failureOf,
  hostileTest,
  MiB,
  NO_DATA,
  onRead,
  readBreaks,
  rejection,
  rootCause,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "read() reassembles split, reversed, interleaved chunks and holes",
  async (step) => {
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
  },
);

hostileTest(
  "a protocol violation fails every pending request with the same error",
  async (step) => {
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
        await withClient(server, {}, async (client) => {
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
          assertClosed(after);
          assert.equal(rootCause(after), reasons[0]);
        });
      },
    );
  },
);

hostileTest(
  "a malformed reply is a transmission NbdProtocolError",
  async (step) => {
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
          await withClient(server, {}, async (client) => {
            const e = await rejection(client.read(1024, 1024), "read()");
            assertProtocol(e, "transmission", v.message);
            assert.equal(client.failure, e);
          });
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
  },
);

hostileTest(
  "a duplicate or cut reply breaks the connection",
  async (step) => {
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
        await withClient(server, {}, async (client) => {
          assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
          const failure = await failureOf(client);
          assertProtocol(failure, "transmission", /cookie/);
          const later = await rejection(client.read(0, 512), "read() after");
          assertClosed(later);
          assert.equal(rootCause(later), failure);
        });
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
        await withClient(server, {}, async (client) => {
          assert.deepEqual(await client.read(0, 512), DATA.slice(0, 512));
          assertProtocol(await failureOf(client), "transmission", /cookie/);
        });
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
          assertClosed(e);
        });
      },
    );
  },
);
