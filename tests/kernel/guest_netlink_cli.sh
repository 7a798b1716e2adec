# Sourced by guest.sh in netlink mode: what only the netlink interface can
# do, through examples/connect.ts with the card's command line. Uses
# guest.sh's helpers and $W, $R, $CONNECT, $MiB; nbd5 is free on entry and
# on exit.

# --- -C 2: two sockets, the server sees two connections ---------------------
start_server two --filter=log memory size=64M logfile="$W/two.log"
$CONNECT -C 2 "$(uri two)" /dev/nbd5 > "$W/c5.out" 2> "$W/c5.err" &
C5=$!
if wait_for 60 attached nbd5 && wait_for 10 grep -q attached "$W/c5.out"; then
  queues=$(ls /sys/block/nbd5/mq | wc -l)
  check multi-attach "$(oneline "$W/c5.out"); $queues hardware queues" \
    sh -c "grep -q '(direct, netlink, 2 connections)' '$W/c5.out' &&
      [ $queues = 2 ]"
else
  fail multi-attach "nbd5 never came up: $(oneline "$W/c5.err")"
fi
# blk-mq picks the hardware queue, so the connection, by the submitting
# CPU: one writer pinned to each CPU uses both.
head -c $((8 * MiB)) /dev/urandom > "$W/pattern8"
taskset -c 0 timeout 90 dd if="$W/pattern8" of=/dev/nbd5 bs=1M count=4 \
  oflag=direct conv=fsync status=none 2> "$W/multi0.err" &
D0=$!
taskset -c 1 timeout 90 dd if="$W/pattern8" of=/dev/nbd5 bs=1M count=4 \
  skip=4 seek=4 oflag=direct conv=fsync status=none 2> "$W/multi1.err" &
D1=$!
wait_exit $D0 100
r0=$?
wait_exit $D1 100
r1=$?
timeout 60 dd if=/dev/nbd5 of="$W/multi-back" bs=1M count=8 iflag=direct \
  status=none 2> "$W/multi-back.err"
check multi-io "writers exit $r0 $r1: $(oneline "$W/multi0.err") $(oneline "$W/multi1.err") $(oneline "$W/multi-back.err")" \
  sh -c "[ $r0 = 0 ] && [ $r1 = 0 ] && cmp -s '$W/pattern8' '$W/multi-back'"
conns=$(grep -o 'connection=[0-9]* Connect' "$W/two.log" | sort -u | wc -l)
writers=$(grep -o 'connection=[0-9]* Write' "$W/two.log" | sort -u | wc -l)
check server-two-connections \
  "nbdkit saw $conns connections, writes on $writers" \
  sh -c "[ $conns = 2 ] && [ $writers = 2 ]"
phase multi-conn

line=$(throughput /dev/nbd5 "$(uname -r) $MODE -C 2")
rc=$?
check throughput-2 "$line $(oneline "$W/tp.err")" [ $rc = 0 ]
phase throughput-2

kill -TERM $C5
wait_exit $C5 30
rc=$?
check multi-sigterm "exit $rc: $(oneline "$W/c5.out") $(oneline "$W/c5.err")" \
  [ $rc = 0 ]
check multi-free "nbd5 free after SIGTERM" wait_for 20 free nbd5
kill "$(cat "$W/two.pid")" 2>/dev/null
phase multi-detach

# --- --persist: the server killed with -9 and started again -----------------
truncate -s 64M "$W/disk.img"
start_server p file "$W/disk.img"
head -c $((3 * MiB)) /dev/urandom > "$W/p-pattern"
$CONNECT --persist "$(uri p)" /dev/nbd5 > "$W/cp.out" 2> "$W/cp.err" &
CP=$!
if wait_for 60 attached nbd5 && wait_for 10 grep -q attached "$W/cp.out"; then
  check persist-attach "$(oneline "$W/cp.out")" \
    grep -q '(direct, netlink, persist)' "$W/cp.out"
else
  fail persist-attach "nbd5 never came up: $(oneline "$W/cp.err")"
fi
timeout 60 dd if="$W/p-pattern" of=/dev/nbd5 bs=1M count=1 oflag=direct \
  conv=fsync status=none 2> "$W/p.err"
check persist-before "1 MiB written before the kill: $(oneline "$W/p.err")" \
  [ $? = 0 ]
kill -KILL "$(cat "$W/p.pid")"
wait_for 20 gone "$(cat "$W/p.pid")"
t=$(now_ms)
# Issued while the server is down: the kernel holds it (dead-connection
# timeout 60 s by default with --persist).
timeout 120 dd if="$W/p-pattern" of=/dev/nbd5 bs=1M count=1 skip=1 seek=1 \
  oflag=direct conv=fsync status=none 2> "$W/p-during.err" &
DURING=$!
sleep 2
check persist-io-waits "a write issued with the server down is still waiting after 2 s" \
  kill -0 $DURING
rm -f "$W/p.sock"
start_server p file "$W/disk.img"
timeout 90 dd if="$W/p-pattern" of=/dev/nbd5 bs=1M count=1 skip=2 seek=2 \
  oflag=direct conv=fsync status=none 2> "$W/p-after.err"
rc=$?
check persist-write-after "write after the restart: exit $rc, $(($(now_ms) - t)) ms after the kill: $(oneline "$W/p-after.err")" \
  [ $rc = 0 ]
wait_exit $DURING 100
rc=$?
check persist-waiting-write "the write issued while down: exit $rc: $(oneline "$W/p-during.err")" \
  [ $rc = 0 ]
timeout 60 dd if=/dev/nbd5 of="$W/p-back" bs=1M count=3 iflag=direct \
  status=none 2> "$W/p-back.err"
dd if="$W/disk.img" of="$W/p-file" bs=1M count=3 status=none
check persist-read-back "3 MiB from before, during and after, on the device and in the server's file: $(oneline "$W/p-back.err")" \
  sh -c "cmp -s '$W/p-pattern' '$W/p-back' && cmp -s '$W/p-pattern' '$W/p-file'"
check persist-client "the client is still running: $(oneline "$W/cp.err")" \
  kill -0 $CP
phase persist

# --- the device outlives its client (netlink, direct route) -----------------
kill -KILL $CP
wait_exit $CP 20
timeout 60 dd if=/dev/nbd5 of="$W/p-orphan" bs=1M count=3 iflag=direct \
  status=none 2> "$W/p-orphan.err"
check outlives-process "after kill -9 of connect.ts, nbd5 is attached and reads back: $(oneline "$W/p-orphan.err")" \
  sh -c "[ -e /sys/block/nbd5/pid ] && cmp -s '$W/p-pattern' '$W/p-orphan'"
$CONNECT -d /dev/nbd5 > "$W/d5.out" 2> "$W/d5.err"
rc=$?
check detach-orphan "-d of the orphaned device: exit $rc: $(oneline "$W/d5.err")" \
  sh -c "[ $rc = 0 ] && [ ! -e /sys/block/nbd5/pid ]"
kill "$(cat "$W/p.pid")" 2>/dev/null
phase outlives
