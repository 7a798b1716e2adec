/**
 * What keeps a netlink-configured device in step after `NBD_CMD_CONNECT`:
 * on `NBD_CMD_LINK_DEAD` for its index it either dials again and hands the
 * new socket over with `NBD_CMD_RECONFIGURE` (persist) or disconnects the
 * device (so a dead server frees it, as on the ioctl path); it notices a
 * disconnect made by another process; and it disconnects on request.
 *
 * The kernel does the waiting: I/O issued while a link is dead waits up to
 * the dead-connection timeout given to `connectDevice()`, then fails.
 *
 * @module
 */

import type { DebugHook } from "../../lib/connect_options.ts";
import { errorText } from "../../lib/errors.ts";
import { retry } from "../../lib/reconnect.ts";
import type { ReleaseInfo } from "../_attached.ts";
import { deviceInUse } from "../_kernel.ts";
import { libc } from "../_libc.ts";
import {
  disconnectDevice,
  type LinkDeadWatch,
  reconfigureDevice,
} from "./mod.ts";

/** Options of {@linkcode superviseDevice}. */
export interface SuperviseOptions {
  /** The index `connectDevice()` returned. */
  index: number;
  /**
   * The subscription, opened before `connectDevice()` so that no
   * notification is missed; the supervisor owns it from here on.
   */
  watch: LinkDeadWatch;
  /**
   * Dials, negotiates and checks one socket for the kernel (the same
   * export, as `exportChanges()` decides); rejects when it cannot. Given: persist. Absent:
   * a dead link disconnects the device.
   */
  redial?: (signal: AbortSignal) => Promise<number>;
  /**
   * How many sockets the device was connected with (1). Without `redial`,
   * the device is disconnected once that many links died: until then the
   * kernel sends everything over the live ones.
   */
  connections?: number;
  /** Milliseconds of redialling before giving up and disconnecting (60 s). */
  giveUpAfterMs?: number;
  /** Milliseconds between checks that the device is still connected (500). */
  pollMs?: number;
  /** Tracing, as elsewhere in the library. */
  debug?: DebugHook;
}

/** A device under supervision. */
export interface SupervisedDevice {
  /** The device index. */
  readonly index: number;
  /** How many dead links were replaced so far. */
  readonly reconnects: number;
  /** Settles once the device is released; never rejects. */
  readonly closed: Promise<ReleaseInfo>;
  /** Disconnects the device and waits for the release. */
  disconnect(): Promise<ReleaseInfo>;
}

/** Milliseconds a disconnect may take before its pid file must be gone. */
const FREE_TIMEOUT_MS = 10_000;

/**
 * Starts supervising a connected device.
 *
 * @param options The device, its subscription and how to redial.
 * @returns The supervised device; `closed` says when and why it went.
 */
export function superviseDevice(options: SuperviseOptions): SupervisedDevice {
  return new Supervisor(options);
}

class Supervisor implements SupervisedDevice {
  readonly index: number;
  readonly closed: Promise<ReleaseInfo>;
  reconnects = 0;
  #deadLinks = 0;
  #options: SuperviseOptions;
  #name: string;
  #stop = new AbortController();
  #requested = false;
  /** Set while this process disconnects after a dead link. */
  #dropping = false;
  #finished = false;
  #resolve!: (r: ReleaseInfo) => void;
  #poller: ReturnType<typeof setInterval>;

