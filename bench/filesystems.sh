#!/usr/bin/env bash
# `make bench`: bench/run.py on every filesystem at hand, one table each, appended to one file.
#
#   bench/filesystems.sh PYTHON [run.py arguments...]
#   BENCH_FS="tmpfs xfs" BENCH_OUT=/tmp/bench.md bench/filesystems.sh .venv/bin/python --rounds 5
#
# Filesystems (BENCH_FS, default all): `local` is the one /var/tmp lies on (ext4 on the
# project's machines), `tmpfs` a tmpfs mounted for the run, `xfs` and `btrfs` new filesystems
# in a sparse file on a loop device (btrfs only where mkfs.btrfs exists). The mounts need root;
# each is unmounted and its backing file removed on exit, however the script ends.
set -euo pipefail

python=${1:?usage: bench/filesystems.sh PYTHON [run.py arguments...]}
shift
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--rounds 3 --runtime 5)
here=$(cd "$(dirname "$0")" && pwd)
out=${BENCH_OUT:-/var/tmp/nbdbench-$(date -u +%Y%m%d-%H%M).md}
filesystems=${BENCH_FS:-local tmpfs xfs btrfs}
scratch=$(mktemp -d /var/tmp/nbdbench-fs.XXXXXX)
mounts=()

cleanup() {
  local m
  for m in "${mounts[@]}"; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "== $1: skipped (mounting needs root)" | tee -a "$out"
    return 1
  fi
}

# A new filesystem of type $1 in a sparse file, loop-mounted at $scratch/$1 (not in a
# subshell: the mount must be remembered for the cleanup).
loop_mount() {
  local fstype=$1 mkfs
  mkfs=$(command -v "mkfs.$fstype" || echo "/usr/sbin/mkfs.$fstype")
  [ -x "$mkfs" ] || return 1
  truncate -s 8G "$scratch/$fstype.fs"
  "$mkfs" -q "$scratch/$fstype.fs" >/dev/null 2>&1 || "$mkfs" "$scratch/$fstype.fs" >/dev/null
  mkdir -p "$scratch/$fstype"
  mount -o loop "$scratch/$fstype.fs" "$scratch/$fstype"
  mounts+=("$scratch/$fstype")
}

echo "# bench/run.py on each filesystem, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs" >>"$out"
echo >>"$out"
for fs in $filesystems; do
  case $fs in
    local)
      dir=/var/tmp ;;
    tmpfs)
      need_root tmpfs || continue
      mkdir -p "$scratch/tmpfs"
      mount -t tmpfs -o size=4G tmpfs "$scratch/tmpfs"
      mounts+=("$scratch/tmpfs")
      dir=$scratch/tmpfs ;;
    xfs | btrfs)
      if ! command -v "mkfs.$fs" >/dev/null && [ ! -x "/usr/sbin/mkfs.$fs" ]; then
        echo "== $fs: skipped (no mkfs.$fs)" | tee -a "$out"
        continue
      fi
      need_root "$fs" || continue
      loop_mount "$fs"
      dir=$scratch/$fs ;;
    *)
      echo "unknown filesystem $fs (local, tmpfs, xfs, btrfs)" >&2
      exit 2 ;;
  esac
  echo "== $fs: $dir"
  "$python" "$here/run.py" "$dir" --markdown "$out" --label "$fs" "${args[@]}"
done
echo
echo "tables: $out"
cat "$out"
