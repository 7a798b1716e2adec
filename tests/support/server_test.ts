/**
 * Proof that the scripted test server speaks NBD correctly: real clients
 * (libnbd's nbdinfo and nbdcopy, qemu-img, qemu-io) run against it, and a
 * few raw exchanges check what libnbd 1.14 cannot (extended headers,
 * reordering). When our client disagrees with this server, these tests say
 * which of the two is wrong.
 */

import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_READ,
  CMD_WRITE,
  EIO,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  OPT_EXPORT_NAME,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_SET_META_CONTEXT,
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_ERR_UNSUP,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_OFFSET_DATA,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
} from "../../lib/constants.ts";
import {
  blockStatusExtPayload,
  Builder,
  concat,
  errorOffsetPayload,
  errorPayload,
  exportNameReply,
  extendedChunk,
  newstyleGreeting,
  offsetDataPayload,
  offsetHolePayload,
  oldstyleGreeting,
  optionReply,
  simpleReply,
  startTestServer,
  structuredChunk,
  type TestServerConfig,
} from "./server.ts";
import { writeAll } from "./io.ts";
import { pattern } from "./pattern.ts";

const decoder = new TextDecoder();

interface Output {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a tool with a deadline; a hang fails the test, not the suite. */
async function run(cmd: string, args: string[]): Promise<Output> {
  const out = await new Deno.Command(cmd, {
    args,
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(20_000),
  }).output();
  return {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

async function ok(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  assert.equal(
    r.code,
    0,
    `${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`,
  );
  return r.stdout;
}

const MiB = 1024 * 1024;

/** 4 MiB with data in the first 192 KiB and at 2 MiB, holes elsewhere. */
function sparseExport(name = "disk") {
  const data = new Uint8Array(4 * MiB);
  data.set(pattern(192 * 1024, 7), 0);
  data.set(pattern(64 * 1024, 9), 2 * MiB);
  return { name, size: 4 * MiB, data, description: `the ${name} export` };
}

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "nbd-server-test-" });
}

/** Variants of a correct server that every real client must accept. */
const variants: { name: string; config: TestServerConfig }[] = [
  { name: "fixed newstyle, structured replies", config: {} },
  {
    name: "fixed newstyle, split, reordered, holes",
    config: {
      readChunkSize: 4096,
      shuffleChunks: true,
      readHoles: true,
      reorder: true,
      noneChunks: true,
      unknownInfos: [{ type: 0x7f00, data: new Uint8Array(9) }],
      blockSizeRequired: true,
    },
  },
  {
    name: "fixed newstyle, no structured replies",
    config: { structuredReplies: false },
  },
  { name: "newstyle (not fixed)", config: { style: "newstyle" } },
  { name: "oldstyle", config: { style: "oldstyle" } },
];