  constructor(options: SuperviseOptions) {
    this.index = options.index;
    this.#options = options;
    this.#name = `nbd${options.index}`;
    this.closed = new Promise((resolve) => {
      this.#resolve = resolve;
    });
    this.#poller = setInterval(() => {
      // The pid file goes once the kernel drops the configuration; a
      // dead link keeps it, a disconnect from anywhere removes it.
      if (!this.#requested && !this.#dropping && !deviceInUse(this.#name)) {
        this.#finish({
          requested: false,
          reason: "lost",
          message:
            `/dev/${this.#name} was released without a disconnect from this process: another process detached it`,
          error: undefined,
        });
      }
    }, options.pollMs ?? 500);
    void this.#run();
  }

  #trace(event: string, fields: Record<string, unknown> = {}): void {
    this.#options.debug?.(event, { device: `/dev/${this.#name}`, ...fields });
  }

  async #run(): Promise<void> {
    try {
      for await (const index of this.#options.watch) {
        if (index !== this.index || this.#finished) continue;
        this.#trace("netlink.link_dead");
        if (this.#requested) return;
        if (!this.#options.redial) {
          const connections = this.#options.connections ?? 1;
          if (++this.#deadLinks < connections) continue;
          await this.#drop(
            connections === 1
              ? "the connection to the server died, so the device was disconnected"
              : `all ${connections} connections to the server died, so the device was disconnected`,
          );
          return;
        }
        const failure = await this.#replace(this.#options.redial);
        // A disconnect() while redialling has taken over.
        if (this.#requested || this.#finished) return;
        if (failure !== undefined) {
          await this.#drop(
            `the server could not be reached again: ${failure}`,
          );
          return;
        }
      }
    } catch (e) {
      if (!this.#finished) {
        await this.#drop(`watching the link failed: ${errorText(e)}`, e);
      }
    }
  }

  /** Redials with backoff; `undefined` once reconfigured, else why not. */
  async #replace(
    redial: (signal: AbortSignal) => Promise<number>,
  ): Promise<string | undefined> {
    const stop = this.#stop.signal;
    try {
      await retry(async (n) => {
        if (stop.aborted) throw new Error("stopped");
        const fd = await redial(stop);
        try {
          await reconfigureDevice(this.index, { sockets: [fd] });
        } finally {
          // The kernel holds its own reference.
          libc().close(fd);
        }
        this.reconnects++;
        this.#trace("netlink.reconfigured", { attempt: n + 1 });
      }, {
        // 100 ms, doubling, up to 2 s; no pause that would end past the
        // deadline.
        delay: 100,
        maxDelay: 2000,
        deadline: Date.now() + (this.#options.giveUpAfterMs ?? 60_000),
        pastDeadline: "stop",
        signal: stop,
        debug: (attempt, e) =>
          this.#trace("netlink.redial_failed", {
            attempt,
            error: errorText(e),
          }),
      });
      return undefined;
    } catch (e) {
      return stop.aborted ? "stopped" : errorText(e);
    }
  }

  /** Disconnects after a dead link, without being asked to. */
  async #drop(why: string, cause?: unknown): Promise<void> {
    if (this.#requested || this.#finished) return;
    this.#dropping = true;
    let error: Error | undefined = cause instanceof Error ? cause : undefined;
    try {
      await disconnectDevice(this.index);
    } catch (e) {
      error ??= e instanceof Error ? e : new Error(String(e));
    }
    this.#finish({
      requested: false,
      reason: error ? "error" : "lost",
      message: `/dev/${this.#name} was released: ${why}`,
      error,
    });
  }

  async disconnect(): Promise<ReleaseInfo> {
    if (this.#finished || this.#requested) return await this.closed;
    this.#requested = true;
    this.#stop.abort();
    this.#trace("netlink.disconnect");
    let error: Error | undefined;
    try {
      await disconnectDevice(this.index);
      const deadline = performance.now() + FREE_TIMEOUT_MS;
      while (deviceInUse(this.#name) && performance.now() < deadline) {
        await delay(20);
      }
      if (deviceInUse(this.#name)) {
        error = new Error(
          `/dev/${this.#name} is still connected ${FREE_TIMEOUT_MS} ms after NBD_CMD_DISCONNECT`,
        );
      }
    } catch (e) {
      error = e instanceof Error ? e : new Error(String(e));
    }
    this.#finish(
      error
        ? {
          requested: true,
          reason: "error",
          message: `/dev/${this.#name}: ${error.message}`,
          error,
        }
        : {
          requested: true,
          reason: "disconnect",
          message: `/dev/${this.#name} disconnected`,
          error: undefined,
        },
    );
    return await this.closed;
  }

  #finish(release: ReleaseInfo): void {
    if (this.#finished) return;
    this.#finished = true;
    clearInterval(this.#poller);
    this.#stop.abort();
    void this.#options.watch.return();
    this.#trace("netlink.released", { reason: release.reason });
    this.#resolve(release);
  }
}

function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}
