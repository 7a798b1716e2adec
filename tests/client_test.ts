import assert from "node:assert/strict";
import {
  NbdClient,
  type ReadOptions,
  type RequestOptions,
} from "../lib/client.ts";
import type { ConnectOptions } from "../lib/connect_options.ts";
import {
  connect,
  listExports,
  openTransport,
  probe,
  probeExports,
} from "../lib/connect.ts";
import { capabilities, transmissionFlagNames } from "../lib/capabilities.ts";
import {
  FLAG_HAS_FLAGS,
  FLAG_READ_ONLY,
  FLAG_SEND_DF,
  FLAG_SEND_FAST_ZERO,
  FLAG_SEND_TRIM,
  FLAG_SEND_WRITE_ZEROES,
  OPT_EXTENDED_HEADERS,
  OPT_GO,
  OPT_INFO,
  OPT_LIST,
  OPT_LIST_META_CONTEXT,
  OPT_SET_META_CONTEXT,
  OPT_STARTTLS,
  OPT_STRUCTURED_REPLY,
  REP_ACK,
  REP_ERR_TLS_REQD,
  REP_ERR_UNKNOWN,
  REP_ERR_UNSUP,
  REP_SERVER,
} from "../lib/constants.ts";
import {
  NbdConnectionClosedError,
  NbdError,
  NbdOptionError,
  NbdProtocolError,
  NbdUnsupportedError,
} from "../lib/errors.ts";
import {
  optionReply,
  repServerPayload,
  startTestServer,
} from "./support/server.ts";
import { within } from "./support/wait.ts";

const KiB = 1024;

Deno.test("connect() bounds the handshake by connectTimeout without a signal", async () => {
  await using server = await startTestServer({ stallHandshake: true });
  const started = Date.now();
  await assert.rejects(
    connect(server.uri, { connectTimeout: 300 }),
    (e: unknown) =>
      e instanceof NbdError &&
      /and negotiating took longer than 300 ms/.test(e.message),
  );
  assert.ok(Date.now() - started < 3000, "gave up promptly");
  await server.settled();
});

Deno.test("connect() refuses bad options before opening anything", async (t) => {
  const cases: Array<[string, Parameters<typeof connect>[1], RegExp]> = [
    [
      "two places",
      { hostname: "h", path: "/p" },
      /only one of hostname, path and cid/,
    ],
    ["port", { hostname: "h", port: 70000.5 }, /Invalid port/],
    [
      "maxInFlight",
      { path: "/p", maxInFlight: 0 },
      /maxInFlight must be an integer/,
    ],
    [
      "connectTimeout",
      { path: "/p", connectTimeout: -1 },
      /connectTimeout must be/,
    ],
  ];
  for (const [name, options, message] of cases) {
    await t.step(name, async () => {
      await assert.rejects(
        connect(options!),
        (e: unknown) =>
          (e instanceof TypeError || e instanceof RangeError) &&
          message.test(e.message),
      );
    });
  }
  await t.step("a server that is not there", async () => {
    await assert.rejects(
      connect({ path: "/nonexistent/nbd.sock" }),
      (e: unknown) =>
        e instanceof NbdError && /^Cannot connect to /.test(e.message),
    );
  });
});

