/**
 * Transmission errors that keep the connection: a server errno, in a simple
 * reply or an error chunk, fails one request and nothing else.
 */

import assert from "node:assert/strict";
import {
  CMD_DISC,
  CMD_READ,
  CMD_WRITE,
  EIO,
  ENOSPC,
  EPERM,
  ESHUTDOWN,
  REPLY_FLAG_DONE,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
} from "../../lib/constants.ts";
import { NbdCommandError } from "../../lib/errors.ts";
import {
  errorOffsetPayload,
  errorPayload,
  offsetDataPayload,
  simpleReply,
  structuredChunk,
} from "../support/server.ts";
import { within } from "../support/wait.ts";
import {
  assertClosed,
  assertCommand,
  BOUND_MS,
  config,
  DATA,
  hostileTest,
  onRead,
  rejection,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "a server errno fails one request; the connection stays usable",
  async (step) => {
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
        await withClient(server, {}, async (client) => {
          const e = await rejection(client.read(0, 512), "read()");
          assertCommand(e, EIO, "EIO");
          assert.equal(e.serverMessage, "disk on fire");
          assert.match(e.message, /disk on fire/);
          assert.equal(client.failure, undefined);
        });
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
                offsetDataPayload(
                  req.offset,
                  DATA.slice(0, Number(req.length)),
                ),
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
  },
);

hostileTest(
  "ESHUTDOWN makes the client disconnect softly",
  async (step) => {
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
        await withClient(server, {}, async (client) => {
          const e = await rejection(client.read(0, 512), "read()");
          assertCommand(e, ESHUTDOWN, "ESHUTDOWN");
          const later = await rejection(client.read(0, 512), "read() after");
          assertClosed(later);
          await within(
            BOUND_MS,
            "server sees the disconnect",
            server.settled(),
          );
          assert.equal(server.log[0]?.requests.at(-1)?.type, CMD_DISC);
        });
      },
    );
  },
);
