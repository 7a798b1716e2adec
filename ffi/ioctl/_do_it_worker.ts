/**
 * Runs `NBD_DO_IT` on a thread of its own, as nbd-client does.
 *
 * `NBD_DO_IT` blocks until the device is released. A signal delivered to the
 * thread waiting in it interrupts the kernel's wait and tears the device
 * down, and a thread-pool call would also lose errno. So this worker blocks
 * every signal on its thread first, then calls synchronously and reads errno
 * right after, on the same thread.
 *
 * The worker is started from a `blob:` URL made of {@linkcode doItWorker}'s
 * source: a worker loaded from a file would need `--allow-read`, and the
 * documented command line grants only `--allow-net --allow-ffi`. So the
 * function must not use anything from its module's scope.
 *
 * Messages: in `{ fd }`; out `{ type: "started", tid }`, then
 * `{ type: "returned", result, errno }` or `{ type: "failed", message }`.
 *
 * @module
 */

/** The part of a worker's global scope this uses. */
interface WorkerScope {
  onmessage: ((e: MessageEvent<{ fd: number }>) => void) | null;
  postMessage(message: unknown): void;
  close(): void;
}

/** The worker's whole program. Self-contained: it is run from its source. */
export function doItWorker(): void {
  const scope = globalThis as unknown as WorkerScope;
  const NBD_DO_IT = 0xab03n;
  const SIG_BLOCK = 0;
  scope.onmessage = (event) => {
    const fd = event.data.fd;
    let lib;
    try {
      lib = Deno.dlopen("libc.so.6", {
        ioctl: { parameters: ["i32", "u64", "u64"], result: "i32" },
        sigfillset: { parameters: ["buffer"], result: "i32" },
        pthread_sigmask: {
          parameters: ["i32", "buffer", "buffer"],
          result: "i32",
        },
        gettid: { parameters: [], result: "i32" },
        __errno_location: { parameters: [], result: "pointer" },
      });
    } catch (e) {
      scope.postMessage({ type: "failed", message: String(e) });
      scope.close();
      return;
    }
    const c = lib.symbols;
    // sigset_t is 128 bytes in glibc.
    const all = new Uint8Array(128);
    c.sigfillset(all);
    const rc = c.pthread_sigmask(SIG_BLOCK, all, null);
    if (rc !== 0) {
      scope.postMessage({
        type: "failed",
        message: `pthread_sigmask failed with ${rc}`,
      });
      lib.close();
      scope.close();
      return;
    }
    scope.postMessage({ type: "started", tid: c.gettid() });
    const result = c.ioctl(fd, NBD_DO_IT, 0n);
    let errno = 0;
    if (result < 0) {
      const p = c.__errno_location();
      if (p !== null) errno = new Deno.UnsafePointerView(p).getInt32(0);
    }
    scope.postMessage({ type: "returned", result, errno });
    lib.close();
    scope.close();
  };
}

/**
 * Starts the worker from a `blob:` URL, which needs no read permission.
 *
 * @returns The worker, waiting for `{ fd }`.
 */
export function startDoItWorker(): Worker {
  const source = `(${doItWorker.toString()})();\n`;
  const url = URL.createObjectURL(
    new Blob([source], { type: "text/javascript" }),
  );
  const worker = new Worker(url, { type: "module", name: "nbd-do-it" });
  // Its first word (or error) means the module is loaded: the URL can go.
  const revoke = () => URL.revokeObjectURL(url);
  worker.addEventListener("message", revoke, { once: true });
  worker.addEventListener("error", revoke, { once: true });
  return worker;
}
