/**
 * What every attached device shares, however the kernel was told
 * (`ioctl/`, `netlink/`): the public shape ({@linkcode AttachedDevice}),
 * what its release says ({@linkcode ReleaseInfo}), and one base class that
 * owns the life of the attachment: watching signals, disconnecting once,
 * disposing, stopping the relays, and settling `closed` exactly once.
 *
 * The life is one state, changed only in `#enter()`:
 *
 * ```
 * attached ──disconnect()──▶ disconnecting
 *     │                           │
 *     └──── the kernel lets go ───┴──▶ releasing ──▶ released
 * ```
 *
 * `releasing` remembers whether this process asked, so a release that
 * races a disconnect is still told apart from one nobody asked for.
 *
 * @module
 */

import type { ExportInfo } from "../lib/export.ts";
import type { Relay } from "./_relay.ts";

/** Why a device was released. */
export type ReleaseReason =
  /** {@linkcode AttachedDevice.disconnect} was called (or a signal came). */
  | "disconnect"
  /**
   * The kernel let go without our asking: the server closed the connection
   * (or died), or another process detached the device.
   */
  | "lost"
  /** The kernel reported an error, such as a request timeout. */
  | "error";

/** What {@linkcode AttachedDevice.closed} resolves to. */
export interface ReleaseInfo {
  /** Whether this process asked for the disconnect. */
  requested: boolean;
  /** Why the device was released. */
  reason: ReleaseReason;
  /** One sentence for users. */
  message: string;
  /** The underlying error, for `"error"` (and a failed relay). */
  error: Error | undefined;
}

/** A device with an export attached. */
export interface AttachedDevice extends AsyncDisposable {
  /** The device path, e.g. `"/dev/nbd0"`. */
  readonly device: string;
  /** Size in bytes as the kernel sees it (whole blocks of the export). */
  readonly size: number;
  /** The logical block size given to the kernel. */
  readonly blockSize: number;
  /** Whether the device is read-only. */
  readonly readOnly: boolean;
  /** What the handshake settled. */
  readonly info: ExportInfo;
  /**
   * How the bytes flow: `"direct"` (the kernel owns the socket) or
   * `"relay"` (this process copies them, as for TLS).
   */
  readonly route: "direct" | "relay";
  /**
   * How the kernel was told: `"netlink"` (the generic netlink family
   * `nbd`; the device outlives this process on the direct route) or
   * `"ioctl"` (a thread of this process waits in `NBD_DO_IT`; the device
   * goes with the process).
   */
  readonly kernelInterface: "netlink" | "ioctl";
  /** How many connections the kernel spreads requests over. */
  readonly connections: number;
  /** Settles once the device is released; never rejects. */
  readonly closed: Promise<ReleaseInfo>;
  /** Asks the kernel to disconnect, then waits for the release. */
  disconnect(): Promise<ReleaseInfo>;
}

/** Where process signals are listened for: `Deno`, or a fake in tests. */
export interface SignalSource {
  /** As `Deno.addSignalListener`. */
  addSignalListener(signal: Deno.Signal, handler: () => void): void;
  /** As `Deno.removeSignalListener`. */
  removeSignalListener(signal: Deno.Signal, handler: () => void): void;
}

/** The signals {@linkcode AttachedBase.watch} handles. */
export const WATCHED_SIGNALS: readonly Deno.Signal[] = ["SIGINT", "SIGTERM"];

/** What every attachment knows about itself once the device is up. */
export interface AttachedParts {
  /** The device path, e.g. `"/dev/nbd0"`. */
  device: string;
  size: number;
  blockSize: number;
  readOnly: boolean;
  info: ExportInfo;
  route: "direct" | "relay";
  connections: number;
}

/** Where an attachment is in its life; see the module doc. */
export type AttachedState =
  | { name: "attached" }
  | { name: "disconnecting" }
  | { name: "releasing"; requested: boolean }
  | { name: "released"; release: ReleaseInfo };

/** The legal moves of {@linkcode AttachedState}, by state name. */
export const ATTACHED_TRANSITIONS: Readonly<
  Record<AttachedState["name"], readonly AttachedState["name"][]>
> = {
  attached: ["disconnecting", "releasing"],
  disconnecting: ["releasing"],
  releasing: ["released"],
  released: [],
};

/**
 * Stops relays and waits for them.
 *
 * @param relays The running relays.
 * @returns The first relay's failure, if one failed rather than ended.
 */
export async function stopRelays(relays: readonly Relay[]): Promise<unknown> {
  for (const relay of relays) relay.stop();
  await Promise.all(relays.map((relay) => relay.done));
  return relays.find((relay) => relay.error !== undefined)?.error;
}

