import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_FLAG_REQ_ONE,
  CMD_READ,
  CMD_WRITE,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_BLOCK_STATUS_EXT,
  REPLY_TYPE_ERROR,
  REPLY_TYPE_ERROR_OFFSET,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  STRUCTURED_REPLY_MAGIC,
} from "../lib/constants.ts";
import {
  NbdCommandError,
  NbdConnectionClosedError,
  NbdProtocolError,
} from "../lib/errors.ts";
import type { ExportInfo } from "../lib/export.ts";
import { type Command, Transmission } from "../lib/transmission.ts";
import { Transport } from "../lib/transport.ts";
import { ScriptedStream } from "./support/byte_script.ts";
import { pattern } from "./support/pattern.ts";
import { seeded } from "./support/random.ts";
import {
  Builder,
  extendedChunk,
  simpleReply,
  structuredChunk,
} from "./support/server.ts";
import { within } from "./support/wait.ts";

const DONE = REPLY_FLAG_DONE;

function info(over: Partial<ExportInfo> = {}): ExportInfo {
  return {
    exportName: "",
    description: "",
    size: 1n << 20n,
    flags: 0x0d6d,
    blockSize: { minimum: 1, preferred: 4096, maximum: 1 << 20 },
    blockSizeAdvertised: false,
    protocol: "fixed newstyle",
    structuredReplies: true,
    extendedHeaders: false,
    tls: false,
    metaContexts: new Map([[7, "base:allocation"], [9, "qemu:x"]]),
    ...over,
  };
}

function setup(over: Partial<ExportInfo> = {}, maxInFlight = 64) {
  const stream = new ScriptedStream(new Uint8Array(0), [], true);
  const tx = new Transmission(
    new Transport(stream),
    info(over),
    maxInFlight,
    undefined,
  );
  return { stream, tx };
}

/**
 * The requests in what the client wrote, whole, however its writes cut
 * them (requests made together go out in one write).
 */
function requests(stream: ScriptedStream): Uint8Array[] {
  const all = new Uint8Array(
    stream.written.reduce((n, w) => n + w.length, 0),
  );
  let at = 0;
  for (const w of stream.written) {
    all.set(w, at);
    at += w.length;
  }
  const out: Uint8Array[] = [];
  const v = new DataView(all.buffer);
  for (at = 0; at + 4 <= all.length;) {
    const extended = v.getUint32(at) === 0x21e41c71;
    const size = extended ? 32 : 28;
    if (at + size > all.length) break;
    const write = v.getUint16(at + 6) === CMD_WRITE;
    const length = extended
      ? Number(v.getBigUint64(at + 24))
      : v.getUint32(at + 24);
    const end = at + size + (write ? length : 0);
    if (end > all.length) break;
    out.push(all.subarray(at, end));
    at = end;
  }
  return out;
}

/** Waits (bounded) until the client has written `n` requests. */
async function written(stream: ScriptedStream, n: number): Promise<void> {
  for (let i = 0; i < 200 && requests(stream).length < n; i++) {
    await new Promise((r) => setTimeout(r, 0));
  }
  assert.ok(requests(stream).length >= n, `expected ${n} requests`);
}

// Replies appended to one builder in order; the messages come from the
// scripted server's encoders.

function simple(b: Builder, cookie: number, error = 0): Builder {
  return b.bytes(simpleReply(BigInt(cookie), error));
}

function chunk(
  b: Builder,
  flags: number,
  type: number,
  cookie: number,
  payload: Builder | Uint8Array,
): Builder {
  const p = payload instanceof Uint8Array ? payload : payload.done();
  return b.bytes(structuredChunk(BigInt(cookie), flags, type, p));
}

function ext(
  b: Builder,
  flags: number,
  type: number,
  cookie: number,
  offset: number,
  payload: Builder | Uint8Array,
): Builder {
  const p = payload instanceof Uint8Array ? payload : payload.done();
  return b.bytes(extendedChunk(BigInt(cookie), flags, type, offset, p));
}

function read(offset: number, length: number, signal?: AbortSignal) {
  const buffer = new Uint8Array(length);
  const cmd: Command = {
    type: CMD_READ,
    flags: 0,
    offset,
    length,
    buffer,
    signal,
  };
  return { buffer, cmd };
}

