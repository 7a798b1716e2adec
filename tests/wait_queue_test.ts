/**
 * lib/_wait_queue.ts: slots first come first served, waiters that leave in
 * constant time, one listener per distinct signal, and the counts close()
 * waits on.
 */

import assert from "node:assert/strict";
import {
  type AbortTarget,
  WaitQueue,
  watchAbort,
  watchedSignals,
} from "../lib/_wait_queue.ts";

/** A signal whose listeners are counted, added and removed. */
function counted(): {
  ac: AbortController;
  adds: () => number;
  removes: () => number;
} {
  const ac = new AbortController();
  let adds = 0;
  let removes = 0;
  const add = ac.signal.addEventListener.bind(ac.signal);
  const remove = ac.signal.removeEventListener.bind(ac.signal);
  ac.signal.addEventListener = ((...a: Parameters<typeof add>) => {
    adds++;
    return add(...a);
  }) as typeof add;
  ac.signal.removeEventListener = ((...a: Parameters<typeof remove>) => {
    removes++;
    return remove(...a);
  }) as typeof remove;
  return { ac, adds: () => adds, removes: () => removes };
}

/** Which of `promises` have settled, after pending callbacks ran. */
async function settled(promises: Promise<unknown>[]): Promise<boolean[]> {
  const done = promises.map(() => false);
  promises.forEach((p, i) =>
    p.then(() => done[i] = true, () => done[i] = true)
  );
  await new Promise((r) => setTimeout(r, 0));
  return done;
}

Deno.test("WaitQueue hands out slots in order", async (t) => {
  await t.step("tryTake() takes free slots, then refuses", () => {
    const q = new WaitQueue(2);
    assert.equal(q.tryTake(), true);
    assert.equal(q.tryTake(), true);
    assert.equal(q.tryTake(), false);
    assert.equal(q.owed, 2);
    assert.equal(q.live, 2);
  });

  await t.step("waiters are granted first come, first served", async () => {
    const q = new WaitQueue(1);
    assert.equal(q.tryTake(), true);
    const order: number[] = [];
    const waits = [1, 2, 3].map((n) => q.take().then(() => order.push(n)));
    assert.equal(q.waiting, 3);
    // A waiter is queued: tryTake() may not jump it, even with a slot free.
    q.release();
    assert.equal(q.tryTake(), false);
    await waits[0];
    q.release();
    await waits[1];
    q.release();
    await waits[2];
    assert.deepEqual(order, [1, 2, 3]);
    assert.equal(q.waiting, 0);
  });

  await t.step(
    "an abort removes that waiter alone, with the reason",
    async () => {
      const q = new WaitQueue(1);
      q.tryTake();
      const a = new AbortController();
      const first = q.take();
      const second = q.take(a.signal);
      const third = q.take();
      a.abort(new Error("gave up"));
      await assert.rejects(second, /gave up/);
      assert.equal(q.waiting, 2);
      q.release();
      await first;
      q.release();
      await third;
    },
  );

  await t.step("an aborted signal is refused at once", async () => {
    const q = new WaitQueue(1);
    await assert.rejects(q.take(AbortSignal.abort(new Error("no"))), /no/);
    assert.equal(q.owed, 0);
  });

  await t.step("grantAll() lets every waiter through", async () => {
    const q = new WaitQueue(1);
    q.tryTake();
    const waits = [q.take(), q.take(), q.take()];
    q.grantAll();
    await Promise.all(waits);
    assert.equal(q.owed, 4);
    assert.equal(q.waiting, 0);
  });
});

Deno.test("WaitQueue counts replies owed and callers waiting", async (t) => {
  await t.step("an abandoned request is owed but not waited for", async () => {
    const q = new WaitQueue(4);
    q.tryTake();
    q.tryTake();
    const none = q.whenNoneWaiting();
    const owed = q.whenNoneOwed();
    q.abandon();
    assert.deepEqual(await settled([none, owed]), [false, false]);
    q.release();
    assert.deepEqual(await settled([none, owed]), [true, false]);
    q.release(true);
    assert.deepEqual(await settled([none, owed]), [true, true]);
    assert.equal(q.owed, 0);
    assert.equal(q.live, 0);
  });

  await t.step(
    "an abandoned request holds its slot until released",
    async () => {
      const q = new WaitQueue(1);
      q.tryTake();
      q.abandon();
      const next = q.take();
      assert.deepEqual(await settled([next]), [false]);
      q.release(true);
      await next;
    },
  );

  await t.step(
    "wakeIdle() wakes waiters for an empty queue at once",
    async () => {
      const q = new WaitQueue(1);
      q.tryTake();
      const none = q.whenNoneWaiting();
      q.wakeIdle();
      await none;
    },
  );
});

Deno.test("watchAbort() adds one listener per distinct signal", async (t) => {
  await t.step("10,000 watchers, one listener, each told once in order", () => {
    const { ac, adds, removes } = counted();
    const told: number[] = [];
    const before = watchedSignals();
    for (let i = 0; i < 10_000; i++) {
      watchAbort(ac.signal, { onAbort: () => told.push(i) });
    }
    assert.equal(adds(), 1);
    assert.equal(watchedSignals(), before + 1);
    ac.abort();
    assert.equal(told.length, 10_000);
    assert.ok(told.every((v, i) => v === i));
    assert.equal(removes(), 1);
    assert.equal(watchedSignals(), before);
  });

  await t.step(
    "cancelled watchers are not told; the last one takes the listener",
    () => {
      const { ac, adds, removes } = counted();
      let told = 0;
      const target: AbortTarget = { onAbort: () => told++ };
      const watches = Array.from(
        { length: 1_000 },
        () => watchAbort(ac.signal, target),
      );
      for (const w of watches.slice(0, 999)) w.cancel();
      assert.equal(removes(), 0);
      watches[999]!.cancel();
      watches[999]!.cancel();
      assert.equal(removes(), 1);
      ac.abort();
      assert.equal(told, 0);
      assert.equal(adds(), 1);
    },
  );

  await t.step("two signals, two listeners", () => {
    const a = counted();
    const b = counted();
    const target: AbortTarget = { onAbort: () => {} };
    const ws = [
      watchAbort(a.ac.signal, target),
      watchAbort(b.ac.signal, target),
      watchAbort(a.ac.signal, target),
    ];
    assert.equal(a.adds() + b.adds(), 2);
    for (const w of ws) w.cancel();
  });

  await t.step(
    "40,000 queued waiters on one signal leave on abort",
    async () => {
      const q = new WaitQueue(1);
      q.tryTake();
      const { ac, adds } = counted();
      const waits = Array.from({ length: 40_000 }, () => q.take(ac.signal));
      // Awaited before the abort, as callers do: rejections with no
      // handler yet cost Deno's own bookkeeping, linear in their number.
      const all = Promise.allSettled(waits);
      ac.abort(new Error("stop"));
      const results = await all;
      assert.ok(results.every((r) => r.status === "rejected"));
      assert.equal(adds(), 1);
      assert.equal(q.waiting, 0);
    },
  );
});
