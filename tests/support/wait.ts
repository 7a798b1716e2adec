/**
 * Bounded waits for every suite: a hang fails the test that caused it,
 * naming what it waited for, instead of stalling the run; a wait is a
 * poll or a race against a timer that is always cleared, never a sleep.
 *
 * @module
 */

/** How often {@linkcode until} asks again. */
const POLL_MS = 10;

/**
 * Races `promise` against a deadline, so a hang fails instead of stalling.
 * The error's message ends in `(hang)`, which tells it apart from the
 * promise's own rejection.
 *
 * @throws {Error} naming `what` when the deadline passes.
 */
export async function within<T>(
  ms: number,
  what: string,
  promise: Promise<T>,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what} did not settle within ${ms} ms (hang)`)),
      ms,
    );
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Waits until `condition()` holds, polling, for at most `ms`.
 *
 * @throws {Error} naming `what` when the deadline passes.
 */
export async function until(
  what: string,
  condition: () => boolean | Promise<boolean>,
  ms = 5_000,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!await condition()) {
    if (Date.now() > deadline) {
      throw new Error(`Gave up after ${ms} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}