async function expectProtocolError(
  p: Promise<unknown>,
  pattern: RegExp,
): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof NbdProtocolError, String(e));
    assert.equal(e.phase, "transmission");
    assert.match(e.message, pattern);
    return true;
  });
}

Deno.test("Transmission reads a structured reply split at every byte boundary", async () => {
  const data = pattern(64);
  const replies = new Builder();
  // Out of order: second half first, a hole in the middle, DONE on NONE.
  chunk(
    replies,
    0,
    REPLY_TYPE_OFFSET_DATA,
    1,
    new Builder().u64(4096 + 32).bytes(data.subarray(32, 48)),
  );
  chunk(
    replies,
    0,
    REPLY_TYPE_OFFSET_HOLE,
    1,
    new Builder().u64(4096 + 48).u32(16),
  );
  chunk(
    replies,
    0,
    REPLY_TYPE_OFFSET_DATA,
    1,
    new Builder().u64(4096).bytes(data.subarray(0, 32)),
  );
  chunk(replies, DONE, REPLY_TYPE_NONE, 1, new Builder());
  const bytes = replies.done();
  const expected = data.slice();
  expected.fill(0, 48);
  for (let cut = 0; cut < bytes.length; cut++) {
    const { stream, tx } = setup();
    const { buffer, cmd } = read(4096, 64);
    const done = tx.submit(cmd);
    await written(stream, 1);
    stream.feed(bytes, [cut]);
    await done;
    assert.deepEqual(buffer, expected, `split at ${cut}`);
    await tx.disconnect();
  }
});

Deno.test("Transmission reads simple replies split at every byte boundary", async () => {
  const data = pattern(40);
  const bytes = simple(new Builder(), 1).bytes(data).done();
  for (let cut = 0; cut < bytes.length; cut++) {
    const { stream, tx } = setup({
      structuredReplies: false,
      metaContexts: new Map(),
    });
    const { buffer, cmd } = read(0, 40);
    const done = tx.submit(cmd);
    await written(stream, 1);
    stream.feed(bytes, [cut]);
    await done;
    assert.deepEqual(buffer, data);
    await tx.disconnect();
  }
});

Deno.test("Transmission reads block status and error chunks split at every byte boundary", async () => {
  const replies = new Builder();
  chunk(
    replies,
    0,
    REPLY_TYPE_BLOCK_STATUS,
    1,
    new Builder().u32(9).u32(8192).u32(1),
  );
  chunk(
    replies,
    DONE,
    REPLY_TYPE_BLOCK_STATUS,
    1,
    new Builder().u32(7).u32(4096).u32(0).u32(4096).u32(3),
  );
  // A read that fails with a message, then DONE on NONE.
  chunk(
    replies,
    0,
    REPLY_TYPE_ERROR,
    2,
    new Builder().u32(5).u16(9).bytes(new TextEncoder().encode("disk died")),
  );
  chunk(replies, DONE, REPLY_TYPE_NONE, 2, new Builder());
  const bytes = replies.done();
  for (let cut = 0; cut < bytes.length; cut++) {
    const { stream, tx } = setup();
    const status = tx.submit({
      type: CMD_BLOCK_STATUS,
      flags: 0,
      offset: 0,
      length: 8192,
    });
    const failed = tx.submit(read(0, 512).cmd);
    await written(stream, 2);
    stream.feed(bytes, [cut]);
    const byId = await status;
    assert.deepEqual(byId.get(7), [
      { offset: 0, length: 4096, flags: 0 },
      { offset: 4096, length: 4096, flags: 3 },
    ], `split at ${cut}`);
    assert.deepEqual(byId.get(9), [{ offset: 0, length: 8192, flags: 1 }]);
    await assert.rejects(failed, (e: unknown) => {
      assert.ok(e instanceof NbdCommandError, `split at ${cut}: ${e}`);
      assert.equal(e.errno, 5);
      assert.equal(e.serverMessage, "disk died");
      return true;
    });
    await tx.disconnect();
  }
});

