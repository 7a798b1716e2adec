#!/bin/sh
# Runs inside the test guest (see harness.ts), in the repository root, as
# root, with the host's root read-only and a fresh tmpfs on /tmp. Every
# check writes one line to $KT_RESULTS/results.txt ("ok NAME: detail" or
# "FAIL NAME: detail") and every phase its time to timings.txt; the host
# asserts on those. Nothing here may wait without a bound.
#
# Usage: guest.sh [netlink|ioctl]. The mode picks the kernel interface of
# every attach (ioctl: connect.ts --no-netlink); netlink mode adds the
# checks only netlink can pass (-C 2, --persist, a device outliving its
# client).
set -u

MODE="${1:-netlink}"
case "$MODE" in
  netlink) NL= ;;
  ioctl) NL=--no-netlink ;;
  *) echo "guest.sh: the mode is netlink or ioctl, not $MODE" >&2; exit 2 ;;
esac
export KT_MODE="$MODE"

R="${KT_RESULTS:?}"
W=/tmp/kt
mkdir -p "$W" "$W/mnt" "$HOME" "$DENO_DIR"
: > "$R/results.txt"
: > "$R/timings.txt"
: > "$R/throughput.txt"
export PATH

# The card's command line, with nothing added but the mode's flag.
CONNECT="deno run --allow-net --allow-ffi examples/connect.ts $NL"
MiB=1048576

now_ms() { date +%s%3N; }
T0=$(now_ms)
PHASE_START=$T0
phase() { # name: records the time since the last phase
  t=$(now_ms)
  echo "$1 $((t - PHASE_START))" >> "$R/timings.txt"
  PHASE_START=$t
}
ok() { echo "ok $1: $2" >> "$R/results.txt"; echo "kt: ok $1: $2"; }
fail() { echo "FAIL $1: $2" >> "$R/results.txt"; echo "kt: FAIL $1: $2"; }
check() { # name detail command...: ok when the command succeeds
  name=$1 detail=$2
  shift 2
  if "$@"; then ok "$name" "$detail"; else fail "$name" "$detail"; fi
}
oneline() { tr '\n' ' ' < "$1" | cut -c1-400; }

# wait_for SECONDS COMMAND...: polls every 0.1 s until COMMAND succeeds.
wait_for() {
  n=$(($1 * 10))
  shift
  while [ "$n" -gt 0 ]; do
    if "$@"; then return 0; fi
    sleep 0.1
    n=$((n - 1))
  done
  return 1
}
attached() { [ -e "/sys/block/$1/pid" ]; }
free() { [ ! -e "/sys/block/$1/pid" ]; }
gone() { ! kill -0 "$1" 2>/dev/null; }

# wait_exit PID SECONDS: the exit status of a background child, or 255
# (after killing it) if it outlives the bound.
wait_exit() {
  if wait_for "$2" gone "$1"; then
    wait "$1"
    return $?
  fi
  kill -KILL "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  return 255
}

# start_server NAME ARGS...: nbdkit on $W/NAME.sock, pid in $W/NAME.pid.
start_server() {
  name=$1
  shift
  nbdkit -U "$W/$name.sock" -P "$W/$name.pid" "$@" ||
    { fail "server-$name" "nbdkit did not start"; return 1; }
  wait_for 20 test -S "$W/$name.sock" ||
    { fail "server-$name" "no socket"; return 1; }
}
uri() { echo "nbd+unix:///?socket=$W/$1.sock"; }

echo "kt: guest script starting; kernel $(uname -r), $MODE"
deno --version | head -1

# Warm Deno's cache once, so later starts measure the client, not the
# transpiler.
deno cache examples/connect.ts tests/kernel/guest_probe.ts > "$W/cache.log" 2>&1 ||
  fail cache "$(oneline "$W/cache.log")"
phase deno-cache

start_server mem memory size=64M
start_server ro -r memory size=16M
# No NBD_FLAG_CAN_MULTI_CONN: -C 2 must be refused.
start_server single --filter=multi-conn memory size=16M multi-conn-mode=disable
phase servers

# --- the relay path, in the background from the start (under emulation a
# Deno start is slow): through the API with relay: true on nbd3, and TLS
# through the command line on nbd4, with --allow-read for the certificates
# and nothing else added.
head -c $((4 * MiB)) /dev/urandom > "$W/pattern"
deno run -A tests/kernel/guest_relay.ts "$W/mem.sock" /dev/nbd3 "$W/pattern" \
  > "$W/relay.out" 2> "$W/relay.err" &
