import assert from "node:assert/strict";
import { NbdProtocolError } from "../lib/errors.ts";
import {
  decodeExtendedReply,
  decodeStructuredReply,
  encodeOption,
  encodeRequest,
  isPowerOfTwo,
  plural,
  Reader,
  REPLY_FIELD,
  SIZES,
  u64Text,
} from "../lib/_wire.ts";
import { encodeInfoRequest } from "../lib/options/_go.ts";
import { encodeMetaContextRequest } from "../lib/options/_meta_context.ts";

const hex = (b: Uint8Array) =>
  [...b].map((x) => x.toString(16).padStart(2, "0")).join("");

Deno.test("SIZES match the spec's message layouts", () => {
  assert.equal(SIZES.optionHeader, 16);
  assert.equal(SIZES.optionReplyHeader, 20);
  assert.equal(SIZES.request, 28);
  assert.equal(SIZES.extendedRequest, 32);
  assert.equal(SIZES.simpleReply, 16);
  assert.equal(SIZES.structuredReply, 20);
  assert.equal(SIZES.extendedReply, 32);
  assert.equal(SIZES.oldstyleRest, 136);
});

Deno.test("encodeOption() golden bytes", () => {
  assert.equal(
    hex(encodeOption(7, Uint8Array.of(1, 2))),
    "49484156454f5054" + "00000007" + "00000002" + "0102",
  );
  assert.equal(
    hex(encodeOption(2)),
    "49484156454f5054" + "00000002" + "00000000",
  );
});

Deno.test("encodeRequest() golden bytes, compact and extended", () => {
  const req = {
    flags: 1,
    type: 1,
    cookie: 0x0102030405060,
    offset: 0x1000,
    length: 0x200,
  };
  assert.equal(
    hex(encodeRequest(req, false)),
    "25609513" + "0001" + "0001" + "0000102030405060" + "0000000000001000" +
      "00000200",
  );
  assert.equal(
    hex(encodeRequest(req, true)),
    "21e41c71" + "0001" + "0001" + "0000102030405060" + "0000000000001000" +
      "0000000000000200",
  );
});

Deno.test("encodeRequest() golden bytes, bigint offset and length past 2^53", () => {
  const req = {
    flags: 0,
    type: 7,
    cookie: 9,
    offset: 2n ** 62n + 2n ** 53n + 1n,
    length: 2n ** 63n - 512n,
  };
  assert.equal(
    hex(encodeRequest(req, true)),
    "21e41c71" + "0000" + "0007" + "0000000000000009" + "4020000000000001" +
      "7ffffffffffffe00",
  );
  // Compact headers carry a 64-bit offset and a 32-bit length.
  assert.equal(
    hex(encodeRequest({ ...req, length: 0xfffffe00n }, false)),
    "25609513" + "0000" + "0007" + "0000000000000009" + "4020000000000001" +
      "fffffe00",
  );
});

Deno.test("encodeInfoRequest() and encodeMetaContextRequest() golden bytes", () => {
  assert.equal(
    hex(encodeInfoRequest("ab", [3])),
    "00000002" + "6162" + "0001" + "0003",
  );
  assert.equal(
    hex(encodeMetaContextRequest("", ["base:allocation"])),
    "00000000" + "00000001" + "0000000f" +
      hex(new TextEncoder().encode("base:allocation")),
  );
  assert.throws(() => encodeInfoRequest("x".repeat(4097), []), RangeError);
});

Deno.test("reply header decoders read every field", () => {
  const s = Uint8Array.from([
    0x66,
    0x8e,
    0x33,
    0xef,
    0,
    1,
    0,
    2,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    9,
    0,
    0,
    1,
    0,
  ]);
  const h = decodeStructuredReply(s);
  assert.deepEqual([h.flags, h.type, h.cookie, h.length], [1, 2, 9, 256]);
  const e = new Uint8Array(32);
  e.set([0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6]);
  e[15] = 3;
  e[23] = 0x10;
  e[31] = 0x18;
  const x = decodeExtendedReply(e);
  assert.deepEqual([x.flags, x.type, x.cookie, x.offset, x.length], [
    1,
    6,
    3,
    16,
    24,
  ]);
  // Beyond 2^53 a field reads as Infinity, so range checks fail safely;
  // messages read the exact value from the header's bytes.
  e.fill(0xff, 16, 24);
  const huge = decodeExtendedReply(e);
  assert.equal(huge.offset, Infinity);
  assert.equal(huge.bytes, e);
  assert.equal(u64Text(huge.bytes, REPLY_FIELD.offset), "18446744073709551615");
  // A reused header object takes every field of the next header.
  assert.equal(decodeStructuredReply(s, huge), huge);
  assert.deepEqual(
    [huge.kind, huge.offset, huge.length, huge.bytes],
    ["structured", 0, 256, s],
  );
});

Deno.test("REPLY_FIELD places the 64-bit fields of reply headers", () => {
  assert.deepEqual(REPLY_FIELD, { cookie: 8, offset: 16, length: 24 });
  assert.equal(REPLY_FIELD.length + 8, SIZES.extendedReply);
});

Deno.test("plural() counts nouns for messages", () => {
  assert.equal(plural(0, "byte"), "0 bytes");
  assert.equal(plural(1, "byte"), "1 byte");
  assert.equal(plural(2, "request"), "2 requests");
  assert.equal(plural(1n, "byte"), "1 byte");
});

Deno.test("Reader fails with a protocol error instead of reading past the end", async (t) => {
  await t.step("short message", () => {
    const r = new Reader(Uint8Array.of(0, 1), "NBD_REP_INFO", "handshake");
    assert.equal(r.u16(), 1);
    assert.throws(
      () => r.u32(),
      (e: unknown) =>
        e instanceof NbdProtocolError && e.phase === "handshake" &&
        /NBD_REP_INFO is too short/.test(e.message),
    );
  });
  await t.step("length prefix larger than the message", () => {
    const r = new Reader(
      Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0x61),
      "NBD_REP_SERVER",
      "handshake",
    );
    assert.throws(
      () => r.lengthPrefixedString("export name"),
      /claims 4294967295 bytes/,
    );
  });
  await t.step("trailing bytes", () => {
    const r = new Reader(Uint8Array.of(0, 0, 0), "x", "transmission");
    r.u16();
    assert.throws(() => r.expectEnd(), /has 1 unexpected trailing byte$/);
  });
  await t.step("invalid UTF-8", () => {
    const r = new Reader(Uint8Array.of(0xff), "name", "handshake");
    assert.throws(() => r.restString(), /not valid UTF-8/);
  });
});

Deno.test("isPowerOfTwo()", () => {
  assert.ok(isPowerOfTwo(1) && isPowerOfTwo(4096) && isPowerOfTwo(0x80000000));
  assert.ok(!isPowerOfTwo(0) && !isPowerOfTwo(3) && !isPowerOfTwo(0x100000000));
});