Deno.test("Transmission matches replies by cookie in any order, interleaved", async () => {
  const { stream, tx } = setup();
  const a = read(0, 8);
  const b = read(8, 8);
  const pa = tx.submit(a.cmd);
  const pb = tx.submit(b.cmd);
  await written(stream, 2);
  const r = new Builder();
  chunk(
    r,
    0,
    REPLY_TYPE_OFFSET_DATA,
    2,
    new Builder().u64(8).bytes(pattern(4, 2)),
  );
  chunk(
    r,
    0,
    REPLY_TYPE_OFFSET_DATA,
    1,
    new Builder().u64(4).bytes(pattern(4, 1)),
  );
  chunk(
    r,
    DONE,
    REPLY_TYPE_OFFSET_DATA,
    2,
    new Builder().u64(12).bytes(pattern(4, 3)),
  );
  chunk(
    r,
    DONE,
    REPLY_TYPE_OFFSET_DATA,
    1,
    new Builder().u64(0).bytes(pattern(4, 4)),
  );
  stream.feed(r.done());
  await Promise.all([pa, pb]);
  assert.deepEqual([...a.buffer], [...pattern(4, 4), ...pattern(4, 1)]);
  assert.deepEqual([...b.buffer], [...pattern(4, 2), ...pattern(4, 3)]);
  await tx.disconnect();
});

Deno.test("Transmission: a server errno fails one request and the connection stays usable", async (t) => {
  await t.step("NBD_REPLY_TYPE_ERROR with a message", async () => {
    const { stream, tx } = setup();
    const first = tx.submit(read(0, 8).cmd);
    await written(stream, 1);
    stream.feed(
      chunk(
        new Builder(),
        DONE,
        REPLY_TYPE_ERROR,
        1,
        new Builder().u32(5).u16(9).string("disk died"),
      )
        .done(),
    );
    await assert.rejects(first, (e: unknown) => {
      assert.ok(e instanceof NbdCommandError);
      assert.equal(e.errno, 5);
      assert.equal(e.errnoName, "EIO");
      assert.equal(e.command, "NBD_CMD_READ");
      assert.equal(e.serverMessage, "disk died");
      assert.match(e.message, /failed with 5 \(EIO\): disk died/);
      return true;
    });
    const second = read(0, 4);
    const p = tx.submit(second.cmd);
    await written(stream, 2);
    stream.feed(
      chunk(
        new Builder(),
        DONE,
        REPLY_TYPE_OFFSET_DATA,
        2,
        new Builder().u64(0).bytes(Uint8Array.of(1, 2, 3, 4)),
      ).done(),
    );
    await p;
    assert.deepEqual([...second.buffer], [1, 2, 3, 4]);
    await tx.disconnect();
  });
  await t.step("NBD_REPLY_TYPE_ERROR_OFFSET names where", async () => {
    const { stream, tx } = setup();
    const p = tx.submit(read(100, 50).cmd);
    await written(stream, 1);
    stream.feed(
      chunk(
        new Builder(),
        DONE,
        REPLY_TYPE_ERROR_OFFSET,
        1,
        new Builder().u32(28).u16(0).u64(120),
      ).done(),
    );
    await assert.rejects(
      p,
      (e: unknown) =>
        e instanceof NbdCommandError && e.errnoName === "ENOSPC" &&
        e.errorOffset === 120,
    );
    await tx.disconnect();
  });
  await t.step("a simple error reply", async () => {
    const { stream, tx } = setup({
      structuredReplies: false,
      metaContexts: new Map(),
    });
    const p = tx.submit({
      type: CMD_WRITE,
      flags: 0,
      offset: 0,
      length: 4,
      payload: pattern(4),
    });
    await written(stream, 1);
    stream.feed(simple(new Builder(), 1, 1).done());
    await assert.rejects(
      p,
      (e: unknown) =>
        e instanceof NbdCommandError && e.errnoName === "EPERM" &&
        e.command === "NBD_CMD_WRITE",
    );
    await tx.disconnect();
  });
});