RELAY=$!
start_server tls --tls=require --tls-certificates="$R/pki/server" \
  memory size=32M
deno run --allow-net --allow-ffi --allow-read examples/connect.ts $NL \
  --tls-certificates "$R/pki/client" --tls-hostname localhost \
  "nbds+unix:///?socket=$W/tls.sock" /dev/nbd4 > "$W/tls.out" 2> "$W/tls.err" &
TLS=$!

# --- attach a writable export to /dev/nbd0 ---------------------------------
$CONNECT "$(uri mem)" /dev/nbd0 > "$W/c0.out" 2> "$W/c0.err" &
C0=$!
if wait_for 60 attached nbd0; then
  wait_for 10 grep -q attached "$W/c0.out"
  ok attach "nbd0 up: $(oneline "$W/c0.out")"
else
  fail attach "nbd0 never came up: $(oneline "$W/c0.err")"
fi
check kernel-interface "$(oneline "$W/c0.out")" \
  grep -q "(direct, $MODE)" "$W/c0.out"
phase attach

size=$(blockdev --getsize64 /dev/nbd0 2>&1)
check blkgetsize64 "BLKGETSIZE64 of nbd0 is $size" [ "$size" = $((64 * MiB)) ]
ro=$(blockdev --getro /dev/nbd0 2>&1)
check writable "BLKROGET of nbd0 is $ro" [ "$ro" = 0 ]
# The library's own view (and a missing device), beside a busy device
# through the command line: two clear errors.
# A server that accepts and never says a word.
/usr/bin/python3 -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
time.sleep(120)' "$W/silent.sock" &
SILENT=$!
wait_for 20 test -S "$W/silent.sock"
start_server tiny memory size=100
deno run --allow-ffi tests/kernel/guest_probe.ts /dev/nbd0 /dev/nbd9 \
  "$W/silent.sock" /dev/nbd1 "$W/tiny.sock" "$MODE" > "$W/probe0.out" 2>&1 &
P=$!
# -l and -c, beside them: nbd0 is attached, nbd5 free.
$CONNECT -l > "$W/list.out" 2>&1 &
L=$!
$CONNECT -c /dev/nbd0 > "$W/check0.out" 2>&1 &
K0=$!
$CONNECT -c /dev/nbd5 > "$W/check5.out" 2>&1 &
K5=$!
# Two connections: refused without multi-conn (netlink), or at all
# (ioctl).
$CONNECT -C 2 "$(uri single)" /dev/nbd5 > "$W/multi-refused.out" \
  2> "$W/multi-refused.err" &
M=$!
$CONNECT "$(uri mem)" /dev/nbd0 > /dev/null 2> "$W/busy.err" &
B=$!
# Not root: the device node is root's.
mkdir -p "$W/nobody/deno" && chmod -R 777 "$W/nobody"
HOME="$W/nobody" DENO_DIR="$W/nobody/deno" \
  setpriv --reuid=65534 --regid=65534 --clear-groups \
  $CONNECT "$(uri mem)" /dev/nbd1 > /dev/null 2> "$W/perm.err" &
N=$!
wait_exit $P 60
check library-probe "$(oneline "$W/probe0.out")" \
  grep -q '"attached":true,"size":"67108864","free":"/dev/nbd1"' "$W/probe0.out"
check missing-error "$(oneline "$W/probe0.out")" \
  grep -q '"missing":"no-module: No such device /dev/nbd9: 2 (ENOENT, No such file or directory). Is the nbd module loaded? Try: modprobe nbd"' \
  "$W/probe0.out"
# 2 s, plus what a starved guest adds (4 Deno processes on 2 vCPUs here).
check silent-server "$(oneline "$W/probe0.out")" grep -Eq \
  '"silent":"[0-9]{1,2}s: Cannot connect and negotiate within 2000 ms' \
  "$W/probe0.out"
check size-error "$(oneline "$W/probe0.out")" grep -q \
  '"tiny":"size: Cannot attach to /dev/nbd1: the export (100 bytes) is smaller than one block of 512 bytes","tinyLeftFree":true' \
  "$W/probe0.out"
kill $SILENT "$(cat "$W/tiny.pid")" 2>/dev/null
wait_exit $B 60
rc=$?
check busy-error "exit $rc: $(oneline "$W/busy.err")" \
  sh -c "[ $rc = 1 ] && grep -q 'already connected' '$W/busy.err'"
