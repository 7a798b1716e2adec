import assert from "node:assert/strict";
import {
  CLISERV_MAGIC,
  IHAVEOPT,
  INFO_BLOCK_SIZE,
  INFO_DESCRIPTION,
  INFO_EXPORT,
  NBDMAGIC,
  OPT_EXPORT_NAME,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_LIST,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  OPTION_REPLY_MAGIC,
  REP_ACK,
  REP_ERR_POLICY,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_INFO,
  REP_META_CONTEXT,
  REP_SERVER,
} from "../lib/constants.ts";
import {
  NbdConnectionClosedError,
  NbdError,
  NbdOptionError,
  NbdProtocolError,
} from "../lib/errors.ts";
import { negotiate } from "../lib/_handshake.ts";
import { Transport } from "../lib/transport.ts";
import { ScriptedStream } from "./support/byte_script.ts";
import { seeded } from "./support/random.ts";
import {
  Builder,
  infoExportPayload,
  newstyleGreeting,
  optionReply,
} from "./support/server.ts";
import { within } from "./support/wait.ts";

// The server's side of a script, appended to one builder in order; the
// messages come from the scripted server's encoders.

function greeting(flags = 3): Builder {
  return new Builder().bytes(newstyleGreeting(flags));
}

function reply(
  b: Builder,
  option: number,
  type: number,
  payload?: Builder | Uint8Array,
): Builder {
  return b.bytes(
    optionReply(
      option,
      type,
      payload instanceof Builder ? payload.done() : payload,
    ),
  );
}

function info(b: Builder, size = 1n << 20n, flags = 0x0d6d): Builder {
  return reply(b, OPT_GO, REP_INFO, infoExportPayload(size, flags));
}

/** A fixed-newstyle server with structured replies and base:allocation. */
function fullServer(): Uint8Array {
  const b = greeting();
  reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
  reply(b, OPT_STRUCTURED_REPLY, REP_ACK);
  reply(
    b,
    OPT_SET_META_CONTEXT,
    REP_META_CONTEXT,
    new Builder().u32(7).string("base:allocation"),
  );
  reply(b, OPT_SET_META_CONTEXT, REP_ACK);
  reply(b, OPT_GO, REP_INFO, new Builder().u16(99).string("future info"));
  reply(
    b,
    OPT_GO,
    REP_INFO,
    new Builder().u16(INFO_BLOCK_SIZE).u32(512).u32(4096).u32(1 << 20),
  );
  reply(
    b,
    OPT_GO,
    REP_INFO,
    new Builder().u16(INFO_DESCRIPTION).string("a disk"),
  );
  info(b);
  reply(b, OPT_GO, REP_ACK);
  return b.done();
}

async function run(
  bytes: Uint8Array,
  cuts: number[] = [],
  options: Parameters<typeof negotiate>[1] = {},
) {
  const stream = new ScriptedStream(bytes, cuts);
  const transport = new Transport(stream);
  try {
    const result = await negotiate(transport, options);
    return { result, stream };
  } finally {
    transport.close();
  }
}

/** Options the client sent, in order. */
function sentOptions(sent: Uint8Array): number[] {
  const v = new DataView(sent.buffer, sent.byteOffset, sent.byteLength);
  const out: number[] = [];
  let at = 4; // client flags
  while (at + 16 <= sent.length) {
    if (v.getBigUint64(at) !== IHAVEOPT) break;
    out.push(v.getUint32(at + 8));
    at += 16 + v.getUint32(at + 12);
  }
  return out;
}

