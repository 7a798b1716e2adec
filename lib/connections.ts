/**
 * The connections a client carries its requests over: one, or several to an
 * export that allows it (`NBD_FLAG_CAN_MULTI_CONN`), each with its own
 * {@linkcode Transmission}. Requests go to the connection with the fewest
 * outstanding. With a reconnect policy, a lost connection is dialled again
 * with the same negotiation; its requests are held meanwhile and replayed in
 * their original order once the new connection is known to reach the same
 * export (`reconnect.ts` holds those rules).
 *
 * One connection without reconnecting costs nothing here: requests go
 * straight to its transmission.
 *
 * @module
 */

import { CMD_BLOCK_STATUS, CMD_FLUSH, commandName } from "./constants.ts";
import type { Tracer } from "./_debug.ts";
import { abortReason, errorText, NbdConnectionClosedError } from "./errors.ts";
import type { ExportInfo } from "./export.ts";
import {
  exportChanges,
  gaveUp,
  isConnectionLoss,
  modifiesData,
  NbdExportChangedError,
  type ReconnectPolicy,
  retry,
} from "./reconnect.ts";
import {
  type Command,
  type ExtentsById,
  Transmission,
  type TransmissionStats,
} from "./transmission.ts";
import type { Transport } from "./transport.ts";
import { encodeStatusPayload } from "./_wire.ts";
import { type AbortTarget, type Watch, watchAbort } from "./_wait_queue.ts";
import { checkTransition, SLOT_TRANSITIONS } from "./_states.ts";

/** A negotiated connection, ready for transmission. */
export interface Link {
  transport: Transport;
  info: ExportInfo;
}

/** Makes a new connection with the same negotiation as the first. */
export type Dialer = (signal: AbortSignal) => Promise<Link>;

/** The connections to carry, and how they behave. */
export interface Pool {
  /** The negotiated connections; every later one must match the first. */
  links: Link[];
  /** Requests in flight at once on each connection. */
  maxInFlight: number;
  trace: Tracer;
  /** Reconnect lost connections; without it a loss fails the client. */
  reconnect?: ReconnectPolicy | undefined;
  /** How to connect again; needed with `reconnect`. */
  dial?: Dialer | undefined;
}

/**
 * What crossed the wire, over every connection a client used (reconnects
 * included), as libnbd's `nbd_stats_*` count it.
 */
export interface NbdStats {
  /** Bytes written to the server, handshakes included. */
  bytesSent: number;
  /** Bytes read from the server, handshakes included. */
  bytesReceived: number;
  /** Requests sent, `NBD_CMD_DISC` included. */
  chunksSent: number;
  /** Simple replies and structured reply chunks received. */
  chunksReceived: number;
  /** Requests sent by command name (`NBD_CMD_READ`: 12, ...). */
  requests: Record<string, number>;
}

/** Adds one connection's counters into `into`. */
function addStats(into: NbdStats, from: TransmissionStats): void {
  into.bytesSent += from.bytesSent;
  into.bytesReceived += from.bytesReceived;
  into.chunksReceived += from.chunksReceived;
  for (const [type, n] of from.requests.entries()) {
    if (n === 0) continue;
    into.chunksSent += n;
    const name = commandName(type);
    into.requests[name] = (into.requests[name] ?? 0) + n;
  }
}

function noStats(): NbdStats {
  return {
    bytesSent: 0,
    bytesReceived: 0,
    chunksSent: 0,
    chunksReceived: 0,
    requests: {},
  };
}

/** `"reconnecting"` while no connection is up but one is being dialled. */
export type ConnectionsState = "open" | "reconnecting" | "failed";

/** A request is replayed at most this often, so a server that dies at every
 * attempt cannot keep one request going forever. */
const MAX_REPLAYS = 16;

/** A slot's state; see `SLOT_TRANSITIONS` in `_states.ts`. */
type SlotState =
  | { readonly name: "carrying" }
  | { readonly name: "redialling"; readonly done: Promise<void> }
  | { readonly name: "dead" };