/**
 * The life every attached device shares. A subclass says how to ask the
 * kernel to disconnect ({@linkcode AttachedBase.askDisconnect}) and how to
 * cut the connection without waiting for the server
 * ({@linkcode AttachedBase.cut}); it reports the kernel letting go with
 * {@linkcode AttachedBase.beginRelease} then
 * {@linkcode AttachedBase.settle}.
 */
export abstract class AttachedBase implements AttachedDevice {
  readonly device: string;
  readonly size: number;
  readonly blockSize: number;
  readonly readOnly: boolean;
  readonly info: ExportInfo;
  readonly route: "direct" | "relay";
  readonly connections: number;
  abstract readonly kernelInterface: "netlink" | "ioctl";
  readonly closed: Promise<ReleaseInfo>;
  #state: AttachedState = { name: "attached" };
  #resolveClosed!: (release: ReleaseInfo) => void;
  #unwatch: (() => void) | undefined;

  protected constructor(parts: AttachedParts) {
    this.device = parts.device;
    this.size = parts.size;
    this.blockSize = parts.blockSize;
    this.readOnly = parts.readOnly;
    this.info = parts.info;
    this.route = parts.route;
    this.connections = parts.connections;
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
  }

  /** The current state's name. */
  get state(): AttachedState["name"] {
    return this.#state.name;
  }

  /** Whether this process asked for the disconnect (so far). */
  protected get requested(): boolean {
    const s = this.#state;
    return s.name === "disconnecting" ||
      (s.name === "releasing" && s.requested) ||
      (s.name === "released" && s.release.requested);
  }

  /** Whether the kernel has let go (the release is under way or done). */
  protected get releasing(): boolean {
    return this.#state.name === "releasing" || this.#state.name === "released";
  }

  #enter(next: AttachedState): void {
    if (!ATTACHED_TRANSITIONS[this.#state.name].includes(next.name)) {
      throw new Error(
        `${this.device}: an attachment cannot go from ${this.#state.name} to ${next.name}`,
      );
    }
    this.#state = next;
  }

  /**
   * Disconnects on SIGINT and SIGTERM (when `handleSignals`) and when
   * `signal` aborts; undone once the device is released. The first signal
   * asks for a clean disconnect, which waits for the server; a signal while
   * that is under way does not wait any longer: the connection is cut
   * ({@linkcode AttachedBase.cut}).
   *
   * @param handleSignals Whether to listen for SIGINT and SIGTERM.
   * @param signal Disconnects when it aborts.
   * @param source Where to listen for process signals (`Deno`).
   */
  watch(
    handleSignals: boolean,
    signal: AbortSignal | undefined,
    source: SignalSource = Deno,
  ): void {
    const onSignal = () => {
      if (this.#state.name === "attached") void this.disconnect();
      else if (this.#state.name === "disconnecting") this.cut();
    };
    const signals = handleSignals ? WATCHED_SIGNALS : [];
    for (const s of signals) source.addSignalListener(s, onSignal);
    signal?.addEventListener("abort", onSignal, { once: true });
    this.#unwatch = () => {
      this.#unwatch = undefined;
      for (const s of signals) source.removeSignalListener(s, onSignal);
      signal?.removeEventListener("abort", onSignal);
    };
    if (this.releasing) this.#unwatch();
  }

  /**
   * Asks the kernel to disconnect, once; later calls wait for the same
   * release.
   *
   * @returns What `closed` settles to.
   */
  disconnect(): Promise<ReleaseInfo> {
    if (this.markRequested()) this.askDisconnect();
    return this.closed;
  }

  /** Disconnects and waits for the release; idempotent. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.disconnect();
  }

  /**
   * Records that this process wants the device released, without asking
   * the kernel yet (a device given up before it came up).
   *
   * @returns `false` when already asked or released.
   */
  protected markRequested(): boolean {
    if (this.#state.name !== "attached") return false;
    this.#enter({ name: "disconnecting" });
    return true;
  }

  /** Asks the kernel to disconnect; the release follows. */
  protected abstract askDisconnect(): void;

  /** Cuts the connection without waiting for the server. */
  protected abstract cut(): void;

  /**
   * The kernel let go: stops watching signals.
   *
   * @returns `false` when the release had already begun.
   */
  protected beginRelease(): boolean {
    if (this.releasing) return false;
    this.#enter({ name: "releasing", requested: this.requested });
    this.#unwatch?.();
    return true;
  }

  /**
   * Settles `closed`, after {@linkcode AttachedBase.beginRelease}.
   *
   * @param release What the release says.
   * @throws {Error} when the release has not begun or already settled.
   */
  protected settle(release: ReleaseInfo): void {
    this.#enter({ name: "released", release });
    this.#resolveClosed(release);
  }
}
