import assert from "node:assert/strict";
import {
  CMD_BLOCK_STATUS,
  CMD_FLAG_REQ_ONE,
  CMD_FLUSH,
  CMD_READ,
  CMD_WRITE,
  commandName,
  EINVAL,
  EIO,
  REPLY_TYPE_BLOCK_STATUS,
} from "../lib/constants.ts";
import { NbdProtocolError } from "../lib/errors.ts";
import {
  addRange,
  claimBits,
  claimRange,
  MAX_RANGES,
  type ReadCoverage,
} from "../lib/_coverage.ts";
import {
  checkChunkHeader,
  checkReplyComplete,
  checkSimpleReply,
  claimDataChunk,
  claimHoleChunk,
  decodeReplyHeader,
  MAX_ERROR_CHUNK,
  parseBlockStatusChunk,
  parseErrorChunk,
  type ReplyContext,
  replyHeaderLength,
  replyHeaderStart,
  type RequestFacts,
  unknownCookie,
} from "../lib/_replies.ts";
import type { ReplyHeader } from "../lib/_wire.ts";
import { seeded } from "./support/random.ts";

/** Golden bytes written as hex, spaces between fields. */
const hex = (s: string) =>
  Uint8Array.from(
    s.replaceAll(" ", "").match(/../g)!.map((b) => parseInt(b, 16)),
  );

const compact: ReplyContext = {
  structuredReplies: true,
  extendedHeaders: false,
  metaContexts: new Map([[7, "base:allocation"], [9, "qemu:x"]]),
  size: 1n << 20n,
};
const extended: ReplyContext = { ...compact, extendedHeaders: true };
const simpleOnly: ReplyContext = {
  ...compact,
  structuredReplies: false,
  metaContexts: new Map(),
};

const read = (offset = 4096, length = 64): RequestFacts => ({
  type: CMD_READ,
  flags: 0,
  offset,
  length,
});
const status = (offset = 4096, length = 8192, flags = 0): RequestFacts => ({
  type: CMD_BLOCK_STATUS,
  flags,
  offset,
  length,
});

const coverage = (): ReadCoverage => ({
  coveredBytes: 0,
  firstStart: 0,
  firstEnd: 0,
  ranges: undefined,
});

/** Asserts a transmission-phase protocol error whose message matches. */
function violates(f: () => unknown, pattern: RegExp): void {
  assert.throws(f, (e: unknown) => {
    assert.ok(e instanceof NbdProtocolError, String(e));
    assert.equal(e.phase, "transmission");
    assert.match(e.message, pattern);
    return true;
  });
}

// Golden reply headers, field by field.
const SIMPLE = hex("67446698 00000005 0000000000000003"); // magic, error, cookie
const STRUCTURED = hex("668e33ef 0001 0001 0000000000000004 00000048"); // magic, flags, type, cookie, length
const EXTENDED = hex(
  "6e8a278c 0001 0005 0000000000000005 0000000000001000 0000000000000018",
); // magic, flags, type, cookie, offset, length

/** A header decoded the way the read loop does it. */
function header(bytes: Uint8Array, ctx: ReplyContext): ReplyHeader {
  const start = bytes.subarray(0, replyHeaderStart(ctx));
  return decodeReplyHeader(bytes.subarray(0, replyHeaderLength(start, ctx)));
}

/** A header with the given fields (what the decoders produce). */
function chunkHeader(
  type: number,
  length: number,
  flags = 0,
  kind: ReplyHeader["kind"] = "structured",
  offset = 0,
): ReplyHeader {
  return {
    kind,
    error: 0,
    flags,
    type,
    cookie: 1,
    offset,
    length,
    bytes: new Uint8Array(32),
  };
}

Deno.test("commandName() names every command with one fallback", () => {
  assert.equal(commandName(CMD_READ), "NBD_CMD_READ");
  assert.equal(commandName(CMD_BLOCK_STATUS), "NBD_CMD_BLOCK_STATUS");
  assert.equal(commandName(99), "command 99");
});

