import assert from "node:assert/strict";
import { deadline, pause, untilAborted, within } from "../lib/_deadline.ts";

Deno.test("pause() waits, or ends at once with the signal's reason, leaving no timer", async (t) => {
  await t.step("waits about as long as asked", async () => {
    const started = performance.now();
    await pause(30);
    assert.ok(performance.now() - started >= 25);
  });
  await t.step(
    "an abort ends it at once (the sanitizer sees no timer)",
    async () => {
      const stop = new AbortController();
      const waiting = pause(60_000, stop.signal);
      stop.abort(new Error("stopped"));
      await assert.rejects(waiting, /stopped/);
    },
  );
  await t.step("an aborted signal rejects before waiting", async () => {
    await assert.rejects(pause(60_000, AbortSignal.abort()), DOMException);
  });
});

Deno.test("deadline() joins a signal and a time limit; within() and untilAborted() bound waits", async (t) => {
  await t.step("the limit fires with its own reason", async () => {
    using d = deadline(undefined, 10, () => new Error("too slow"));
    await assert.rejects(
      untilAborted(pause(60_000, d.signal), d.signal),
      /too slow/,
    );
  });
  await t.step(
    "within() gives undefined on time-out and clears its timer",
    async () => {
      const never = new Promise<never>(() => {});
      assert.equal(await within(never, 10), undefined);
      assert.equal(await within(Promise.resolve(7), 60_000), 7);
    },
  );
});