Deno.test("Transmission: a protocol violation fails every pending request with the same error", async (t) => {
  const cases: Array<[string, (b: Builder) => void, RegExp]> = [
    ["unknown cookie", (b) => simple(b, 99), /unknown cookie 99/],
    [
      "bad magic",
      (b) => b.u32(0xdeadbeef).u32(0).u64(1),
      /Bad reply magic 0xdeadbeef/,
    ],
    [
      "a 4 GiB data chunk",
      (b) =>
        b.u32(STRUCTURED_REPLY_MAGIC).u16(0).u16(REPLY_TYPE_OFFSET_DATA).u64(1)
          .u32(0xffffffff),
      /payload length 4294967295 does not fit the request/,
    ],
    [
      "data outside the request",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_OFFSET_DATA,
          1,
          new Builder().u64(4).bytes(pattern(8)),
        ),
      /lies outside the request/,
    ],
    [
      "overlapping data",
      (b) => {
        chunk(
          b,
          0,
          REPLY_TYPE_OFFSET_DATA,
          1,
          new Builder().u64(0).bytes(pattern(6)),
        );
        chunk(
          b,
          DONE,
          REPLY_TYPE_OFFSET_DATA,
          1,
          new Builder().u64(4).bytes(pattern(4)),
        );
      },
      /overlaps data already received/,
    ],
    [
      "a short reply",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_OFFSET_DATA,
          1,
          new Builder().u64(0).bytes(pattern(4)),
        ),
      /covered 4 of 8 bytes/,
    ],
    [
      "an unknown chunk type",
      (b) => chunk(b, DONE, 77, 1, new Builder()),
      /77 \(unknown\) chunk .*unknown chunk type/,
    ],
    [
      "a block status chunk for a read",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(7).u32(8).u32(0),
        ),
      /not a valid reply to NBD_CMD_READ/,
    ],
    [
      "an error chunk whose message overruns it",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_ERROR,
          1,
          new Builder().u32(5).u16(100).string("x"),
        ),
      /message length 100 exceeds/,
    ],
    [
      "a simple reply with data after structured replies",
      (b) => simple(b, 1),
      /simple reply with data to NBD_CMD_READ/,
    ],
  ];
  for (const [name, script, pattern] of cases) {
    await t.step(name, async () => {
      const { stream, tx } = setup();
      const first = tx.submit(read(0, 8).cmd);
      const second = tx.submit(read(8, 8).cmd);
      await written(stream, 2);
      const b = new Builder();
      script(b);
      stream.feed(b.done());
      let err1: unknown, err2: unknown;
      await first.catch((e) => (err1 = e));
      await second.catch((e) => (err2 = e));
      assert.ok(err1 instanceof NbdProtocolError, `${name}: ${err1}`);
      assert.match((err1 as Error).message, pattern);
      assert.equal(err2, err1, "every pending request gets the same error");
      await assert.rejects(
        tx.submit(read(0, 8).cmd),
        (e: unknown) =>
          e instanceof NbdConnectionClosedError && e.cause === err1,
      );
      await tx.disconnect();
    });
  }
  await t.step("DONE twice", async () => {
    const { stream, tx } = setup();
    const first = tx.submit(read(0, 8).cmd);
    const second = tx.submit(read(8, 8).cmd);
    await written(stream, 2);
    const b = new Builder();
    chunk(
      b,
      DONE,
      REPLY_TYPE_OFFSET_DATA,
      1,
      new Builder().u64(0).bytes(pattern(8)),
    );
    chunk(b, DONE, REPLY_TYPE_NONE, 1, new Builder());
    stream.feed(b.done());
    await first;
    await expectProtocolError(second, /unknown cookie 1/);
    await tx.disconnect();
  });
  await t.step("connection dropped mid-payload", async () => {
    const { stream, tx } = setup({
      structuredReplies: false,
      metaContexts: new Map(),
    });
    const p = tx.submit(read(0, 16).cmd);
    await written(stream, 1);
    stream.feed(simple(new Builder(), 1).bytes(pattern(7)).done());
    stream.end();
    await expectProtocolError(
      p,
      /Connection closed after 7 of 16 bytes of the 16-byte payload/,
    );
    await tx.disconnect();
  });
  await t.step("connection dropped between replies", async () => {
    const { stream, tx } = setup();
    const p = tx.submit(read(0, 16).cmd);
    await written(stream, 1);
    stream.end();
    await assert.rejects(
      p,
      (e: unknown) =>
        e instanceof NbdConnectionClosedError &&
        /with 1 request in flight$/.test(e.message),
    );
    await tx.disconnect();
  });
});

