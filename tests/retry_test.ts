/**
 * retry(): the one backoff loop behind the open timeout, the reconnect and
 * the netlink supervisor. Deadlines are set in the past or far ahead and
 * pauses are 0 or 1 ms, so nothing here depends on the machine's speed.
 */

import assert from "node:assert/strict";
import { retry, retryPause } from "../lib/reconnect.ts";

const FAR = 60_000;

/** An attempt that fails `n` times, then returns its number. */
function failing(n: number): {
  attempt: (k: number, left: number) => Promise<number>;
  calls: number[];
} {
  const calls: number[] = [];
  return {
    calls,
    attempt: (k) => {
      calls.push(k);
      return k < n
        ? Promise.reject(new Error(`failure ${k}`))
        : Promise.resolve(k);
    },
  };
}

Deno.test("retry() tries again until an attempt succeeds", async (t) => {
  await t.step(
    "the first success ends it, attempts numbered from 0",
    async () => {
      const f = failing(3);
      const seen: Array<[number, string, boolean]> = [];
      const got = await retry(f.attempt, {
        delay: 0,
        maxDelay: 0,
        deadline: Date.now() + FAR,
        debug: (n, e, again) => seen.push([n, (e as Error).message, again]),
      });
      assert.equal(got, 3);
      assert.deepEqual(f.calls, [0, 1, 2, 3]);
      assert.deepEqual(seen, [
        [1, "failure 0", true],
        [2, "failure 1", true],
        [3, "failure 2", true],
      ]);
    },
  );

  await t.step("a deadline already past allows one attempt", async () => {
    const f = failing(5);
    const seen: boolean[] = [];
    await assert.rejects(
      retry(f.attempt, {
        delay: 0,
        maxDelay: 0,
        deadline: Date.now() - 1,
        debug: (_n, _e, again) => seen.push(again),
      }),
      /failure 0/,
    );
    assert.deepEqual(f.calls, [0]);
    assert.deepEqual(seen, [false]);
  });

  await t.step("a failure the predicate refuses ends it at once", async () => {
    const f = failing(5);
    await assert.rejects(
      retry(f.attempt, {
        delay: 0,
        maxDelay: 0,
        deadline: Date.now() + FAR,
        retryable: (e) => (e as Error).message !== "failure 1",
      }),
      /failure 1/,
    );
    assert.deepEqual(f.calls, [0, 1]);
  });

  await t.step("the signal ends a pause with its reason", async () => {
    const ac = new AbortController();
    const f = failing(5);
    const p = retry(f.attempt, {
      delay: FAR,
      maxDelay: FAR,
      deadline: Date.now() + 2 * FAR,
      signal: ac.signal,
    });
    await Promise.resolve();
    ac.abort(new Error("stop"));
    await assert.rejects(p, /stop/);
    assert.deepEqual(f.calls, [0]);
  });

  await t.step("an aborted signal makes a failure final", async () => {
    const ac = new AbortController();
    ac.abort(new Error("stop"));
    await assert.rejects(
      retry(() => Promise.reject(new Error("dial failed")), {
        delay: 0,
        maxDelay: 0,
        deadline: Date.now() + FAR,
        signal: ac.signal,
      }),
      /dial failed/,
    );
  });

  await t.step(
    'pastDeadline "stop" gives up rather than pause past it',
    async () => {
      const f = failing(5);
      await assert.rejects(
        retry(f.attempt, {
          delay: FAR,
          maxDelay: FAR,
          deadline: Date.now() + FAR / 2,
          pastDeadline: "stop",
        }),
        /failure 0/,
      );
      assert.deepEqual(f.calls, [0]);
    },
  );

  await t.step(
    "a counter carries the backoff on, and can be out of time",
    async () => {
      const counter = { attempts: 0 };
      const f = failing(1);
      assert.equal(
        await retry(f.attempt, {
          delay: 0,
          maxDelay: 0,
          deadline: Date.now() + FAR,
          counter,
        }),
        1,
      );
      assert.equal(counter.attempts, 2);
      // The next call goes on from attempt 2; with its time up it makes
      // none and throws the cause it was given.
      const cause = new Error("lost");
      await assert.rejects(
        retry(f.attempt, {
          delay: 0,
          maxDelay: 0,
          deadline: Date.now() - 1,
          counter,
          cause,
        }),
        (e) => e === cause,
      );
      assert.deepEqual(f.calls, [0, 1]);
    },
  );

  await t.step("each attempt is told the time left", async () => {
    const lefts: number[] = [];
    await retry((_n, left) => {
      lefts.push(left);
      return Promise.resolve();
    }, { delay: 0, maxDelay: 0, deadline: Date.now() + FAR });
    assert.ok(lefts[0]! > FAR - 1000 && lefts[0]! <= FAR);
  });
});

Deno.test("retryPause() grows by the factor up to the ceiling", () => {
  const o = { delay: 100, maxDelay: 2000, deadline: 0 };
  assert.deepEqual(
    [1, 2, 3, 4, 5, 6, 7].map((n) => retryPause(n, o)),
    [100, 200, 400, 800, 1600, 2000, 2000],
  );
  assert.deepEqual(
    [1, 2, 3].map((n) => retryPause(n, { ...o, factor: 3 })),
    [100, 300, 900],
  );
  assert.equal(retryPause(1_000, o), 2000);
});
