/**
 * Client-side helpers shared by the interop tests: a debug-hook recorder
 * (which doubles as a wire tap: "was anything sent?", "how many requests
 * were in flight at once?"), deterministic data, and block status over a
 * whole range. What the reference client sees is in
 * `tests/support/reference.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { type Extent, type NbdClient, NbdUnsupportedError } from "../../mod.ts";
import { pattern as seededPattern } from "../support/pattern.ts";
import { concat } from "../support/server.ts";
import { within } from "../support/wait.ts";

/** One call of the `debug` hook. */
export interface TraceEvent {
  event: string;
  fields: Record<string, unknown>;
}

/** Records every debug event of a connection. */
export class Trace {
  readonly events: TraceEvent[] = [];
  #inFlight = 0;
  #peak = 0;

  /** Pass this as `debug`. */
  readonly hook = (event: string, fields: Record<string, unknown>): void => {
    this.events.push({ event, fields });
    if (event === "send command" && fields.command !== "NBD_CMD_DISC") {
      this.#inFlight++;
      this.#peak = Math.max(this.#peak, this.#inFlight);
    } else if (
      event === "recv simple reply" ||
      (event === "recv chunk" && fields.done === true)
    ) {
      this.#inFlight--;
    }
  };

  /** Commands sent so far, `NBD_CMD_DISC` included. */
  commands(): Array<Record<string, unknown>> {
    return this.events.filter((e) => e.event === "send command").map((e) =>
      e.fields
    );
  }

  /** The most requests that were waiting for replies at one time. */
  get peakInFlight(): number {
    return this.#peak;
  }

  /** Forgets the high-water mark, so the next check measures its own. */
  resetPeak(): void {
    this.#peak = this.#inFlight;
  }
}

/**
 * Runs `call`, which must fail with {@linkcode NbdUnsupportedError} for
 * `feature` before any command reaches the wire.
 */
export async function rejectsBeforeTraffic(
  trace: Trace,
  call: () => Promise<unknown>,
  feature: string,
  message: RegExp,
): Promise<void> {
  const sent = trace.commands().length;
  await assert.rejects(call, (e: unknown) => {
    assert.ok(e instanceof NbdUnsupportedError, `got ${e}`);
    assert.equal(e.feature, feature);
    assert.match(e.message, message);
    return true;
  });
  assert.equal(trace.commands().length, sent, "a command was sent anyway");
}

/** What the client says when a read-only export is asked to change. */
export const READ_ONLY = /the export is read-only/;

/**
 * write(), trim() and writeZeroes() of `length` bytes at offset 0, which a
 * read-only export must refuse before any command reaches the wire.
 */
export async function refusesWritesBeforeTraffic(
  trace: Trace,
  client: NbdClient,
  length: number,
): Promise<void> {
  await rejectsBeforeTraffic(
    trace,
    () => client.write(0, new Uint8Array(length)),
    "write",
    READ_ONLY,
  );
  await rejectsBeforeTraffic(
    trace,
    () => client.trim(0, length),
    "write",
    READ_ONLY,
  );
  await rejectsBeforeTraffic(
    trace,
    () => client.writeZeroes(0, length),
    "write",
    READ_ONLY,
  );
}

/**
 * Bytes that depend on `seed` and on the absolute offset, so that data read
 * from the wrong place or the wrong request never matches by accident: the
 * `pattern()` of `tests/support/pattern.ts` with the arguments in this suite's
 * order.
 */
export function fill(seed: number, offset: number, length: number): Uint8Array {
  return seededPattern(length, seed, offset);
}

/** nbdkit-pattern-plugin's content: each 8-byte word holds its offset. */
export { nbdkitPattern as pattern } from "../support/pattern.ts";

/** Asserts two byte arrays are equal, naming the first difference. */
export function assertBytes(
  actual: Uint8Array,
  expected: Uint8Array,
  what: string,
): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      assert.fail(
        `${what}: byte ${i} is 0x${actual[i]!.toString(16)}, expected 0x${
          expected[i]!.toString(16)
        }`,
      );
    }
  }
}

/** Whether every byte is zero. */
export function isZero(bytes: Uint8Array): boolean {
  return bytes.every((b) => b === 0);
}

/**
 * Block status of one context over exactly [offset, offset+length): asks
 * again from where each reply ended (a server may describe less), and clips
 * the last extent (which may run past the range).
 */
export async function extentsOf(
  client: NbdClient,
  context: string,
  offset: number,
  length: number,
): Promise<Extent[]> {
  const out: Extent[] = [];
  const end = offset + length;
  let at = offset;
  for (let round = 0; at < end; round++) {
    assert.ok(round < 10_000, "block status made no progress");
    const all = await client.blockStatus(at, end - at);
    const extents = all[context];
    assert.ok(extents && extents.length > 0, `no extents for ${context}`);
    assert.equal(extents[0]!.offset, at, "first extent starts at the request");
    for (const e of extents) {
      const stop = Math.min(e.offset + e.length, end);
      if (e.offset >= end) break;
      const last = out.at(-1);
      if (
        last && last.flags === e.flags && last.offset + last.length === e.offset
      ) {
        last.length = stop - last.offset;
      } else {
        out.push({ offset: e.offset, length: stop - e.offset, flags: e.flags });
      }
      at = stop;
    }
  }
  return out;
}

/**
 * Reads `stream` to its end, each read bounded (10 s) so that a stalled
 * stream fails the test, and returns its bytes joined.
 */
export async function readAll(
  stream: ReadableStream<Uint8Array>,
  what: string,
): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  const reader = stream.getReader();
  while (true) {
    const { value, done } = await within(10_000, what, reader.read());
    if (done) break;
    chunks.push(value);
  }
  return concat(...chunks);
}