Deno.test("NbdClient checks every call against the export before sending", async (t) => {
  await using server = await startTestServer({
    exports: [{
      name: "",
      size: 64 * KiB,
      blockSize: { minimum: 512, preferred: 4096, maximum: 16 * KiB },
      flags: 0,
    }],
  });
  const nbd = await connect(server.uri);
  assert.ok(nbd instanceof NbdClient);
  const sent = () => server.log.flatMap((c) => c.requests).length;
  const before = sent();
  await t.step("ranges: zero, negative, past the end, misaligned", async () => {
    await assert.rejects(nbd.read(0, 0), RangeError);
    await assert.rejects(nbd.read(-512, 512), RangeError);
    await assert.rejects(
      nbd.read(63 * KiB, 2 * KiB),
      /beyond the end of the export/,
    );
    await assert.rejects(
      nbd.read(100, 512),
      /multiples of the export's minimum block size 512/,
    );
  });
  await t.step("features the export does not advertise", async () => {
    for (
      const [call, feature] of [
        [() => nbd.flush(), "flush"],
        [() => nbd.trim(0, 512), "trim"],
        [() => nbd.writeZeroes(0, 512), "writeZeroes"],
        [() => nbd.cache(0, 512), "cache"],
        [() => nbd.write(0, new Uint8Array(512), { fua: true }), "fua"],
        [() => nbd.blockStatus(0, 512), "blockStatus"],
      ] as const
    ) {
      await assert.rejects(
        call(),
        (e: unknown) =>
          e instanceof NbdUnsupportedError && e.feature === feature,
      );
    }
  });
  assert.equal(sent(), before, "nothing reached the server");
  await t.step("reads larger than the maximum are split to it", async () => {
    const data = new Uint8Array(48 * KiB).map((_, i) => i % 251);
    await nbd.write(0, data);
    assert.deepEqual(await nbd.read(0, 48 * KiB), data);
    const lengths = server.log.flatMap((c) => c.requests).map((r) =>
      Number(r.length)
    );
    assert.ok(lengths.every((l) => l <= 16 * KiB), `lengths ${lengths}`);
  });
  await t.step("state follows the connection", async () => {
    assert.equal(nbd.state, "open");
    assert.equal(nbd.blockSizeAdvertised, true);
    await nbd.close();
    assert.equal(nbd.state, "closed");
    await assert.rejects(
      nbd.read(0, 512),
      (e: unknown) =>
        e instanceof NbdConnectionClosedError &&
        e.message === "Cannot call read(): the client is closed",
    );
  });
});

Deno.test("openTransport() negotiates and hands over the transport with nothing buffered", async () => {
  await using server = await startTestServer();
  const { transport, info } = await openTransport(server.uri, {
    structuredReplies: false,
  });
  try {
    assert.equal(info.protocol, "fixed newstyle");
    assert.equal(info.structuredReplies, false);
    assert.equal(info.extendedHeaders, false);
    assert.ok(info.size > 0n);
    assert.equal(transport.buffered, 0);
    assert.equal(transport.phase, "handshake");
  } finally {
    transport.close();
  }
  await server.settled();
});

Deno.test("probe() follows the size rule of NbdClient: size a number, sizeBigInt exact", async () => {
  await using server = await startTestServer({
    exports: [{ name: "", size: 64 * KiB }],
  });
  const p = await probe(server.uri);
  await assert.rejects(
    probe(server.uri, { listMetaContexts: "no" as unknown as boolean }),
    /^TypeError: listMetaContexts must be true or false, not "no"$/,
  );
  assert.equal(typeof p.size, "number");
  assert.equal(p.size, 64 * KiB);
  assert.equal(p.sizeBigInt, BigInt(64 * KiB));
  const nbd = await connect(server.uri);
  try {
    assert.equal(nbd.size, p.size);
    assert.equal(nbd.sizeBigInt, p.sizeBigInt);
  } finally {
    await nbd.close();
  }
});