Deno.test("reply headers: golden bytes, the magic decides the length", async (t) => {
  await t.step(
    "replyHeaderStart() reads a whole extended header at once",
    () => {
      assert.equal(replyHeaderStart(compact), 16);
      assert.equal(replyHeaderStart(extended), 32);
    },
  );

  await t.step("a simple reply", () => {
    assert.equal(replyHeaderLength(SIMPLE, compact), 16);
    assert.equal(replyHeaderLength(SIMPLE, simpleOnly), 16);
    const h = header(SIMPLE, compact);
    assert.deepEqual(
      [h.kind, h.error, h.flags, h.type, h.cookie, h.length],
      ["simple", 5, 0, 0, 3, 0],
    );
  });

  await t.step("a structured chunk", () => {
    assert.equal(replyHeaderLength(STRUCTURED, compact), 20);
    const h = header(STRUCTURED, compact);
    assert.deepEqual(
      [h.kind, h.flags, h.type, h.cookie, h.length],
      ["structured", 1, 1, 4, 0x48],
    );
  });

  await t.step("an extended chunk", () => {
    assert.equal(replyHeaderLength(EXTENDED, extended), 32);
    const h = header(EXTENDED, extended);
    assert.deepEqual(
      [h.kind, h.flags, h.type, h.cookie, h.offset, h.length],
      ["extended", 1, 5, 5, 4096, 24],
    );
  });

  await t.step(
    "the first 4 bytes (the magic) suffice, whatever follows",
    () => {
      for (
        const [bytes, ctx, want] of [
          [SIMPLE, compact, 16],
          [STRUCTURED, compact, 20],
          [EXTENDED, extended, 32],
        ] as const
      ) {
        for (let n = 4; n <= bytes.length; n++) {
          assert.equal(replyHeaderLength(bytes.subarray(0, n), ctx), want);
        }
      }
    },
  );

  await t.step("one reused object takes every kind in turn", () => {
    const out = decodeReplyHeader(SIMPLE);
    assert.equal(decodeReplyHeader(EXTENDED, out), out);
    assert.deepEqual([out.kind, out.offset, out.length], [
      "extended",
      4096,
      24,
    ]);
    decodeReplyHeader(SIMPLE, out);
    assert.deepEqual([out.kind, out.error, out.offset, out.length], [
      "simple",
      5,
      0,
      0,
    ]);
    assert.throws(() => decodeReplyHeader(new Uint8Array(17)), RangeError);
  });

  await t.step("a magic the connection does not allow", () => {
    violates(
      () => replyHeaderLength(STRUCTURED, simpleOnly),
      /^Bad reply magic 0x668e33ef \(expected a simple reply\)$/,
    );
    violates(
      () => replyHeaderLength(EXTENDED, compact),
      /^Bad reply magic 0x6e8a278c \(expected a structured reply\)$/,
    );
    violates(
      () => replyHeaderLength(hex("00000001"), compact),
      /^Bad reply magic 0x00000001/,
    );
    violates(
      () => replyHeaderLength(SIMPLE, extended),
      /^Bad reply magic 0x67446698/,
    );
  });

  await t.step("unknownCookie() names the cookie", () => {
    violates(
      () => {
        throw unknownCookie(header(SIMPLE, compact));
      },
      /^Server replied to unknown cookie 3$/,
    );
  });
});

Deno.test("messages print 64-bit fields exactly, never Infinity", async (t) => {
  // magic, flags, type, cookie, offset, length: each past 2^53
  const huge = hex(
    "6e8a278c 0000 0001 ffffffffffffffff fffffffffffffff0 8000000000000000",
  );
  const h = header(huge, extended);
  assert.deepEqual([h.cookie, h.offset, h.length], [
    Infinity,
    Infinity,
    Infinity,
  ]);

  await t.step("a cookie", () => {
    violates(
      () => {
        throw unknownCookie(h);
      },
      /^Server replied to unknown cookie 18446744073709551615$/,
    );
  });

  await t.step("an extended header's offset", () => {
    violates(
      () => checkChunkHeader(read(), h, extended),
      /names offset 18446744073709551600, but the request was at 4096$/,
    );
  });

  await t.step("an extended header's payload length", () => {
    const at = hex(
      "6e8a278c 0001 0001 0000000000000001 0000000000001000 8000000000000000",
    );
    violates(
      () => checkChunkHeader(read(), header(at, extended), extended),
      /: payload length 9223372036854775808 does not fit the request$/,
    );
    for (const type of ["0000", "0002", "8001"]) {
      const other = at.slice();
      other.set(hex(type), 6);
      violates(
        () => checkChunkHeader(read(), header(other, extended), extended),
        /: payload length 9223372036854775808(, expected| is out of range)/,
      );
    }
  });

  await t.step("a data or hole chunk's offset", () => {
    violates(
      () => claimDataChunk(read(), coverage(), hex("ffffffffffffffff"), 1),
      /: range 18446744073709551615\+1 lies outside the request$/,
    );
    violates(
      () =>
        claimHoleChunk(read(), coverage(), hex("0020000000000000 00000010")),
      /: range 9007199254740992\+16 lies outside the request$/,
    );
  });
});