Deno.test("Transmission: block status", async (t) => {
  const bs = (flags = 0) => ({
    type: CMD_BLOCK_STATUS,
    flags,
    offset: 0,
    length: 8192,
  });
  await t.step("one chunk per context, by id", async () => {
    const { stream, tx } = setup();
    const p = tx.submit(bs());
    await written(stream, 1);
    const r = new Builder();
    chunk(
      r,
      0,
      REPLY_TYPE_BLOCK_STATUS,
      1,
      new Builder().u32(9).u32(8192).u32(1),
    );
    chunk(
      r,
      DONE,
      REPLY_TYPE_BLOCK_STATUS,
      1,
      new Builder().u32(7).u32(4096).u32(0).u32(65536).u32(3),
    );
    stream.feed(r.done());
    const byId = await p;
    assert.deepEqual(byId.get(7), [
      { offset: 0, length: 4096, flags: 0 },
      { offset: 4096, length: 65536, flags: 3 },
    ]);
    assert.deepEqual(byId.get(9), [{ offset: 0, length: 8192, flags: 1 }]);
    await tx.disconnect();
  });
  const bad: Array<[string, (b: Builder) => void, RegExp, number?]> = [
    [
      "unknown context id",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(3).u32(512).u32(0),
        ),
      /unknown metadata context id 3/,
    ],
    [
      "a missing context",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(7).u32(512).u32(0),
        ),
      /no extents for "qemu:x"/,
    ],
    [
      "REQ_ONE with two extents",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(7).u32(512).u32(0).u32(512).u32(0),
        ),
      /2 extents despite NBD_CMD_FLAG_REQ_ONE/,
      CMD_FLAG_REQ_ONE,
    ],
    [
      "a zero-length extent",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(7).u32(0).u32(0),
        ),
      /extent 0 has length 0/,
    ],
    [
      "extents after the request's end",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(7).u32(8192).u32(0).u32(512).u32(0),
        ),
      /extent 1 starts beyond the request/,
    ],
    [
      "a wide chunk without extended headers",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS_EXT,
          1,
          new Builder().u32(7).u32(1).u64(512).u64(0),
        ),
      /sent without extended headers/,
    ],
    [
      "a length that is not 4 + 8n",
      (b) =>
        chunk(
          b,
          DONE,
          REPLY_TYPE_BLOCK_STATUS,
          1,
          new Builder().u32(7).u32(512),
        ),
      /payload length 8 is invalid/,
    ],
  ];
  for (const [name, script, pattern, flags] of bad) {
    await t.step(name, async () => {
      const { stream, tx } = setup();
      const p = tx.submit(bs(flags));
      await written(stream, 1);
      const b = new Builder();
      script(b);
      stream.feed(b.done());
      await expectProtocolError(p, pattern);
      await tx.disconnect();
    });
  }
});