Deno.test("capabilities() is what NbdClient's getters say, with libnbd's rules", async (t) => {
  await t.step("a read-only export can neither trim nor zero", () => {
    const can = capabilities({
      flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_TRIM |
        FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO,
      structuredReplies: true,
      metaContexts: 0,
    });
    assert.deepEqual(
      [can.readOnly, can.canTrim, can.canWriteZeroes, can.canFastZero],
      [true, false, false, false],
    );
  });
  await t.step("DF needs structured replies, fast zero write zeroes", () => {
    const simple = capabilities({
      flags: FLAG_HAS_FLAGS | FLAG_SEND_DF | FLAG_SEND_FAST_ZERO,
      structuredReplies: false,
      metaContexts: 1,
    });
    assert.equal(simple.canDf, false);
    assert.equal(simple.canFastZero, false);
    assert.equal(simple.canBlockStatus, false);
  });
  await t.step("the getters of a connected client agree", async () => {
    await using server = await startTestServer();
    const nbd = await connect(server.uri, {
      metaContexts: ["base:allocation"],
    });
    try {
      const can = capabilities({
        flags: nbd.flags,
        structuredReplies: nbd.structuredReplies,
        metaContexts: nbd.metaContexts.length,
      });
      for (const [name, value] of Object.entries(can)) {
        assert.equal(nbd[name as keyof typeof can], value, name);
      }
      assert.equal(can.canBlockStatus, true);
    } finally {
      await nbd.close();
    }
  });
  await t.step("flag names, lowest bit first", () => {
    assert.deepEqual(
      transmissionFlagNames(FLAG_HAS_FLAGS | FLAG_SEND_TRIM | 0x8000),
      ["NBD_FLAG_HAS_FLAGS", "NBD_FLAG_SEND_TRIM", "0x8000"],
    );
  });
});

Deno.test("connect() checks every option's type and range before anything is sent", async (t) => {
  await using server = await startTestServer();
  const refused = async (
    options: Record<string, unknown>,
    kind: typeof TypeError | typeof RangeError,
    message: RegExp,
  ) => {
    await assert.rejects(
      connect(server.uri, options as ConnectOptions),
      (e: unknown) =>
        e instanceof kind && e.constructor === kind && message.test(e.message),
    );
  };
  await t.step(
    "an unknown tls mode fails closed, whatever its spelling",
    async () => {
      for (const tls of ["required", "yes", "REQUIRE", "", "true"]) {
        await refused(
          { tls },
          TypeError,
          /^tls must be "disable", "prefer" or "require", not "/,
        );
      }
      await refused({ tls: true }, TypeError, /^tls must be .*, not true$/);
    },
  );
  await t.step("types", async () => {
    await refused({ exportName: 5 }, TypeError, /^exportName must be a string/);
    await refused(
      { metaContexts: "base:allocation" },
      TypeError,
      /^metaContexts must be an array of strings, not "base:allocation" \(write \["base:allocation"\]\)$/,
    );
    await refused({ metaContexts: [1] }, TypeError, /^metaContexts must be/);
    await refused({ caCerts: "pem" }, TypeError, /^caCerts must be/);
    await refused(
      { structuredReplies: "false" },
      TypeError,
      /^structuredReplies must be true or false, not "false"$/,
    );
    await refused({ tlsVerifyPeer: 0 }, TypeError, /^tlsVerifyPeer must be/);
    await refused(
      { signal: {} },
      TypeError,
      /^connect\(\): signal must be an AbortSignal, not an object$/,
    );
    await refused({ debug: "yes" }, TypeError, /^debug must be true, false/);
  });
  await t.step("ranges", async () => {
    await refused({ port: "10809" }, RangeError, /^Invalid port "10809"$/);
    await refused(
      { path: undefined, cid: -1 },
      RangeError,
      /^cid must be an integer from 0 to 4294967295, not -1$/,
    );
    await refused({ maxInFlight: 1.5 }, RangeError, /^maxInFlight must be/);
  });
  await t.step(
    "a timeout a timer cannot wait is a RangeError, not an instant timeout",
    async () => {
      for (const connectTimeout of [2 ** 31, 2 ** 40, Infinity, -1, NaN]) {
        await refused(
          { connectTimeout },
          RangeError,
          /^connectTimeout must be a number of milliseconds from 0 to 2147483647 \(timers cannot wait longer\)/,
        );
      }
      const nbd = await connect(server.uri, { connectTimeout: 2 ** 31 - 1 });
      await nbd.close();
    },
  );
  await server.settled();
  // Only the last step's connection reached the server.
  assert.equal(server.log.length, 1);
});

