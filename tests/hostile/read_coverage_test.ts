/**
 * A read answered in many small chunks, in any order, costs time linear in
 * the chunks: the scripted server answers reads in one-byte chunks in
 * order, reversed, and in an order that leaves every chunk apart from its
 * neighbours until the end, and each order must finish within a fixed
 * multiple of the in-order time (no absolute time is asserted).
 */

import assert from "node:assert/strict";
import type { NbdClient } from "../../lib/client.ts";
import {
  REPLY_FLAG_DONE,
  REPLY_TYPE_OFFSET_DATA,
  STRUCTURED_REPLY_MAGIC,
} from "../../lib/constants.ts";
import type { ReceivedRequest } from "../support/server.ts";
import {
  BOUND_MS,
  closeClient,
  config,
  DATA,
  hostileTest,
  MiB,
  onRead,
  open,
} from "./_helpers.ts";

const KiB = 1024;
/** The slowest order may take this many times the in-order time. */
const RATIO = 5;
/** Attempts per order before it counts as slow (the machine is shared). */
const ATTEMPTS = 4;

type Order = "in order" | "reversed" | "apart";

/** The chunks' relative offsets, one byte each, in `order`. */
function offsets(length: number, order: Order): Uint32Array {
  const out = new Uint32Array(length);
  if (order === "in order") {
    for (let i = 0; i < length; i++) out[i] = i;
  } else if (order === "reversed") {
    for (let i = 0; i < length; i++) out[i] = length - 1 - i;
  } else {
    // Every even offset from the top down, each apart from the others, then
    // the odd ones: half the chunks stay separate until the second half.
    let n = 0;
    for (let i = (length - 1) & ~1; i >= 0; i -= 2) out[n++] = i;
    for (let i = 1; i < length; i += 2) out[n++] = i;
  }
  return out;
}

/** One structured reply in one-byte data chunks, as one buffer. */
function oneByteChunks(req: ReceivedRequest, order: Order): Uint8Array {
  const base = Number(req.offset);
  const at = offsets(Number(req.length), order);
  const each = 4 + 2 + 2 + 8 + 4 + 8 + 1; // magic, flags, type, cookie, length, offset, data
  const out = new Uint8Array(at.length * each);
  const view = new DataView(out.buffer);
  for (let i = 0; i < at.length; i++) {
    const p = i * each;
    const offset = base + at[i]!;
    view.setUint32(p, STRUCTURED_REPLY_MAGIC);
    view.setUint16(p + 4, i === at.length - 1 ? REPLY_FLAG_DONE : 0);
    view.setUint16(p + 6, REPLY_TYPE_OFFSET_DATA);
    view.setBigUint64(p + 8, req.cookie);
    view.setUint32(p + 16, 8 + 1);
    view.setBigUint64(p + 20, BigInt(offset));
    out[p + 28] = DATA[offset]!;
  }
  return out;
}

/** How long a read took, and whether it finished before its limit. */
interface Timing {
  ms: number;
  done: boolean;
}

/**
 * Reads `length` bytes and checks them, aborting at `limit` ms. When the
 * limit passes the read rejects once the client looks at its signal again,
 * which a reply in a quadratic loop puts off: `ms` says how long it took.
 */
async function timedRead(
  client: NbdClient,
  length: number,
  limit: number,
): Promise<Timing> {
  const signal = AbortSignal.timeout(Math.ceil(limit));
  const start = performance.now();
  try {
    const got = await client.read(0, length, { signal });
    const ms = performance.now() - start;
    assert.deepEqual(got, DATA.subarray(0, length));
    return { ms, done: true };
  } catch (e) {
    if (!signal.aborted) throw e;
    return { ms: performance.now() - start, done: false };
  }
}

hostileTest(
  "read() coverage costs linear time in the chunk count, in any order",
  async (step) => {
    let order: Order = "in order";
    // Once a smaller read is too slow, a larger one (on a quadratic client,
    // a minute or more) would only delay the verdict: it is not run.
    let smallerPassed = true;
    for (const length of [64 * KiB, MiB]) {
      smallerPassed &&= await step(
        `read() of ${
          length / KiB
        } KiB in one-byte chunks, reversed or apart, within ${RATIO}x the in-order time`,
        config({ onCommand: onRead((req) => oneByteChunks(req, order)) }),
        async (server) => {
          let client = await open(server);
          try {
            order = "in order";
            await timedRead(client, 4 * KiB, 60_000); // warm-up
            // The yardstick is the quickest in-order read so far, measured
            // again before each attempt: load on the shared machine slows
            // some reads, never speeds one up.
            let inOrder = Infinity;
            for (const o of ["reversed", "apart"] as const) {
              const tried: string[] = [];
              let passed = false;
              for (let i = 0; i < ATTEMPTS; i++) {
                order = "in order";
                const yardstick = await timedRead(client, length, 60_000);
                assert.ok(yardstick.done, "the in-order read finishes");
                inOrder = Math.min(inOrder, yardstick.ms);
                order = o;
                const limit = RATIO * inOrder;
                const took = await timedRead(client, length, limit);
                passed = took.done;
                if (passed) break;
                tried.push(
                  `${took.ms.toFixed(0)} ms against ${inOrder.toFixed(0)} ms`,
                );
                // The rest of the slow reply would only cost more time. A
                // client still busy with it long after is slow beyond doubt.
                const closed = await closeClient(client).then(
                  () => true,
                  () => false,
                );
                assert.ok(
                  closed,
                  `${o}: ${length} one-byte chunks took over ${RATIO}x the ` +
                    `in-order time (${tried.join("; ")}), and the client ` +
                    `was still busy with the reply ${BOUND_MS} ms later`,
                );
                client = await open(server);
              }
              assert.ok(
                passed,
                `${o}: ${length} one-byte chunks took over ${RATIO}x the ` +
                  `in-order time: ${tried.join("; ")}`,
              );
            }
          } finally {
            // After a failed close above, a second would only hide why.
            await closeClient(client).catch(() => {});
          }
        },
        120_000,
      );
    }
  },
);