/** Reconnecting gave up on this slot. */
function isDead(slot: Slot): boolean {
  return slot.state.name === "dead";
}

interface Slot {
  readonly index: number;
  transport: Transport;
  tx: Transmission;
  info: ExportInfo;
  outstanding: number;
  /** Carrying, redialling (with the reconnect in progress), or dead. */
  state: SlotState;
  /**
   * Losses close together are one outage: one deadline and one growing
   * backoff, until a connection carries a reply or stays up a while. A
   * server that accepts and hangs up at once cannot make a storm.
   */
  streak: { deadline: number; attempts: number } | undefined;
  /** When the current connection came up. */
  upSince: number;
}

/**
 * How long a new connection must stay up (without carrying a reply) before
 * a loss counts as a new outage rather than more of the same.
 */
function stableAfter(policy: ReconnectPolicy): number {
  return Math.max(1_000, policy.maxDelay);
}

/** The connections of one client; see the module doc. */
export class Connections {
  readonly #slots: Slot[];
  readonly #original: ExportInfo;
  readonly #byName = new Map<string, number>();
  readonly #options: Pool;
  readonly #policy: ReconnectPolicy | undefined;
  readonly #stop = new AbortController();
  /**
   * Requests waiting for a connection to come up, in arrival order (a set:
   * one that gives up leaves in constant time).
   */
  #waiting = new Set<Held>();
  /** Data-changing requests in flight, which a multi-conn flush waits for. */
  readonly #modifying = new Set<Promise<unknown>>();
  #failure: Error | undefined;
  #closed = false;
  #reconnects = 0;
  /** The counters of connections already replaced. */
  readonly #retired = noStats();

  /**
   * @param options The connections, limits, tracing and the reconnect
   *   policy; the first connection's export is the one every later
   *   connection must match.
   */
  constructor(options: Pool) {
    const links = options.links;
    if (links.length === 0) throw new RangeError("No connection given");
    this.#options = options;
    this.#policy = options.dial ? options.reconnect : undefined;
    this.#original = links[0]!.info;
    for (const [id, name] of this.#original.metaContexts) {
      this.#byName.set(name, id);
    }
    this.#slots = links.map((link, index) => this.#slot(index, link));
  }