Deno.test("negotiate() with a fixed-newstyle server", async (t) => {
  const bytes = fullServer();
  await t.step(
    "reads every field and skips unknown NBD_INFO types",
    async () => {
      const { result, stream } = await run(bytes, [], {
        metaContexts: ["base:allocation"],
      });
      assert.equal(result.protocol, "fixed newstyle");
      assert.equal(result.size, 1n << 20n);
      assert.equal(result.description, "a disk");
      assert.deepEqual(result.blockSize, {
        minimum: 512,
        preferred: 4096,
        maximum: 1 << 20,
      });
      assert.ok(result.structuredReplies && !result.extendedHeaders);
      assert.deepEqual([...result.metaContexts], [[7, "base:allocation"]]);
      assert.deepEqual(sentOptions(stream.sent), [
        OPT_EXTENDED_HEADERS,
        OPT_STRUCTURED_REPLY,
        OPT_SET_META_CONTEXT,
        OPT_GO,
      ]);
      // Client flags: fixed newstyle and no zeroes, as the server offered.
      assert.deepEqual([...stream.sent.subarray(0, 4)], [0, 0, 0, 3]);
    },
  );
  await t.step(
    "gives the same result for the server's bytes split at every boundary",
    async () => {
      for (let cut = 1; cut < bytes.length; cut++) {
        const { result } = await run(bytes, [cut], {
          metaContexts: ["base:allocation"],
        });
        assert.equal(result.size, 1n << 20n, `split at ${cut}`);
        assert.equal(result.metaContexts.get(7), "base:allocation");
      }
    },
  );
  await t.step("reads one byte at a time", async () => {
    const cuts = Array.from({ length: bytes.length }, (_, i) => i);
    const { result } = await run(bytes, cuts, {
      metaContexts: ["base:allocation"],
    });
    assert.equal(result.description, "a disk");
  });
  await t.step("fails with a protocol error at every truncation", async () => {
    for (const len of [1, 15, 17, 30, bytes.length - 1]) {
      await assert.rejects(
        run(bytes.subarray(0, len), [], { metaContexts: ["base:allocation"] }),
        (e: unknown) =>
          e instanceof NbdProtocolError ||
          e instanceof NbdConnectionClosedError,
        `truncated at ${len}`,
      );
    }
  });
});

Deno.test("negotiate() with an oldstyle server", async () => {
  const b = new Builder().u64(NBDMAGIC).u64(CLISERV_MAGIC).u64(4096).u32(3)
    .zeroes(124);
  const { result, stream } = await run(b.done());
  assert.equal(result.protocol, "oldstyle");
  assert.equal(result.size, 4096n);
  assert.equal(result.flags, 3);
  assert.equal(stream.sent.length, 0, "oldstyle needs no reply");
  await assert.rejects(
    run(b.done(), [], { tls: "require" }),
    (e: unknown) => e instanceof NbdError && /oldstyle/.test(e.message),
  );
});

Deno.test("negotiate() refuses oldstyle flags beyond the 16 transmission bits", async () => {
  const b = new Builder().u64(NBDMAGIC).u64(CLISERV_MAGIC).u64(4096)
    .u32(0x10003).zeroes(124);
  await assert.rejects(
    run(b.done()),
    (e: unknown) =>
      e instanceof NbdProtocolError && e.phase === "handshake" &&
      /Unexpected export flags 0x10003/.test(e.message),
  );
});

Deno.test("negotiate() with a non-fixed newstyle server sends only NBD_OPT_EXPORT_NAME", async () => {
  const b = greeting(0).u64(8192).u16(1).zeroes(124);
  const { result, stream } = await run(b.done(), [], { exportName: "disk" });
  assert.equal(result.protocol, "newstyle");
  assert.equal(result.size, 8192n);
  assert.deepEqual([...stream.sent.subarray(0, 4)], [0, 0, 0, 0]);
  assert.deepEqual(sentOptions(stream.sent), [OPT_EXPORT_NAME]);
});