Deno.test("checkSimpleReply()", async (t) => {
  const ok = decodeReplyHeader(hex("67446698 00000000 0000000000000001"));
  const failed = decodeReplyHeader(hex("67446698 00000005 0000000000000001"));

  await t.step("a read's data follows only without structured replies", () => {
    assert.equal(checkSimpleReply(read(0, 512), ok, simpleOnly), 512);
    violates(
      () => checkSimpleReply(read(0, 512), ok, compact),
      /simple reply with data to NBD_CMD_READ although structured replies were negotiated/,
    );
  });

  await t.step("an error reply carries nothing, for any command", () => {
    for (const req of [read(), status()]) {
      assert.equal(checkSimpleReply(req, failed, compact), 0);
    }
  });

  await t.step("block status needs extents", () => {
    violates(
      () => checkSimpleReply(status(), ok, compact),
      /^Server sent a simple reply without extents to NBD_CMD_BLOCK_STATUS$/,
    );
  });

  await t.step("other commands succeed with no payload", () => {
    const flush = { type: CMD_FLUSH, flags: 0, offset: 0, length: 0 };
    assert.equal(checkSimpleReply(flush, ok, compact), 0);
  });
});

Deno.test("checkChunkHeader() bounds every length before it is used", async (t) => {
  const cases: Array<{
    name: string;
    req: RequestFacts;
    h: ReplyHeader;
    ctx?: ReplyContext;
    error?: RegExp;
  }> = [
    { name: "NONE with DONE", req: read(), h: chunkHeader(0, 0, 1) },
    {
      name: "NONE without DONE",
      req: read(),
      h: chunkHeader(0, 0, 0),
      error:
        /^0 \(NBD_REPLY_TYPE_NONE\) chunk for NBD_CMD_READ \(offset 4096, length 64\): NBD_REPLY_FLAG_DONE is not set$/,
    },
    {
      name: "NONE with a payload",
      req: read(),
      h: chunkHeader(0, 4, 1),
      error: /payload length 4, expected 0$/,
    },
    { name: "the smallest data chunk", req: read(), h: chunkHeader(1, 9) },
    { name: "the largest data chunk", req: read(), h: chunkHeader(1, 72) },
    {
      name: "a data chunk with no data",
      req: read(),
      h: chunkHeader(1, 8),
      error: /payload length 8 does not fit the request$/,
    },
    {
      name: "a data chunk larger than the request",
      req: read(),
      h: chunkHeader(1, 73),
      error: /payload length 73 does not fit the request$/,
    },
    {
      name: "data for a write",
      req: { type: CMD_WRITE, flags: 0, offset: 0, length: 64 },
      h: chunkHeader(1, 16),
      error:
        /^1 \(NBD_REPLY_TYPE_OFFSET_DATA\) chunk for NBD_CMD_WRITE .*: not a valid reply to NBD_CMD_WRITE$/,
    },
    { name: "a hole", req: read(), h: chunkHeader(2, 12) },
    {
      name: "a hole of 13 bytes",
      req: read(),
      h: chunkHeader(2, 13),
      error: /payload length 13, expected 12$/,
    },
    {
      name: "a hole for block status",
      req: status(),
      h: chunkHeader(2, 12),
      error: /not a valid reply to NBD_CMD_BLOCK_STATUS$/,
    },
    { name: "one compact extent", req: status(), h: chunkHeader(5, 12) },
    {
      name: "a compact status chunk with no extent",
      req: status(),
      h: chunkHeader(5, 4),
      error: /payload length 4 is invalid$/,
    },
    {
      name: "a compact status chunk with half an extent",
      req: status(),
      h: chunkHeader(5, 16),
      error: /payload length 16 is invalid$/,
    },
    {
      name: "a status chunk over the bound",
      req: status(),
      h: chunkHeader(5, 4 + 8 * (8 * 1024 * 1024)),
      error: /is invalid$/,
    },
    {
      name: "extents for a read",
      req: read(),
      h: chunkHeader(5, 12),
      error: /not a valid reply to NBD_CMD_READ$/,
    },
    {
      name: "wide extents without extended headers",
      req: status(),
      h: chunkHeader(6, 24),
      error: /sent without extended headers$/,
    },
    {
      name: "one wide extent",
      req: status(),
      h: chunkHeader(6, 24, 0, "extended", 4096),
      ctx: extended,
    },
    {
      name: "a wide chunk with a short extent",
      req: status(),
      h: chunkHeader(6, 32, 0, "extended", 4096),
      ctx: extended,
      error: /payload length 32 is invalid$/,
    },
    {
      name: "the smallest error chunk",
      req: read(),
      h: chunkHeader(0x8001, 6),
    },
    {
      name: "the largest error chunk",
      req: read(),
      h: chunkHeader(0x8002, MAX_ERROR_CHUNK),
    },
    {
      name: "an error chunk too short for its errno",
      req: read(),
      h: chunkHeader(0x8001, 5),
      error:
        /^32769 \(NBD_REPLY_TYPE_ERROR\) chunk .*: payload length 5 is out of range$/,
    },
    {
      name: "an error chunk over the bound",
      req: read(),
      h: chunkHeader(0x8001, MAX_ERROR_CHUNK + 1),
      error: /payload length 4111 is out of range$/,
    },
    {
      name: "an unknown error type is still an error chunk",
      req: read(),
      h: chunkHeader(0x8099, 6),
    },
    {
      name: "an unknown type",
      req: read(),
      h: chunkHeader(99, 0, 1),
      error: /^99 \(unknown\) chunk for NBD_CMD_READ .*: unknown chunk type$/,
    },
    {
      name: "an extended chunk at another offset",
      req: read(),
      h: chunkHeader(1, 16, 0, "extended", 4608),
      ctx: extended,
      error:
        /^Extended reply to NBD_CMD_READ names offset 4608, but the request was at 4096$/,
    },
  ];
  for (const c of cases) {
    await t.step(c.name, () => {
      const run = () => checkChunkHeader(c.req, c.h, c.ctx ?? compact);
      if (c.error) violates(run, c.error);
      else run();
    });
  }
});