  /** The transmission phase over `link`, with the pool's limits and trace. */
  #transmission(link: Link): Transmission {
    return new Transmission(
      link.transport,
      link.info,
      this.#options.maxInFlight,
      this.#options.trace,
    );
  }

  #slot(index: number, link: Link): Slot {
    const slot: Slot = {
      index,
      transport: link.transport,
      tx: this.#transmission(link),
      info: link.info,
      outstanding: 0,
      state: { name: "carrying" },
      streak: undefined,
      upSince: Date.now(),
    };
    this.#watch(slot, slot.tx);
    return slot;
  }

  /** The one place a slot's state changes, checked against the table. */
  #enter(slot: Slot, next: SlotState): void {
    checkTransition(
      "a connection slot",
      SLOT_TRANSITIONS,
      slot.state.name,
      next.name,
    );
    slot.state = next;
  }

  /** Tracing: `makeTracer()` made the hook safe, whatever it throws. */
  #trace(event: string, fields: Record<string, unknown>): void {
    this.#options.trace?.(event, fields);
  }

  /**
   * Notices a connection that dies, idle or not: a lost one comes back at
   * once; one whose server broke the protocol is not dialled again
   * (`reconnect.ts`), so its failure is the client's, as without
   * reconnecting. Left alone, it would be neither up nor given up, and
   * every request would wait for it forever.
   */
  #watch(slot: Slot, tx: Transmission): void {
    if (!this.#policy) return;
    tx.finished.then(() => {
      if (slot.tx !== tx || !tx.failure || this.#closed) return;
      if (isConnectionLoss(tx.failure)) this.#lose(slot, tx, tx.failure);
      else this.#failAll(tx.failure);
    });
  }

  /** How many connections carry requests, or will once back; not the ones given up. */
  get count(): number {
    return this.#slots.filter((s) => !isDead(s)).length;
  }

  /** How many times a lost connection was replaced. */
  get reconnects(): number {
    return this.#reconnects;
  }

  /** Counters over every connection, past ones included. */
  get stats(): NbdStats {
    const out = { ...this.#retired, requests: { ...this.#retired.requests } };
    for (const s of this.#slots) addStats(out, s.tx.stats);
    return out;
  }

  /** Whether any connection is up, one is being dialled, or all is lost. */
  get state(): ConnectionsState {
    if (this.#failure) return "failed";
    if (this.#slots.some((s) => this.#live(s))) return "open";
    if (this.#policy && this.#slots.some((s) => !isDead(s))) {
      return "reconnecting";
    }
    return "failed";
  }

  /** The error that ended the client's connections, if one did. */
  get failure(): Error | undefined {
    if (this.#failure) return this.#failure;
    if (this.#policy) return undefined;
    return this.#slots.find((s) => s.tx.failure)?.tx.failure;
  }

  /** Whether the server said `ESHUTDOWN` and nothing will replace it. */
  get shuttingDown(): boolean {
    return !this.#policy && this.#slots.some((s) => s.tx.shuttingDown);
  }

  /** Whether every connection's reader has stopped. */
  get ended(): boolean {
    return this.#slots.every((s) => s.tx.ended);
  }

  #live(s: Slot): boolean {
    return s.state.name === "carrying" && !s.tx.failure && !s.tx.shuttingDown;
  }

  /**
   * Sends `cmd` on the least busy connection and waits for its reply,
   * replaying it on a new connection when the old one is lost.
   *
   * @returns Block status extents by the context ids of the first
   *   connection (empty for other commands).
   */
  submit(cmd: Command): Promise<ExtentsById> {
    const slots = this.#slots;
    if (slots.length === 1 && !this.#policy) return slots[0]!.tx.submit(cmd);
    if (slots.length > 1) {
      if (cmd.type === CMD_FLUSH) return this.#flush(cmd);
      if (modifiesData(cmd.type)) {
        const done = this.#carry(cmd);
        this.#modifying.add(done);
        const forget = () => this.#modifying.delete(done);
        done.then(forget, forget);
        return done;
      }
    }
    return this.#carry(cmd);
  }

  /**
   * A flush on one of several connections covers the writes that completed
   * before it was sent, on any of them (`doc/proto.md`, multi-conn): so the
   * writes already in flight finish first.
   */
  async #flush(cmd: Command): Promise<ExtentsById> {
    if (this.#modifying.size > 0) {
      await Promise.allSettled([...this.#modifying]);
    }
    return await this.#carry(cmd);
  }

  async #carry(cmd: Command): Promise<ExtentsById> {
    for (let replays = 0;; replays++) {
      const slot = this.#pick() ?? await this.#awaitSlot(cmd.hold);
      const tx = slot.tx;
      slot.outstanding++;
      try {
        const result = await tx.submit(
          cmd.contexts && slot.info !== this.#original
            ? this.#translate(cmd, slot.info)
            : cmd,
        );
        // It carried a reply: whatever went wrong before is over.
        if (slot.streak && slot.tx === tx) slot.streak = undefined;
        return cmd.type === CMD_BLOCK_STATUS && slot.info !== this.#original
          ? this.#remap(result, slot.info)
          : result;
      } catch (e) {
        if (
          !this.#policy || this.#closed || this.#failure ||
          cmd.hold?.aborted || !isConnectionLoss(e)
        ) {
          if (!this.#policy && tx.failure && this.#slots.length > 1) {
            this.#failAll(tx.failure);
          }
          throw e;
        }
        this.#lose(slot, tx, e);
        if (replays >= MAX_REPLAYS) {
          throw new NbdConnectionClosedError(
            `The connection was lost ${
              replays + 1
            } times while this request was in flight: ${errorText(e)}`,
            { cause: e },
          );
        }
        this.#trace("replay", {
          offset: cmd.offset,
          length: cmd.length,
          replays: replays + 1,
        });
      } finally {
        slot.outstanding--;
      }
    }
  }

  /** The live connection with the fewest requests outstanding. */
  #pick(): Slot | undefined {
    let best: Slot | undefined;
    for (const s of this.#slots) {
      if (!this.#live(s)) continue;
      if (!best || s.outstanding < best.outstanding) best = s;
    }
    return best;
  }

  /** Waits, in arrival order, until a connection is up again. */
  async #awaitSlot(signal: AbortSignal | undefined): Promise<Slot> {
    while (true) {
      this.#throwIfOver();
      if (signal?.aborted) throw abortReason(signal);
      const slot = this.#pick();
      if (slot) return slot;
      const { promise, resolve } = Promise.withResolvers<void>();
      const held = new Held(this.#waiting, resolve, signal);
      this.#waiting.add(held);
      await promise;
    }
  }

  #throwIfOver(): void {
    // Every held request gets the same error, as with one connection.
    if (this.#failure) throw this.#failure;
    if (this.#closed) {
      throw new NbdConnectionClosedError(
        "The client was closed while the request waited for a new connection",
      );
    }
    // Without reconnecting nothing comes back: fail instead of waiting.
    if (!this.#policy || this.#slots.every(isDead)) {
      const down = this.failure;
      if (down) throw down;
      throw new NbdConnectionClosedError(
        this.#slots.some((s) => s.tx.shuttingDown)
          ? "Cannot send the request: the server is shutting down (ESHUTDOWN)"
          : "Every connection is lost",
      );
    }
  }

  #wake(): void {
    const all = [...this.#waiting];
    this.#waiting.clear();
    for (const held of all) held.wake();
  }

  /** Starts replacing `slot`'s connection `tx`, once per loss. */
  #lose(slot: Slot, tx: Transmission, cause: unknown): void {
    if (slot.tx !== tx || slot.state.name !== "carrying" || this.#closed) {
      return;
    }
    this.#trace("connection lost", {
      connection: slot.index,
      error: errorText(cause),
    });
    // What the old connection still owes comes back here as a loss and is
    // replayed; a short grace lets replies already on their way arrive.
    tx.disconnect(AbortSignal.timeout(200)).catch(() => {});
    const done = this.#redial(slot, cause).finally(() => {
      if (slot.state.name === "redialling") {
        this.#enter(slot, { name: "carrying" });
      }
      this.#wake();
    });
    this.#enter(slot, { name: "redialling", done });
  }

  async #redial(slot: Slot, cause: unknown): Promise<void> {
    const policy = this.#policy!;
    const dial = this.#options.dial!;
    // A connection that stayed up long enough ended the last outage.
    if (slot.streak && Date.now() - slot.upSince >= stableAfter(policy)) {
      slot.streak = undefined;
    }
    const streak = slot.streak ??= {
      deadline: Date.now() + policy.timeout,
      attempts: 0,
    };
    const stop = this.#stop.signal;
    let link: Link;
    try {
      link = await retry(
        (_n, left) =>
          dial(AbortSignal.any([stop, AbortSignal.timeout(Math.max(1, left))])),
        {
          delay: policy.delay,
          maxDelay: policy.maxDelay,
          deadline: streak.deadline,
          signal: stop,
          counter: streak,
          cause,
          debug: (attempt, e) =>
            this.#trace("reconnect attempt failed", {
              connection: slot.index,
              attempt,
              error: errorText(e),
            }),
        },
      );
    } catch (last) {
      // Closed, or failed for good elsewhere: nothing to give up on.
      if (stop.aborted) return;
      this.#enter(slot, { name: "dead" });
      if (this.#slots.every(isDead)) {
        this.#failAll(gaveUp(policy, last));
      }
      return;
    }
    if (this.#closed || this.#failure) {
      link.transport.close();
      return;
    }
    const changes = exportChanges(
      this.#original,
      link.info,
      this.#slots.length > 1,
    );
    if (changes.length > 0) {
      // Nothing was sent to it; say goodbye politely and stop for good.
      const stranger = new Transmission(
        link.transport,
        link.info,
        1,
        undefined,
      );
      await stranger.disconnect(AbortSignal.timeout(1000)).catch(() => {});
      this.#failAll(new NbdExportChangedError(changes));
      return;
    }
    addStats(this.#retired, slot.tx.stats);
    slot.transport = link.transport;
    slot.tx = this.#transmission(link);
    slot.info = link.info;
    slot.upSince = Date.now();
    this.#watch(slot, slot.tx);
    this.#reconnects++;
    this.#trace("reconnected", {
      connection: slot.index,
      attempts: streak.attempts,
      reconnects: this.#reconnects,
    });
  }

  /** Ends every connection with `error`; held and later requests get it. */
  #failAll(error: Error): void {
    if (this.#failure) return;
    this.#failure = error;
    this.#trace("connections failed", { error: error.message });
    this.#stop.abort(error);
    this.#wake();
    for (const s of this.#slots) {
      s.tx.disconnect(AbortSignal.timeout(0)).catch(() => {});
    }
  }

  /** A block status request in the payload form, in `info`'s context ids. */
  #translate(cmd: Command, info: ExportInfo): Command {
    const ids = new Map<string, number>();
    for (const [id, name] of info.metaContexts) ids.set(name, id);
    const contexts = cmd.contexts!.map((id) =>
      ids.get(this.#original.metaContexts.get(id)!)!
    );
    return {
      ...cmd,
      contexts,
      payload: encodeStatusPayload(cmd.length, contexts),
    };
  }

  /** Re-keys block status from a new connection's context ids. */
  #remap(byId: ExtentsById, info: ExportInfo): ExtentsById {
    const out: ExtentsById = new Map();
    for (const [id, extents] of byId) {
      const original = this.#byName.get(info.metaContexts.get(id)!);
      if (original !== undefined) out.set(original, extents);
    }
    return out;
  }

  /**
   * Stops reconnecting for good: requests held for a new connection fail at
   * once, and a loss from now on fails the requests it hits.
   */
  halt(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#stop.abort();
    this.#wake();
  }

  /** Closes every transport at once, failing whatever still waits. */
  tearDown(): void {
    this.halt();
    for (const s of this.#slots) s.transport.close();
  }

  /**
   * Closes every connection: waits for requests in flight (bounded by
   * `signal`), sends `NBD_CMD_DISC` on each, and fails requests still held
   * for a reconnect at once.
   */
  async disconnect(signal?: AbortSignal): Promise<void> {
    this.halt();
    const redials = this.#slots.map((s) =>
      s.state.name === "redialling" ? s.state.done : undefined
    );
    await Promise.all(this.#slots.map((s) => s.tx.disconnect(signal)));
    await Promise.all(redials);
  }
}

/**
 * A request held until a connection is up again; it wakes early, to see
 * its signal has aborted, through one listener per distinct signal.
 */
class Held implements AbortTarget {
  #watch: Watch | undefined;

  constructor(
    readonly set: Set<Held>,
    readonly resolve: () => void,
    signal: AbortSignal | undefined,
  ) {
    this.#watch = signal ? watchAbort(signal, this) : undefined;
  }

  /** A connection came up, or the wait is over for everyone. */
  wake(): void {
    this.#watch?.cancel();
    this.resolve();
  }

  onAbort(): void {
    this.#watch = undefined;
    this.set.delete(this);
    this.resolve();
  }
}
