import assert from "node:assert/strict";
import {
  ATTACHED_TRANSITIONS,
  AttachedBase,
  type AttachedState,
  type ReleaseInfo,
  type SignalSource,
  stopRelays,
  WATCHED_SIGNALS,
} from "../../ffi/_attached.ts";
import type { Relay } from "../../ffi/_relay.ts";
import { exportDiffers } from "../../ffi/netlink/_attach.ts";
import {
  FLAG_CAN_MULTI_CONN,
  FLAG_HAS_FLAGS,
  FLAG_SEND_FLUSH,
  FLAG_SEND_TRIM,
} from "../../lib/constants.ts";
import type { ExportInfo } from "../../lib/export.ts";
import { until, within } from "../support/wait.ts";

function exportInfo(over: Partial<ExportInfo> = {}): ExportInfo {
  return {
    exportName: "",
    description: "",
    size: 1n << 20n,
    flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM |
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

/** Process signals delivered by hand; counts the listeners left. */
class FakeSignals implements SignalSource {
  #listeners = new Map<Deno.Signal, Set<() => void>>();

  addSignalListener(signal: Deno.Signal, handler: () => void): void {
    const set = this.#listeners.get(signal) ?? new Set();
    set.add(handler);
    this.#listeners.set(signal, set);
  }

  removeSignalListener(signal: Deno.Signal, handler: () => void): void {
    this.#listeners.get(signal)?.delete(handler);
  }

  send(signal: Deno.Signal): void {
    for (const handler of [...this.#listeners.get(signal) ?? []]) handler();
  }

  get count(): number {
    let n = 0;
    for (const set of this.#listeners.values()) n += set.size;
    return n;
  }
}

/** An attachment with no kernel under it: counts what it is asked. */
class FakeDevice extends AttachedBase {
  readonly kernelInterface = "ioctl" as const;
  asks = 0;
  cuts = 0;

  constructor() {
    super({
      device: "/dev/nbd9",
      size: 1 << 20,
      blockSize: 512,
      readOnly: false,
      info: exportInfo(),
      route: "direct",
      connections: 1,
    });
  }

  protected askDisconnect(): void {
    this.asks++;
  }

  protected cut(): void {
    this.cuts++;
  }

  /** What the kernel letting go would do; `false` if already released. */
  kernelLetGo(reason: ReleaseInfo["reason"] = "lost"): boolean {
    if (!this.beginRelease()) return false;
    this.settle({
      requested: this.requested,
      reason: this.requested && reason === "lost" ? "disconnect" : reason,
      message: `${this.device} released`,
      error: undefined,
    });
    return true;
  }

  beginOnly(): boolean {
    return this.beginRelease();
  }

  settleOnly(): void {
    this.settle({
      requested: this.requested,
      reason: "lost",
      message: "",
      error: undefined,
    });
  }

  giveUp(): boolean {
    return this.markRequested();
  }
}

Deno.test("AttachedBase.watch()", async (t) => {
  await t.step("a first signal asks for a clean disconnect", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    dev.watch(true, undefined, signals);
    assert.equal(signals.count, WATCHED_SIGNALS.length);
    signals.send("SIGINT");
    assert.equal(dev.asks, 1);
    assert.equal(dev.cuts, 0);
    assert.equal(dev.state, "disconnecting");
    dev.kernelLetGo();
  });

  await t.step(
    "a second signal cuts the connection, every later one too",
    () => {
      const signals = new FakeSignals();
      const dev = new FakeDevice();
      dev.watch(true, undefined, signals);
      signals.send("SIGTERM");
      signals.send("SIGINT");
      assert.equal(dev.asks, 1, "the disconnect is asked once");
      assert.equal(dev.cuts, 1);
      signals.send("SIGTERM");
      assert.equal(dev.cuts, 2);
      dev.kernelLetGo();
    },
  );

  await t.step("a signal after disconnect() cuts", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    dev.watch(true, undefined, signals);
    void dev.disconnect();
    signals.send("SIGINT");
    assert.deepEqual([dev.asks, dev.cuts], [1, 1]);
    dev.kernelLetGo();
  });

  await t.step("an aborted signal disconnects like a first signal", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    const stop = new AbortController();
    dev.watch(true, stop.signal, signals);
    stop.abort();
    assert.deepEqual([dev.asks, dev.cuts], [1, 0]);
    signals.send("SIGINT");
    assert.deepEqual([dev.asks, dev.cuts], [1, 1]);
    dev.kernelLetGo();
  });

  await t.step("handleSignals false listens to no process signal", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    const stop = new AbortController();
    dev.watch(false, stop.signal, signals);
    assert.equal(signals.count, 0);
    signals.send("SIGINT");
    assert.equal(dev.asks, 0);
    stop.abort();
    assert.equal(dev.asks, 1, "the abort signal is still watched");
    dev.kernelLetGo();
  });

  await t.step("the release removes every listener", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    const stop = new AbortController();
    dev.watch(true, stop.signal, signals);
    assert.ok(dev.kernelLetGo());
    assert.equal(signals.count, 0);
    signals.send("SIGINT");
    stop.abort();
    assert.deepEqual([dev.asks, dev.cuts], [0, 0]);
  });

  await t.step("a signal while the release runs does nothing", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    dev.watch(true, undefined, signals);
    void dev.disconnect();
    assert.ok(dev.beginOnly());
    signals.send("SIGINT");
    assert.deepEqual([dev.asks, dev.cuts], [1, 0]);
    dev.settleOnly();
  });

  await t.step("watch() after the release leaves no listener", () => {
    const signals = new FakeSignals();
    const dev = new FakeDevice();
    dev.kernelLetGo();
    dev.watch(true, new AbortController().signal, signals);
    assert.equal(signals.count, 0);
  });

  await t.step("by default it listens to the process's SIGTERM", async () => {
    const dev = new FakeDevice();
    dev.watch(true, undefined);
    try {
      Deno.kill(Deno.pid, "SIGTERM");
      await until("the SIGTERM reaches the device", () => dev.asks === 1, 5000);
      assert.equal(dev.state, "disconnecting");
    } finally {
      // Removes the process listeners again.
      dev.kernelLetGo();
    }
  });
});