Deno.test("NbdClient checks request options before sending", async (t) => {
  await using server = await startTestServer({
    exports: [{ name: "", size: 64 * KiB }],
  });
  const nbd = await connect(server.uri, { metaContexts: ["base:allocation"] });
  const sent = () => server.log.flatMap((c) => c.requests).length;
  try {
    await t.step(
      "a signal that is not an AbortSignal: nothing is written",
      async () => {
        await assert.rejects(
          nbd.write(0, new Uint8Array(512).fill(7), {
            signal: {} as AbortSignal,
          }),
          (e: unknown) =>
            e instanceof TypeError &&
            e.message ===
              "write(): signal must be an AbortSignal, not an object",
        );
        assert.equal(sent(), 0);
        assert.deepEqual(await nbd.read(0, 512), new Uint8Array(512));
      },
    );
    const before = sent();
    await t.step("options that are not an object", async () => {
      await assert.rejects(
        nbd.read(0, 512, null as unknown as ReadOptions),
        (e: unknown) =>
          e instanceof TypeError &&
          e.message === "read(): options must be an object, not null",
      );
      await assert.rejects(
        nbd.flush("now" as unknown as RequestOptions),
        /^TypeError: flush\(\): options must be an object, not "now"$/,
      );
    });
    await t.step("flags that are not booleans", async () => {
      await assert.rejects(
        nbd.blockStatus(0, 512, { reqOne: "yes" as unknown as boolean }),
        /^TypeError: blockStatus\(\): reqOne must be true or false, not "yes"$/,
      );
      await assert.rejects(
        nbd.write(0, new Uint8Array(512), { fua: 1 as unknown as boolean }),
        /^TypeError: write\(\): fua must be true or false, not 1$/,
      );
    });
    assert.equal(sent(), before, "nothing reached the server");
    await t.step("close() checks its signal too", async () => {
      await assert.rejects(
        nbd.close({ signal: "soon" as unknown as AbortSignal }),
        /^TypeError: close\(\): signal must be an AbortSignal, not "soon"$/,
      );
      assert.equal(nbd.state, "open");
    });
  } finally {
    await nbd.close();
  }
});

Deno.test("connect({ listMetaContexts }) lists what is offered on the connection it goes on with", async (t) => {
  const exports = [{
    name: "",
    size: 64 * KiB,
    contexts: { "qemu:dirty-bitmap:b0": [], "qemu:allocation-depth": [] },
  }];
  const offered = [
    "base:allocation",
    "qemu:dirty-bitmap:b0",
    "qemu:allocation-depth",
  ];
  await t.step("listed, and one of them selected", async () => {
    await using server = await startTestServer({ exports });
    const nbd = await connect(server.uri, {
      listMetaContexts: true,
      metaContexts: ["qemu:dirty-bitmap:b0"],
    });
    try {
      assert.deepEqual(nbd.availableMetaContexts, offered);
      assert.deepEqual(nbd.metaContexts, ["qemu:dirty-bitmap:b0"]);
    } finally {
      await nbd.close();
    }
    await server.settled();
    // One connection: LIST (every namespace), then SET, then GO.
    const options = server.log[0]!.options.map((o) => o.option);
    assert.deepEqual(
      options.filter((o) =>
        o === OPT_LIST_META_CONTEXT || o === OPT_SET_META_CONTEXT ||
        o === OPT_GO
      ),
      [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_GO],
    );
    assert.equal(server.log.length, 1);
  });
  await t.step("not asked, or no structured replies: not listed", async () => {
    await using server = await startTestServer({ exports });
    for (
      const options of [{}, {
        listMetaContexts: true,
        structuredReplies: false,
      }]
    ) {
      const nbd = await connect(server.uri, options);
      try {
        assert.equal(nbd.availableMetaContexts, undefined);
      } finally {
        await nbd.close();
      }
    }
    await server.settled();
    for (const conn of server.log) {
      assert.ok(
        !conn.options.some((o) => o.option === OPT_LIST_META_CONTEXT),
      );
    }
  });
  await t.step(
    "a server without NBD_OPT_LIST_META_CONTEXT offers none",
    async () => {
      await using server = await startTestServer({
        exports,
        optionReplies: { [OPT_LIST_META_CONTEXT]: REP_ERR_UNSUP },
      });
      const nbd = await connect(server.uri, { listMetaContexts: true });
      try {
        assert.deepEqual(nbd.availableMetaContexts, []);
      } finally {
        await nbd.close();
      }
    },
  );
  await t.step("with several connections only the first lists", async () => {
    await using server = await startTestServer({ exports });
    const nbd = await connect(server.uri, {
      listMetaContexts: true,
      connections: 2,
    });
    try {
      assert.equal(nbd.connections, 2);
      assert.deepEqual(nbd.availableMetaContexts, offered);
    } finally {
      await nbd.close();
    }
    await server.settled();
    assert.deepEqual(
      server.log.map((c) =>
        c.options.filter((o) => o.option === OPT_LIST_META_CONTEXT).length
      ),
      [1, 0],
    );
  });
  await t.step("checked like every other option", async () => {
    await assert.rejects(
      connect({
        path: "/nonexistent",
        listMetaContexts: 1 as unknown as boolean,
      }),
      /^TypeError: listMetaContexts must be true or false, not 1/,
    );
  });
});