Deno.test("negotiate() falls back to NBD_OPT_EXPORT_NAME when NBD_OPT_GO is unsupported", async (t) => {
  const base = () => {
    const b = greeting(1);
    reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
    reply(b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
    reply(b, OPT_GO, REP_ERR_UNSUP);
    reply(
      b,
      OPT_LIST,
      REP_SERVER,
      new Builder().u32(4).string("disk").string("desc"),
    );
    reply(b, OPT_LIST, REP_ACK);
    return b;
  };
  await t.step("export listed: EXPORT_NAME with the 124 zeroes", async () => {
    const b = base().u64(65536).u16(1).zeroes(124);
    const { result, stream } = await run(b.done(), [], { exportName: "disk" });
    assert.equal(result.size, 65536n);
    assert.ok(!result.structuredReplies);
    assert.deepEqual(sentOptions(stream.sent), [
      OPT_EXTENDED_HEADERS,
      OPT_STRUCTURED_REPLY,
      OPT_GO,
      OPT_LIST,
      OPT_EXPORT_NAME,
    ]);
  });
  await t.step(
    "export not listed: a clear error naming what is offered",
    async () => {
      await assert.rejects(
        run(base().done(), [], { exportName: "nope" }),
        (e: unknown) =>
          e instanceof NbdOptionError && e.option === OPT_GO &&
          e.replyName === "NBD_REP_ERR_UNKNOWN" &&
          /Export "nope" is not offered by the server \(it offers: "disk"\)/
            .test(e.message),
      );
    },
  );
  await t.step(
    "server hangs up after EXPORT_NAME: says the export is probably missing",
    async () => {
      const b = greeting(1);
      reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
      reply(b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
      reply(b, OPT_GO, REP_ERR_UNSUP);
      reply(b, OPT_LIST, REP_ERR_POLICY);
      await assert.rejects(
        run(b.done(), [], { exportName: "x" }),
        /export "x" probably does not exist/,
      );
    },
  );
});

Deno.test("negotiate() turns NBD_REP_ERR_* into NbdOptionError with the server's text", async () => {
  const b = greeting();
  reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
  reply(b, OPT_STRUCTURED_REPLY, REP_ACK);
  reply(
    b,
    OPT_GO,
    REP_ERR_UNKNOWN,
    new Builder().string("no export named foo"),
  );
  // The client then sends NBD_OPT_ABORT once; the server may or may not ack.
  const { promise, stream } = (() => {
    const stream = new ScriptedStream(b.done());
    const transport = new Transport(stream);
    return {
      stream,
      promise: negotiate(transport, { exportName: "foo" }).finally(() =>
        transport.close()
      ),
    };
  })();
  await assert.rejects(promise, (e: unknown) => {
    assert.ok(e instanceof NbdOptionError);
    assert.equal(e.option, OPT_GO);
    assert.equal(e.replyName, "NBD_REP_ERR_UNKNOWN");
    assert.equal(e.serverMessage, "no export named foo");
    assert.match(e.message, /7 \(NBD_OPT_GO\)/);
    return true;
  });
  const sent = sentOptions(stream.sent);
  assert.equal(sent.filter((o) => o === 2).length, 1, "one NBD_OPT_ABORT");
});

Deno.test("negotiate() rejects hostile option replies before allocating", async (t) => {
  await t.step("a 4 GiB option reply", async () => {
    const b = greeting();
    b.u64(OPTION_REPLY_MAGIC).u32(OPT_EXTENDED_HEADERS).u32(REP_INFO).u32(
      0xffffffff,
    );
    await assert.rejects(
      run(b.done()),
      (e: unknown) =>
        e instanceof NbdProtocolError &&
        /claims 4294967295 bytes, more than the limit/.test(e.message),
    );
  });
  await t.step("a reply to another option", async () => {
    const b = greeting();
    reply(b, OPT_LIST, REP_ACK);
    await assert.rejects(
      run(b.done()),
      /Unexpected option reply 3 \(NBD_OPT_LIST\), expected 11 \(NBD_OPT_EXTENDED_HEADERS\)/,
    );
  });
  await t.step("a bad reply magic", async () => {
    const b = greeting().u64(0x1234n).u32(OPT_EXTENDED_HEADERS).u32(1).u32(0);
    await assert.rejects(run(b.done()), /Bad option reply magic 0x1234/);
  });
  await t.step("a bad greeting", async () => {
    await assert.rejects(
      run(new Builder().string("HTTP/1.1 200 OK\r\n\r\n").done()),
      /Bad greeting magic .*does not speak NBD/,
    );
  });
  await t.step("NBD_INFO_EXPORT of the wrong length", async () => {
    const b = greeting();
    reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
    reply(b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
    reply(b, OPT_GO, REP_INFO, new Builder().u16(INFO_EXPORT).u64(1));
    await assert.rejects(run(b.done()), /has length 10, expected 12/);
  });
  await t.step("ACK without NBD_INFO_EXPORT", async () => {
    const b = greeting();
    reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
    reply(b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
    reply(b, OPT_GO, REP_ACK);
    await assert.rejects(run(b.done()), /without sending NBD_INFO_EXPORT/);
  });
  await t.step("invalid block sizes", async () => {
    for (
      const [min, pref, max, rule] of [
        [3, 4096, 65536, "minimum must be a power of two"],
        [
          512,
          256,
          65536,
          "preferred must be a power of two at least the minimum",
        ],
        [4096, 4096, 6000, "maximum must be a multiple of the minimum"],
      ] as const
    ) {
      const b = greeting();
      reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
      reply(b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
      reply(
        b,
        OPT_GO,
        REP_INFO,
        new Builder().u16(INFO_BLOCK_SIZE).u32(min).u32(pref).u32(max),
      );
      await assert.rejects(
        run(b.done()),
        (e: unknown) =>
          e instanceof NbdProtocolError && e.message.includes(rule),
      );
    }
  });
});

Deno.test("negotiate() and TLS modes", async (t) => {
  await t.step(
    "require: STARTTLS is the first option and a refusal ends it",
    async () => {
      const b = greeting();
      reply(
        b,
        OPT_STARTTLS,
        REP_ERR_POLICY,
        new Builder().string("no TLS here"),
      );
      const stream = new ScriptedStream(b.done());
      const transport = new Transport(stream);
      await assert.rejects(
        negotiate(transport, {
          tls: "require",
          exportName: "secret",
          upgradeTls: () => Promise.reject(new Error("not reached")),
        }),
        (e: unknown) =>
          e instanceof NbdOptionError && e.option === OPT_STARTTLS &&
          /TLS is required/.test(e.message) &&
          e.serverMessage === "no TLS here",
      );
      transport.close();
      const sent = sentOptions(stream.sent);
      assert.deepEqual(sent, [OPT_STARTTLS, 2]);
      assert.ok(
        !new TextDecoder().decode(stream.sent).includes("secret"),
        "the export name never crossed the wire",
      );
    },
  );
  await t.step(
    "disable: NBD_REP_ERR_TLS_REQD says TLS is required",
    async () => {
      const b = greeting();
      reply(b, OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD);
      await assert.rejects(
        run(b.done()),
        (e: unknown) =>
          e instanceof NbdOptionError &&
          e.replyName === "NBD_REP_ERR_TLS_REQD" &&
          /The server requires TLS/.test(e.message),
      );
    },
  );
  await t.step(
    "on demand: NBD_REP_ERR_TLS_REQD upgrades with STARTTLS and starts over",
    async () => {
      const clear = greeting();
      reply(clear, OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD);
      reply(clear, OPT_STARTTLS, REP_ACK);
      // What the TLS session carries, as plaintext.
      const secure = new Builder();
      reply(secure, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
      reply(secure, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
      info(secure);
      reply(secure, OPT_GO, REP_ACK);
      const before = new ScriptedStream(clear.done());
      const after = new ScriptedStream(secure.done());
      const transport = new Transport(before);
      let upgrades = 0;
      try {
        const result = await negotiate(transport, {
          tlsOnDemand: true,
          upgradeTls: () => {
            upgrades++;
            return Promise.resolve(after);
          },
        });
        assert.equal(result.tls, true);
        assert.equal(upgrades, 1);
      } finally {
        transport.close();
      }
      assert.deepEqual(sentOptions(before.sent), [
        OPT_EXTENDED_HEADERS,
        OPT_STARTTLS,
      ]);
      assert.deepEqual(
        sentOptions(new Uint8Array([0, 0, 0, 0, ...after.sent])),
        [
          OPT_EXTENDED_HEADERS,
          OPT_STRUCTURED_REPLY,
          OPT_GO,
        ],
      );
    },
  );
  await t.step(
    "on demand: a server that refuses under TLS too fails with its reply",
    async () => {
      const b = greeting();
      reply(b, OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD);
      reply(b, OPT_STARTTLS, REP_ERR_POLICY, new Builder().string("no"));
      await assert.rejects(
        run(b.done(), [], {
          tlsOnDemand: true,
          upgradeTls: () => Promise.reject(new Error("not reached")),
        }),
        (e: unknown) =>
          e instanceof NbdOptionError && e.option === OPT_STARTTLS &&
          e.serverMessage === "no",
      );
    },
  );
  await t.step("prefer: a refusal continues in clear", async () => {
    const b = greeting();
    reply(b, OPT_STARTTLS, REP_ERR_UNSUP);
    reply(b, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP);
    reply(b, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP);
    info(b);
    reply(b, OPT_GO, REP_ACK);
    const { result } = await run(b.done(), [], {
      tls: "prefer",
      upgradeTls: () => Promise.reject(new Error("not reached")),
    });
    assert.equal(result.tls, false);
  });
});

Deno.test("negotiate() turns random server bytes into a typed error, never a hang", async () => {
  const next = seeded(0x1b873593);
  const head = greeting().done();
  for (let round = 0; round < 300; round++) {
    // A valid greeting, then option replies with the right magic and random
    // fields most of the time, so the checks behind the magic run too.
    const junk = new Uint8Array(20 + (next() % 300));
    for (let i = 0; i < junk.length; i++) junk[i] = next() & 0xff;
    if (next() % 4 !== 0) {
      new DataView(junk.buffer).setBigUint64(0, OPTION_REPLY_MAGIC);
      new DataView(junk.buffer).setUint32(8, OPT_EXTENDED_HEADERS);
    }
    const bytes = new Uint8Array(head.length + junk.length);
    bytes.set(head);
    bytes.set(junk, head.length);
    // A hang fails the round: within() rejects, naming it.
    const outcome = await within(
      3000,
      `round ${round}`,
      run(bytes, [next() % bytes.length]).then(
        () => "ok",
        (e: unknown) => e,
      ),
    );
    if (outcome !== "ok") {
      assert.ok(
        outcome instanceof NbdError,
        `round ${round}: ${outcome}`,
      );
    }
  }
});