Deno.test("AttachedBase.disconnect() and disposal", async (t) => {
  await t.step("disconnect() asks once and returns `closed`", async () => {
    const dev = new FakeDevice();
    const first = dev.disconnect();
    const second = dev.disconnect();
    assert.equal(first, dev.closed);
    assert.equal(second, dev.closed);
    assert.equal(dev.asks, 1);
    dev.kernelLetGo();
    const release = await within(1000, "closed", first);
    assert.equal(release.requested, true);
    assert.equal(release.reason, "disconnect");
  });

  await t.step("disposing twice disconnects once", async () => {
    const dev = new FakeDevice();
    const disposed = dev[Symbol.asyncDispose]();
    const again = dev[Symbol.asyncDispose]();
    assert.equal(dev.asks, 1);
    dev.kernelLetGo();
    await within(1000, "the disposals", Promise.all([disposed, again]));
    await within(1000, "a third", dev[Symbol.asyncDispose]());
    assert.equal(dev.asks, 1);
  });

  await t.step("await using disposes at the end of the block", async () => {
    let seen: FakeDevice | undefined;
    {
      await using dev = new FakeDevice();
      seen = dev;
      // The kernel lets go once asked; disposal waits for that.
      queueMicrotask(() => dev.kernelLetGo());
    }
    assert.equal(seen.asks, 1);
    assert.equal(seen.state, "released");
  });

  await t.step("after a release nothing is asked", async () => {
    const dev = new FakeDevice();
    dev.kernelLetGo();
    const release = await within(1000, "disconnect()", dev.disconnect());
    assert.equal(dev.asks, 0);
    assert.equal(release.requested, false);
    await dev[Symbol.asyncDispose]();
    assert.equal(dev.asks, 0);
  });
});

Deno.test("AttachedBase release info", async (t) => {
  await t.step("a release nobody asked for is not requested", async () => {
    const dev = new FakeDevice();
    assert.ok(dev.kernelLetGo("lost"));
    const release = await within(1000, "closed", dev.closed);
    assert.deepEqual(
      { requested: release.requested, reason: release.reason },
      { requested: false, reason: "lost" },
    );
  });

  await t.step("a release after disconnect() is requested", async () => {
    const dev = new FakeDevice();
    void dev.disconnect();
    dev.kernelLetGo("lost");
    const release = await within(1000, "closed", dev.closed);
    assert.equal(release.requested, true);
    assert.equal(release.reason, "disconnect");
  });

  await t.step("a device given up before it came up is requested", async () => {
    const dev = new FakeDevice();
    assert.ok(dev.giveUp());
    assert.equal(dev.asks, 0, "giving up asks the kernel nothing");
    assert.equal(dev.giveUp(), false);
    dev.kernelLetGo("error");
    const release = await within(1000, "closed", dev.closed);
    assert.equal(release.requested, true);
    assert.equal(release.reason, "error");
  });

  await t.step("`closed` settles once, with the first release", async () => {
    const dev = new FakeDevice();
    assert.ok(dev.kernelLetGo("error"));
    assert.equal(dev.kernelLetGo("lost"), false);
    assert.equal(dev.beginOnly(), false);
    assert.equal((await dev.closed).reason, "error");
  });

  await t.step("settling before the release began is refused", () => {
    const dev = new FakeDevice();
    assert.throws(
      () => dev.settleOnly(),
      (e: unknown) =>
        e instanceof Error && /cannot go from attached to released/.test(
          e.message,
        ),
    );
    void dev.disconnect();
    assert.throws(() => dev.settleOnly(), /from disconnecting to released/);
    dev.kernelLetGo();
    assert.throws(() => dev.settleOnly(), /from released to released/);
  });
});

