/**
 * Reconnect and replay against real servers that are killed and started
 * again on the same socket: nbdkit's `file` plugin (so data survives a
 * restart) and qemu-nbd. Every check compares with a shadow copy kept by the
 * test, so a lost, doubled or misplaced write shows.
 */

import assert from "node:assert/strict";
import {
  connect,
  type NbdClient,
  NbdCommandError,
  NbdConnectionClosedError,
  NbdError,
  NbdExportChangedError,
} from "../../mod.ts";
import { makeTestPki } from "../support/certs.ts";
import { seeded } from "../support/random.ts";
import {
  nbdkitOn,
  type Restartable,
  restartable,
} from "../support/restartable.ts";
import { until, within } from "../support/wait.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
/** Workers each own a stripe, so their requests never overlap. */
const WORKERS = 16;
const STRIPE = SIZE / WORKERS;

async function image(dir: string, size: number, seed: number) {
  const next = seeded(seed);
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i += 4) {
    new DataView(data.buffer).setUint32(i, next());
  }
  const path = `${dir}/disk-${size}-${seed}.img`;
  await Deno.writeFile(path, data);
  return { path, data };
}

/**
 * Random writes and checked reads from every worker, `perWorker` each, while
 * `chaos` runs beside them.
 */
async function load(
  nbd: NbdClient,
  shadow: Uint8Array,
  perWorker: number,
  seed: number,
): Promise<number> {
  let done = 0;
  const next = seeded(seed);
  await Promise.all(
    Array.from({ length: WORKERS }, async (_, w) => {
      const base = w * STRIPE;
      for (let i = 0; i < perWorker; i++) {
        const length = 512 * (1 + (next() % 64));
        const offset = base + 512 * (next() % ((STRIPE - length) / 512));
        if (next() % 2 === 0) {
          const data = new Uint8Array(length).fill((w * 31 + i) & 0xff);
          await nbd.write(offset, data);
          shadow.set(data, offset);
        } else {
          const got = await nbd.read(offset, length);
          const want = shadow.subarray(offset, offset + length);
          assert.ok(
            got.every((b, k) => b === want[k]),
            `worker ${w} read ${offset}+${length} differs from the shadow`,
          );
        }
        done++;
      }
    }),
  );
  return done;
}

/** Reads the whole export back and compares it with `shadow`. */
async function matches(nbd: NbdClient, shadow: Uint8Array): Promise<void> {
  for (let at = 0; at < shadow.length; at += MiB) {
    const got = await nbd.read(at, MiB);
    const want = shadow.subarray(at, at + MiB);
    for (let i = 0; i < MiB; i++) {
      if (got[i] !== want[i]) {
        assert.fail(`byte ${at + i} is ${got[i]}, the shadow has ${want[i]}`);
      }
    }
  }
}

/** Kills and restarts the server `times` times while `busy` is running. */
async function chaos(
  server: Restartable,
  signal: Deno.Signal,
  times: number,
  busy: () => boolean,
): Promise<number> {
  let kills = 0;
  for (let i = 0; i < times; i++) {
    await new Promise((r) => setTimeout(r, 150));
    // Only a kill under load counts: the point is requests in flight.
    if (!busy()) break;
    await server.kill(signal);
    kills++;
    await new Promise((r) => setTimeout(r, 100 + 50 * i));
    await server.start();
  }
  return kills;
}

function nbdkitFile(path: string, extra: string[] = []) {
  return (socket: string) =>
    nbdkitOn(socket, [...extra, "file", `file=${path}`]);
}

