/**
 * The ioctl attachment: a device the kernel drives, from `NBD_DO_IT` on a
 * worker to the release, with what `closed` says about it. Signals,
 * disconnect-once and disposal are the shared base's (`../_attached.ts`).
 *
 * @module
 */

import type { Tracer } from "../../lib/_debug.ts";
import { errorText } from "../../lib/errors.ts";
import type { ExportInfo } from "../../lib/export.ts";
import { within } from "../../lib/_deadline.ts";
import type { RelayEnds } from "../_connect.ts";
import { startDoItWorker } from "./_do_it_worker.ts";
import {
  deviceInUse,
  NBD_CLEAR_QUE,
  NBD_CLEAR_SOCK,
  NBD_DISCONNECT,
} from "../_kernel.ts";
import {
  cString,
  describeErrno,
  E,
  libc,
  O_CLOEXEC,
  O_RDONLY,
} from "../_libc.ts";
import { type Relay, startRelay } from "../_relay.ts";
import { AttachedBase, type ReleaseInfo, stopRelays } from "../_attached.ts";
import { NbdKernelError } from "../errors.ts";

/** Milliseconds after NBD_DISCONNECT before the socket is cut by force. */
const DISCONNECT_GRACE_MS = 5000;

type WorkerMessage =
  | { type: "started"; tid: number }
  | { type: "returned"; result: number; errno: number }
  | { type: "failed"; message: string };

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** What an {@linkcode IoctlAttachment} takes over. */
export interface AttachmentParts {
  /** The device path, e.g. `"/dev/nbd0"`. */
  device: string;
  name: string;
  devFd: number;
  sockFd: number;
  info: ExportInfo;
  blockSize: number;
  size: number;
  readOnly: boolean;
  relay: RelayEnds | undefined;
  trace: Tracer;
}

/**
 * A device with an export attached through ioctls: starts `NBD_DO_IT` on a
 * worker and releases everything once the kernel lets go.
 */
export class IoctlAttachment extends AttachedBase {
  readonly kernelInterface = "ioctl" as const;
  #name: string;
  #devFd: number;
  #sockFd: number;
  #relayParts: RelayEnds | undefined;
  #relay: Relay | undefined;
  #trace: Tracer;
  #worker: Worker | undefined;
  #pendingIoctls: Promise<unknown>[] = [];
  #graceTimer: ReturnType<typeof setTimeout> | undefined;
  #onStarted: ((m: WorkerMessage) => void) | undefined;

  constructor(parts: AttachmentParts) {
    super({
      device: parts.device,
      size: parts.size,
      blockSize: parts.blockSize,
      readOnly: parts.readOnly,
      info: parts.info,
      route: parts.relay ? "relay" : "direct",
      connections: 1,
    });
    this.#name = parts.name;
    this.#devFd = parts.devFd;
    this.#sockFd = parts.sockFd;
    this.#relayParts = parts.relay;
    this.#trace = parts.trace;
  }

