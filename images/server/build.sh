#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds the busy server: a real Debian 12 (systemd, OpenSSH, python3, Debian's kernel) on a small
# BIOS-bootable raw disk (MBR, ext4 labelled busyroot on the first partition, /dev/vda1 under virtio,
# extlinux), whose workload (images/server/busy) writes all the time from its first boot.
#
#   images/server/build.sh DEST [SIZE]    SIZE in bytes or with an IEC suffix; default 2G
#
# Writes DEST and DEST.host_key.pub: the server's one SSH host key (ed25519) is made here, once per
# built image, so that the appliance pins it instead of trusting whatever answers first. Root's
# authorized_keys is not in the image: the VM's firmware hands it over at boot (busy-keys).
#
# Nothing binary is committed. images/build/ keeps the debootstrap tarball (the .debs, keyed by the
# package list, suite and mirror) and one built image per recipe (a hash of the files next to this
# script, the package list, the host's syslinux and SIZE); a second call copies that image.
#
# Needs root on a cache miss (debootstrap, chroot, a loop mount for extlinux), the network to a Debian
# mirror (SERVER_MIRROR, default deb.debian.org) for the first tarball, and these Debian packages:
# debootstrap coreutils util-linux fdisk e2fsprogs extlinux syslinux-common openssh-client.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build_dir=${SERVER_BUILD_DIR:-$(dirname "$here")/build}
mirror=${SERVER_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
label=busyroot
mbr_bin=/usr/lib/syslinux/mbr/mbr.bin
part_start=$((1 << 20))
# minbase brings dpkg, apt, coreutils, util-linux (fsfreeze) and dash; the rest is what a server needs to
# boot (kernel, initramfs, systemd, udev for module loading and LABEL=) and to be backed up (sshd, python3),
# and LVM with thin pools for the data volumes of busy-lvm.
packages=(systemd systemd-sysv udev kmod openssh-server python3 e2fsprogs initramfs-tools linux-image-amd64
	lvm2 thin-provisioning-tools)
# The initramfs holds only the root disk's drivers (virtio, SATA, IDE) and ext4: a third of the default
# `MODULES=most`, built and unpacked faster under TCG.
initramfs_modules=(virtio_pci virtio_blk ahci ata_piix sd_mod ext4 crc32c_generic)
# Timers that would write at random moments, and what waits for a network the static config already has.
masked=(apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer
	systemd-networkd-wait-online.service getty@tty1.service getty-static.service)

die() {
	echo "build.sh: $*" >&2
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: build.sh DEST [SIZE]"
dest=$1
size=$(numfmt --from=iec "${2:-2G}" 2>/dev/null) || die "bad size: ${2:-}"
[ "$size" -ge $((1 << 30)) ] || die "size $size is too small: at least 1 GiB (the kernel's modules alone take 400 MB)"
size=$((size / part_start * part_start))

missing=()
for tool in debootstrap chroot sfdisk mke2fs extlinux losetup mount findmnt flock sha256sum ssh-keygen numfmt; do
	command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -f "$mbr_bin" ] || missing+=("$mbr_bin (syslinux-common)")
[ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (see images/server/README.md for the Debian packages)"

mkdir -p "$build_dir"
# One build at a time: parallel runs share the cache.
exec 9>"$build_dir/.server.lock"
flock 9

debs_key=$(echo "$suite $mirror minbase ${packages[*]}" | sha256sum | cut -c1-16)
tarball=$build_dir/server-debootstrap-$debs_key.tgz
key=$(
	{
		for f in "$here"/*; do
			[ -f "$f" ] && [ "${f%.md}" = "$f" ] && sha256sum "$f" | sed "s|  .*/|  |"
		done
		echo "$debs_key"
		sha256sum "$mbr_bin" | cut -d' ' -f1
		extlinux --version 2>&1 | head -n 1
		echo "$size"
	} | sha256sum | cut -c1-16
)
cached=$build_dir/server-$key.img

copy_out() {
	mkdir -p "$(dirname "$dest")"
	cp --sparse=always "$cached" "$dest.part"
	cp "$cached.host_key.pub" "$dest.host_key.pub"
	mv "$dest.part" "$dest"
}

if [ -f "$cached" ] && [ -f "$cached.host_key.pub" ]; then
	copy_out
	echo "build.sh: $dest from the cache (server-$key.img)"
	exit 0
fi

[ "$(id -u)" = 0 ] || die "building (not cached yet) needs root: debootstrap, chroot and a loop mount"

work=$(mktemp -d "$build_dir/work.XXXXXX")
loop=""
# debootstrap's second stage mounts /proc, /sys (and /dev in a container) in the chroot; a failed run
# can leave them, and rm -rf must never walk into the machine's own /dev.
unmount_under() {
	findmnt -rn -o TARGET | awk -v w="$1/" 'index($0, w) == 1' | sort -r | while read -r m; do
		umount -l "$m" || true
	done
}
cleanup() {
	unmount_under "$work"
	[ -n "$loop" ] && losetup -d "$loop"
	if [ -z "$(findmnt -rn -o TARGET | awk -v w="$work/" 'index($0, w) == 1')" ]; then
		rm -rf "$work"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log=$work/debootstrap.log
include=$(
	IFS=,
	echo "${packages[*]}"
)
if [ ! -f "$tarball" ]; then
	echo "build.sh: downloading the packages into ${tarball##*/}" >&2
	debootstrap --variant=minbase --include="$include" --make-tarball="$tarball.part" \
		"$suite" "$work/tarball" "$mirror" >"$log" 2>&1 || die "debootstrap --make-tarball: $(tail -n 3 "$log")"
	mv "$tarball.part" "$tarball"
	find "$build_dir" -maxdepth 1 -name 'server-debootstrap-*.tgz' ! -name "${tarball##*/}" -delete
fi

# Two stages, so that the initramfs configuration is in place before the kernel's postinst builds it.
# The second stage keeps services from starting in the chroot itself (a policy-rc.d while it runs).
root=$work/root
debootstrap --variant=minbase --include="$include" --foreign --unpack-tarball="$tarball" \
	"$suite" "$root" "$mirror" >"$log" 2>&1 || die "debootstrap (first stage): $(tail -n 3 "$log")"
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\nCOMPRESS=gzip\n' >"$root/etc/initramfs-tools/conf.d/busy.conf"
printf '%s\n' "${initramfs_modules[@]}" >"$root/usr/share/initramfs-tools/modules.d/busy"
chroot "$root" /debootstrap/debootstrap --second-stage >"$log" 2>&1 ||
	die "debootstrap (second stage): $(tail -n 3 "$log")"
unmount_under "$root"

# The system's configuration.
echo busy >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 busy\n' >"$root/etc/hosts"
echo "LABEL=$label / ext4 defaults,errors=remount-ro 0 1" >"$root/etc/fstab"
echo "$key$key" >"$root/etc/machine-id" # fixed: no first-boot setup, the same id in every point
install -D -m 644 "$here/network.conf" "$root/etc/systemd/network/20-busy.network"
install -D -m 644 "$here/journald.conf" "$root/etc/systemd/journald.conf.d/busy.conf"
install -D -m 644 "$here/sshd.conf" "$root/etc/ssh/sshd_config.d/busy.conf"
rm -f "$root"/etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N "" -C "root@busy" -f "$root/etc/ssh/ssh_host_ed25519_key"

# The workload and the authorized_keys from the firmware.
install -m 755 "$here/busy" "$root/usr/local/bin/busy"
ln -s busy "$root/usr/local/bin/busy-writer"
ln -s busy "$root/usr/local/bin/busy-stats"
install -m 755 "$here/busy-keys" "$here/busy-lvm" "$root/usr/local/sbin/"
install -m 644 "$here/busy-writer.service" "$here/busy-keys.service" "$here/busy-lvm.service" \
	"$root/etc/systemd/system/"
chroot "$root" systemctl enable -q systemd-networkd.service ssh.service busy-keys.service busy-lvm.service \
	busy-writer.service
chroot "$root" systemctl mask -q "${masked[@]}"
chroot "$root" /usr/local/bin/busy-writer init

# What a running server never reads.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
	"$root"/usr/share/man/* "$root"/usr/share/locale/*
kver=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
[ -n "$kver" ] && [ -f "$root/boot/initrd.img-$kver" ] || die "no kernel or initramfs in the built system"
mkdir -p "$root/boot/extlinux"
sed -e "s/@KVER@/$kver/g" -e "s/@LABEL@/$label/g" "$here/extlinux.conf" >"$root/boot/extlinux/extlinux.conf"

# The disk, built without mounting except for extlinux, which needs the mounted file system.
img=$work/server.img
part_size=$((size - part_start))
truncate -s "$size" "$img"
printf 'label: dos\nstart=%d, size=%d, type=83, bootable\n' $((part_start / 512)) $((part_size / 512)) |
	sfdisk --quiet "$img"
mke2fs -q -t ext4 -L "$label" -d "$root" -E offset=$part_start "$img" $((part_size / 1024))k
dd if="$mbr_bin" of="$img" bs=440 count=1 conv=notrunc status=none
loop=$(losetup --find --show --offset $part_start --sizelimit $part_size "$img")
mkdir "$work/mnt"
mount "$loop" "$work/mnt"
extlinux --install "$work/mnt/boot/extlinux" >"$work/extlinux.log" 2>&1 ||
	die "extlinux --install: $(tail -n 1 "$work/extlinux.log")"
umount "$work/mnt"
losetup -d "$loop"
loop=""

cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$cached.host_key.pub"
mv "$img" "$cached"
# Older recipes' images: keep the newest two, drop the rest.
find "$build_dir" -maxdepth 1 -name 'server-*.img' -printf '%T@ %p\n' | sort -rn | tail -n +3 | cut -d' ' -f2- |
	while read -r old; do rm -f "$old" "$old.host_key.pub"; done
copy_out
echo "build.sh: $dest built (Debian $suite, kernel $kver, server-$key.img)"
