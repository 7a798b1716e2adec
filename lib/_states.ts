/**
 * The state machines of the coordination layers, written down as data (as
 * libnbd's `generator/state_machine.ml` does): for each machine, every
 * state and the states it may enter. Each class changes its state in one
 * `#enter()` that calls {@linkcode checkTransition}, so an illegal move is
 * an internal error at the moment it happens, not a wrong answer later.
 * `docs/state-machines.md` draws them.
 *
 * @module
 */

import { NbdConnectionClosedError, NbdError } from "./errors.ts";

/** For each state, the states it may enter. */
export type Transitions<S extends string> = Readonly<Record<S, readonly S[]>>;

/**
 * One connection in transmission (`transmission.ts`):
 *
 * - `open`: requests go out.
 * - `shutdown`: the server said `ESHUTDOWN`; nothing new goes out, and a
 *   soft disconnect follows once no reply is awaited.
 * - `closing`: `disconnect()` began: waiting for replies, then
 *   `NBD_CMD_DISC`.
 * - `closed`: the reader ended after a clean disconnect.
 * - `failed`: the connection broke; every request failed with its error.
 *
 * `closing` may enter `closing` again: an `ESHUTDOWN` reply that arrives
 * while closing is remembered.
 */
export type TransmissionStateName =
  | "open"
  | "shutdown"
  | "closing"
  | "closed"
  | "failed";

/** A transmission's state, with what each state carries. */
export type TransmissionState =
  | { readonly name: "open" }
  | { readonly name: "shutdown" }
  | { readonly name: "closing"; readonly shutdown: boolean }
  | { readonly name: "closed"; readonly shutdown: boolean }
  | {
    readonly name: "failed";
    readonly error: Error;
    readonly shutdown: boolean;
  };

/** The legal moves of a transmission. */
export const TRANSMISSION_TRANSITIONS: Transitions<TransmissionStateName> = {
  open: ["shutdown", "closing", "failed"],
  shutdown: ["closing", "failed"],
  closing: ["closing", "closed", "failed"],
  closed: [],
  failed: [],
};

/**
 * One connection slot of a client (`connections.ts`):
 *
 * - `carrying`: it has a transmission of its own (which may have failed;
 *   a loss moves it on).
 * - `redialling`: the connection was lost; a new one is being dialled.
 * - `dead`: reconnecting gave up on it.
 */
export type SlotStateName = "carrying" | "redialling" | "dead";

/** The legal moves of a connection slot. */
export const SLOT_TRANSITIONS: Transitions<SlotStateName> = {
  carrying: ["redialling"],
  redialling: ["carrying", "dead"],
  dead: [],
};

/**
 * What the client itself decided (`client.ts`): `open` until `close()`,
 * `closing` while it drains and disconnects, then `closed`. What its
 * connections went through is theirs; {@linkcode clientState} puts the two
 * together.
 */
export type ClientOwnState = "open" | "closing" | "closed";

/** The legal moves of a client. */
export const CLIENT_TRANSITIONS: Transitions<ClientOwnState> = {
  open: ["closing"],
  closing: ["closed"],
  closed: [],
};

/**
 * Checks a move against its machine's table.
 *
 * @param machine The machine's name, for the message.
 * @param table Its legal moves.
 * @param from The state now.
 * @param to The state asked for.
 * @throws {NbdError} an internal error when the move is not in the table.
 */
export function checkTransition<S extends string>(
  machine: string,
  table: Transitions<S>,
  from: S,
  to: S,
): void {
  if (!table[from].includes(to)) {
    throw new NbdError(
      `Internal error: ${machine} cannot go from ${from} to ${to}`,
    );
  }
}

/** What a client's connections say, for {@linkcode clientState}. */
export interface ConnectionsView {
  /** The error that ended them, if one did. */
  readonly failure: Error | undefined;
  /** The server said `ESHUTDOWN` and nothing will replace the connection. */
  readonly shuttingDown: boolean;
  /** Every reader has stopped. */
  readonly ended: boolean;
  /** Up, being dialled again, or lost. */
  readonly state: "open" | "reconnecting" | "failed";
}

/**
 * The client's state, as its guards name it: `"failed"` once the
 * connection broke (see `failure`), `"reconnecting"` while a lost
 * connection is dialled again (requests wait), `"closing"` while a
 * disconnect waits for requests in flight (also after the server said
 * `ESHUTDOWN`).
 */
export type ClientState =
  | "open"
  | "reconnecting"
  | "closing"
  | "closed"
  | "failed";

/**
 * The client's state, derived: its own decision to close comes first;
 * while open, a broken connection makes it `failed`, a server's
 * `ESHUTDOWN` `closing` and then `closed`, and otherwise the connections
 * say whether it is `open` or `reconnecting`.
 *
 * @param own What the client decided.
 * @param tx What its connections say.
 * @returns The state to show.
 */
export function clientState(
  own: ClientOwnState,
  tx: ConnectionsView,
): ClientState {
  if (own !== "open") return own;
  if (tx.failure) return "failed";
  if (tx.shuttingDown) return tx.ended ? "closed" : "closing";
  return tx.state;
}

/** Whether a client in `state` takes requests (held while reconnecting). */
export function takesRequests(state: ClientState): boolean {
  return state === "open" || state === "reconnecting";
}

/**
 * Why a client in `state` refuses a call, if it does: it takes requests
 * while open or reconnecting (they are held until a connection is back).
 *
 * @param method The method called, for the message.
 * @param state The client's state.
 * @param failure The error that broke the connection, if one did.
 * @param shutdown Whether the server said `ESHUTDOWN` (and the client did
 *   not close).
 * @returns The error to throw, or `undefined` when the call may go on.
 */
export function refusal(
  method: string,
  state: ClientState,
  failure: Error | undefined,
  shutdown: boolean,
): NbdConnectionClosedError | undefined {
  if (takesRequests(state)) return undefined;
  if (state === "failed") {
    const cause = failure ??
      new NbdConnectionClosedError("Every connection is lost");
    return new NbdConnectionClosedError(
      `Cannot call ${method}(): the connection failed: ${cause.message}`,
      { cause },
    );
  }
  if (shutdown) {
    return new NbdConnectionClosedError(
      `Cannot call ${method}(): the server is shutting down (ESHUTDOWN)`,
    );
  }
  return new NbdConnectionClosedError(
    `Cannot call ${method}(): the client is ${state}`,
  );
}