Deno.test("claimDataChunk() and claimHoleChunk() place each range in the buffer", async (t) => {
  await t.step("golden payloads, out of order, fill the request once", () => {
    const req = read(4096, 64);
    const cov = coverage();
    assert.equal(claimDataChunk(req, cov, hex("0000000000001020"), 16), 32);
    assert.deepEqual(
      claimHoleChunk(req, cov, hex("0000000000001030 00000010")),
      { start: 48, end: 64 },
    );
    assert.equal(claimDataChunk(req, cov, hex("0000000000001000"), 32), 0);
    assert.equal(cov.coveredBytes, 64);
    assert.deepEqual(cov.ranges, [[0, 64]], "touching ranges merge");
    checkReplyComplete(req, cov.coveredBytes, undefined, compact);
  });

  await t.step("a reply in one chunk allocates no ranges", () => {
    const cov = coverage();
    assert.equal(claimDataChunk(read(), cov, hex("0000000000001000"), 64), 0);
    assert.deepEqual(
      [cov.coveredBytes, cov.firstStart, cov.firstEnd, cov.ranges],
      [64, 0, 64, undefined],
    );
  });

  await t.step("a range outside the request", () => {
    violates(
      () => claimDataChunk(read(), coverage(), hex("0000000000000ff8"), 16),
      /^1 \(NBD_REPLY_TYPE_OFFSET_DATA\) chunk for NBD_CMD_READ \(offset 4096, length 64\): range 4088\+16 lies outside the request$/,
    );
    violates(
      () => claimDataChunk(read(), coverage(), hex("0000000000001038"), 16),
      /range 4152\+16 lies outside the request$/,
    );
    violates(
      () =>
        claimHoleChunk(read(), coverage(), hex("0000000000001000 00000041")),
      /^2 \(NBD_REPLY_TYPE_OFFSET_HOLE\) chunk .*: range 4096\+65 lies outside/,
    );
  });

  await t.step("a range over data already received", () => {
    const cov = coverage();
    claimDataChunk(read(), cov, hex("0000000000001000"), 16);
    violates(
      () => claimHoleChunk(read(), cov, hex("000000000000100f 00000004")),
      /range 4111\+4 overlaps data already received$/,
    );
    claimDataChunk(read(), cov, hex("0000000000001030"), 16);
    violates(
      () => claimDataChunk(read(), cov, hex("0000000000001028"), 9),
      /range 4136\+9 overlaps/,
    );
    assert.equal(cov.coveredBytes, 32, "a refused range is not counted");
  });

  await t.step("a hole of length 0", () => {
    violates(
      () =>
        claimHoleChunk(read(), coverage(), hex("0000000000001000 00000000")),
      /hole of length 0$/,
    );
  });

  await t.step("every truncated payload is a protocol error", () => {
    const hole = hex("0000000000001000 00000010");
    for (let n = 0; n < hole.length; n++) {
      violates(
        () => claimHoleChunk(read(), coverage(), hole.subarray(0, n)),
        new RegExp(
          `^NBD_REPLY_TYPE_OFFSET_HOLE payload has ${n} ${
            n === 1 ? "byte" : "bytes"
          }, expected 12$`,
        ),
      );
    }
    for (let n = 0; n < 8; n++) {
      violates(
        () => claimDataChunk(read(), coverage(), hole.subarray(0, n), 8),
        /^NBD_REPLY_TYPE_OFFSET_DATA payload has/,
      );
    }
  });
});