wait_exit $N 90
rc=$?
check permission-error "exit $rc: $(oneline "$W/perm.err")" \
  sh -c "[ $rc = 1 ] && grep -q 'EACCES.*needs root' '$W/perm.err'"
wait_exit $L 60
rc=$?
check list "exit $rc: $(oneline "$W/list.out")" sh -c "[ $rc = 0 ] &&
  grep -Eq '^/dev/nbd0: connected, 67108864 bytes, pid [0-9]+$' '$W/list.out' &&
  grep -q '^/dev/nbd5: free$' '$W/list.out'"
wait_exit $K0 60
rc=$?
check check-attached "-c /dev/nbd0: exit $rc: $(oneline "$W/check0.out")" \
  sh -c "[ $rc = 0 ] && grep -q 'nbd0: attached' '$W/check0.out'"
wait_exit $K5 60
rc=$?
check check-free "-c /dev/nbd5: exit $rc: $(oneline "$W/check5.out")" \
  sh -c "[ $rc = 1 ] && grep -q 'nbd5: not attached' '$W/check5.out'"
wait_exit $M 60
rc=$?
if [ "$MODE" = netlink ]; then
  want='no NBD_FLAG_CAN_MULTI_CONN'
else
  want='needs netlink'
fi
check connections-refused "exit $rc: $(oneline "$W/multi-refused.err")" \
  sh -c "[ $rc = 1 ] && grep -q '$want' '$W/multi-refused.err' &&
    [ ! -e /sys/block/nbd5/pid ]"
phase probes

# --- I/O through the kernel, checked from the server side too --------------
timeout 60 dd if="$W/pattern" of=/dev/nbd0 bs=1M seek=1 oflag=direct \
  conv=fsync status=none 2> "$W/dd.err"
check write "4 MiB at 1 MiB: $(oneline "$W/dd.err")" [ $? = 0 ]
echo 3 > /proc/sys/vm/drop_caches
timeout 60 dd if=/dev/nbd0 of="$W/readback" bs=1M skip=1 count=4 \
  iflag=direct status=none 2> "$W/dd.err"
check read-back "read 4 MiB back" cmp -s "$W/pattern" "$W/readback"
timeout 60 nbdcopy "$(uri mem)" "$W/server.img" 2> "$W/nbdcopy.err"
dd if="$W/server.img" of="$W/server-part" bs=1M skip=1 count=4 status=none
check server-side "nbdcopy of the export matches: $(oneline "$W/nbdcopy.err")" \
  cmp -s "$W/pattern" "$W/server-part"
phase io

# throughput DEVICE LABEL: one dd of 64 MiB O_DIRECT each way, to
# throughput.txt; fails when either dd does.
throughput() {
  t=$(now_ms)
  timeout 120 dd if=/dev/zero of="$1" bs=1M count=64 oflag=direct \
    conv=fsync status=none 2> "$W/tp.err" || return 1
  w=$(($(now_ms) - t))
  t=$(now_ms)
  timeout 120 dd if="$1" of=/dev/null bs=1M count=64 iflag=direct \
    status=none 2>> "$W/tp.err" || return 1
  r=$(($(now_ms) - t))
  echo "$2: dd 64 MiB O_DIRECT write $w ms ($((64000 / w)) MiB/s), read $r ms ($((64000 / r)) MiB/s)" |
    tee -a "$R/throughput.txt"
}

timeout 60 mkfs.ext4 -q -F /dev/nbd0 > "$W/mkfs.log" 2>&1
check mkfs "mkfs.ext4: $(oneline "$W/mkfs.log")" [ $? = 0 ]
if timeout 60 mount -t ext4 /dev/nbd0 "$W/mnt" 2> "$W/mount.err"; then
  cp "$W/pattern" "$W/mnt/pattern"
  sync
  umount "$W/mnt"
  timeout 60 mount -t ext4 -o ro /dev/nbd0 "$W/mnt" 2>> "$W/mount.err"
  check filesystem "a file survives umount and mount" \
    cmp -s "$W/pattern" "$W/mnt/pattern"
  umount "$W/mnt" 2>> "$W/mount.err"
else
  fail filesystem "mount: $(oneline "$W/mount.err")"
fi
phase filesystem

# --- detach with -d, as nbd-client -d ---------------------------------------
$CONNECT -d /dev/nbd0 > "$W/d.out" 2> "$W/d.err"
rc=$?
check detach "connect.ts -d exit $rc: $(oneline "$W/d.err")" [ $rc = 0 ]
check detach-free "nbd0 has no pid file after -d" wait_for 20 free nbd0
wait_exit $C0 30
rc=$?
check detach-client-exits "attached client exit $rc: $(oneline "$W/c0.err")" \
  [ $rc != 255 ]