for (const signal of ["SIGKILL", "SIGTERM"] as const) {
  Deno.test(`reconnect: nbdkit file killed with ${signal} under load: every request completes, the disk matches the shadow`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "nbd-reconnect-" });
    try {
      const { path, data } = await image(dir, SIZE, 7);
      const shadow = data.slice();
      await using server = await restartable(
        "nbdkit",
        nbdkitFile(path),
        dir,
      );
      await server.start();
      const events: string[] = [];
      const nbd = await connect({ path: server.socket }, {
        reconnect: { timeout: 10_000 },
        debug: (event) => events.push(event),
      });
      try {
        let busy = true;
        const work = load(nbd, shadow, 200, 11).finally(() => busy = false);
        const kills = await chaos(server, signal, 4, () => busy);
        const done = await within(60_000, "the load", work);
        assert.equal(done, WORKERS * 200);
        assert.ok(kills >= 1, "the server was killed at least once");
        // A kill while the client is still dialling the last restart is
        // absorbed by that same reconnect, so there may be fewer.
        assert.ok(
          nbd.reconnects >= 1 && nbd.reconnects <= kills,
          `${nbd.reconnects} reconnects for ${kills} kills`,
        );
        assert.ok(events.includes("reconnected"));
        assert.equal(nbd.state, "open");
        await matches(nbd, shadow);
      } finally {
        await nbd.close();
      }
      // What the server wrote is what the shadow says.
      assert.deepEqual(await Deno.readFile(path), shadow);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

Deno.test("reconnect: rules for what is and is not retried", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-reconnect-" });
  try {
    const { path, data } = await image(dir, 1 * MiB, 3);
    await using server = await restartable("nbdkit", nbdkitFile(path), dir);
    await server.start();

    await t.step(
      "a server that never comes back: typed failure within the timeout",
      async () => {
        const nbd = await connect({ path: server.socket }, {
          reconnect: { timeout: 1_500 },
        });
        try {
          await server.kill("SIGKILL");
          const started = Date.now();
          const err = await nbd.read(0, 4096).then(
            () => assert.fail("the read succeeded with no server"),
            (e: unknown) => e,
          );
          const took = Date.now() - started;
          assert.ok(err instanceof NbdConnectionClosedError, String(err));
          assert.match(err.message, /within 1500 ms/);
          assert.ok(err.cause instanceof Error, "the last dial error is kept");
          assert.ok(took < 1_500 + 2_000, `failed after ${took} ms`);
          assert.equal(nbd.state, "failed");
          await assert.rejects(nbd.read(0, 512), NbdConnectionClosedError);
        } finally {
          await nbd.close();
        }
        await server.start();
      },
    );

    await t.step(
      "a server back with another size: typed failure, nothing written",
      async () => {
        const nbd = await connect({ path: server.socket }, {
          reconnect: { timeout: 5_000 },
        });
        const other = await image(dir, 2 * MiB, 5);
        try {
          await server.kill("SIGKILL");
          const write = nbd.write(0, new Uint8Array(4096).fill(0xee));
          await server.start(nbdkitFile(other.path)(server.socket));
          const err = await within(10_000, "the held write", write).then(
            () => assert.fail("the write went to another disk"),
            (e: unknown) => e,
          );
          assert.ok(err instanceof NbdExportChangedError, String(err));
          assert.match(err.message, /size 1048576 is now 2097152/);
          assert.deepEqual(err.changes, ["size 1048576 is now 2097152"]);
          assert.equal(nbd.state, "failed");
        } finally {
          await nbd.close();
        }
        assert.deepEqual(await Deno.readFile(other.path), other.data);
        await server.kill("SIGTERM");
        await server.start();
      },
    );

    await t.step(
      "close() while reconnecting fails held requests at once",
      async () => {
        const nbd = await connect({ path: server.socket }, {
          reconnect: { timeout: 30_000 },
        });
        await server.kill("SIGKILL");
        const held = nbd.read(0, 4096).then(() => "read", (e: unknown) => e);
        await until("the client to notice", () => nbd.state === "reconnecting");
        const started = Date.now();
        await within(2_000, "close()", nbd.close());
        const err = await within(2_000, "the held read", held);
        assert.ok(err instanceof NbdConnectionClosedError, String(err));
        assert.ok(Date.now() - started < 2_000);
        assert.equal(nbd.state, "closed");
        await server.start();
      },
    );

    await t.step(
      "an aborted request fails alone while the rest wait",
      async () => {
        const nbd = await connect({ path: server.socket }, {
          reconnect: { timeout: 10_000 },
        });
        try {
          await server.kill("SIGKILL");
          const kept = nbd.read(0, 4096);
          const aborted = nbd.read(4096, 4096, {
            signal: AbortSignal.timeout(100),
          });
          await assert.rejects(
            within(2_000, "the aborted read", aborted),
            (e: unknown) => e instanceof DOMException,
          );
          await server.start();
          const got = await within(10_000, "the kept read", kept);
          assert.deepEqual(got, data.subarray(0, 4096));
          assert.equal(nbd.reconnects, 1);
        } finally {
          await nbd.close();
        }
      },
    );

    await t.step("a server errno is not retried", async () => {
      await server.kill("SIGTERM");
      await server.start(nbdkitOn(server.socket, [
        "--filter=error",
        "file",
        `file=${path}`,
        "error=EIO",
        "error-pread-rate=1",
      ]));
      const nbd = await connect({ path: server.socket }, {
        reconnect: true,
      });
      try {
        await assert.rejects(
          nbd.read(0, 512),
          (e: unknown) => e instanceof NbdCommandError && e.errnoName === "EIO",
        );
        assert.equal(nbd.reconnects, 0);
        assert.equal(nbd.state, "open");
      } finally {
        await nbd.close();
      }
      await server.kill("SIGTERM");
      await server.start();
    });

    await t.step(
      "openTimeout: the first connect waits for a server that comes up late",
      async () => {
        await server.kill("SIGTERM");
        await assert.rejects(connect({ path: server.socket }), NbdError);
        let started: Promise<void> | undefined;
        const late = setTimeout(() => started = server.start(), 500);
        try {
          const nbd = await connect({ path: server.socket }, {
            openTimeout: 10_000,
          });
          assert.equal(nbd.size, 1 * MiB);
          await nbd.close();
        } finally {
          clearTimeout(late);
          await started;
        }
      },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("reconnect: a TLS export reconnects with verification on", async () => {
  await using pki = await makeTestPki();
  const dir = await Deno.makeTempDir({ prefix: "nbd-reconnect-" });
  try {
    const { path, data } = await image(dir, 1 * MiB, 9);
    await using server = await restartable(
      "nbdkit",
      nbdkitFile(path, [
        "--tls=require",
        `--tls-certificates=${pki.serverDir}`,
      ]),
      dir,
    );
    await server.start();
    const nbd = await connect({ path: server.socket }, {
      tls: "require",
      tlsCertificates: pki.clientDir,
      tlsHostname: "localhost",
      reconnect: { timeout: 10_000 },
    });
    try {
      assert.equal(nbd.tls, true);
      await server.kill("SIGKILL");
      const held = nbd.write(0, new Uint8Array(4096).fill(0x5a));
      await server.start();
      await within(10_000, "the held write", held);
      assert.equal(nbd.reconnects, 1);
      const back = await nbd.read(0, 8192);
      assert.ok(back.subarray(0, 4096).every((b) => b === 0x5a));
      assert.deepEqual(back.subarray(4096), data.subarray(4096, 8192));
    } finally {
      await nbd.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("reconnect: qemu-nbd restarted under load", async () => {
  const dir = await Deno.makeTempDir({ prefix: "nbd-reconnect-" });
  try {
    const { path, data } = await image(dir, SIZE, 13);
    const shadow = data.slice();
    await using server = await restartable(
      "qemu-nbd",
      (socket) => [
        "-k",
        socket,
        "-f",
        "raw",
        "--persistent",
        "--shared=8",
        path,
      ],
      dir,
    );
    await server.start();
    const nbd = await connect({ path: server.socket }, {
      reconnect: { timeout: 10_000 },
    });
    try {
      let busy = true;
      const work = load(nbd, shadow, 300, 17).finally(() => busy = false);
      const kills = await chaos(server, "SIGKILL", 2, () => busy);
      await within(60_000, "the load", work);
      assert.ok(kills >= 1, "the server was killed under load");
      assert.ok(nbd.reconnects >= 1, `${nbd.reconnects} reconnects`);
      await matches(nbd, shadow);
    } finally {
      await nbd.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