Deno.test({
  name: "startTestServer() serves real NBD clients",
  async fn(t) {
    await t.step("nbdinfo --list shows every export", async () => {
      await using server = await startTestServer({
        exports: [
          { ...sparseExport("disk"), blockSize: minBlocks() },
          { name: "second", size: MiB, readOnly: true },
        ],
      });
      const out = JSON.parse(
        await ok("nbdinfo", ["--json", "--list", server.uri]),
      );
      const names = out.exports.map((e: { "export-name": string }) =>
        e["export-name"]
      );
      assert.deepEqual(names, ["disk", "second"]);
      const [disk, second] = out.exports;
      assert.equal(disk["export-size"], 4 * MiB);
      assert.equal(disk.description, "the disk export");
      assert.equal(disk.block_size_minimum, 512);
      assert.equal(disk.block_size_preferred, 4096);
      assert.equal(disk.block_size_maximum, MiB);
      assert.equal(second.is_read_only, true);
      assert.ok(disk.contexts.includes("base:allocation"));
      assert.equal(second["export-size"], MiB);
      await server.settled();
      const log = server.log[0];
      assert.ok(log);
      assert.ok(log.options.some((o) => o.option === 3), "NBD_OPT_LIST sent");
    });

    await t.step("nbdinfo --map reports data and holes", async () => {
      await using server = await startTestServer({
        exports: [sparseExport()],
      });
      const map = JSON.parse(
        await ok("nbdinfo", ["--json", "--map", server.uri]),
      ) as { offset: number; length: number; type: number }[];
      const compact = map.map((e) => [e.offset, e.length, e.type]);
      const hz = STATE_HOLE | STATE_ZERO;
      assert.deepEqual(compact, [
        [0, 192 * 1024, 0],
        [192 * 1024, 2 * MiB - 192 * 1024, hz],
        [2 * MiB, 64 * 1024, 0],
        [2 * MiB + 64 * 1024, 2 * MiB - 64 * 1024, hz],
      ]);
    });

    await t.step("nbdinfo --map shows a configured context", async () => {
      await using server = await startTestServer({
        exports: [{
          name: "disk",
          size: MiB,
          contexts: {
            "qemu:dirty-bitmap:b0": [
              { length: 4096, flags: 1 },
              { length: MiB - 4096, flags: 0 },
            ],
          },
        }],
      });
      const map = JSON.parse(
        await ok("nbdinfo", [
          "--json",
          "--map=qemu:dirty-bitmap:b0",
          server.uri,
        ]),
      ) as { offset: number; length: number; type: number }[];
      assert.deepEqual(map.map((e) => [e.offset, e.length, e.type]), [
        [0, 4096, 1],
        [4096, MiB - 4096, 0],
      ]);
    });

    await t.step("nbdinfo --map on an 8 GiB sparse export", async () => {
      const GiB = 1024 * MiB;
      await using server = await startTestServer({
        exports: [{ name: "big", size: 8 * GiB }],
      });
      server.disk().write(5 * GiB, new Uint8Array(4096).fill(1));
      const map = JSON.parse(
        await ok("nbdinfo", ["--json", "--map", server.uri]),
      ) as { offset: number; length: number; type: number }[];
      const hz = STATE_HOLE | STATE_ZERO;
      // Merge what the client saw (holes arrive in pieces under 4 GiB).
      const merged: number[][] = [];
      for (const e of map) {
        const last = merged[merged.length - 1];
        if (last && last[2] === e.type) last[1]! += e.length;
        else merged.push([e.offset, e.length, e.type]);
      }
      assert.deepEqual(merged, [
        [0, 5 * GiB, hz],
        [5 * GiB, 64 * 1024, 0],
        [5 * GiB + 64 * 1024, 3 * GiB - 64 * 1024, hz],
      ]);
    });

    for (const v of variants) {
      await t.step(`nbdcopy and qemu round-trip: ${v.name}`, async () => {
        const initial = sparseExport();
        await using server = await startTestServer({
          ...v.config,
          exports: [initial],
        });
        const dir = await tempDir();
        try {
          // Read the whole export and compare with what it was given.
          const copy = `${dir}/copy.img`;
          await ok("nbdcopy", [server.uri, copy]);
          assert.deepEqual(await Deno.readFile(copy), initial.data);
          await ok("qemu-img", [
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            copy,
            server.uri,
          ]);

          // Write a new image through the server and read it back.
          const fresh = pattern(4 * MiB, 42);
          fresh.fill(0, MiB, 3 * MiB);
          const src = `${dir}/src.img`;
          await Deno.writeFile(src, fresh);
          await ok("nbdcopy", [src, server.uri]);
          assert.deepEqual(server.disk().read(0, 4 * MiB), fresh);
          const back = `${dir}/back.img`;
          await ok("nbdcopy", [server.uri, back]);
          assert.deepEqual(await Deno.readFile(back), fresh);

          // qemu-io: a patterned write, read back with verification.
          const io = await ok("qemu-io", [
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 65536 131072",
            "-c",
            "read -P 0x5a 65536 131072",
            "-c",
            "flush",
            server.uri,
          ]);
          assert.match(io, /read 131072\/131072 bytes/);
          const region = server.disk().read(65536, 131072);
          assert.ok(region.every((b) => b === 0x5a));
          await server.settled();
          const structured = v.config.structuredReplies !== false &&
            v.config.style === undefined;
          for (const log of server.log) {
            assert.equal(log.structuredReplies, structured);
            assert.equal(log.extendedHeaders, false);
            assert.deepEqual(log.notes.filter((n) => n.includes("error")), []);
          }
        } finally {
          await Deno.remove(dir, { recursive: true });
        }
      });
    }

    await t.step("nbdinfo over TCP on 127.0.0.1", async () => {
      await using server = await startTestServer({
        listen: "tcp",
        exports: [sparseExport()],
      });
      assert.ok(server.port !== undefined && server.port > 0);
      assert.equal(server.path, undefined);
      const out = JSON.parse(await ok("nbdinfo", ["--json", server.uri]));
      assert.equal(out.exports[0]["export-size"], 4 * MiB);
    });

    await t.step("libnbd falls back to NBD_OPT_EXPORT_NAME", async () => {
      await using server = await startTestServer({
        exports: [sparseExport()],
        optionReplies: { [OPT_GO]: REP_ERR_UNSUP },
      });
      const dir = await tempDir();
      try {
        await ok("nbdcopy", [server.uri, `${dir}/c.img`]);
        assert.deepEqual(
          await Deno.readFile(`${dir}/c.img`),
          sparseExport().data,
        );
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
      await server.settled();
      const options = server.log[0]?.options.map((o) => o.option);
      assert.deepEqual(options?.slice(-2), [OPT_GO, OPT_EXPORT_NAME]);
    });

    await t.step("a server errno fails the tool cleanly", async () => {
      await using server = await startTestServer({
        exports: [sparseExport()],
        onCommand: (req) =>
          req.type === CMD_READ
            ? structuredChunk(
              req.cookie,
              REPLY_FLAG_DONE,
              0x8001,
              errorPayload(EIO, "scripted failure"),
            )
            : undefined,
      });
      const dir = await tempDir();
      try {
        const r = await run("nbdcopy", [server.uri, `${dir}/c.img`]);
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /Input\/output error|scripted failure/);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });

    await t.step("the log shows requests within block sizes", async () => {
      await using server = await startTestServer({
        exports: [{
          ...sparseExport(),
          blockSize: { minimum: 512, preferred: 65536, maximum: 65536 },
        }],
      });
      const dir = await tempDir();
      let firstCopy = 0;
      try {
        // libnbd 1.14's nbdcopy does not split by the advertised maximum.
        await ok("nbdcopy", [
          "--request-size=65536",
          server.uri,
          `${dir}/c.img`,
        ]);
        // nbdcopy may use several connections: take every one of this copy.
        await server.settled();
        firstCopy = server.log.length;
        const big = await run("nbdcopy", [
          "--request-size=262144",
          server.uri,
          `${dir}/d.img`,
        ]);
        assert.notEqual(big.code, 0, "reads over the maximum are refused");
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
      await server.settled();
      const reads = server.log.slice(0, firstCopy).flatMap((l) =>
        l.requests.filter((r) => r.type === CMD_READ)
      );
      assert.ok(reads.length >= 256 * 1024 / 65536);
      for (const r of reads) assert.ok(r.length <= 65536n);
    });
  },
});

function minBlocks() {
  return { minimum: 512, preferred: 4096, maximum: MiB };
}

// ---------------------------------------------------------------------------
// Raw exchanges for what libnbd 1.14 does not do.
// ---------------------------------------------------------------------------

/** A bare-bones client over a Unix socket, for raw exchanges. */
class Raw {
  #conn: Deno.Conn;
  #buf = new Uint8Array(0);

  private constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  static async open(path: string): Promise<Raw> {
    return new Raw(await Deno.connect({ transport: "unix", path }));
  }

  write(b: Uint8Array): Promise<void> {
    return writeAll(this.#conn, b);
  }

  /** Reads exactly n bytes, or throws at end of stream. */
  async read(n: number): Promise<Uint8Array> {
    const chunk = new Uint8Array(64 * 1024);
    for (let i = 0; this.#buf.length < n; i++) {
      if (i > 100_000) throw new Error("read did not progress");
      const r = await this.#conn.read(chunk);
      if (r === null) throw new Error(`EOF after ${this.#buf.length} of ${n}`);
      const next = new Uint8Array(this.#buf.length + r);
      next.set(this.#buf);
      next.set(chunk.subarray(0, r), this.#buf.length);
      this.#buf = next;
    }
    const out = this.#buf.slice(0, n);
    this.#buf = this.#buf.slice(n);
    return out;
  }

  /** Reads until the server closes; returns what came before. */
  async readToEnd(): Promise<Uint8Array> {
    const chunk = new Uint8Array(64 * 1024);
    for (let i = 0; i < 100_000; i++) {
      const r = await this.#conn.read(chunk).catch(() => null);
      if (r === null) break;
      const next = new Uint8Array(this.#buf.length + r);
      next.set(this.#buf);
      next.set(chunk.subarray(0, r), this.#buf.length);
      this.#buf = next;
    }
    const out = this.#buf;
    this.#buf = new Uint8Array(0);
    return out;
  }

  close(): void {
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
  }

  async option(
    option: number,
    payload: Uint8Array = new Uint8Array(0),
  ): Promise<void> {
    await this.write(
      new Builder().u64(IHAVEOPT).u32(option).u32(payload.length).bytes(
        payload,
      ).done(),
    );
  }

  /** Reads one option reply. */
  async optionReply(): Promise<
    { option: number; type: number; data: Uint8Array }
  > {
    const h = await this.read(20);
    const v = new DataView(h.buffer);
    assert.equal(v.getBigUint64(0), OPTION_REPLY_MAGIC);
    const data = await this.read(v.getUint32(16));
    return { option: v.getUint32(8), type: v.getUint32(12), data };
  }

  /** Fixed newstyle greeting and flags, then GO with `options` before it. */
  async negotiate(name: string, options: number[]): Promise<void> {
    const g = await this.read(18);
    assert.deepEqual(g, newstyleGreeting());
    await this.write(
      new Builder().u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).done(),
    );
    for (const o of options) {
      if (o === OPT_SET_META_CONTEXT) {
        const n = new TextEncoder().encode(name);
        await this.option(
          o,
          new Builder().u32(n.length).bytes(n).u32(1).u32(15).string(
            "base:allocation",
          ).done(),
        );
        const ctx = await this.optionReply();
        assert.equal(ctx.type, 4);
      } else await this.option(o);
      assert.equal((await this.optionReply()).type, REP_ACK);
    }
    const n = new TextEncoder().encode(name);
    await this.option(
      OPT_GO,
      new Builder().u32(n.length).bytes(n).u16(1).u16(INFO_BLOCK_SIZE).done(),
    );
    for (let i = 0; i < 10; i++) {
      const r = await this.optionReply();
      if (r.type === REP_ACK) return;
      assert.equal(r.type, 3, "NBD_REP_INFO");
    }
    throw new Error("no ACK to NBD_OPT_GO");
  }
}

function request(
  type: number,
  cookie: bigint,
  offset: number,
  length: number,
  flags = 0,
): Uint8Array {
  return new Builder().u32(REQUEST_MAGIC).u16(flags).u16(type).u64(cookie)
    .u64(offset).u32(length).done();
}

function extendedRequest(
  type: number,
  cookie: bigint,
  offset: number,
  length: number,
  flags = 0,
): Uint8Array {
  return new Builder().u32(EXTENDED_REQUEST_MAGIC).u16(flags).u16(type)
    .u64(cookie).u64(offset).u64(length).done();
}

Deno.test("startTestServer() raw exchanges", async (t) => {
  await t.step("encoders produce the spec's sizes", () => {
    assert.equal(simpleReply(1n).length, 4 + 4 + 8); // magic, error, cookie
    assert.equal(structuredChunk(1n, 0, 0).length, 4 + 2 + 2 + 8 + 4);
    assert.equal(extendedChunk(1n, 0, 0, 0).length, 4 + 2 + 2 + 8 + 8 + 8);
    assert.equal(optionReply(1, 1).length, 8 + 4 + 4 + 4);
    assert.equal(newstyleGreeting().length, 8 + 8 + 2);
    assert.equal(oldstyleGreeting(0, 1).length, 8 + 8 + 8 + 4 + 124);
    assert.equal(exportNameReply(0, 1).length, 8 + 2 + 124);
    assert.equal(exportNameReply(0, 1, true).length, 8 + 2);
    assert.equal(offsetDataPayload(0, new Uint8Array(3)).length, 8 + 3);
    assert.equal(offsetHolePayload(0, 1).length, 8 + 4);
    assert.equal(errorPayload(EIO, "ab").length, 4 + 2 + 2);
    assert.equal(errorOffsetPayload(EIO, "ab", 0).length, 4 + 2 + 2 + 8);
    assert.equal(
      blockStatusExtPayload(1, [{ length: 1, flags: 0 }]).length,
      4 + 4 + 16,
    );
    assert.deepEqual(
      simpleReply(0x0102030405060708n, 5),
      new Uint8Array([
        0x67,
        0x44,
        0x66,
        0x98,
        0,
        0,
        0,
        5,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
      ]),
    );
  });

  await t.step("extended headers: read, write, block status", async () => {
    const data = pattern(8192, 3);
    await using server = await startTestServer({
      exports: [{ name: "x", size: MiB, data }],
    });
    const raw = await Raw.open(server.path!);
    try {
      await raw.negotiate("x", [OPT_EXTENDED_HEADERS, OPT_SET_META_CONTEXT]);
      await raw.write(extendedRequest(CMD_READ, 7n, 4096, 4096));
      const h = await raw.read(32);
      const v = new DataView(h.buffer);
      assert.equal(v.getUint32(0), EXTENDED_REPLY_MAGIC);
      assert.equal(v.getUint16(4), REPLY_FLAG_DONE);
      assert.equal(v.getUint16(6), REPLY_TYPE_OFFSET_DATA);
      assert.equal(v.getBigUint64(8), 7n);
      assert.equal(v.getBigUint64(16), 4096n, "offset echoes the request");
      assert.equal(v.getBigUint64(24), 8n + 4096n);
      const body = await raw.read(8 + 4096);
      assert.deepEqual(body.subarray(8), data.subarray(4096));

      await raw.write(
        concat(
          extendedRequest(CMD_WRITE, 8n, 65536, 3),
          new Uint8Array([1, 2, 3]),
        ),
      );
      const w = new DataView((await raw.read(32)).buffer);
      assert.equal(w.getUint16(6), 0, "NBD_REPLY_TYPE_NONE");
      assert.equal(w.getBigUint64(24), 0n);
      assert.deepEqual(server.disk().read(65536, 3), new Uint8Array([1, 2, 3]));

      await raw.write(extendedRequest(CMD_BLOCK_STATUS, 9n, 0, MiB));
      const b = new DataView((await raw.read(32)).buffer);
      assert.equal(b.getUint16(6), REPLY_TYPE_BLOCK_STATUS_EXT);
      const len = Number(b.getBigUint64(24));
      const p = new DataView((await raw.read(len)).buffer);
      assert.equal(p.getUint32(0), 1, "context id");
      const count = p.getUint32(4);
      assert.equal(len, 8 + 16 * count);
      const extents = [];
      for (let i = 0; i < count; i++) {
        extents.push([
          Number(p.getBigUint64(8 + 16 * i)),
          Number(p.getBigUint64(16 + 16 * i)),
        ]);
      }
      assert.deepEqual(extents, [[131072, 0], [MiB - 131072, 3]]);

      await raw.write(extendedRequest(CMD_DISC, 10n, 0, 0));
      assert.equal((await raw.readToEnd()).length, 0);
    } finally {
      raw.close();
    }
    await server.settled();
    assert.equal(server.log[0]?.extendedHeaders, true);
    assert.ok(server.log[0]?.requests.every((r) => r.extended));
  });

  await t.step("reorder answers the later request first", async () => {
    await using server = await startTestServer({
      exports: [{ name: "", size: MiB }],
      reorder: true,
      reorderWindowMs: 50,
    });
    const raw = await Raw.open(server.path!);
    try {
      await raw.negotiate("", []);
      await raw.write(
        concat(request(CMD_READ, 1n, 0, 512), request(CMD_READ, 2n, 512, 512)),
      );
      const first = new DataView((await raw.read(16 + 512)).buffer);
      const second = new DataView((await raw.read(16 + 512)).buffer);
      assert.equal(first.getUint32(0), SIMPLE_REPLY_MAGIC);
      assert.equal(first.getBigUint64(8), 2n);
      assert.equal(second.getBigUint64(8), 1n);
    } finally {
      raw.close();
    }
  });

  await t.step("hooks: raw bytes, twice the same cookie, drop", async () => {
    await using server = await startTestServer({
      onCommand: async (req, ctx) => {
        if (req.index === 0) {
          const good = await ctx.defaultReply();
          return [...good, ...good];
        }
        return [simpleReply(req.cookie, 0).subarray(0, 7), "drop"];
      },
    });
    const raw = await Raw.open(server.path!);
    try {
      await raw.negotiate("", []);
      await raw.write(request(CMD_READ, 5n, 0, 16));
      const a = await raw.read(16 + 16);
      const b = await raw.read(16 + 16);
      assert.deepEqual(a, b);
      await raw.write(request(CMD_READ, 6n, 0, 16));
      assert.equal((await raw.readToEnd()).length, 7);
    } finally {
      raw.close();
    }
    await server.settled();
    assert.deepEqual(server.log[0]?.notes, ["dropped by hook"]);
  });

  await t.step("close() ends stalled connections", async () => {
    const server = await startTestServer({ stallHandshake: true });
    const raw = await Raw.open(server.path!);
    try {
      const closing = server.close();
      assert.equal((await raw.readToEnd()).length, 0);
      await closing;
    } finally {
      raw.close();
    }
  });

  await t.step("a stall in a command hook ends at close()", async () => {
    const server = await startTestServer({ onCommand: () => "stall" });
    const raw = await Raw.open(server.path!);
    try {
      await raw.negotiate("", []);
      await raw.write(request(CMD_READ, 1n, 0, 512));
      await server.close();
      assert.equal((await raw.readToEnd()).length, 0);
    } finally {
      raw.close();
    }
  });

  await t.step("non-fixed newstyle hangs up on other options", async () => {
    await using server = await startTestServer({ style: "newstyle" });
    const raw = await Raw.open(server.path!);
    try {
      assert.deepEqual(await raw.read(18), newstyleGreeting(0));
      await raw.write(new Builder().u32(0).done());
      await raw.option(OPT_STRUCTURED_REPLY);
      assert.equal((await raw.readToEnd()).length, 0);
    } finally {
      raw.close();
    }
    await server.settled();
    assert.match(server.log[0]?.notes[0] ?? "", /non-fixed newstyle/);
  });

  await t.step("client flags that were not advertised end it", async () => {
    await using server = await startTestServer({ style: "newstyle" });
    const raw = await Raw.open(server.path!);
    try {
      await raw.read(18);
      await raw.write(new Builder().u32(FLAG_C_NO_ZEROES).done());
      assert.equal((await raw.readToEnd()).length, 0);
    } finally {
      raw.close();
    }
    await server.settled();
    assert.equal(server.log[0]?.clientFlags, FLAG_C_NO_ZEROES);
  });

  await t.step("unknown info types and option replies", async () => {
    await using server = await startTestServer({
      unknownInfos: [{ type: 0x4242, data: new Uint8Array([1, 2]) }],
      optionReplies: { [OPT_STRUCTURED_REPLY]: REP_ERR_UNSUP },
    });
    const raw = await Raw.open(server.path!);
    try {
      await raw.read(18);
      await raw.write(new Builder().u32(FLAG_C_FIXED_NEWSTYLE).done());
      await raw.option(OPT_STRUCTURED_REPLY);
      assert.equal((await raw.optionReply()).type, REP_ERR_UNSUP);
      await raw.option(OPT_GO, new Builder().u32(0).u16(0).done());
      const info = await raw.optionReply();
      assert.equal(info.type, 3);
      assert.deepEqual(info.data, new Uint8Array([0x42, 0x42, 1, 2]));
      const exp = await raw.optionReply();
      assert.equal(new DataView(exp.data.buffer).getUint16(0), 0);
      assert.equal((await raw.optionReply()).type, REP_ACK);
    } finally {
      raw.close();
    }
  });
});
