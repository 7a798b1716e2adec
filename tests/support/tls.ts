/**
 * Checks the TLS suites share, whatever engine runs the session: a round
 * trip that must have gone through TLS, and an `assert.rejects` predicate
 * for an {@linkcode NbdTlsError} however deep in the cause chain it sits.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  connect,
  type ConnectOptions,
  NbdOptionError,
  NbdTlsError,
} from "../../mod.ts";
import { OPT_STARTTLS } from "../../lib/constants.ts";

/**
 * Connects, checks that TLS was negotiated, writes a pattern and reads it
 * back (once whole, once inside a read larger than a TLS record, once as
 * several requests in flight at once), and closes.
 *
 * @param target What `connect()` takes.
 * @param options Passed to `connect()` as they are: the caller bounds it.
 * @returns When the client is closed.
 * @throws {AssertionError} When TLS was not used or the data differs.
 * @example
 * ```ts
 * await tlsRoundTrip(`nbds://localhost:${port}/`, { signal });
 * ```
 */
export async function tlsRoundTrip(
  target: string | ConnectOptions,
  options: ConnectOptions,
): Promise<void> {
  const client = await connect(target, options);
  try {
    assert.equal(client.tls, true, "TLS was not negotiated");
    const data = new Uint8Array(96 * 1024).map((_, i) => (i * 7 + 3) & 0xff);
    await client.write(4096, data);
    assert.deepEqual(await client.read(4096, data.length), data);
    // A read larger than one TLS record and than the adapters' read slabs.
    const big = await client.read(0, 512 * 1024);
    assert.deepEqual(big.subarray(4096, 4096 + data.length), data);
    // Several requests in flight at once over one session.
    const parts = await Promise.all(
      [0, 1, 2, 3].map((i) => client.read(4096 + i * 1024, 1024)),
    );
    assert.deepEqual(
      new Uint8Array(parts.flatMap((p) => [...p])),
      data.subarray(0, 4096),
    );
  } finally {
    await client.close();
  }
}

/**
 * An `assert.rejects` predicate: the error, or one in its `cause` chain (the
 * layer that saw the TLS failure may wrap it), is an {@linkcode NbdTlsError}
 * with this `code` (unless `undefined`) and a message matching `message`.
 *
 * @param code The Node-style code expected, or `undefined` for any.
 * @param message What the message must match.
 * @returns The predicate; it returns `true` or throws.
 * @example
 * ```ts
 * await assert.rejects(connect(uri), tlsFailure("CERT_REVOKED", /revoked/));
 * ```
 */
export function tlsFailure(
  code: string | undefined,
  message: RegExp,
): (e: unknown) => boolean {
  return (e: unknown): boolean => {
    let found: unknown = e;
    while (found instanceof Error && !(found instanceof NbdTlsError)) {
      found = found.cause;
    }
    assert.ok(found instanceof NbdTlsError, `expected NbdTlsError in ${e}`);
    if (code !== undefined) assert.equal(found.code, code);
    assert.match(found.message, message);
    return true;
  };
}

/**
 * An `assert.rejects` predicate: `nbds://` (TLS required) refused by a
 * server that does not do TLS, as an {@linkcode NbdOptionError} for
 * `NBD_OPT_STARTTLS`.
 *
 * @param e What was thrown.
 * @returns `true`, or throws.
 * @example
 * ```ts
 * await assert.rejects(connect(`nbds://localhost:${port}/`), tlsRequired);
 * ```
 */
export function tlsRequired(e: unknown): boolean {
  assert.ok(e instanceof NbdOptionError, `got ${e}`);
  assert.equal(e.option, OPT_STARTTLS);
  assert.match(e.message, /TLS is required but the server/);
  return true;
}
