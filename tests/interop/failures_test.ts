/**
 * How the client fails against real servers that fail: nbdkit's error
 * filter (an errno for one request; the connection carries on), a server
 * killed with requests in flight (every one of them fails, nothing hangs),
 * and nbdkit shutting down (ESHUTDOWN, then a soft disconnect).
 */

import assert from "node:assert/strict";
import {
  connect,
  type NbdClient,
  NbdCommandError,
  NbdConnectionClosedError,
  NbdProtocolError,
} from "../../mod.ts";
import { assertBytes, fill, Trace } from "./_support.ts";
import {
  nbdkit,
  type Peers,
  type Server,
  tempDir,
} from "../support/servers.ts";
import { until, within } from "../support/wait.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Asserts `e` is the server's errno for one command. */
function assertErrno(
  e: unknown,
  command: string,
  errno: number,
  name: string,
): true {
  assert.ok(e instanceof NbdCommandError, `got ${e}`);
  assert.equal(e.command, command);
  assert.equal(e.errno, errno);
  assert.equal(e.errnoName, name);
  assert.match(e.message, new RegExp(`failed with ${errno} \\(${name}\\)`));
  return true;
}

/**
 * Waits until the requests already sent are inside the server: nbdkit
 * takes requests off the socket in order, so once an undelayed write sent
 * after them has its reply, the server has taken them all.
 */
async function behind(client: NbdClient): Promise<void> {
  await within(
    5_000,
    "a write behind the delayed reads",
    client.write(8 * MiB, new Uint8Array(4096)),
  );
}

/**
 * nbdkit serving 16 MiB whose reads sleep for a minute. The delay filter
 * sleeps interruptibly: SIGTERM ends the sleep and the request fails with
 * ESHUTDOWN instead of being served.
 *
 * @param options nbdkit options before the filter, e.g. `--threads=64`.
 */
function stallingNbdkit(
  peers: Peers,
  ...options: string[]
): Promise<Server> {
  return nbdkit([
    ...options,
    "--filter=delay",
    "memory",
    String(16 * MiB),
    "delay-read=60",
  ], { peers });
}

/**
 * Sends `count` 4 KiB reads and returns once all of them are inside the
 * server. Each is observed, so a rejection before the test awaits it is
 * not "unhandled".
 */
async function readsInFlight(
  client: NbdClient,
  count: number,
): Promise<Promise<Uint8Array>[]> {
  const pending: Promise<Uint8Array>[] = [];
  for (let i = 0; i < count; i++) pending.push(client.read(i * 4096, 4096));
  for (const p of pending) p.catch(() => {});
  await behind(client);
  return pending;
}

/** nbdkit 1.32 from the host, 1.42 from the Debian 13 root. */
const NBDKIT: Array<[Peers, string]> = [
  ["host", ""],
  ["trixie", " (nbdkit 1.42)"],
];

/**
 * Runs `body` while `file` exists: the error filter fails requests only
 * then.
 */
async function whileFailing<T>(
  file: string,
  body: () => Promise<T>,
): Promise<T> {
  await Deno.writeTextFile(file, "");
  try {
    return await body();
  } finally {
    await Deno.remove(file);
  }
}