Deno.test("probeExports() lists and describes every export on one connection", async () => {
  const gone = new TextEncoder().encode("gone");
  await using server = await startTestServer({
    exports: [
      { name: "a", size: 64 * KiB, description: "first" },
      { name: "b", size: 128 * KiB },
      { name: "gone", size: 4 * KiB },
    ],
    // NBD_OPT_INFO for "gone" is refused with the server's own text.
    onOption: (opt) => {
      if (opt.option !== OPT_INFO) return undefined;
      const v = new DataView(opt.payload.buffer, opt.payload.byteOffset);
      const name = opt.payload.subarray(4, 4 + v.getUint32(0));
      return name.length === gone.length && name.every((b, i) => b === gone[i])
        ? [optionReply(OPT_INFO, REP_ERR_UNKNOWN, "withdrawn")]
        : undefined;
    },
  });
  const listed = await probeExports(server.uri);
  assert.deepEqual(
    listed.map((e) => [e.name, e.description, e.probe?.size]),
    [["a", "first", 64 * KiB], ["b", "", 128 * KiB], ["gone", "", undefined]],
  );
  assert.deepEqual(listed[0]!.probe!.metaContexts, ["base:allocation"]);
  const refused = listed[2]!.error;
  assert.ok(refused instanceof NbdOptionError, String(refused));
  assert.equal(refused.replyName, "NBD_REP_ERR_UNKNOWN");
  assert.equal(refused.serverMessage, "withdrawn");
  await server.settled();
  // One connection; the reply format negotiated once, then LIST, then an
  // INFO (with its context listing) per export.
  assert.equal(server.log.length, 1);
  const options = server.log[0]!.options.map((o) => o.option);
  assert.equal(
    options.filter((o) =>
      o === OPT_EXTENDED_HEADERS || o === OPT_STRUCTURED_REPLY
    ).length,
    1,
  );
  assert.deepEqual(
    options.filter((o) => o === OPT_LIST || o === OPT_INFO),
    [OPT_LIST, OPT_INFO, OPT_INFO, OPT_INFO],
  );
});

Deno.test("probeExports() and listExports() refuse a listed name longer than 4096 bytes, before asking about it", async () => {
  // No request may carry such a name (strings are at most 4096 bytes): the
  // client could never describe it, nor connect to it.
  await using server = await startTestServer({
    exports: [{ name: "a", size: 4 * KiB }],
    onOption: (opt) =>
      opt.option === OPT_LIST
        ? [
          optionReply(OPT_LIST, REP_SERVER, repServerPayload("a")),
          optionReply(OPT_LIST, REP_SERVER, repServerPayload("x".repeat(4097))),
          optionReply(OPT_LIST, REP_ACK),
        ]
        : undefined,
  });
  for (const call of [probeExports, listExports]) {
    await assert.rejects(
      call(server.uri),
      (e) =>
        e instanceof NbdProtocolError &&
        /NBD_REP_SERVER export name of 4097 bytes exceeds 4096/.test(e.message),
    );
  }
  await server.settled();
  assert.equal(server.log.length, 2);
  for (const c of server.log) {
    assert.deepEqual(
      c.options.filter((o) =>
        o.option === OPT_INFO || o.option === OPT_LIST_META_CONTEXT
      ).map((o) => o.name),
      [],
    );
  }
});