Deno.test("claimRange() keeps a read's coverage exact in linear time", async (t) => {
  /**
   * Claims `ranges` in turn and checks each answer against a byte-by-byte
   * model: a claim succeeds exactly when none of its bytes is covered yet.
   */
  function replay(
    length: number,
    ranges: Iterable<readonly [number, number]>,
  ): ReadCoverage {
    const cov = coverage();
    const model = new Uint8Array(length);
    let covered = 0;
    for (const [start, end] of ranges) {
      const free = model.subarray(start, end).every((b) => b === 0);
      assert.equal(
        claimRange(cov, start, end, length),
        free,
        `[${start}, ${end})`,
      );
      if (free) {
        model.fill(1, start, end);
        covered += end - start;
      }
      assert.equal(cov.coveredBytes, covered);
    }
    return cov;
  }

  await t.step(
    "addRange() merges touching neighbours, refuses overlaps",
    () => {
      const ranges: Array<[number, number]> = [];
      assert.ok(addRange(ranges, 10, 20));
      assert.ok(addRange(ranges, 40, 50));
      assert.deepEqual(ranges, [[10, 20], [40, 50]], "a gap stays apart");
      assert.ok(addRange(ranges, 0, 10), "touches the next");
      assert.ok(addRange(ranges, 20, 25), "touches the previous");
      assert.deepEqual(ranges, [[0, 25], [40, 50]]);
      assert.ok(!addRange(ranges, 5, 6));
      assert.ok(!addRange(ranges, 24, 26));
      assert.ok(!addRange(ranges, 39, 41));
      assert.ok(!addRange(ranges, 30, 60), "spans a whole range");
      assert.ok(addRange(ranges, 25, 40), "touches both: one range left");
      assert.deepEqual(ranges, [[0, 50]]);
    },
  );

  await t.step("claimRange(): the first range, then merged ranges", () => {
    const cov = coverage();
    assert.ok(claimRange(cov, 10, 20, 30));
    assert.equal(cov.ranges, undefined);
    assert.ok(!claimRange(cov, 15, 16, 30), "overlaps the first range");
    assert.ok(!claimRange(cov, 0, 11, 30));
    assert.ok(claimRange(cov, 0, 10, 30));
    assert.ok(claimRange(cov, 20, 21, 30));
    assert.deepEqual(cov.ranges, [[0, 21]]);
    assert.equal(cov.coveredBytes, 21, "a gap of 9 bytes is left");
  });

  await t.step("one-byte chunks, reversed, stay one range", () => {
    const length = 100_000;
    const cov = coverage();
    for (let at = length - 1; at >= 0; at--) {
      assert.ok(claimRange(cov, at, at + 1, length));
      assert.ok((cov.ranges?.length ?? 1) === 1, `at ${at}`);
    }
    assert.equal(cov.coveredBytes, length);
    for (const at of [0, 1, length / 2, length - 1]) {
      assert.ok(!claimRange(cov, at, at + 1, length), `again at ${at}`);
    }
  });

  await t.step("apart chunks switch to a bitmap that keeps every range", () => {
    const length = 4 * (MAX_RANGES + 8);
    const apart = Array.from(
      { length: MAX_RANGES + 8 },
      (_, i) => [i * 4 + 1, i * 4 + 3] as const,
    );
    const cov = replay(length, apart);
    assert.equal(cov.ranges, undefined);
    assert.ok(cov.bitmap, "past MAX_RANGES ranges, a bitmap");
    // Every byte against the model: overlaps refused, gaps filled.
    const cells = Array.from({ length }, (_, at) => [at, at + 1] as const);
    replay(length, [...apart, ...cells]);
    assert.equal(cov.coveredBytes, length / 2);
  });

  await t.step("every split of a read into two, in both orders", () => {
    const length = 70;
    for (let k = 1; k < length; k++) {
      for (
        const parts of [
          [[0, k], [k, length]],
          [[k, length], [0, k]],
        ] as const
      ) {
        assert.equal(replay(length, parts).coveredBytes, length, `at ${k}`);
      }
      replay(length, [[0, k + 1], [k, length]]);
      replay(length, [[k - 1, length], [0, k]]);
      assert.equal(
        replay(length, [[0, k]]).coveredBytes,
        k,
        "a gap is left uncovered",
      );
    }
  });

  await t.step("random chunks in random order against the model", () => {
    const next = seeded(22);
    let bitmaps = 0;
    for (let round = 0; round < 40; round++) {
      const length = 1 + next() % 5000;
      const ranges: Array<[number, number]> = [];
      // A random cut into chunks, shuffled, with random overlapping claims.
      for (let at = 0; at < length;) {
        const size = 1 + next() % (round % 2 ? 4 : 200);
        ranges.push([at, Math.min(length, at + size)]);
        at += size;
      }
      for (let i = ranges.length - 1; i > 0; i--) {
        const j = next() % (i + 1);
        [ranges[i], ranges[j]] = [ranges[j]!, ranges[i]!];
      }
      // Each overlapping claim comes after a chunk it overlaps.
      const chunks = [...ranges];
      for (let i = 0; i < 20; i++) {
        const chunk = chunks[next() % chunks.length]!;
        const after = ranges.indexOf(chunk);
        const [from, to] = chunk;
        const start = from + next() % (to - from);
        const end = start + 1 + next() % (length - start);
        const at = after + 1 + next() % (ranges.length - after);
        ranges.splice(at, 0, [start, end]);
      }
      const cov = replay(length, ranges);
      assert.equal(cov.coveredBytes, length);
      if (cov.bitmap) bitmaps++;
    }
    assert.ok(bitmaps > 0, "some rounds use the bitmap");
  });

  await t.step("claimBits(): every range over three words", () => {
    const length = 96;
    const taken = [[0, 1], [31, 33], [40, 64], [95, 96]] as const;
    for (let start = 0; start < length; start++) {
      for (let end = start + 1; end <= length; end++) {
        const bitmap = new Uint32Array(3);
        for (const [from, to] of taken) assert.ok(claimBits(bitmap, from, to));
        const before = bitmap.slice();
        const free = taken.every(([from, to]) => end <= from || start >= to);
        assert.equal(claimBits(bitmap, start, end), free, `${start}-${end}`);
        if (!free) assert.deepEqual(bitmap, before, "nothing is set");
        for (let at = 0; at < length; at++) {
          const set = ((bitmap[at >>> 5]! >>> (at & 31)) & 1) === 1;
          const want = taken.some(([from, to]) => at >= from && at < to) ||
            (free && at >= start && at < end);
          assert.equal(set, want, `${start}-${end} bit ${at}`);
        }
      }
    }
  });
});

