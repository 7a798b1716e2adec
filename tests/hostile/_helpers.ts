/**
 * What every hostile test shares: one step per misbehaviour, each with its
 * own scripted server, bounded, and checked for rejections nobody handled;
 * the disk the server serves; and the assertions that say which typed error
 * a misbehaviour must end in.
 *
 * The server is `tests/support/server.ts`, which real clients validate in
 * `tests/support/server_test.ts`; when a step fails, the client is wrong,
 * not the step.
 *
 * @module
 */

import assert from "node:assert/strict";
import type { NbdClient } from "../../lib/client.ts";
import { connect } from "../../lib/connect.ts";
import type { ConnectOptions } from "../../lib/connect_options.ts";
import { CMD_READ, OPT_GO } from "../../lib/constants.ts";
import {
  NbdCommandError,
  NbdConnectionClosedError,
  NbdProtocolError,
} from "../../lib/errors.ts";
import {
  type Action,
  type OptionAction,
  type ReceivedRequest,
  startTestServer,
  type TestServer,
  type TestServerConfig,
} from "../support/server.ts";
import { until, within } from "../support/wait.ts";

/** Generous for a Unix socket; a step that takes this long has hung. */
export const BOUND_MS = 5000;
export const MiB = 1024 * 1024;

/** What the default export holds: a pattern no offset repeats nearby. */
export const DATA: Uint8Array = (() => {
  const d = new Uint8Array(MiB);
  for (let i = 0; i < d.length; i++) d[i] = (i * 7 + (i >> 9)) & 0xff;
  return d;
})();

export const NO_DATA: Uint8Array = new Uint8Array(0);

// Rejections nobody handled are collected here and asserted empty per step.
const unhandled: unknown[] = [];
function onUnhandled(e: PromiseRejectionEvent): void {
  e.preventDefault();
  unhandled.push(e.reason);
}

/** Lets pending rejection events fire. */
function tick(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** One step with its own server; see {@linkcode hostileTest}. */
export type HostileStep = (
  name: string,
  cfg: TestServerConfig,
  body: (server: TestServer) => Promise<void>,
  bound?: number,
) => Promise<boolean>;

/**
 * A `Deno.test` whose steps each start their own server from `cfg`, run
 * `body` within `bound`, and fail on any rejection nobody handled.
 */
export function hostileTest(
  name: string,
  steps: (step: HostileStep) => Promise<void>,
): void {
  Deno.test(name, async (t) => {
    globalThis.addEventListener("unhandledrejection", onUnhandled);
    try {
      await steps((name, cfg, body, bound = BOUND_MS * 2) =>
        t.step(name, async () => {
          await using server = await startTestServer(cfg);
          await within(bound, name, body(server));
          await tick();
          assert.deepEqual(unhandled.splice(0), [], "unhandled rejections");
        })
      );
    } finally {
      globalThis.removeEventListener("unhandledrejection", onUnhandled);
    }
  });
}

/** Settles `p` and returns its error, failing if it resolved. */
export async function rejection(
  p: Promise<unknown>,
  what: string,
  bound = BOUND_MS,
): Promise<Error> {
  try {
    await within(bound, what, p);
  } catch (e) {
    assert.ok(e instanceof Error, `${what}: threw a non-Error ${String(e)}`);
    assert.doesNotMatch(e.message, /\(hang\)$/, `${what} hung`);
    return e;
  }
  assert.fail(`${what}: resolved, expected a rejection`);
}

export function assertProtocol(
  e: Error,
  phase: "handshake" | "transmission",
  message?: RegExp,
): asserts e is NbdProtocolError {
  assert.ok(
    e instanceof NbdProtocolError,
    `expected NbdProtocolError, got ${e.name}: ${e.message}`,
  );
  assert.equal(e.phase, phase, e.message);
  if (message) assert.match(e.message, message);
}

export function assertCommand(
  e: Error,
  errno: number,
  errnoName: string,
): asserts e is NbdCommandError {
  assert.ok(
    e instanceof NbdCommandError,
    `expected NbdCommandError, got ${e.name}: ${e.message}`,
  );
  assert.equal(e.errno, errno);
  assert.equal(e.errnoName, errnoName);
}

export function assertClosed(
  e: Error,
): asserts e is NbdConnectionClosedError {
  assert.ok(e instanceof NbdConnectionClosedError, `${e.name}: ${e.message}`);
}

/** A fatal error, or the closed-connection error that carries it. */
export function rootCause(e: Error): Error {
  if (e instanceof NbdConnectionClosedError && e.cause instanceof Error) {
    return e.cause;
  }
  return e;
}

/** Closes a client, bounded; errors from an already broken client are fine. */
export async function closeClient(client: NbdClient): Promise<void> {
  await within(BOUND_MS, "close()", client.close().catch(() => {}));
}

export async function open(
  server: TestServer,
  options: ConnectOptions = {},
): Promise<NbdClient> {
  return await within(
    BOUND_MS,
    "connect()",
    connect({ path: server.path!, exportName: "disk", ...options }),
  );
}

/** Connect options that ask for block status. */
export const WITH_ALLOCATION: ConnectOptions = {
  metaContexts: ["base:allocation"],
};

/** Runs `body` with a client, closing it afterwards. */
export async function withClient(
  server: TestServer,
  options: ConnectOptions,
  body: (client: NbdClient) => Promise<void>,
): Promise<void> {
  const client = await open(server, options);
  try {
    await within(BOUND_MS, "step body", body(client));
  } finally {
    await closeClient(client);
  }
}

/** connect() fails in the handshake with an NbdProtocolError. */
export async function handshakeFails(
  server: TestServer,
  message?: RegExp,
  options: ConnectOptions = {},
): Promise<void> {
  const e = await rejection(open(server, options), "connect()");
  assertProtocol(e, "handshake", message);
}

/** read(0, length) fails with a transmission NbdProtocolError. */
export async function readBreaks(
  server: TestServer,
  length: number,
  message: RegExp,
): Promise<void> {
  await withClient(server, {}, async (client) => {
    const e = await rejection(client.read(0, length), "read()");
    assertProtocol(e, "transmission", message);
  });
}

/** Polls (bounded) until the client records a fatal failure. */
export async function failureOf(client: NbdClient): Promise<Error> {
  await until("the client to record a failure", () => !!client.failure, 2000);
  return client.failure!;
}

/**
 * A compact-header server (the steps build compact replies); steps about
 * extended headers turn them back on.
 */
export function config(extra: TestServerConfig = {}): TestServerConfig {
  return {
    extendedHeaders: false,
    exports: [{
      name: "disk",
      size: MiB,
      data: DATA,
      description: "hostile test disk",
    }],
    ...extra,
  };
}

/** Answers NBD_OPT_GO with `reply` and every other option correctly. */
export function onGo(
  reply: OptionAction | OptionAction[],
): NonNullable<TestServerConfig["onOption"]> {
  return (opt) => opt.option === OPT_GO ? reply : undefined;
}

/** The option numbers the first connection sent, in order. */
export function optionsSent(server: TestServer): number[] {
  return server.log[0]!.options.map((o) => o.option);
}

/** Answers READs with `reply(req)` and everything else correctly. */
export function onRead(
  reply: (req: ReceivedRequest) => Action | Action[] | undefined,
): NonNullable<TestServerConfig["onCommand"]> {
  return (req) => req.type === CMD_READ ? reply(req) : undefined;
}
