/**
 * The three pieces of reaching a server, each on its own against the
 * scripted server: dialling (lib/dial.ts), probing in the option phase
 * (lib/probe.ts) and connecting a client (lib/connect.ts).
 */

import assert from "node:assert/strict";
import { FLAG_SEND_FLUSH, OPT_ABORT, OPT_GO } from "../lib/constants.ts";
import { connect } from "../lib/connect.ts";
import { openTransport } from "../lib/dial.ts";
import { NbdError } from "../lib/errors.ts";
import { listExports, probe, probeExports } from "../lib/probe.ts";
import { startTestServer } from "./support/server.ts";

Deno.test("openTransport() dials and negotiates", async (t) => {
  await t.step("it returns the transport and what was negotiated", async () => {
    await using server = await startTestServer({
      exports: [{ name: "disk", size: 1 << 20 }],
    });
    const { transport, info } = await openTransport(server.uriFor("disk"));
    try {
      assert.equal(info.size, 1n << 20n);
      assert.equal(info.exportName, "disk");
      assert.equal(server.log[0]!.exportName, "disk");
    } finally {
      transport.close();
    }
  });

  await t.step(
    "connectTimeout bounds a server that never answers",
    async () => {
      await using server = await startTestServer({ stallHandshake: true });
      await assert.rejects(
        openTransport(server.uri, { connectTimeout: 100 }),
        (e) =>
          e instanceof NbdError && /took longer than 100 ms/.test(e.message),
      );
    },
  );

  await t.step("the caller's signal ends it with its reason", async () => {
    await using server = await startTestServer({ stallHandshake: true });
    await assert.rejects(
      openTransport(server.uri, {
        signal: AbortSignal.timeout(50),
        connectTimeout: 0,
      }),
      (e) => e instanceof DOMException && e.name === "TimeoutError",
    );
  });

  await t.step("a socket with no server is a typed error", async () => {
    const dir = await Deno.makeTempDir();
    try {
      await assert.rejects(
        openTransport(`nbd+unix:///?socket=${dir}/none.sock`),
        (e) => e instanceof NbdError && /Cannot connect to/.test(e.message),
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
});

Deno.test("probing asks in the option phase and leaves", async (t) => {
  await t.step(
    "probe() reports one export and sends NBD_OPT_ABORT",
    async () => {
      await using server = await startTestServer({
        exports: [{ name: "disk", size: 4096, description: "a disk" }],
      });
      const facts = await probe(server.uriFor("disk"));
      assert.equal(facts.exportName, "disk");
      assert.equal(facts.size, 4096);
      assert.equal(facts.description, "a disk");
      await server.settled();
      const options = server.log[0]!.options.map((o) => o.option);
      assert.equal(options.at(-1), OPT_ABORT);
      assert.ok(!options.includes(OPT_GO), "no export was entered");
      assert.equal(server.log[0]!.requests.length, 0);
    },
  );

  await t.step("listExports() names every export", async () => {
    await using server = await startTestServer({
      exports: [
        { name: "a", size: 512, description: "first" },
        { name: "b", size: 1024 },
      ],
    });
    const listed = await listExports(server.uri);
    assert.deepEqual(
      listed.map((e) => [e.name, e.description]),
      [["a", "first"], ["b", ""]],
    );
  });

  await t.step("probeExports() probes each listed export", async () => {
    await using server = await startTestServer({
      exports: [{ name: "a", size: 512 }, { name: "b", size: 1024 }],
    });
    const listed = await probeExports(server.uri);
    assert.deepEqual(
      listed.map((e) => [e.name, e.probe?.size]),
      [["a", 512], ["b", 1024]],
    );
  });
});

Deno.test("connect() makes a client over one or more connections", async (t) => {
  await t.step("connections: 3 with NBD_FLAG_CAN_MULTI_CONN", async () => {
    await using server = await startTestServer();
    await using nbd = await connect(server.uri, { connections: 3 });
    assert.equal(nbd.connections, 3);
    assert.equal(server.log.length, 3);
  });

  await t.step(
    "connections: 3 without it stays at one, and says why",
    async () => {
      await using server = await startTestServer({
        exports: [{ name: "", size: 1 << 20, flags: FLAG_SEND_FLUSH }],
      });
      const events: [string, Record<string, unknown>][] = [];
      await using nbd = await connect(server.uri, {
        connections: 3,
        debug: (event, fields) => events.push([event, fields]),
      });
      assert.equal(nbd.connections, 1);
      const said = events.find(([e]) => e === "connections");
      assert.match(String(said?.[1].reason), /does not advertise/);
    },
  );

  await t.step(
    "openTimeout tries again until the server is there",
    async () => {
      const dir = await Deno.makeTempDir();
      const path = `${dir}/late.sock`;
      const events: string[] = [];
      try {
        const late = new Promise<void>((r) => setTimeout(r, 150));
        const client = connect(`nbd+unix:///?socket=${path}`, {
          openTimeout: 5_000,
          debug: (event) => events.push(event),
        });
        await late;
        await using server = await startTestServer({ listen: "unix" });
        // The scripted server listens on its own path: link it where the
        // client looks.
        await Deno.symlink(server.path!, path);
        await using nbd = await client;
        assert.equal(nbd.state, "open");
        assert.ok(events.includes("connect attempt failed"));
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  );

  await t.step(
    "without openTimeout a missing server fails at once",
    async () => {
      const dir = await Deno.makeTempDir();
      try {
        await assert.rejects(
          connect(`nbd+unix:///?socket=${dir}/none.sock`),
          /Cannot connect to/,
        );
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    },
  );
});