Deno.test("Transmission with extended headers", async (t) => {
  const over = {
    extendedHeaders: true,
    metaContexts: new Map([[7, "base:allocation"]]),
  };
  await t.step(
    "sends 32-byte requests and reads 32-byte replies split anywhere",
    async () => {
      const data = pattern(24);
      const r = new Builder();
      ext(
        r,
        0,
        REPLY_TYPE_OFFSET_HOLE,
        1,
        512,
        new Builder().u64(512 + 16).u32(8),
      );
      ext(
        r,
        DONE,
        REPLY_TYPE_OFFSET_DATA,
        1,
        512,
        new Builder().u64(512).bytes(data.subarray(0, 16)),
      );
      const bytes = r.done();
      for (let cut = 0; cut < bytes.length; cut += 3) {
        const { stream, tx } = setup(over);
        const { buffer, cmd } = read(512, 24);
        const p = tx.submit(cmd);
        await written(stream, 1);
        assert.equal(requests(stream)[0]!.length, 32);
        assert.deepEqual([...requests(stream)[0]!.subarray(0, 4)], [
          0x21,
          0xe4,
          0x1c,
          0x71,
        ]);
        stream.feed(bytes, [cut]);
        await p;
        assert.deepEqual([...buffer], [
          ...data.subarray(0, 16),
          ...new Array(8).fill(0),
        ]);
        await tx.disconnect();
      }
    },
  );
  await t.step(
    "64-bit block status extents, compact chunks accepted too",
    async () => {
      const { stream, tx } = setup({ ...over, size: 1n << 40n });
      const p = tx.submit({
        type: CMD_BLOCK_STATUS,
        flags: 0,
        offset: 0,
        length: 2 ** 33,
      });
      await written(stream, 1);
      stream.feed(
        ext(
          new Builder(),
          DONE,
          REPLY_TYPE_BLOCK_STATUS_EXT,
          1,
          0,
          new Builder().u32(7).u32(1).u64(2 ** 35).u64(3),
        )
          .done(),
      );
      assert.deepEqual((await p).get(7), [{
        offset: 0,
        length: 2 ** 35,
        flags: 3,
      }]);
      await tx.disconnect();
    },
  );
  await t.step("a reply whose offset is not the request's", async () => {
    const { stream, tx } = setup(over);
    const p = tx.submit(read(512, 8).cmd);
    await written(stream, 1);
    stream.feed(
      ext(new Builder(), DONE, REPLY_TYPE_NONE, 1, 0, new Builder()).done(),
    );
    await expectProtocolError(p, /names offset 0, but the request was at 512/);
    await tx.disconnect();
  });
  await t.step("a 2^63-byte payload length is printed exactly", async () => {
    const { stream, tx } = setup(over);
    const p = tx.submit(read(512, 16).cmd);
    await written(stream, 1);
    // magic, flags, type, cookie, offset, length
    const h = new Builder().u32(0x6e8a278c).u16(DONE)
      .u16(REPLY_TYPE_OFFSET_DATA).u64(1).u64(512).u64(1n << 63n);
    stream.feed(h.done());
    await expectProtocolError(
      p,
      /^1 \(NBD_REPLY_TYPE_OFFSET_DATA\) chunk for NBD_CMD_READ \(offset 512, length 16\): payload length 9223372036854775808 does not fit the request$/,
    );
    await tx.disconnect();
  });
  await t.step(
    "a data chunk's offset past 2^53 is printed exactly",
    async () => {
      const { stream, tx } = setup();
      const p = tx.submit(read(512, 16).cmd);
      await written(stream, 1);
      stream.feed(
        chunk(
          new Builder(),
          DONE,
          REPLY_TYPE_OFFSET_DATA,
          1,
          new Builder().u64(0xffff_ffff_ffff_fff0n).bytes(pattern(16)),
        ).done(),
      );
      await expectProtocolError(
        p,
        /: range 18446744073709551600\+16 lies outside the request$/,
      );
      await tx.disconnect();
    },
  );
  await t.step("a simple reply", async () => {
    const { stream, tx } = setup(over);
    const p = tx.submit(read(0, 8).cmd);
    await written(stream, 1);
    stream.feed(simple(new Builder(), 1).zeroes(16).done());
    await expectProtocolError(
      p,
      /Bad reply magic 0x67446698 \(expected an extended reply\)/,
    );
    await tx.disconnect();
  });
});

Deno.test("Transmission: ESHUTDOWN leads to a soft disconnect", async () => {
  const { stream, tx } = setup();
  const p = tx.submit(read(0, 8).cmd);
  await written(stream, 1);
  stream.feed(
    chunk(
      new Builder(),
      DONE,
      REPLY_TYPE_ERROR,
      1,
      new Builder().u32(108).u16(0),
    )
      .done(),
  );
  await assert.rejects(
    p,
    (e: unknown) => e instanceof NbdCommandError && e.errnoName === "ESHUTDOWN",
  );
  await assert.rejects(
    tx.submit(read(0, 8).cmd),
    /shutting down \(ESHUTDOWN\)/,
  );
  await written(stream, 2);
  const disc = requests(stream)[1]!;
  assert.equal(
    new DataView(disc.buffer, disc.byteOffset).getUint16(6),
    CMD_DISC,
  );
  await tx.disconnect();
});

Deno.test("Transmission: requests in flight are bounded", async () => {
  const { stream, tx } = setup({}, 2);
  const ps = [0, 1, 2, 3].map((i) => tx.submit(read(i * 8, 8).cmd));
  await written(stream, 2);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(
    requests(stream).length,
    2,
    "only two requests may be in flight",
  );
  for (let cookie = 1; cookie <= 4; cookie++) {
    await written(stream, Math.min(cookie + 1, 4));
    stream.feed(
      chunk(
        new Builder(),
        DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        new Builder().u64((cookie - 1) * 8).bytes(pattern(8)),
      ).done(),
    );
  }
  await Promise.all(ps);
  await tx.disconnect();
});

