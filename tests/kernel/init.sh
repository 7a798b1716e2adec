#!/bin/busybox sh
# /init of the test guest. It loads the modules, mounts the host's root
# read-only over 9p, chroots into it and runs the command the host wrote to
# the writable share (kt.conf), then powers off. The host reads the exit
# code and everything else from that share.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Loopback only: there is no network device (-nic none).
ip link set lo up

for ko in $(cat /modules.order); do
  case "$ko" in
    nbd.ko) insmod "/lib/modules/$ko" nbds_max=6 max_part=8 ;;
    *) insmod "/lib/modules/$ko" ;;
  esac
done

fail() {
  echo "kt-init: $*"
  poweroff -f
}

mkdir -p /mnt/host /mnt/rw
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 rw /mnt/rw ||
  fail "cannot mount the results share"
. /mnt/rw/kt.conf || fail "no kt.conf on the results share"

# A watchdog: whatever happens inside, the guest stops by the deadline.
(sleep "$KT_DEADLINE" && echo "kt-init: deadline of ${KT_DEADLINE}s passed" &&
  echo 124 > /mnt/rw/exit-code && sync && poweroff -f) &

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro \
  hostroot /mnt/host || fail "cannot mount the host root"
H=/mnt/host
mount -t proc proc $H/proc
mount -t sysfs sysfs $H/sys
mount -t devtmpfs devtmpfs $H/dev
mkdir -p $H/dev/pts 2>/dev/null
mount -t devpts devpts $H/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $H/tmp
mount -t tmpfs -o mode=755 tmpfs $H/run
# A checkout under /tmp or /run is hidden by the tmpfs: it comes on its own
# share, at the same path.
if [ -n "$KT_REPO_SHARE" ]; then
  mkdir -p "$H$KT_REPO_SHARE"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro \
    repo "$H$KT_REPO_SHARE" || fail "cannot mount the repository share"
fi
mkdir -p $H/run/kt $H/run/deno
mount --bind /mnt/rw $H/run/kt
mount --bind /deno $H/run/deno

echo "kt-init: ready after $(cut -d' ' -f1 /proc/uptime)s"
chroot $H /usr/bin/env -i \
  PATH=/run/deno:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp/home DENO_DIR=/tmp/deno-dir DENO_NO_UPDATE_CHECK=1 \
  NO_COLOR=1 KT_RESULTS=/run/kt KT_UPTIME_START="$(cut -d' ' -f1 /proc/uptime)" \
  /bin/sh -c "cd '$KT_REPO' && $KT_COMMAND" < /dev/null
echo $? > /mnt/rw/exit-code
sync
poweroff -f
