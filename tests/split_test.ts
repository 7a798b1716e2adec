/**
 * Many requests on one signal, and requests split into many pieces: the
 * costs must grow with the requests, not with their square. Counted, not
 * timed: listeners added to the caller's signal, and pieces made at once.
 */

import assert from "node:assert/strict";
import { connect } from "../mod.ts";
import { CMD_TRIM } from "../lib/constants.ts";
import { simpleReply, startTestServer } from "./support/server.ts";
import { until, within } from "./support/wait.ts";

/** A signal whose `addEventListener` calls are counted. */
function countedSignal(): { ac: AbortController; adds: () => number } {
  const ac = new AbortController();
  let adds = 0;
  const add = ac.signal.addEventListener.bind(ac.signal);
  ac.signal.addEventListener = ((...args: Parameters<typeof add>) => {
    adds++;
    return add(...args);
  }) as typeof add;
  return { ac, adds: () => adds };
}

/** A Uint8Array whose `subarray` calls (one per piece made) are counted. */
function countedBuffer(length: number): {
  buffer: Uint8Array;
  made: () => number;
} {
  const buffer = new Uint8Array(length);
  let made = 0;
  const subarray = buffer.subarray.bind(buffer);
  buffer.subarray = ((begin?: number, end?: number) => {
    made++;
    return subarray(begin, end);
  }) as typeof subarray;
  return { buffer, made: () => made };
}

Deno.test("NbdClient requests share one listener per signal", async (t) => {
  await t.step(
    "40,000 concurrent reads with one signal add one listener",
    async () => {
      await using server = await startTestServer({
        exports: [{ name: "disk", size: 1 << 20 }],
      });
      await using nbd = await connect(server.uri);
      const { ac, adds } = countedSignal();
      const reads: Promise<Uint8Array>[] = [];
      for (let i = 0; i < 40_000; i++) {
        reads.push(nbd.read((i % 2048) * 512, 512, { signal: ac.signal }));
      }
      await within(60_000, "40,000 reads", Promise.all(reads));
      assert.equal(adds(), 1);
    },
  );

  await t.step(
    "aborting 20,000 queued reads rejects each with the reason",
    async () => {
      await using server = await startTestServer({
        exports: [{ name: "disk", size: 1 << 20 }],
        delay: 20,
      });
      await using nbd = await connect(server.uri);
      const { ac, adds } = countedSignal();
      const reads: Promise<unknown>[] = [];
      for (let i = 0; i < 20_000; i++) {
        reads.push(
          nbd.read(0, 512, { signal: ac.signal }).then(
            () => "read",
            (e: Error) => e.message,
          ),
        );
      }
      ac.abort(new Error("gave up"));
      const results = await within(10_000, "aborted reads", Promise.all(reads));
      assert.ok(results.every((r) => r === "gave up"));
      assert.equal(adds(), 1);
    },
  );
});

Deno.test("NbdClient leaves no listener behind", async (t) => {
  await t.step(
    "a queued request refused by close() removes its listener",
    async () => {
      await using server = await startTestServer({
        exports: [{ name: "disk", size: 1 << 20 }],
        delay: 50,
      });
      const nbd = await connect(server.uri, { maxInFlight: 1 });
      const ac = new AbortController();
      let listeners = 0;
      const add = ac.signal.addEventListener.bind(ac.signal);
      const remove = ac.signal.removeEventListener.bind(ac.signal);
      ac.signal.addEventListener = ((...a: Parameters<typeof add>) => {
        listeners++;
        return add(...a);
      }) as typeof add;
      ac.signal.removeEventListener = ((...a: Parameters<typeof remove>) => {
        listeners--;
        return remove(...a);
      }) as typeof remove;
      const first = nbd.read(0, 512);
      const queued = nbd.read(512, 512, { signal: ac.signal });
      const closed = nbd.close();
      await first;
      await assert.rejects(queued, /the connection is closing/);
      await closed;
      assert.equal(listeners, 0);
    },
  );
});

Deno.test("NbdClient split requests make their pieces as slots free", async (t) => {
  await t.step(
    "readInto() over 256 pieces holds at most maxInFlight",
    async () => {
      const release = Promise.withResolvers<void>();
      let received = 0;
      await using server = await startTestServer({
        exports: [{
          name: "disk",
          size: 1 << 20,
          blockSize: { minimum: 1, preferred: 4096, maximum: 4096 },
        }],
        onCommand: async (_req, ctx) => {
          received++;
          await release.promise;
          return await ctx.defaultReply();
        },
      });
      await using nbd = await connect(server.uri, { maxInFlight: 8 });
      const { buffer, made } = countedBuffer(1 << 20);
      const read = nbd.readInto(buffer, 0);
      try {
        await until("the first piece", () => received >= 1);
        // Give eager code the chance to make every piece now.
        await new Promise((r) => setTimeout(r, 50));
        assert.ok(made() <= 8, `${made()} pieces made, 8 may be in flight`);
      } finally {
        release.resolve();
        await within(10_000, "the split read", read);
      }
      assert.equal(made(), 256);
    },
  );

  await t.step(
    "trim(0, 2 ** 50) without extended headers aborts promptly",
    async () => {
      let trims = 0;
      await using server = await startTestServer({
        extendedHeaders: false,
        exports: [{ name: "disk", size: 2 ** 50 }],
        onCommand: (req) => {
          if (req.type !== CMD_TRIM) return undefined;
          trims++;
          return simpleReply(req.cookie);
        },
      });
      await using nbd = await connect(server.uri);
      assert.equal(nbd.extendedHeaders, false);
      const { ac, adds } = countedSignal();
      const trim = nbd.trim(0, 2 ** 50, { signal: ac.signal });
      await until("100 trims", () => trims >= 100);
      ac.abort(new Error("enough"));
      await assert.rejects(within(2_000, "the aborted trim", trim), /enough/);
      assert.equal(adds(), 1);
      // 2^50 bytes in 4 GiB pieces would be 262,144 requests.
      assert.ok(trims < 10_000, `${trims} trims sent`);
    },
  );
});
