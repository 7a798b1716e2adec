/**
 * Several connections per client against nbdkit: requests spread over them,
 * data stays right under a random mix, a flush waits for the writes before
 * it, and an export without `NBD_FLAG_CAN_MULTI_CONN` gets one connection.
 * nbdkit's log filter is the witness of what reached the server, and when.
 */

import assert from "node:assert/strict";
import { connect, NbdError } from "../../mod.ts";
import { seeded } from "../support/random.ts";
import { nbdkitOn, restartable } from "../support/restartable.ts";
import { until, within } from "../support/wait.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

function nbdkit(extra: string[], plugin: string[]) {
  return (socket: string, dir: string) =>
    nbdkitOn(socket, [
      "--filter=log",
      ...extra,
      ...plugin,
      `logfile=${dir}/requests.log`,
    ]);
}

/** The log filter's lines, as written so far. */
async function requests(dir: string): Promise<string[]> {
  const text = await Deno.readTextFile(`${dir}/requests.log`);
  return text.split("\n").filter((l) => l.includes("connection="));
}

Deno.test("connections: 4 connections to a multi-conn export", async (t) => {
  await using server = await restartable(
    "nbdkit",
    nbdkit(["--filter=delay"], ["memory", "16M", "wdelay=20ms"]),
  );
  await server.start();
  const events: Array<[string, Record<string, unknown>]> = [];
  await using nbd = await connect({ path: server.socket }, {
    connections: 4,
    debug: (event, fields) => events.push([event, fields]),
  });

  await t.step("the server sees four connections", async () => {
    assert.equal(nbd.connections, 4);
    const ids = new Set(
      (await requests(server.dir)).filter((l) => / Connect /.test(l))
        .map((l) => /connection=(\d+)/.exec(l)![1]),
    );
    assert.equal(ids.size, 4);
  });

  await t.step(
    "a flush is sent only after the writes in flight before it completed",
    async () => {
      const writes = Array.from(
        { length: 8 },
        (_, i) => nbd.write(i * 64 * KiB, new Uint8Array(64 * KiB).fill(i)),
      );
      const flushed = nbd.flush();
      await within(
        10_000,
        "writes and flush",
        Promise.all([...writes, flushed]),
      );
      const log = await requests(server.dir);
      const flushAt = log.findIndex((l) => / Flush id=/.test(l));
      assert.ok(flushAt >= 0, "the flush reached the server");
      const writeLines = log.filter((l) => / Write id=/.test(l));
      const used = new Set(
        writeLines.map((l) => /connection=(\d+)/.exec(l)![1]),
      );
      assert.ok(used.size >= 2, `writes went over ${used.size} connection(s)`);
      const returns = log
        .map((l, i) => [l, i] as const)
        .filter(([l]) => /\.\.\.Write id=\d+ return=0/.test(l));
      assert.equal(returns.length, 8);
      for (const [line, i] of returns) {
        assert.ok(i < flushAt, `flush sent before "${line}"`);
      }
    },
  );

  await t.step("4000 random reads and writes match a shadow copy", async () => {
    const size = nbd.size;
    // What the flush step left there is where the shadow starts.
    const shadow = await nbd.read(0, size);
    const workers = 16;
    const stripe = size / workers;
    const next = seeded(23);
    await within(
      60_000,
      "the random mix",
      Promise.all(
        Array.from({ length: workers }, async (_, w) => {
          for (let i = 0; i < 250; i++) {
            const length = 512 * (1 + (next() % 32));
            const offset = w * stripe +
              512 * (next() % ((stripe - length) / 512));
            if (next() % 2 === 0) {
              const data = new Uint8Array(length).fill((w + i) & 0xff);
              await nbd.write(offset, data);
              shadow.set(data, offset);
            } else {
              const got = await nbd.read(offset, length);
              assert.ok(
                got.every((b, k) => b === shadow[offset + k]),
                `read ${offset}+${length} differs from the shadow`,
              );
            }
          }
        }),
      ),
    );
    const all = await nbd.read(0, size);
    assert.ok(all.every((b, i) => b === shadow[i]), "full read-back");
    const reads = (await requests(server.dir)).filter((l) =>
      / Read id=/.test(l)
    );
    const spread = new Set(reads.map((l) => /connection=(\d+)/.exec(l)![1]));
    assert.equal(spread.size, 4, "reads went over every connection");
  });
});