for (const [peers, suffix] of NBDKIT) {
  for (const structured of [true, false]) {
    const replies = structured ? "structured replies" : "simple replies";
    Deno.test({
      name:
        `failures${suffix}: a server errno fails one request (nbdkit error filter, ${replies})`,
      async fn(t) {
        const dir = await tempDir(peers);
        // Errors are injected only while these files exist.
        const readErrors = `${dir}/fail-reads`;
        const writeErrors = `${dir}/fail-writes`;
        let server: Server | undefined;
        try {
          server = await nbdkit([
            ...(structured ? [] : ["--no-sr"]),
            "--filter=error",
            "memory",
            String(16 * MiB),
            "error-pread=EIO",
            "error-pread-rate=1",
            `error-pread-file=${readErrors}`,
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=1",
            `error-pwrite-file=${writeErrors}`,
          ], { dir, peers });
          const trace = new Trace();
          await using client = await connect(server.target(), {
            debug: trace.hook,
          });
          assert.equal(client.structuredReplies, structured);
          const data = fill(11, 0, 64 * KiB);
          await client.write(0, data);

          await t.step(
            "read() fails with NbdCommandError EIO when the server fails it",
            async () => {
              await whileFailing(readErrors, async () => {
                await assert.rejects(
                  () => client.read(4 * KiB, 8 * KiB),
                  (e) => {
                    assertErrno(e, "NBD_CMD_READ", 5, "EIO");
                    assert.equal((e as NbdCommandError).offset, 4 * KiB);
                    assert.equal((e as NbdCommandError).length, 8 * KiB);
                    return true;
                  },
                );
              });
            },
          );

          await t.step(
            "the connection stays usable after a command error",
            async () => {
              assert.equal(client.failure, undefined);
              assert.equal(client.state, "open");
              assertBytes(
                await client.read(0, 64 * KiB),
                data,
                "read after EIO",
              );
            },
          );

          await t.step(
            "write() fails with NbdCommandError ENOSPC when the server fails it",
            async () => {
              await whileFailing(writeErrors, async () => {
                await assert.rejects(
                  () => client.write(MiB, fill(12, MiB, 4 * KiB)),
                  (e) => assertErrno(e, "NBD_CMD_WRITE", 28, "ENOSPC"),
                );
              });
              await client.write(MiB, fill(12, MiB, 4 * KiB));
              assertBytes(
                await client.read(MiB, 4 * KiB),
                fill(12, MiB, 4 * KiB),
                "write after ENOSPC",
              );
            },
          );

          await t.step(
            "readable() and writable() fail with the server's errno",
            async () => {
              await whileFailing(readErrors, async () => {
                const reader = client.readable({ offset: 0, length: MiB })
                  .getReader();
                await assert.rejects(
                  () => within(5_000, "readable()", reader.read()),
                  (e) => assertErrno(e, "NBD_CMD_READ", 5, "EIO"),
                );
              });
              await whileFailing(writeErrors, async () => {
                await assert.rejects(
                  () =>
                    within(
                      5_000,
                      "writable()",
                      ReadableStream.from([fill(14, 0, 256 * KiB)]).pipeTo(
                        client.writable({ offset: 3 * MiB }),
                      ),
                    ),
                  (e) => assertErrno(e, "NBD_CMD_WRITE", 28, "ENOSPC"),
                );
              });
              assert.equal(client.failure, undefined);
              assertBytes(
                await client.read(0, 64 * KiB),
                data,
                "after streams",
              );
            },
          );

          await t.step(
            "among many requests in flight only those the server fails are rejected",
            async () => {
              const block = 4 * KiB;
              const results = await whileFailing(readErrors, () => {
                const all: Promise<unknown>[] = [];
                for (let i = 0; i < 64; i++) {
                  all.push(client.read(i * block, block));
                  const at = 2 * MiB + i * block;
                  all.push(client.write(at, fill(13, at, block)));
                }
                return within(
                  10_000,
                  "requests in flight",
                  Promise.allSettled(all),
                );
              });
              for (const [i, r] of results.entries()) {
                if (i % 2 === 0) {
                  assert.equal(r.status, "rejected", `read ${i / 2}`);
                  assertErrno(
                    (r as PromiseRejectedResult).reason,
                    "NBD_CMD_READ",
                    5,
                    "EIO",
                  );
                } else {
                  assert.equal(r.status, "fulfilled", `write ${(i - 1) / 2}`);
                }
              }
              assert.equal(client.failure, undefined);
              assertBytes(
                await client.read(2 * MiB, 64 * block),
                fill(13, 2 * MiB, 64 * block),
                "the writes that went through",
              );
            },
          );
        } finally {
          await server?.stop();
          await Deno.remove(dir, { recursive: true }).catch(() => {});
        }
      },
    });
  }

  Deno.test({
    name:
      `failures${suffix}: a server killed with requests in flight fails all of them`,
    async fn(t) {
      let server: Server | undefined;
      try {
        // Reads sleep for a minute, so they are surely in flight at the kill;
        // enough threads that every one of them is inside the server.
        server = await stallingNbdkit(peers, "--threads=64");
        const trace = new Trace();
        await using client = await connect(server.target(), {
          debug: trace.hook,
        });
        const pending = await readsInFlight(client, 32);
        server.kill("SIGKILL");

        await t.step(
          "every pending request fails with the same connection error, promptly",
          async () => {
            const settled = await within(
              5_000,
              "requests after the kill",
              Promise.allSettled(pending),
            );
            const reasons = settled.map((s) => {
              assert.equal(s.status, "rejected");
              return (s as PromiseRejectedResult).reason as unknown;
            });
            const first = reasons[0];
            assert.ok(
              first instanceof NbdConnectionClosedError ||
                first instanceof NbdProtocolError,
              `got ${first}`,
            );
            assert.match(
              (first as Error).message,
              /Server closed the connection with 32 requests in flight/,
            );
            for (const r of reasons) assert.equal(r, first);
            assert.equal(client.failure, first);
          },
        );

        await t.step(
          "later requests fail at once with NbdConnectionClosedError",
          async () => {
            await assert.rejects(
              () => within(5_000, "read after the kill", client.read(0, 4096)),
              (e: unknown) =>
                e instanceof NbdConnectionClosedError &&
                e.message.startsWith(
                  "Cannot call read(): the connection failed: ",
                ) &&
                e.cause === client.failure,
            );
            assert.equal(client.state, "failed");
          },
        );

        await t.step("close() still resolves", async () => {
          await within(5_000, "close()", client.close());
          assert.equal(client.state, "closed");
        });
      } finally {
        await server?.stop();
      }
    },
  });

  Deno.test({
    name:
      `failures${suffix}: nbdkit shutting down fails requests with ESHUTDOWN`,
    async fn(t) {
      let server: Server | undefined;
      try {
        server = await stallingNbdkit(peers);
        const trace = new Trace();
        await using client = await connect(server.target(), {
          debug: trace.hook,
        });
        const pending = await readsInFlight(client, 3);
        server.kill("SIGTERM");

        await t.step(
          "requests in flight fail with NbdCommandError ESHUTDOWN",
          async () => {
            const settled = await within(
              5_000,
              "requests after SIGTERM",
              Promise.allSettled(pending),
            );
            for (const s of settled) {
              assert.equal(s.status, "rejected");
              assertErrno(
                (s as PromiseRejectedResult).reason,
                "NBD_CMD_READ",
                108,
                "ESHUTDOWN",
              );
            }
          },
        );

        await t.step(
          "the client then disconnects softly and refuses new requests",
          async () => {
            await until(
              "NBD_CMD_DISC",
              () => trace.commands().at(-1)?.command === "NBD_CMD_DISC",
            );
            await assert.rejects(
              () => client.read(0, 4096),
              (e: unknown) =>
                e instanceof NbdConnectionClosedError &&
                /the server is shutting down \(ESHUTDOWN\)/.test(e.message),
            );
            await within(5_000, "close()", client.close());
            assert.equal(client.state, "closed");
            assert.ok(
              await server!.waitForExit(5_000),
              "nbdkit should exit once the client has gone",
            );
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });

  Deno.test({
    name: `failures${suffix}: an aborted request leaves the connection usable`,
    async fn(t) {
      let server: Server | undefined;
      try {
        server = await nbdkit([
          "--filter=delay",
          "memory",
          String(16 * MiB),
          "delay-read=200ms",
        ], { peers });
        const trace = new Trace();
        await using client = await connect(server.target(), {
          debug: trace.hook,
        });
        const data = fill(21, 0, 64 * KiB);
        await client.write(0, data);

        await t.step(
          "read() rejects with the signal's reason when aborted in flight",
          async () => {
            const controller = new AbortController();
            const reading = client.read(0, 64 * KiB, {
              signal: controller.signal,
            });
            await until(
              "the read to be sent",
              () => trace.commands().at(-1)?.command === "NBD_CMD_READ",
            );
            controller.abort();
            await assert.rejects(
              () => within(1_000, "aborted read", reading),
              (e: unknown) =>
                e instanceof DOMException && e.name === "AbortError",
            );
          },
        );

        await t.step(
          "the late reply is absorbed and the next read gets its own data",
          async () => {
            assertBytes(
              await within(5_000, "read", client.read(0, 64 * KiB)),
              data,
              "read after abort",
            );
            assert.equal(client.failure, undefined);
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });

  Deno.test({
    name: `failures${suffix}: close() is not held up by a stalled server`,
    async fn(t) {
      let server: Server | undefined;
      try {
        // Every read stalls for a minute; close() must not wait that long.
        server = await stallingNbdkit(peers);

        await t.step(
          "close() does not wait for a request whose caller aborted it",
          async () => {
            const client = await connect(server!.target());
            try {
              const controller = new AbortController();
              const reading = client.read(0, 4096, {
                signal: controller.signal,
              });
              await behind(client);
              controller.abort();
              await assert.rejects(
                () => reading,
                (e: unknown) =>
                  e instanceof DOMException && e.name === "AbortError",
              );
              await within(5_000, "close()", client.close());
              assert.equal(client.state, "closed");
            } finally {
              await client.close();
            }
          },
        );

        await t.step(
          "close({ signal }) cuts the wait short and fails what is left",
          async () => {
            const client = await connect(server!.target());
            try {
              const reading = client.read(0, 4096);
              reading.catch(() => {});
              await behind(client);
              const controller = new AbortController();
              const timer = setTimeout(() => controller.abort(), 100);
              try {
                await within(
                  5_000,
                  "close({ signal })",
                  client.close({ signal: controller.signal }),
                );
              } finally {
                clearTimeout(timer);
              }
              await assert.rejects(
                () => within(5_000, "the stalled read", reading),
                (e: unknown) => e instanceof NbdConnectionClosedError,
              );
              assert.equal(client.state, "closed");
            } finally {
              await client.close();
            }
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });

  Deno.test({
    name:
      `failures${suffix}: connect() gives up when its signal aborts mid-handshake`,
    async fn(t) {
      let server: Server | undefined;
      try {
        // nbdkit opens the export while answering NBD_OPT_GO; the delay
        // filter holds that open for a minute.
        server = await nbdkit([
          "--filter=delay",
          "memory",
          String(MiB),
          "delay-open=60",
        ], { peers });
        await t.step(
          "connect() rejects with the signal's reason, promptly",
          async () => {
            const trace = new Trace();
            const controller = new AbortController();
            const connecting = connect(server!.target(), {
              signal: controller.signal,
              debug: trace.hook,
            });
            connecting.catch(() => {});
            await until(
              "NBD_OPT_GO to be sent",
              () =>
                trace.events.some((e) =>
                  e.event === "send option" && e.fields.option === "NBD_OPT_GO"
                ),
            );
            const reason = new Error("gave up on the handshake");
            controller.abort(reason);
            await assert.rejects(
              () => within(2_000, "the aborted connect()", connecting),
              (e: unknown) => e === reason,
            );
          },
        );
      } finally {
        await server?.stop();
      }
    },
  });
}
