import assert from "node:assert/strict";
import {
  FLAG_CAN_MULTI_CONN,
  FLAG_HAS_FLAGS,
  FLAG_READ_ONLY,
  FLAG_ROTATIONAL,
  FLAG_SEND_FLUSH,
  FLAG_SEND_FUA,
  FLAG_SEND_TRIM,
} from "../lib/constants.ts";
import {
  NbdCommandError,
  NbdConnectionClosedError,
  NbdProtocolError,
} from "../lib/errors.ts";
import type { ExportInfo } from "../lib/export.ts";
import {
  backoff,
  DEFAULT_RECONNECT,
  exportChanges,
  gaveUp,
  isConnectionLoss,
  NbdExportChangedError,
  reconnectPolicy,
} from "../lib/reconnect.ts";

function exportInfo(over: Partial<ExportInfo> = {}): ExportInfo {
  return {
    exportName: "",
    description: "",
    size: 1n << 20n,
    flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM |
      FLAG_CAN_MULTI_CONN,
    blockSize: { minimum: 512, preferred: 4096, maximum: 1 << 20 },
    blockSizeAdvertised: true,
    protocol: "fixed newstyle",
    structuredReplies: true,
    extendedHeaders: false,
    tls: false,
    metaContexts: new Map([[1, "base:allocation"]]),
    ...over,
  };
}

Deno.test("isConnectionLoss() retries what a new connection can carry on", async (t) => {
  await t.step("end of stream, reset and a closed transport are lost", () => {
    assert.ok(isConnectionLoss(new NbdConnectionClosedError("gone")));
  });
  await t.step("a stream cut inside a message is lost, not broken", () => {
    const cut = new NbdProtocolError(
      "transmission",
      "Connection closed after 7 of 16 bytes of a simple reply",
      { cause: new NbdConnectionClosedError("end of stream") },
    );
    assert.ok(isConnectionLoss(cut));
  });
  await t.step("ESHUTDOWN is a soft disconnect: lost", () => {
    const e = new NbdCommandError({
      command: "NBD_CMD_READ",
      errno: 108,
      offset: 0,
      length: 512,
    });
    assert.ok(isConnectionLoss(e));
  });
  await t.step("a protocol violation, an errno or an abort is not", () => {
    assert.ok(!isConnectionLoss(new NbdProtocolError("transmission", "bad")));
    assert.ok(
      !isConnectionLoss(
        new NbdCommandError({
          command: "NBD_CMD_READ",
          errno: 5,
          offset: 0,
          length: 512,
        }),
      ),
    );
    assert.ok(!isConnectionLoss(new DOMException("x", "AbortError")));
    assert.ok(!isConnectionLoss(new TypeError("x")));
  });
});

Deno.test("exportChanges() names every difference that could mean another disk", async (t) => {
  await t.step("the same export is no change, ids may differ", () => {
    const after = exportInfo({
      metaContexts: new Map([[9, "base:allocation"]]),
      flags: exportInfo().flags | FLAG_ROTATIONAL,
    });
    assert.deepEqual(exportChanges(exportInfo(), after), []);
  });
  await t.step("size, read-only, withdrawn flags", () => {
    const after = exportInfo({
      size: 2n << 20n,
      flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH,
    });
    assert.deepEqual(exportChanges(exportInfo(), after), [
      "size 1048576 is now 2097152",
      "the export is read-only now",
      "NBD_FLAG_SEND_FUA withdrawn",
      "NBD_FLAG_SEND_TRIM withdrawn",
    ]);
  });
  await t.step("multi-conn counts only with several connections", () => {
    const after = exportInfo({
      flags: exportInfo().flags & ~FLAG_CAN_MULTI_CONN,
    });
    assert.deepEqual(exportChanges(exportInfo(), after, false), []);
    assert.deepEqual(exportChanges(exportInfo(), after, true), [
      "NBD_FLAG_CAN_MULTI_CONN withdrawn",
    ]);
  });
  await t.step("block sizes the checked requests would break", () => {
    const after = exportInfo({
      blockSize: { minimum: 4096, preferred: 4096, maximum: 65536 },
    });
    assert.deepEqual(exportChanges(exportInfo(), after), [
      "minimum block size 512 is now 4096",
      "maximum block size 1048576 is now 65536",
    ]);
    const finer = exportInfo({
      blockSize: { minimum: 1, preferred: 4096, maximum: 1 << 21 },
    });
    assert.deepEqual(exportChanges(exportInfo(), finer), []);
  });
  await t.step("reply formats and metadata contexts", () => {
    const before = exportInfo({ extendedHeaders: true });
    const after = exportInfo({
      structuredReplies: false,
      metaContexts: new Map(),
    });
    assert.deepEqual(exportChanges(before, after), [
      "extended headers are no longer negotiated",
      "structured replies are no longer negotiated",
      "metadata context base:allocation is gone",
    ]);
  });
  await t.step(
    "the error carries the list and says nothing was replayed",
    () => {
      const e = new NbdExportChangedError(["size 1 is now 2"]);
      assert.ok(e instanceof NbdConnectionClosedError);
      assert.equal(e.name, "NbdExportChangedError");
      assert.deepEqual(e.changes, ["size 1 is now 2"]);
      assert.match(e.message, /no request was replayed: size 1 is now 2/);
    },
  );
});

Deno.test("reconnectPolicy() settles defaults and refuses bad values", async (t) => {
  await t.step("off unless asked", () => {
    assert.equal(reconnectPolicy(undefined), undefined);
    assert.equal(reconnectPolicy(false), undefined);
  });
  await t.step("true is the documented default", () => {
    assert.deepEqual(reconnectPolicy(true), DEFAULT_RECONNECT);
    assert.equal(DEFAULT_RECONNECT.timeout, 30_000);
  });
  await t.step("fields override the defaults", () => {
    assert.deepEqual(reconnectPolicy({ timeout: 5 }), {
      ...DEFAULT_RECONNECT,
      timeout: 5,
    });
  });
  await t.step("wrong types and ranges", () => {
    assert.throws(() => reconnectPolicy("yes" as never), TypeError);
    assert.throws(() => reconnectPolicy({ timeout: "1" as never }), TypeError);
    assert.throws(() => reconnectPolicy({ timeout: 0 }), RangeError);
    assert.throws(() => reconnectPolicy({ timeout: 2 ** 31 }), RangeError);
    assert.throws(() => reconnectPolicy({ delay: -1 }), RangeError);
  });
});

Deno.test("backoff() doubles up to the ceiling and never past the deadline", () => {
  const p = { timeout: 10_000, delay: 50, maxDelay: 400 };
  assert.deepEqual(
    [0, 1, 2, 3, 4, 40].map((a) => backoff(a, p, 10_000)),
    [50, 100, 200, 400, 400, 400],
  );
  assert.equal(backoff(3, p, 30), 30);
  assert.equal(backoff(3, p, -5), 0);
});

Deno.test("gaveUp() keeps the last dial error as its cause", () => {
  const last = new Error("ECONNREFUSED");
  const e = gaveUp({ timeout: 1500, delay: 1, maxDelay: 1 }, last);
  assert.ok(e instanceof NbdConnectionClosedError);
  assert.equal(e.cause, last);
  assert.equal(
    e.message,
    "Could not reconnect to the server within 1500 ms: ECONNREFUSED",
  );
});