Deno.test("connections: an export without multi-conn gets one connection, and says why", async () => {
  await using server = await restartable(
    "nbdkit",
    nbdkit(["--filter=multi-conn"], [
      "memory",
      "1M",
      "multi-conn-mode=disable",
    ]),
  );
  await server.start();
  const events: Array<[string, Record<string, unknown>]> = [];
  await using nbd = await connect({ path: server.socket }, {
    connections: 4,
    debug: (event, fields) => events.push([event, fields]),
  });
  assert.equal(nbd.connections, 1);
  const why = events.find(([e]) => e === "connections");
  assert.ok(why, "a debug event says how many connections and why");
  assert.match(String(why[1].reason), /NBD_FLAG_CAN_MULTI_CONN/);
  await nbd.write(0, new Uint8Array(4096).fill(1));
  assert.deepEqual(await nbd.read(0, 4096), new Uint8Array(4096).fill(1));
  const connects = (await requests(server.dir)).filter((l) =>
    / Connect /.test(l)
  );
  assert.equal(connects.length, 1);
});

Deno.test("connections: a reconnect applies per connection", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-multi-" });
  try {
    const path = `${dir}/disk.img`;
    await Deno.writeFile(path, new Uint8Array(4 * MiB));
    await using server = await restartable(
      "nbdkit",
      (
        socket,
      ) => nbdkitOn(socket, ["file", `file=${path}`]),
      dir,
    );
    await server.start();
    await using nbd = await connect({ path: server.socket }, {
      connections: 3,
      reconnect: { timeout: 10_000 },
    });
    assert.equal(nbd.connections, 3);
    await server.kill("SIGKILL");
    const held = Promise.all(Array.from(
      { length: 12 },
      (_, i) => nbd.write(i * 4096, new Uint8Array(4096).fill(i + 1)),
    ));
    held.catch(() => {}); // awaited below; a failure must not go unseen
    await server.start();
    await within(15_000, "the held writes", held);
    // Each connection comes back on its own, idle ones too.
    await until(
      "all three connections back",
      () => nbd.reconnects === 3,
      10_000,
    );
    assert.equal(nbd.connections, 3);
    for (let i = 0; i < 12; i++) {
      assert.deepEqual(
        await nbd.read(i * 4096, 4096),
        new Uint8Array(4096).fill(i + 1),
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

for (const signal of ["SIGKILL", "SIGTERM"] as const) {
  Deno.test(`connections: without reconnect, a server killed with ${signal} fails requests on every connection, never hangs`, async () => {
    await using server = await restartable(
      "nbdkit",
      (socket) => nbdkitOn(socket, ["memory", "1M"]),
    );
    await server.start();
    const nbd = await connect({ path: server.socket }, { connections: 3 });
    try {
      assert.equal(nbd.connections, 3);
      await nbd.read(0, 4096);
      // nbdkit on SIGTERM waits for its clients to hang up: do not wait.
      const killed = server.kill(signal);
      if (signal === "SIGKILL") await killed;
      else {
        // SIGTERM arrives when it arrives: a read sent before nbdkit acts
        // on it may still be served. Read until the first one fails.
        const started = Date.now();
        let served = 0;
        while (Date.now() - started < 5_000 && served < 10_000) {
          try {
            await within(5_000, "a read as nbdkit stops", nbd.read(0, 4096));
            served++;
          } catch (e) {
            assert.ok(e instanceof NbdError, String(e));
            assert.doesNotMatch(e.message, /\(hang\)/);
            break;
          }
        }
        assert.notEqual(nbd.state, "open", `${served} reads served`);
      }
      for (let i = 0; i < 4; i++) {
        await assert.rejects(
          within(5_000, `read ${i}`, nbd.read(0, 4096)),
          (e: unknown) => e instanceof NbdError && !/\(hang\)/.test(e.message),
        );
      }
      assert.notEqual(nbd.state, "open");
      await within(5_000, "close()", nbd.close());
      await within(5_000, "the server to exit", killed);
    } finally {
      await nbd.close();
    }
  });
}