phase detach

# --- read-only: an -r export, and --read-only on a writable one -------------
$CONNECT "$(uri ro)" /dev/nbd1 > "$W/c1.out" 2> "$W/c1.err" &
C1=$!
$CONNECT --read-only --block-size 1024 --timeout 20 "$(uri mem)" /dev/nbd2 \
  > "$W/c2.out" 2> "$W/c2.err" &
C2=$!
wait_for 60 attached nbd1 || fail attach-ro "nbd1: $(oneline "$W/c1.err")"
wait_for 60 attached nbd2 || fail attach-ro "nbd2: $(oneline "$W/c2.err")"
check read-only-export "BLKROGET of nbd1 is $(blockdev --getro /dev/nbd1)" \
  [ "$(blockdev --getro /dev/nbd1)" = 1 ]
check read-only-option "BLKROGET of nbd2 is $(blockdev --getro /dev/nbd2)" \
  [ "$(blockdev --getro /dev/nbd2)" = 1 ]
check block-size-option "logical block size of nbd2 is $(blockdev --getss /dev/nbd2)" \
  [ "$(blockdev --getss /dev/nbd2)" = 1024 ]
timeout 60 dd if="$W/pattern" of=/dev/nbd1 bs=4096 count=1 oflag=direct \
  status=none 2> "$W/ro.err"
rc=$?
check read-only-write-fails "dd exit $rc: $(oneline "$W/ro.err")" [ $rc != 0 ]
timeout 60 dd if=/dev/nbd1 of=/dev/null bs=1M count=1 iflag=direct \
  status=none 2> "$W/ro.err"
check read-only-read "reading nbd1: $(oneline "$W/ro.err")" [ $? = 0 ]
phase read-only

# --- signals: SIGTERM and SIGINT detach cleanly and exit 0 ------------------
kill -TERM $C1
kill -INT $C2
wait_exit $C1 30
rc=$?
check sigterm "exit $rc: $(oneline "$W/c1.out") $(oneline "$W/c1.err")" [ $rc = 0 ]
wait_exit $C2 30
rc=$?
check sigint "exit $rc: $(oneline "$W/c2.out") $(oneline "$W/c2.err")" [ $rc = 0 ]
check signal-free "nbd1 and nbd2 free" wait_for 20 sh -c \
  '[ ! -e /sys/block/nbd1/pid ] && [ ! -e /sys/block/nbd2/pid ]'
phase signals

# --- the server dies under an attached device (over TCP on loopback: the
# guest has no network device, only lo) ---------------------------------------
nbdkit -i 127.0.0.1 -p 10810 -P "$W/kill.pid" memory size=8M ||
  fail server-kill "nbdkit did not start"
wait_for 20 sh -c 'nbdinfo --size nbd://127.0.0.1:10810 > /dev/null 2>&1' ||
  fail server-kill "nbdkit does not answer on 127.0.0.1:10810"
# "localhost" resolves to ::1 first, where nobody listens: the client must
# move on to 127.0.0.1.
$CONNECT nbd://localhost:10810 /dev/nbd2 > "$W/c3.out" 2> "$W/c3.err" &
C3=$!
if wait_for 60 attached nbd2; then
  # The client prints its line just after the kernel shows the device.
  wait_for 10 grep -q '(direct' "$W/c3.out"
  check tcp-attach "$(oneline "$W/c3.out")" grep -q "(direct, $MODE)" "$W/c3.out"
else
  fail tcp-attach "nbd2: $(oneline "$W/c3.err")"
fi
# BLKROSET sticks to a device: the client must have cleared it.
check read-only-reset "BLKROGET of nbd2 is $(blockdev --getro /dev/nbd2)" \
  [ "$(blockdev --getro /dev/nbd2)" = 0 ]
# A read in flight when the server dies fails: the server is stopped so
# the read waits, then killed.
kill -STOP "$(cat "$W/kill.pid")"
t=$(now_ms)
timeout 60 dd if=/dev/nbd2 of=/dev/null bs=4096 count=1 skip=100 iflag=direct \
  status=none 2> "$W/dead.err" &
DD=$!
sleep 0.5
kill -KILL "$(cat "$W/kill.pid")"
wait_exit $DD 70
rc=$?
check dead-io-error "dd exit $rc after $(($(now_ms) - t)) ms: $(oneline "$W/dead.err")" \
  sh -c "[ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 255 ]"