Deno.test("parseErrorChunk()", async (t) => {
  // errno, message length, message ("disk died"), and for ERROR_OFFSET the offset
  const plain = hex("00000005 0009 6469736b2064696564");
  const withOffset = hex("0000001c 0000 0000000000001010");

  await t.step("golden payloads", () => {
    assert.deepEqual(parseErrorChunk(read(), 0x8001, plain), {
      errno: EIO,
      message: "disk died",
      offset: undefined,
    });
    assert.deepEqual(parseErrorChunk(read(), 0x8002, withOffset), {
      errno: 28,
      message: "",
      offset: 4112,
    });
  });

  await t.step("errno 0 still reports a failure (EINVAL)", () => {
    const e = parseErrorChunk(read(), 0x8001, hex("00000000 0000"));
    assert.equal(e.errno, EINVAL);
  });

  await t.step("a message is decoded leniently", () => {
    const e = parseErrorChunk(read(), 0x8001, hex("00000005 0002 ff61"));
    assert.equal(e.message, "\ufffda");
  });

  await t.step("every truncated payload is a protocol error", () => {
    const payloads: Array<[number, Uint8Array]> = [
      [0x8001, plain],
      [0x8002, withOffset],
    ];
    for (const [type, payload] of payloads) {
      for (let n = 0; n < payload.length; n++) {
        violates(
          () => parseErrorChunk(read(), type, payload.subarray(0, n)),
          /too short|exceeds the/,
        );
      }
    }
  });

  await t.step("a message that overruns the payload", () => {
    violates(
      () => parseErrorChunk(read(), 0x8001, hex("00000005 0064 6869")),
      /^32769 \(NBD_REPLY_TYPE_ERROR\) chunk for NBD_CMD_READ \(offset 4096, length 64\): message length 100 exceeds the 2 bytes left$/,
    );
  });

  await t.step("trailing bytes after NBD_REPLY_TYPE_ERROR", () => {
    violates(
      () => parseErrorChunk(read(), 0x8001, hex("00000005 0000 00")),
      /^32769 \(NBD_REPLY_TYPE_ERROR\) payload has 1 unexpected trailing byte$/,
    );
  });

  await t.step("an unknown error type may carry more", () => {
    const e = parseErrorChunk(read(), 0x8099, hex("00000005 0000 0102"));
    assert.deepEqual(e, { errno: EIO, message: "", offset: undefined });
  });

  await t.step("an error offset outside the request", () => {
    for (const at of ["0000000000000fff", "0000000000001040"]) {
      violates(
        () => parseErrorChunk(read(), 0x8002, hex(`00000005 0000 ${at}`)),
        /error offset \d+ lies outside the request$/,
      );
    }
  });
});

