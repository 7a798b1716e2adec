/**
 * Requests: what the client refuses before any traffic (read-only, flags not
 * advertised, beyond the block size), and requests whose caller gives up.
 */

import assert from "node:assert/strict";
import {
  CMD_DISC,
  CMD_FLUSH,
  CMD_READ,
  CMD_WRITE,
  FLAG_SEND_FLUSH,
  FLAG_SEND_TRIM,
  OPT_GO,
  REP_ACK,
  REP_INFO,
} from "../../lib/constants.ts";
import { NbdUnsupportedError } from "../../lib/errors.ts";
import { infoExportPayload, optionReply } from "../support/server.ts";
import { within } from "../support/wait.ts";
import {
  BOUND_MS,
  config,
  DATA,
  hostileTest,
  MiB,
  onGo,
  onRead,
  open,
  rejection,
  withClient,
} from "./_helpers.ts";

hostileTest(
  "the client sends only what the export allows",
  async (step) => {
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
          assert.ok(
            e instanceof NbdUnsupportedError,
            `${e.name}: ${e.message}`,
          );
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
        onOption: onGo([
          optionReply(
            OPT_GO,
            REP_INFO,
            infoExportPayload(MiB, FLAG_SEND_FLUSH | FLAG_SEND_TRIM),
          ),
          optionReply(OPT_GO, REP_ACK),
          "transmission",
        ]),
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
  },
);

hostileTest(
  "a request whose caller gives up leaves the connection sound",
  async (step) => {
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
          assert.deepEqual(
            await client.read(1024, 512),
            DATA.slice(1024, 1536),
          );
        });
      },
    );
  },
);