  /** Starts the relay and NBD_DO_IT; resolves once the device is up. */
  async start(timeoutMs: number): Promise<void> {
    if (this.#relayParts) {
      this.#relay = startRelay(this.#relayParts.local, this.#relayParts.remote);
    }
    const worker = startDoItWorker();
    this.#worker = worker;
    let early: WorkerMessage | undefined;
    const started = new Promise<WorkerMessage>((resolve) => {
      this.#onStarted = resolve;
    });
    worker.onmessage = (e: MessageEvent<WorkerMessage>) => {
      const m = e.data;
      if (m.type === "returned" || m.type === "failed") {
        early ??= m;
        this.#onStarted?.(m);
        void this.#finish(m);
      } else {
        this.#trace?.("kernel.do_it", { device: this.device, tid: m.tid });
        this.#onStarted?.(m);
      }
    };
    worker.onerror = (e: ErrorEvent) => {
      e.preventDefault();
      const m: WorkerMessage = { type: "failed", message: e.message };
      early ??= m;
      this.#onStarted?.(m);
      void this.#finish(m);
    };
    worker.postMessage({ fd: this.#devFd });

    const deadline = performance.now() + timeoutMs;
    const first = await within(started, timeoutMs);
    // The sysfs pid file appears once the kernel has the device up.
    while (!early && first?.type === "started") {
      if (deviceInUse(this.#name)) break;
      if (performance.now() > deadline) {
        await this.#abandon();
        throw new NbdKernelError(
          this.device,
          "NBD_DO_IT",
          0,
          `${this.device} did not come up within ${timeoutMs} ms`,
          "timeout",
        );
      }
      await delay(10);
    }
    if (first === undefined) {
      await this.#abandon();
      throw new NbdKernelError(
        this.device,
        "NBD_DO_IT",
        0,
        `The NBD_DO_IT thread for ${this.device} did not start within ${timeoutMs} ms`,
        "timeout",
      );
    }
    if (early) {
      const release = await this.closed;
      const m = early;
      if (m.type === "failed") {
        throw new NbdKernelError(
          this.device,
          "NBD_DO_IT",
          0,
          `Cannot start ${this.device}: ${m.message}`,
        );
      }
      throw new NbdKernelError(
        this.device,
        "NBD_DO_IT",
        m.type === "returned" ? m.errno : 0,
        `Cannot start ${this.device}${
          m.type === "returned" && m.result === 0 ? ": " + release.message : ""
        }`,
      );
    }
    this.#trace?.("kernel.up", { device: this.device, size: this.size });
    // Partitions appear on the next open after the device is up (no udev
    // does it for us). On a pool thread: the open reads the partition
    // table, which on the relay path this very thread must carry.
    const c = libc();
    void c.open_nb(cString(this.device), O_RDONLY | O_CLOEXEC, 0).then((fd) =>
      fd >= 0 ? c.close_nb(fd) : undefined
    );
  }

  protected askDisconnect(): void {
    this.#trace?.("kernel.disconnect", { device: this.device });
    const c = libc();
    // On a pool thread: the kernel sends NBD_CMD_DISC through the socket,
    // which on the relay path this thread has to carry.
    this.#pendingIoctls.push(c.ioctl_nb(this.#devFd, NBD_DISCONNECT, 0n));
    // A server that never closes its end is cut off, as `nbd-client -d`
    // does.
    this.#graceTimer = setTimeout(() => this.cut(), DISCONNECT_GRACE_MS);
  }

  /** Shuts the socket down without waiting for the server. */
  protected cut(): void {
    if (this.releasing) return;
    clearTimeout(this.#graceTimer);
    this.#pendingIoctls.push(
      libc().ioctl_nb(this.#devFd, NBD_CLEAR_SOCK, 0n),
    );
  }

  /** Gives up on a device that never came up. */
  async #abandon(): Promise<void> {
    this.markRequested();
    libc().ioctl(this.#devFd, NBD_CLEAR_SOCK, 0n);
    await within(this.closed, 5000);
    // NBD_DO_IT never started or never returned: release what we hold.
    await this.#finish({ type: "failed", message: "abandoned" });
  }

  async #finish(m: WorkerMessage): Promise<void> {
    if (m.type === "started" || !this.beginRelease()) return;
    let cleanupError: unknown;
    try {
      await this.#release();
    } catch (e) {
      // `closed` must settle whatever happens; the error goes in it.
      cleanupError = e;
    }
    this.settle(this.#describe(m, cleanupError));
  }

  /** Hands everything back once NBD_DO_IT has returned. */
  async #release(): Promise<void> {
    clearTimeout(this.#graceTimer);
    const c = libc();
    // Let ioctls on pool threads finish before their descriptor goes.
    await Promise.allSettled(this.#pendingIoctls);
    c.ioctl(this.#devFd, NBD_CLEAR_QUE, 0n);
    c.ioctl(this.#devFd, NBD_CLEAR_SOCK, 0n);
    if (this.#relay) {
      await stopRelays([this.#relay]);
    } else if (this.#relayParts) {
      this.#relayParts.local.close();
      try {
        this.#relayParts.remote.close();
      } catch {
        // Already closed.
      }
    }
    c.close(this.#sockFd);
    // Closing the last reference releases the device (its pid file goes).
    await c.close_nb(this.#devFd);
    this.#worker?.terminate();
  }

  /** What `closed` says about a release. */
  #describe(
    m: Exclude<WorkerMessage, { type: "started" }>,
    cleanupError: unknown,
  ): ReleaseInfo {
    let release: ReleaseInfo;
    const relayError = this.#relay?.error;
    if (m.type === "failed") {
      release = {
        requested: this.requested,
        reason: "error",
        message: `${this.device}: the NBD_DO_IT thread failed: ${m.message}`,
        error: new Error(m.message),
      };
    } else if (m.result < 0) {
      const what = m.errno === E.ETIMEDOUT
        ? "the server did not answer in time"
        : `NBD_DO_IT failed with ${describeErrno(m.errno)}`;
      release = {
        requested: this.requested,
        reason: "error",
        message: `${this.device} was released: ${what}`,
        error: new NbdKernelError(
          this.device,
          "NBD_DO_IT",
          m.errno,
          `${this.device} was released`,
        ),
      };
    } else if (this.requested) {
      release = {
        requested: true,
        reason: "disconnect",
        message: `${this.device} disconnected`,
        error: undefined,
      };
    } else {
      release = {
        requested: false,
        reason: "lost",
        message: relayError
          ? `${this.device} was released: the connection to the server failed: ${
            errorText(relayError)
          }`
          : `${this.device} was released without a disconnect from this process: the server closed the connection, or another process detached the device`,
        error: relayError instanceof Error ? relayError : undefined,
      };
    }
    if (cleanupError !== undefined && release.error === undefined) {
      release.error = cleanupError instanceof Error
        ? cleanupError
        : new Error(String(cleanupError));
    }
    this.#trace?.("kernel.released", {
      device: this.device,
      reason: release.reason,
    });
    return release;
  }
}
