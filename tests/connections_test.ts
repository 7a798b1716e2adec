/**
 * lib/connections.ts on its own: requests spread over several
 * connections, a lost connection dialled again and its requests replayed,
 * a reconnect that reaches another export, one that gives up, and halt().
 * Links are real negotiated connections to the scripted server.
 */

import assert from "node:assert/strict";
import { CMD_READ, CMD_WRITE } from "../lib/constants.ts";
import { Connections, type Link, type Pool } from "../lib/connections.ts";
import { openTransport } from "../lib/dial.ts";
import { NbdExportChangedError } from "../lib/reconnect.ts";
import type { Command } from "../lib/transmission.ts";
import { startTestServer } from "./support/server.ts";
import { until, within } from "./support/wait.ts";

function read(offset: number, length = 512): Command {
  return {
    type: CMD_READ,
    flags: 0,
    offset,
    length,
    buffer: new Uint8Array(length),
  };
}

async function links(uri: string, n: number): Promise<Link[]> {
  return await Promise.all(
    Array.from({ length: n }, () => openTransport(uri)),
  );
}

function pool(first: Link[], over: Partial<Pool> = {}): Pool {
  return { links: first, maxInFlight: 8, trace: undefined, ...over };
}

Deno.test("Connections carries requests over its connections", async (t) => {
  await t.step("one connection: straight to its transmission", async () => {
    await using server = await startTestServer();
    const tx = new Connections(pool(await links(server.uri, 1)));
    try {
      assert.equal(tx.state, "open");
      assert.equal(tx.count, 1);
      await tx.submit(read(0));
      assert.equal(tx.stats.requests["NBD_CMD_READ"], 1);
    } finally {
      await tx.disconnect();
    }
    assert.equal(tx.ended, true);
  });

  await t.step("two connections share the requests", async () => {
    await using server = await startTestServer({ delay: 5 });
    const tx = new Connections(pool(await links(server.uri, 2)));
    try {
      await Promise.all(
        Array.from({ length: 16 }, (_, i) => tx.submit(read(i * 512))),
      );
      const reads = server.log.map((c) =>
        c.requests.filter((r) => r.type === CMD_READ).length
      );
      assert.deepEqual(reads.sort(), [8, 8]);
      assert.equal(tx.stats.requests["NBD_CMD_READ"], 16);
    } finally {
      await tx.disconnect();
    }
  });

  await t.step(
    "without reconnecting, a lost connection fails the requests",
    async () => {
      await using server = await startTestServer({
        onCommand: (_req, ctx) => {
          ctx.drop();
          return [];
        },
      });
      const tx = new Connections(pool(await links(server.uri, 1)));
      try {
        await assert.rejects(tx.submit(read(0)), /closed the connection/);
        assert.equal(tx.state, "failed");
        assert.ok(tx.failure);
      } finally {
        await tx.disconnect();
      }
    },
  );
});

Deno.test("Connections reconnects a lost connection", async (t) => {
  const policy = { timeout: 5_000, delay: 1, maxDelay: 10 };

  await t.step(
    "a request in flight is replayed on the new connection",
    async () => {
      let dropped = false;
      await using server = await startTestServer({
        onCommand: (req, ctx) => {
          if (req.type !== CMD_WRITE || dropped) return undefined;
          dropped = true;
          ctx.drop();
          return [];
        },
      });
      const tx = new Connections(
        pool(await links(server.uri, 1), {
          reconnect: policy,
          dial: (signal) => openTransport(server.uri, { signal }),
        }),
      );
      try {
        const data = new Uint8Array(512).fill(7);
        await within(
          5_000,
          "the replayed write",
          tx.submit({
            type: CMD_WRITE,
            flags: 0,
            offset: 0,
            length: 512,
            payload: data,
          }),
        );
        assert.equal(tx.reconnects, 1);
        assert.equal(tx.state, "open");
        assert.deepEqual(server.disk().read(0, 512), data);
      } finally {
        await tx.disconnect();
      }
    },
  );

  await t.step(
    "a server that comes back as another export fails it all",
    async () => {
      await using first = await startTestServer({
        exports: [{ name: "", size: 1 << 20 }],
      });
      await using other = await startTestServer({
        exports: [{ name: "", size: 2 << 20 }],
      });
      const tx = new Connections(
        pool(await links(first.uri, 1), {
          reconnect: policy,
          dial: (signal) => openTransport(other.uri, { signal }),
        }),
      );
      try {
        await first.close();
        await assert.rejects(
          within(5_000, "the held read", tx.submit(read(0))),
          (e) =>
            e instanceof NbdExportChangedError &&
            e.changes.includes("size 1048576 is now 2097152"),
        );
        assert.equal(tx.state, "failed");
      } finally {
        await tx.disconnect();
      }
    },
  );

  await t.step(
    "a dial that keeps failing gives up by the deadline",
    async () => {
      await using server = await startTestServer();
      let dials = 0;
      const tx = new Connections(
        pool(await links(server.uri, 1), {
          reconnect: { timeout: 200, delay: 1, maxDelay: 20 },
          dial: () => {
            dials++;
            return Promise.reject(new Error("refused"));
          },
        }),
      );
      try {
        await server.close();
        await until("reconnecting to give up", () => tx.state === "failed");
        assert.match(
          tx.failure?.message ?? "",
          /Could not reconnect to the server within 200 ms: refused/,
        );
        assert.ok(dials >= 2, `${dials} dials`);
        assert.equal(tx.count, 0);
      } finally {
        await tx.disconnect();
      }
    },
  );

  await t.step("halt() fails the requests held for a connection", async () => {
    await using server = await startTestServer();
    const gate = Promise.withResolvers<Link>();
    const tx = new Connections(
      pool(await links(server.uri, 1), {
        reconnect: policy,
        dial: () => gate.promise,
      }),
    );
    try {
      await server.close();
      await until("reconnecting", () => tx.state === "reconnecting");
      const held = tx.submit(read(0));
      tx.halt();
      await assert.rejects(
        held,
        /The client was closed while the request waited for a new connection/,
      );
    } finally {
      gate.reject(new Error("never"));
      await tx.disconnect();
    }
  });
});