Deno.test("connect({ debug }): a hook that throws breaks nothing", async (t) => {
  const unhandled: unknown[] = [];
  const onUnhandled = (e: PromiseRejectionEvent) => {
    e.preventDefault();
    unhandled.push(e.reason);
  };
  globalThis.addEventListener("unhandledrejection", onUnhandled);
  try {
    // Each event the hook fails on, on every kind of reply: the requests
    // go out, their replies come back, and the slots are freed.
    for (
      const [event, structuredReplies] of [
        ["send command", true],
        ["recv chunk", true],
        ["recv simple reply", false],
        ["send option", true],
      ] as const
    ) {
      await t.step(
        `${event} (structured replies ${structuredReplies})`,
        async () => {
          await using server = await startTestServer({
            exports: [{ name: "", size: 64 * KiB }],
          });
          let thrown = 0;
          const nbd = await within(
            5_000,
            "connect()",
            connect(server.uri, {
              structuredReplies,
              maxInFlight: 2,
              debug: (e) => {
                if (e === event) {
                  thrown++;
                  throw new Error(`the hook fails on ${e}`);
                }
              },
            }),
          );
          try {
            // More reads than slots: a slot lost to the hook hangs the rest.
            for (let i = 0; i < 4; i++) {
              const got = await within(5_000, `read ${i}`, nbd.read(0, 512));
              assert.equal(got.length, 512);
            }
            assert.ok(thrown > 0, `the hook saw no ${event}`);
            assert.equal(nbd.state, "open");
          } finally {
            await within(5_000, "close()", nbd.close());
          }
          await new Promise((r) => setTimeout(r, 0));
          assert.deepEqual(unhandled.splice(0), [], "unhandled rejections");
        },
      );
    }
  } finally {
    globalThis.removeEventListener("unhandledrejection", onUnhandled);
  }
});

Deno.test("probeExports(): TLS required for one export upgrades when TLS is left to the server, and is that export's refusal when TLS is off", async (t) => {
  const b = new TextEncoder().encode("b");
  const config = {
    exports: [{ name: "a", size: 4 * KiB }, { name: "b", size: 4 * KiB }],
    onOption: (opt: { option: number; payload: Uint8Array }) => {
      if (opt.option !== OPT_INFO) return undefined;
      const v = new DataView(opt.payload.buffer, opt.payload.byteOffset);
      const name = opt.payload.subarray(4, 4 + v.getUint32(0));
      return name.length === 1 && name[0] === b[0]
        ? [optionReply(OPT_INFO, REP_ERR_TLS_REQD, "b needs TLS")]
        : undefined;
    },
  };
  await t.step(
    'tls: "disable": b carries the refusal, a is described',
    async () => {
      await using server = await startTestServer(config);
      const listed = await probeExports(server.uri, { tls: "disable" });
      assert.equal(listed[0]!.probe?.size, 4 * KiB);
      assert.equal(listed[1]!.error?.replyName, "NBD_REP_ERR_TLS_REQD");
    },
  );
  await t.step("tls unset: the session asks for STARTTLS", async () => {
    await using server = await startTestServer(config);
    // The scripted server has no TLS and says so: the upgrade fails, loudly.
    await assert.rejects(probeExports(server.uri), NbdError);
    await server.settled();
    const options = server.log[0]!.options.map((o) => o.option);
    assert.ok(options.includes(OPT_STARTTLS), options.join(","));
    assert.ok(options.indexOf(OPT_STARTTLS) > options.lastIndexOf(OPT_INFO));
  });
});
