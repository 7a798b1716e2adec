/**
 * The state machines of `lib/_states.ts`, table-driven: every move of each
 * machine, legal or not, and the client state derived from the parts.
 */

import assert from "node:assert/strict";
import {
  checkTransition,
  CLIENT_TRANSITIONS,
  type ClientOwnState,
  clientState,
  type ConnectionsView,
  SLOT_TRANSITIONS,
  type SlotStateName,
  takesRequests,
  type Transitions,
  TRANSMISSION_TRANSITIONS,
  type TransmissionStateName,
} from "../lib/_states.ts";
import { NbdError } from "../lib/errors.ts";
import { CMD_READ, ESHUTDOWN } from "../lib/constants.ts";
import { openTransport } from "../lib/dial.ts";
import { type Command, Transmission } from "../lib/transmission.ts";
import { simpleReply, startTestServer } from "./support/server.ts";
import { within } from "./support/wait.ts";

/** Every legal move, written out again here: a change to a table is a change to this. */
const LEGAL: {
  machine: string;
  table: Transitions<string>;
  moves: string[];
}[] = [
  {
    machine: "a transmission",
    table: TRANSMISSION_TRANSITIONS as Transitions<TransmissionStateName>,
    moves: [
      "open>shutdown",
      "open>closing",
      "open>failed",
      "shutdown>closing",
      "shutdown>failed",
      "closing>closing",
      "closing>closed",
      "closing>failed",
    ],
  },
  {
    machine: "a connection slot",
    table: SLOT_TRANSITIONS as Transitions<SlotStateName>,
    moves: ["carrying>redialling", "redialling>carrying", "redialling>dead"],
  },
  {
    machine: "a client",
    table: CLIENT_TRANSITIONS as Transitions<ClientOwnState>,
    moves: ["open>closing", "closing>closed"],
  },
];

Deno.test("checkTransition() allows exactly the moves in each table", async (t) => {
  for (const { machine, table, moves } of LEGAL) {
    await t.step(machine, () => {
      const states = Object.keys(table);
      let legal = 0;
      for (const from of states) {
        for (const to of states) {
          if (moves.includes(`${from}>${to}`)) {
            checkTransition(machine, table, from, to);
            legal++;
          } else {
            assert.throws(
              () => checkTransition(machine, table, from, to),
              (e) =>
                e instanceof NbdError &&
                e.message ===
                  `Internal error: ${machine} cannot go from ${from} to ${to}`,
            );
          }
        }
      }
      assert.equal(legal, moves.length, "every listed move is legal");
    });
  }
});

function view(over: Partial<ConnectionsView> = {}): ConnectionsView {
  return {
    failure: undefined,
    shuttingDown: false,
    ended: false,
    state: "open",
    ...over,
  };
}

Deno.test("clientState() derives what the client shows", async (t) => {
  const lost = new Error("lost");
  const cases: [string, ClientOwnState, ConnectionsView, string][] = [
    ["open connections", "open", view(), "open"],
    ["reconnecting", "open", view({ state: "reconnecting" }), "reconnecting"],
    ["every connection lost", "open", view({ state: "failed" }), "failed"],
    ["a failure", "open", view({ failure: lost }), "failed"],
    [
      "a failure before ESHUTDOWN",
      "open",
      view({ failure: lost, shuttingDown: true }),
      "failed",
    ],
    ["ESHUTDOWN, readers on", "open", view({ shuttingDown: true }), "closing"],
    [
      "ESHUTDOWN, readers ended",
      "open",
      view({ shuttingDown: true, ended: true }),
      "closed",
    ],
    ["close() begun", "closing", view({ failure: lost }), "closing"],
    ["close() done", "closed", view({ state: "failed" }), "closed"],
  ];
  for (const [name, own, tx, expected] of cases) {
    await t.step(name, () => assert.equal(clientState(own, tx), expected));
  }
  await t.step("requests are taken while open or reconnecting", () => {
    assert.deepEqual(
      (["open", "reconnecting", "closing", "closed", "failed"] as const)
        .filter(takesRequests),
      ["open", "reconnecting"],
    );
  });
});

Deno.test("Transmission moves through its states", async (t) => {
  const read = (): Command => ({
    type: CMD_READ,
    flags: 0,
    offset: 0,
    length: 512,
    buffer: new Uint8Array(512),
  });
  const over = async (uri: string): Promise<Transmission> => {
    const { transport, info } = await openTransport(uri);
    return new Transmission(transport, info, 4, undefined);
  };

  await t.step("open, closing, closed", async () => {
    await using server = await startTestServer();
    const tx = await over(server.uri);
    assert.equal(tx.state.name, "open");
    await tx.submit(read());
    const closing = tx.disconnect();
    assert.deepEqual(tx.state, { name: "closing", shutdown: false });
    await closing;
    assert.deepEqual(tx.state, { name: "closed", shutdown: false });
    assert.equal(tx.ended, true);
    await assert.rejects(tx.submit(read()), /the connection is closing/);
  });

  await t.step("open, shutdown, closing, closed after ESHUTDOWN", async () => {
    await using server = await startTestServer({
      // A simple reply: not with extended headers.
      extendedHeaders: false,
      onCommand: (req) =>
        req.type === CMD_READ ? simpleReply(req.cookie, ESHUTDOWN) : undefined,
    });
    const tx = await over(server.uri);
    await assert.rejects(tx.submit(read()), /ESHUTDOWN/);
    assert.equal(tx.shuttingDown, true);
    await within(5_000, "the soft disconnect", tx.finished);
    assert.deepEqual(tx.state, { name: "closed", shutdown: true });
    await assert.rejects(
      tx.submit(read()),
      /the server is shutting down \(ESHUTDOWN\)/,
    );
  });

  await t.step("open, failed when the server goes", async () => {
    await using server = await startTestServer({
      onCommand: (_req, ctx) => {
        ctx.drop();
        return [];
      },
    });
    const tx = await over(server.uri);
    await assert.rejects(tx.submit(read()), /closed the connection/);
    assert.equal(tx.state.name, "failed");
    assert.equal(tx.failure, (tx.state as { error: Error }).error);
    await tx.disconnect();
    assert.equal(tx.state.name, "failed");
  });
});
