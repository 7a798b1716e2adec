/**
 * readInto() with a buffer its owner detaches (`ArrayBuffer.prototype
 * .transfer()`, `structuredClone` with `transfer`) while the server still
 * owes the data: the reply is drained into scratch, that read alone fails
 * (a TypeError when its caller still waits), and the connection goes on.
 * Through the public API against the scripted server, whose command hook
 * holds each reply until the test has detached the buffer.
 */

import assert from "node:assert/strict";
import { REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA } from "../lib/constants.ts";
import { connect, type NbdClient } from "../mod.ts";
import {
  Builder,
  type ExportConfig,
  type ReceivedRequest,
  simpleReply,
  startTestServer,
  structuredChunk,
  type TestServerConfig,
} from "./support/server.ts";
import { until, within } from "./support/wait.ts";

const KiB = 1024;
const SIZE = 1024 * KiB;
const DATA = Uint8Array.from({ length: SIZE }, (_, i) => (i * 13 + 7) & 255);
/** Half the export is data, half never written (holes with `readHoles`). */
const EXPORT: ExportConfig = {
  name: "",
  size: SIZE,
  data: DATA.slice(0, SIZE / 2),
};

/** Detaches `buffer`'s memory the two ways a caller can. */
const detachers: Array<[string, (b: Uint8Array<ArrayBuffer>) => void]> = [
  ["ArrayBuffer.prototype.transfer()", (b) => void b.buffer.transfer()],
  [
    "structuredClone() with transfer",
    (b) => void structuredClone(b.buffer, { transfer: [b.buffer] }),
  ],
];

/** A server that holds the reply to the first read until `open` resolves. */
function holdFirstRead(
  open: Promise<void>,
  config: TestServerConfig = {},
): TestServerConfig {
  let held = false;
  return {
    exports: [EXPORT],
    ...config,
    onCommand: async (req: ReceivedRequest) => {
      if (req.type !== 0 || held) return undefined;
      held = true;
      await open;
      return undefined;
    },
  };
}

/** The connection works on: a read elsewhere returns the right bytes. */
async function stillWorks(client: NbdClient): Promise<void> {
  assert.equal(client.state, "open");
  const got = await within(
    5000,
    "the next read",
    client.read(64 * KiB, 8 * KiB),
  );
  assert.deepEqual(got, DATA.subarray(64 * KiB, 72 * KiB));
  const into = new Uint8Array(4 * KiB);
  await client.readInto(into, 128 * KiB);
  assert.deepEqual(into, DATA.subarray(128 * KiB, 132 * KiB));
  assert.equal(client.failure, undefined);
}

function isDetachedError(e: unknown): boolean {
  assert.ok(e instanceof TypeError, `expected a TypeError, got ${e}`);
  assert.doesNotMatch(e.message, /Cannot perform/);
  assert.match(
    e.message,
    /^The buffer of NBD_CMD_READ \(offset \d+, length \d+\) was detached before its data arrived; the data was dropped$/,
  );
  return true;
}

const modes: Array<[string, TestServerConfig, number]> = [
  ["structured replies, one data chunk", {}, 0],
  ["structured replies, a hole", { readHoles: true }, SIZE / 2],
  ["structured replies, many chunks", { readChunkSize: 4 * KiB }, 0],
  ["simple replies", { structuredReplies: false }, 0],
];

Deno.test("readInto(): an aborted read whose buffer is then detached leaves the connection usable", async (t) => {
  for (const [mode, config, offset] of modes) {
    for (const [how, detach] of detachers) {
      await t.step(`${mode}, ${how}`, async () => {
        const open = Promise.withResolvers<void>();
        await using server = await startTestServer(
          holdFirstRead(open.promise, config),
        );
        await using client = await connect(server.uri);
        const buffer = new Uint8Array(64 * KiB);
        const ac = new AbortController();
        const read = client.readInto(buffer, offset, { signal: ac.signal });
        await until(
          "the server to receive the read",
          () => server.log[0]?.requests.some((r) => r.type === 0) ?? false,
        );
        ac.abort(new Error("gave up"));
        await assert.rejects(read, /gave up/);
        detach(buffer);
        assert.equal(buffer.length, 0, "the buffer is detached");
        open.resolve();
        await stillWorks(client);
      });
    }
  }
});

Deno.test("readInto(): a buffer detached while its read waits fails that read alone, with a TypeError", async (t) => {
  for (const [mode, config, offset] of modes) {
    await t.step(mode, async () => {
      const open = Promise.withResolvers<void>();
      await using server = await startTestServer(
        holdFirstRead(open.promise, config),
      );
      await using client = await connect(server.uri);
      const buffer = new Uint8Array(64 * KiB);
      const read = client.readInto(buffer, offset);
      read.catch(() => {});
      await until(
        "the server to receive the read",
        () => server.log[0]?.requests.some((r) => r.type === 0) ?? false,
      );
      detachers[0]![1](buffer);
      open.resolve();
      await assert.rejects(within(5000, "the read", read), isDetachedError);
      await stillWorks(client);
    });
  }
});

Deno.test("readInto(): a buffer detached while its data is arriving fails that read alone", async (t) => {
  // Sizes on both sides of the transport's direct-read threshold (16 KiB):
  // the rest lands through its buffer, or straight in the caller's memory.
  for (const length of [4 * KiB, 64 * KiB]) {
    for (const structured of [true, false]) {
      await t.step(
        `${length / KiB} KiB, ${
          structured ? "a data chunk" : "a simple reply"
        }`,
        async () => {
          const rest = Promise.withResolvers<void>();
          let first = true;
          await using server = await startTestServer({
            exports: [EXPORT],
            // Compact headers, so that the reply below is the one negotiated.
            extendedHeaders: false,
            structuredReplies: structured,
            onCommand: async (req, ctx) => {
              if (req.type !== 0 || !first) return undefined;
              first = false;
              const data = DATA.subarray(0, length);
              const reply = structured
                ? structuredChunk(
                  req.cookie,
                  REPLY_FLAG_DONE,
                  REPLY_TYPE_OFFSET_DATA,
                  new Builder().u64(0).bytes(data).done(),
                )
                : simpleReply(req.cookie, 0, data);
              // Everything but the last KiB of data, then the rest later.
              const cut = reply.length - KiB;
              await ctx.send(reply.subarray(0, cut));
              await rest.promise;
              return reply.slice(cut);
            },
          });
          await using client = await connect(server.uri);
          const buffer = new Uint8Array(length);
          const read = client.readInto(buffer, 0);
          read.catch(() => {});
          try {
            // All the data sent so far has landed: the read waits for the rest.
            const sent = length - KiB;
            await until("the first part of the data to land", () => {
              for (let i = 0; i < sent; i++) {
                if (buffer[i] !== DATA[i]) return false;
              }
              return true;
            });
            buffer.buffer.transfer();
          } finally {
            rest.resolve();
          }
          await assert.rejects(within(5000, "the read", read), isDetachedError);
          await stillWorks(client);
        },
      );
    }
  }
});
