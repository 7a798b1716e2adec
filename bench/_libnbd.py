# The libnbd side of bench/bench.ts, run inside nbdsh, which has already
# connected the handle `h` to the benchmark server:
#
#     nbdsh -u URI -c "exec(open('bench/_libnbd.py').read())"
#
# Parameters come in the environment (NBD_BENCH_*) so that nbdsh's own
# command line stays as its manual shows it. One JSON object is printed on
# stdout: {"runs": [{"ops": N, "bytes": N, "seconds": S, "cpu": S}, ...]},
# the warm-up excluded; cpu is this process's user + system seconds. Timing
# is taken here, around the I/O only, like the Deno side.

import array
import json
import os
import sys
import time

_env = os.environ
_mode = _env["NBD_BENCH_MODE"]  # "seq" or "rand"
_req = int(_env["NBD_BENCH_REQUEST"])  # bytes per request
_qd = int(_env["NBD_BENCH_QD"])  # requests in flight
_runs = int(_env["NBD_BENCH_RUNS"])
_budget = float(_env["NBD_BENCH_SECONDS"])  # stop issuing after this long
_size = int(_env.get("NBD_BENCH_SIZE", "0"))  # seq: bytes to read
_count = int(_env.get("NBD_BENCH_COUNT", "0"))  # rand: reads per run
_warm_count = int(_env.get("NBD_BENCH_WARM_COUNT", "0"))
_warm_size = int(_env.get("NBD_BENCH_WARM_SIZE", "0"))
# "1": write (a buffer of zero bytes) instead of read.
_write = _env.get("NBD_BENCH_WRITE", "0") == "1"

_offsets = array.array("Q")
if _mode == "rand":
    with open(_env["NBD_BENCH_OFFSETS"], "rb") as f:
        _offsets.frombytes(f.read())
    # bench.ts writes the offsets little-endian.
    if sys.byteorder != "little":
        _offsets.byteswap()


def _offset_of(i):
    if _mode == "seq":
        return i * _req
    return _offsets[i]


def _qd1(count):
    """A plain loop of synchronous h.pread (or h.pwrite): one request on
    the wire."""
    req = _req
    if _write:
        data = bytes(req)
        pwrite = h.pwrite

        def pread(_n, off):
            pwrite(data, off)
    else:
        pread = h.pread
    offs = _offsets if _mode == "rand" else None
    done = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    deadline = t0 + _budget
    while done < count:
        off = offs[done] if offs is not None else done * req
        pread(req, off)
        done += 1
        if (done & 255) == 0 and time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - t0, time.process_time() - c0


def _window(count):
    """Up to _qd h.aio_pread (or h.aio_pwrite) in flight, reaped with
    h.poll and h.aio_command_completed; each request's buffer is reused."""
    bufs = [nbd.Buffer(_req) for _ in range(_qd)]
    free = list(range(_qd))
    inflight = {}
    aio_pread = h.aio_pwrite if _write else h.aio_pread
    peek = h.aio_peek_command_completed
    completed = h.aio_command_completed
    poll = h.poll
    issued = 0
    done = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    deadline = t0 + _budget
    stop = count
    while done < issued or issued < stop:
        while free and issued < stop:
            i = free.pop()
            inflight[aio_pread(bufs[i], _offset_of(issued))] = i
            issued += 1
            if (issued & 255) == 0 and time.perf_counter() > deadline:
                stop = issued
        cookie = peek()
        if cookie == 0:
            poll(-1)
            continue
        completed(cookie)
        free.append(inflight.pop(cookie))
        done += 1
    return done, time.perf_counter() - t0, time.process_time() - c0


def _measure(count):
    if _qd == 1:
        return _qd1(count)
    return _window(count)


def _count_for(size_or_count):
    return size_or_count // _req if _mode == "seq" else size_or_count


_measure(_count_for(_warm_size if _mode == "seq" else _warm_count))
_results = []
for _ in range(_runs):
    _ops, _secs, _cpu = _measure(_count_for(_size if _mode == "seq" else _count))
    _results.append(
        {"ops": _ops, "bytes": _ops * _req, "seconds": _secs, "cpu": _cpu}
    )
print(json.dumps({"runs": _results}))
