/**
 * Runs `NBD_DO_IT` on a thread of its own, as nbd-client does.
 *
 * `NBD_DO_IT` blocks until the device is released. A signal delivered to the
 * thread waiting in it interrupts the kernel's wait and tears the device
 * down, and a thread-pool call would also lose errno. So this worker blocks
 * every signal on its thread first, then calls synchronously and reads errno
 * right after, on the same thread.
 *
 * Messages: in `{ fd }`; out `{ type: "started", tid }`, then
 * `{ type: "returned", result, errno }` or `{ type: "failed", message }`.
 *
 * @module
 */

/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />

const NBD_DO_IT = 0xab03n;
const SIG_BLOCK = 0;

self.onmessage = (event: MessageEvent<{ fd: number }>) => {
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
    self.postMessage({ type: "failed", message: String(e) });
    self.close();
    return;
  }
  const c = lib.symbols;
  // sigset_t is 128 bytes in glibc.
  const all = new Uint8Array(128);
  c.sigfillset(all);
  const rc = c.pthread_sigmask(SIG_BLOCK, all, null);
  if (rc !== 0) {
    self.postMessage({
      type: "failed",
      message: `pthread_sigmask failed with ${rc}`,
    });
    lib.close();
    self.close();
    return;
  }
  self.postMessage({ type: "started", tid: c.gettid() });
  const result = c.ioctl(fd, NBD_DO_IT, 0n);
  let errno = 0;
  if (result < 0) {
    const p = c.__errno_location();
    if (p !== null) errno = new Deno.UnsafePointerView(p).getInt32(0);
  }
  self.postMessage({ type: "returned", result, errno });
  lib.close();
  self.close();
};