Deno.test("parseBlockStatusChunk()", async (t) => {
  // context id, then (length, flags) per extent
  const narrow = hex("00000007 00001000 00000001 00001000 00000002");
  // context id, descriptor count, then (length, flags) per extent, 64-bit
  const wide = hex(
    "00000009 00000002 0000000000001000 0000000000000003 0000000000001000 0000000000000000",
  );

  await t.step("golden payloads, compact and extended", () => {
    assert.deepEqual(
      parseBlockStatusChunk(status(), 5, narrow, compact, new Map()),
      {
        id: 7,
        extents: [
          { offset: 4096, length: 4096, flags: 1 },
          { offset: 8192, length: 4096, flags: 2 },
        ],
      },
    );
    assert.deepEqual(
      parseBlockStatusChunk(status(), 6, wide, extended, new Map()),
      {
        id: 9,
        extents: [
          { offset: 4096, length: 4096, flags: 3 },
          { offset: 8192, length: 4096, flags: 0 },
        ],
      },
    );
  });

  await t.step("a bigint request gets bigint extents, exact past 2^53", () => {
    const huge: ReplyContext = { ...extended, size: 1n << 62n };
    const at = (1n << 53n) + 1n;
    const req: RequestFacts = {
      type: CMD_BLOCK_STATUS,
      flags: 0,
      offset: at,
      length: (1n << 62n) - at,
    };
    // 2^53 + 1 bytes of data, then the rest of the export a hole
    const payload = hex(
      "00000009 00000002 0020000000000001 0000000000000000 3fbffffffffffffe 0000000000000001",
    );
    assert.deepEqual(parseBlockStatusChunk(req, 6, payload, huge, new Map()), {
      id: 9,
      extents: [
        { offset: at, length: (1n << 53n) + 1n, flags: 0 },
        {
          offset: (1n << 54n) + 2n,
          length: (1n << 62n) - (1n << 54n) - 2n,
          flags: 1,
        },
      ],
    });
    // One byte more runs past the end of the export.
    const over = payload.slice();
    over[payload.length - 9] = 0xff;
    violates(
      () => parseBlockStatusChunk(req, 6, over, huge, new Map()),
      /extent 1 runs past the end of the export$/,
    );
  });

  await t.step('a descriptor count of 0 means "not counted"', () => {
    const p = wide.slice();
    p.fill(0, 4, 8);
    assert.equal(
      parseBlockStatusChunk(status(), 6, p, extended, new Map()).extents.length,
      2,
    );
  });

  await t.step("every truncation parses whole extents or fails typed", () => {
    for (
      const [type, payload, ctx, head, each] of [
        [5, narrow, compact, 4, 8],
        [6, wide, extended, 8, 16],
      ] as const
    ) {
      for (let n = 0; n < payload.length; n++) {
        const cut = payload.subarray(0, n);
        const whole = n >= head + each && (n - head) % each === 0;
        // The extended kind states its count, so a cut there never passes.
        if (whole && type === REPLY_TYPE_BLOCK_STATUS) {
          const got = parseBlockStatusChunk(
            status(),
            type,
            cut,
            ctx,
            new Map(),
          );
          assert.equal(got.extents.length, (n - head) / each);
        } else {
          violates(
            () => parseBlockStatusChunk(status(), type, cut, ctx, new Map()),
            /payload length \d+ is invalid|descriptor count 2, but 1 follow/,
          );
        }
      }
    }
  });

  const bad: Array<{
    name: string;
    payload: Uint8Array;
    error: RegExp;
    req?: RequestFacts;
    wide?: boolean;
  }> = [
    {
      name: "an unknown context id",
      payload: hex("00000008 00001000 00000000"),
      error:
        /^5 \(NBD_REPLY_TYPE_BLOCK_STATUS\) chunk for NBD_CMD_BLOCK_STATUS \(offset 4096, length 8192\): unknown metadata context id 8$/,
    },
    {
      name: "an extent of length 0",
      payload: hex("00000007 00000000 00000000"),
      error: /extent 0 has length 0$/,
    },
    {
      name: "an extent past the request",
      payload: hex("00000007 00002000 00000000 00000200 00000000"),
      error: /extent 1 starts beyond the request$/,
    },
    {
      name: "an extent past the end of the export",
      payload: hex("00000007 00100000 00000000"),
      error: /extent 0 runs past the end of the export$/,
    },
    {
      name: "two extents despite REQ_ONE",
      payload: hex("00000007 00001000 00000000 00001000 00000000"),
      error: /2 extents despite NBD_CMD_FLAG_REQ_ONE$/,
      req: status(4096, 8192, CMD_FLAG_REQ_ONE),
    },
    {
      name: "a single extent longer than a REQ_ONE request",
      payload: hex("00000007 00001001 00000000"),
      error: /the single extent is longer than the request$/,
      req: status(4096, 4096, CMD_FLAG_REQ_ONE),
    },
    {
      name: "a descriptor count that does not match",
      payload: hex("00000009 00000005 0000000000001000 0000000000000000"),
      error: /descriptor count 5, but 1 follows$/,
      wide: true,
    },
    {
      name: "a 64-bit length that would round into range",
      payload: hex("00000009 00000001 0020000000000001 0000000000000000"),
      error: /extent 0 runs past the end of the export$/,
      wide: true,
    },
    {
      name: "flags wider than a safe integer",
      payload: hex("00000009 00000001 0000000000001000 0020000000000000"),
      error: /extent 0 flags 0x20000000000000 are too wide$/,
      wide: true,
    },
  ];
  for (const c of bad) {
    await t.step(c.name, () => {
      violates(
        () =>
          parseBlockStatusChunk(
            c.req ?? status(),
            c.wide ? 6 : 5,
            c.payload,
            c.wide ? extended : compact,
            new Map(),
          ),
        c.error,
      );
    });
  }

  await t.step("a second chunk for one context", () => {
    violates(
      () =>
        parseBlockStatusChunk(status(), 5, narrow, compact, new Map([[7, []]])),
      /second chunk for metadata context id 7$/,
    );
  });
});

Deno.test("checkReplyComplete()", async (t) => {
  await t.step("a read must be covered in full", () => {
    checkReplyComplete(read(0, 64), 64, undefined, compact);
    violates(
      () => checkReplyComplete(read(0, 64), 48, undefined, compact),
      /^Server's reply to NBD_CMD_READ \(offset 0\) covered 48 of 64 bytes$/,
    );
  });

  await t.step("block status must answer every context", () => {
    const both = new Map([[7, []], [9, []]]);
    checkReplyComplete(status(), 0, both, compact);
    violates(
      () => checkReplyComplete(status(), 0, new Map([[7, []]]), compact),
      /^Server's reply to NBD_CMD_BLOCK_STATUS \(offset 4096\) has no extents for "qemu:x"$/,
    );
  });

  await t.step("nothing to check without structured replies", () => {
    checkReplyComplete(read(0, 64), 0, undefined, simpleOnly);
  });
});