Deno.test("Transmission: an aborted request rejects at once and its late reply is absorbed", async () => {
  const { stream, tx } = setup();
  const ac = new AbortController();
  const p = tx.submit(read(0, 8, ac.signal).cmd);
  await written(stream, 1);
  ac.abort(new Error("gave up"));
  await assert.rejects(p, /gave up/);
  stream.feed(
    chunk(
      new Builder(),
      DONE,
      REPLY_TYPE_OFFSET_DATA,
      1,
      new Builder().u64(0).bytes(pattern(8)),
    ).done(),
  );
  const next = read(0, 8);
  const q = tx.submit(next.cmd);
  await written(stream, 2);
  stream.feed(
    chunk(
      new Builder(),
      DONE,
      REPLY_TYPE_OFFSET_DATA,
      2,
      new Builder().u64(0).bytes(pattern(8, 5)),
    ).done(),
  );
  await q;
  assert.deepEqual(next.buffer, pattern(8, 5));
  await tx.disconnect();
});

Deno.test("Transmission: random server bytes end in a typed error, never a hang", async () => {
  const next = seeded(0x2545f491);
  const magics = [
    0x67446698, // simple
    0x668e33ef, // structured
    0x6e8a278c, // extended
  ];
  for (let round = 0; round < 300; round++) {
    const extendedHeaders = round % 3 === 2;
    const { stream, tx } = setup({
      extendedHeaders,
      metaContexts: new Map([[7, "base:allocation"]]),
    });
    const reads = [read(0, 4096).cmd, read(8192, 512).cmd].map((c) =>
      tx.submit(c)
    );
    await written(stream, 2);
    // Mostly plausible headers (right magic, live cookies) with random
    // fields and payloads, so the checks past the magic get exercised.
    const junk = new Uint8Array(64 + (next() % 512));
    for (let i = 0; i < junk.length; i++) junk[i] = next() & 0xff;
    const v = new DataView(junk.buffer);
    if (next() % 4 !== 0) {
      v.setUint32(0, magics[extendedHeaders ? 2 : next() % 2]!);
      v.setUint32(8, 0);
      v.setUint32(12, 1 + (next() % 2));
    }
    stream.feed(junk, [next() % junk.length]);
    stream.end();
    // A hang fails the round: within() rejects, naming it.
    const settled = await within(
      2000,
      `round ${round}`,
      Promise.allSettled(reads),
    );
    for (const s of settled) {
      if (s.status === "rejected") {
        assert.ok(
          s.reason instanceof NbdProtocolError ||
            s.reason instanceof NbdConnectionClosedError ||
            s.reason instanceof NbdCommandError,
          `round ${round}: ${s.reason}`,
        );
      }
    }
    await tx.disconnect();
  }
});

Deno.test("Transmission: requests made together go out in one write; replies that came together are all handled", async () => {
  const { stream, tx } = setup({ structuredReplies: false });
  // Let the reader start waiting for the server.
  await new Promise((r) => setTimeout(r, 0));
  const reads = Array.from({ length: 5 }, (_, i) => read(i * 4, 4));
  const replies = reads.map((r) => tx.submit(r.cmd));
  await written(stream, 5);
  assert.equal(stream.written.length, 1, "five requests, one write");
  // All five replies in one piece: handled from the buffer, in order.
  const b = new Builder();
  for (let i = 0; i < 5; i++) simple(b, i + 1).bytes(pattern(4, i + 10));
  stream.feed(b.done());
  await within(5_000, "the five reads", Promise.all(replies));
  reads.forEach((r, i) => assert.deepEqual(r.buffer, pattern(4, i + 10)));
  // The next round, made as the replies settle, also goes out together.
  const again = reads.map((r) => tx.submit(r.cmd));
  await written(stream, 10);
  assert.equal(stream.written.length, 2);
  const c = new Builder();
  for (let i = 0; i < 5; i++) simple(c, i + 6).bytes(pattern(4, i + 20));
  stream.feed(c.done(), [3, 17, 30]);
  await within(5_000, "the second five", Promise.all(again));
  reads.forEach((r, i) => assert.deepEqual(r.buffer, pattern(4, i + 20)));
  await tx.disconnect();
});