Deno.test("ATTACHED_TRANSITIONS names every legal move", async (t) => {
  const names: AttachedState["name"][] = [
    "attached",
    "disconnecting",
    "releasing",
    "released",
  ];
  await t.step("every state is in the table, and only those", () => {
    assert.deepEqual(
      Object.keys(ATTACHED_TRANSITIONS).sort(),
      [...names].sort(),
    );
  });
  await t.step("the moves are the module doc's drawing", () => {
    const legal = names.flatMap((from) =>
      ATTACHED_TRANSITIONS[from].map((to) => `${from}->${to}`)
    );
    assert.deepEqual(legal, [
      "attached->disconnecting",
      "attached->releasing",
      "disconnecting->releasing",
      "releasing->released",
    ]);
  });
});

function fakeRelay(error: unknown, log: string[], name: string): Relay {
  let finish!: () => void;
  const done = new Promise<void>((resolve) => finish = resolve);
  return {
    done,
    error,
    stop() {
      log.push(`stop ${name}`);
      // Each relay ends on its own time after being stopped.
      setTimeout(() => {
        log.push(`done ${name}`);
        finish();
      }, name === "a" ? 20 : 1);
    },
  };
}

Deno.test("stopRelays()", async (t) => {
  await t.step("stops every relay and waits for all of them", async () => {
    const log: string[] = [];
    const relays = [
      fakeRelay(undefined, log, "a"),
      fakeRelay(undefined, log, "b"),
    ];
    const error = await within(1000, "stopRelays()", stopRelays(relays));
    assert.equal(error, undefined);
    assert.deepEqual(log.slice(0, 2), ["stop a", "stop b"]);
    assert.ok(log.includes("done a") && log.includes("done b"));
  });

  await t.step("returns the first relay's failure", async () => {
    const log: string[] = [];
    const boom = new Error("reset");
    const relays = [
      fakeRelay(undefined, log, "a"),
      fakeRelay(boom, log, "b"),
      fakeRelay(new Error("later"), log, "c"),
    ];
    assert.equal(await within(1000, "stopRelays()", stopRelays(relays)), boom);
  });

  await t.step("no relays: nothing to wait for", async () => {
    assert.equal(await stopRelays([]), undefined);
  });
});

Deno.test("exportDiffers() decides the same export as the library's reconnect", async (t) => {
  await t.step("the same export", () => {
    assert.equal(exportDiffers(exportInfo(), exportInfo(), 1), undefined);
  });
  await t.step("a flag added is still the same export", () => {
    const more = exportInfo({ flags: exportInfo().flags | 0x8000 });
    assert.equal(exportDiffers(exportInfo(), more, 1), undefined);
  });
  await t.step("another size", () => {
    const bigger = exportInfo({ size: 2n << 20n });
    assert.match(exportDiffers(exportInfo(), bigger, 1) ?? "", /size/);
  });
  await t.step(
    "a larger minimum block size, which size and flags missed",
    () => {
      const coarser = exportInfo({
        blockSize: { minimum: 4096, preferred: 4096, maximum: 1 << 20 },
      });
      assert.match(
        exportDiffers(exportInfo(), coarser, 1) ?? "",
        /minimum block size 512 is now 4096/,
      );
    },
  );
  await t.step("a metadata context gone", () => {
    const none = exportInfo({ metaContexts: new Map() });
    assert.match(exportDiffers(exportInfo(), none, 1) ?? "", /base:allocation/);
  });
  await t.step(
    "multi-conn withdrawn matters only with several connections",
    () => {
      const single = exportInfo({
        flags: exportInfo().flags & ~FLAG_CAN_MULTI_CONN,
      });
      assert.equal(exportDiffers(exportInfo(), single, 1), undefined);
      assert.match(
        exportDiffers(exportInfo(), single, 2) ?? "",
        /NBD_FLAG_CAN_MULTI_CONN withdrawn/,
      );
    },
  );
  await t.step("several changes in one phrase", () => {
    const other = exportInfo({
      size: 1n,
      flags: exportInfo().flags & ~FLAG_SEND_FLUSH,
    });
    const text = exportDiffers(exportInfo(), other, 1) ?? "";
    assert.match(text, /size .*; .*withdrawn/);
  });
});