wait_exit $C3 60
rc=$?
check server-killed "exit $rc: $(oneline "$W/c3.err")" \
  sh -c "[ $rc = 1 ] && grep -q 'released' '$W/c3.err'"
check server-killed-free "nbd2 free" wait_for 20 free nbd2
timeout 20 dd if=/dev/nbd2 of=/dev/null bs=4096 count=1 status=none 2>/dev/null
rc=$?
check dead-device-no-hang "reading the released device: dd exit $rc" [ $rc != 124 ]
phase server-killed

# --- throughput with one connection, on a device of its own, once the
# background clients are idle; no device given: the kernel (netlink) or
# the client (ioctl) picks a free one --------------------------------------------
start_server one memory size=64M
$CONNECT "$(uri one)" > "$W/c1c.out" 2> "$W/c1c.err" &
C1C=$!
if wait_for 60 grep -q attached "$W/c1c.out"; then
  dev=$(sed -n 's|^\(/dev/nbd[0-9]*\): attached.*|\1|p' "$W/c1c.out")
  check any-free-device "$(oneline "$W/c1c.out")" \
    sh -c "[ -n '$dev' ] && [ -e /sys/block/${dev#/dev/}/pid ]"
  line=$(throughput "$dev" "$(uname -r) $MODE -C 1")
  rc=$?
  check throughput-1 "$line $(oneline "$W/tp.err")" [ $rc = 0 ]
  kill -TERM $C1C
  wait_exit $C1C 30
  wait_for 20 free "${dev#/dev/}" ||
    fail throughput-1 "$dev still attached after SIGTERM"
else
  fail any-free-device "no device came up: $(oneline "$W/c1c.err")"
  kill -KILL $C1C 2>/dev/null
fi
kill "$(cat "$W/one.pid")" 2>/dev/null
phase throughput-1

if [ "$MODE" = netlink ]; then
  . tests/kernel/guest_netlink_cli.sh
fi

# --- the relay's results ----------------------------------------------------
wait_exit $RELAY 120
rc=$?
relay="exit $rc: $(oneline "$W/relay.out") $(oneline "$W/relay.err")"
check relay-attach "$relay" grep -q \
  "\"route\":\"relay\",\"kernelInterface\":\"$MODE\",\"size\":67108864" "$W/relay.out"
check relay-io "$relay" grep -q '"io":true' "$W/relay.out"
check relay-disconnect "$relay" \
  grep -q '"reason":"disconnect","requested":true' "$W/relay.out"
check relay-free "$relay" grep -q '"free":true' "$W/relay.out"
grep -o '"[a-z]*Ms":[0-9]*' "$W/relay.out" | tr -d '"' | tr ':' ' ' |
  sed 's/^/relay-/' >> "$R/timings.txt"

if wait_for 60 attached nbd4 && wait_for 10 grep -q attached "$W/tls.out"; then
  check tls-attach "$(oneline "$W/tls.out")" grep -q "(relay, $MODE)" "$W/tls.out"
else
  fail tls-attach "nbd4: $(oneline "$W/tls.err")"
fi
timeout 60 dd if="$W/pattern" of=/dev/nbd4 bs=1M count=1 oflag=direct \
  conv=fsync status=none 2> "$W/dd.err" &&
  timeout 60 dd if=/dev/nbd4 of="$W/tls-back" bs=1M count=1 iflag=direct \
    status=none 2>> "$W/dd.err" &&
  head -c $MiB "$W/pattern" | cmp -s - "$W/tls-back"
check tls-io "1 MiB through TLS: $(oneline "$W/dd.err")" [ $? = 0 ]
kill -TERM $TLS
wait_exit $TLS 30
rc=$?
check tls-sigterm "exit $rc: $(oneline "$W/tls.out") $(oneline "$W/tls.err")" [ $rc = 0 ]
check tls-free "nbd4 free" wait_for 20 free nbd4
phase relay-wait

kill "$(cat "$W/mem.pid")" "$(cat "$W/ro.pid")" "$(cat "$W/single.pid")" \
  2>/dev/null
kill "$(cat "$W/tls.pid")" 2>/dev/null
echo "total $(($(now_ms) - T0))" >> "$R/timings.txt"
grep -c '^ok' "$R/results.txt" | sed 's/^/kt: passed /'
if grep -q '^FAIL' "$R/results.txt"; then exit 1; fi
exit 0
