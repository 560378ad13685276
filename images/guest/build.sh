#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
# Builds the lab guest: a small BIOS-bootable raw disk (MBR, one ext4 partition labelled approot,
# extlinux, a Debian 12 kernel and a busybox initramfs) whose init prints the disk's /marker.txt.
#
#   images/guest/build.sh DEST [SIZE]      SIZE in bytes or with an IEC suffix (1G, 512M); default 1G
#
# Nothing binary is committed: the kernel and busybox come from Debian packages (`apt-get download`,
# unpacked with `dpkg-deb -x`, never installed). images/build/ keeps the packages and one built image
# per recipe (hash of the files next to this script, the package versions, the host's syslinux and
# SIZE); a second call with the same recipe copies that image. The marker is not part of the recipe:
# the image says "base" and appliance.lab.guest.set_marker changes it.
#
# Needs root on a cache miss (a loop mount, for `extlinux --install`) and these Debian packages:
# apt dpkg coreutils util-linux fdisk e2fsprogs extlinux syslinux-common kmod cpio gzip xz-utils zstd.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build_dir=${GUEST_BUILD_DIR:-$(dirname "$here")/build}
debs=$build_dir/debs
flavour=${GUEST_KERNEL_FLAVOUR:-amd64}
mbr_bin=/usr/lib/syslinux/mbr/mbr.bin
part_start=$((1 << 20))
# The root disk on virtio, SATA and IDE, the network for later, the ACPI power button; and ext4,
# which the generic kernel builds as a module. Built-in ones are skipped, dependencies added.
wanted=(virtio_pci virtio_blk ahci ata_piix sd_mod virtio_net ext4 button evdev)

die() {
	echo "build.sh: $*" >&2
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: build.sh DEST [SIZE]"
dest=$1
size=$(numfmt --from=iec "${2:-1G}" 2>/dev/null) || die "bad size: ${2:-}"
[ "$size" -ge $((32 << 20)) ] || die "size $size is too small: at least 32 MiB"
size=$((size / part_start * part_start))

missing=()
for tool in apt-get apt-cache dpkg-deb depmod sfdisk mke2fs extlinux losetup mount cpio gzip flock sha256sum; do
	command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -f "$mbr_bin" ] || missing+=("$mbr_bin (syslinux-common)")
[ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (see images/README.md for the Debian packages)"

mkdir -p "$debs"
# One build at a time: parallel test runs share the cache.
exec 9>"$build_dir/.lock"
flock 9

# What the recipe uses, as apt's lists say today: the kernel package behind the flavour's meta-package
# (linux-image-6.1.0-NN-amd64) and busybox-static, each with its candidate version. apt-cache takes
# half a second a call, so the answer is kept until the lists or apt's configuration change.
resolve_packages() {
	local kpkg
	kpkg=$(apt-cache depends "linux-image-$flavour" 2>/dev/null |
		awk -v f="$flavour" '$1 == "Depends:" && $2 ~ "^linux-image-.*-" f "$" { print $2; exit }')
	[ -n "$kpkg" ] || return 0
	apt-cache policy "$kpkg" busybox-static 2>/dev/null |
		awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } $1 == "Candidate:" && $2 != "(none)" { print p, $2 }'
}

# The .deb of PACKAGE at VERSION in the cache, downloaded if missing.
fetch_deb() {
	local package=$1 version=$2 f tmp
	for f in "$debs/${package}"_*.deb; do
		[ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version)" = "$version" ] && {
			echo "$f"
			return
		}
	done
	tmp=$(mktemp -d "$debs/download.XXXXXX")
	# As root, apt's download sandbox user cannot write to a folder it does not own.
	(cd "$tmp" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$package=$version" >&2) ||
		{
			rm -rf "$tmp"
			die "apt-get download $package=$version failed"
		}
	f=$(find "$tmp" -name '*.deb' | head -n 1)
	mv "$f" "$debs/"
	rm -rf "$tmp"
	echo "$debs/${f##*/}"
}

# Offline, without apt lists: the newest cached .deb matching PATTERN.
cached_deb() {
	local f
	f=$(find "$debs" -maxdepth 1 -name "$1" | sort -V | tail -n 1)
	[ -n "$f" ] || die "cannot resolve the packages ($1): run apt-get update (and check the network)"
	echo "build.sh: apt cannot resolve the packages, using the cached ${f##*/}" >&2
	echo "$f"
}

memo=$build_dir/packages.$flavour
stamp=$(find /var/lib/apt/lists /etc/apt -type f -printf '%p %T@ %s\n' 2>/dev/null | sort | sha256sum | cut -c1-16)
if [ -f "$memo" ] && [ "$(head -n 1 "$memo")" = "$stamp" ]; then
	resolved=$(tail -n +2 "$memo")
else
	resolved=$(resolve_packages)
	[ "$(grep -c . <<<"$resolved")" = 2 ] && printf '%s\n%s\n' "$stamp" "$resolved" >"$memo"
fi
if [ "$(grep -c . <<<"$resolved")" = 2 ]; then
	read -r kpkg kversion < <(grep '^linux-image-' <<<"$resolved")
	read -r _ bversion < <(grep '^busybox-static ' <<<"$resolved")
	kernel_deb=$(fetch_deb "$kpkg" "$kversion")
	busybox_deb=$(fetch_deb busybox-static "$bversion")
else
	kernel_deb=$(cached_deb "linux-image-*-${flavour}_*.deb")
	busybox_deb=$(cached_deb "busybox-static_*.deb")
fi

key=$(
	{
		for f in "$here"/*; do
			[ -f "$f" ] && sha256sum "$f" | sed "s|  .*/|  |"
		done
		basename "$kernel_deb"
		basename "$busybox_deb"
		sha256sum "$mbr_bin" | cut -d' ' -f1
		extlinux --version 2>&1 | head -n 1
		echo "$size"
	} | sha256sum | cut -c1-16
)
cached=$build_dir/guest-$key.img

copy_out() {
	mkdir -p "$(dirname "$dest")"
	cp --sparse=always "$cached" "$dest.part"
	mv "$dest.part" "$dest"
}

if [ -f "$cached" ]; then
	copy_out
	echo "build.sh: $dest from the cache (guest-$key.img)"
	exit 0
fi

[ "$(id -u)" = 0 ] || die "building (not cached yet) needs root: it loop-mounts the image for extlinux"

work=$(mktemp -d "$build_dir/work.XXXXXX")
loop=""
cleanup() {
	mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
	[ -n "$loop" ] && losetup -d "$loop"
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"
kdir=$(find "$work/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
kver=${kdir##*/}
[ -n "$kver" ] && [ -f "$work/kernel/boot/vmlinuz-$kver" ] || die "no kernel in ${kernel_deb##*/}"
# Debian generates modules.dep when the package is installed; it is not in the .deb.
[ -f "$kdir/modules.dep" ] || depmod -b "$work/kernel" "$kver"

# Module load order: a depth-first walk of modules.dep (and of modules.softdep's "pre:", whose names
# may be aliases, as ext4's "crypto-crc32c"), each module after what it needs.
declare -A path_of=() deps_of=() pre_of=() seen=()
declare -a order=()
# A module's name is its file name without .ko*, with "-" read as "_" (crc-t10dif.ko is crc_t10dif).
while IFS= read -r line; do
	p=${line%%:*}
	n=${p##*/}
	n=${n%%.ko*}
	path_of[${n//-/_}]=$p
	deps_of[${n//-/_}]=${line#*:}
done <"$kdir/modules.dep"
while read -r word module rest; do
	[ "$word" = softdep ] || continue
	rest=" $rest "
	case $rest in *" pre: "*) ;; *) continue ;; esac
	rest=${rest#* pre: }
	rest=${rest%% post:*}
	pre_of[${module//-/_}]+=" $rest"
done <"$kdir/modules.softdep"
declare -A builtin=()
while IFS= read -r p; do
	n=${p##*/}
	n=${n%%.ko*}
	builtin[${n//-/_}]=1
done <"$kdir/modules.builtin"

# Names a softdep may mean: a module, or every module providing that alias.
resolve() {
	if [ -n "${path_of[$1]:-}" ] || [ -n "${builtin[$1]:-}" ]; then
		echo "$1"
	else
		awk -v a="$1" '$1 == "alias" && $2 == a { print $3 }' "$kdir/modules.alias"
	fi
}

visit() {
	local n=$1 d p
	[ -z "${seen[$n]:-}" ] || return 0
	seen[$n]=1
	[ -z "${builtin[$n]:-}" ] || return 0
	[ -n "${path_of[$n]:-}" ] || return 0
	for p in ${pre_of[$n]:-}; do
		for d in $(resolve "$p"); do visit "${d//-/_}"; done
	done
	for p in ${deps_of[$n]}; do
		d=${p##*/}
		d=${d%%.ko*}
		visit "${d//-/_}"
	done
	order+=("$n")
}

for n in "${wanted[@]}"; do
	[ -n "${path_of[$n]:-}" ] || [ -n "${builtin[$n]:-}" ] ||
		die "kernel $kver has neither a module nor a built-in $n (flavour $flavour; cloud-amd64 has no ahci)"
	visit "$n"
done

# The initramfs: busybox with a link per applet, the modules (uncompressed: busybox insmod reads
# plain .ko only), their load order and init.
initramfs=$work/initramfs
mkdir -p "$initramfs"/{bin,dev,proc,sys,root,run,lib/modules}
cp "$work/busybox/bin/busybox" "$initramfs/bin/busybox"
for applet in $("$initramfs/bin/busybox" --list); do
	[ "$applet" = busybox ] || ln -s busybox "$initramfs/bin/$applet"
done
# The kernel opens /dev/console for init before init mounts devtmpfs.
mknod -m 600 "$initramfs/dev/console" c 5 1
install -m 755 "$here/init" "$initramfs/init"
: >"$initramfs/lib/modules/load.list"
for n in "${order[@]}"; do
	src=$kdir/${path_of[$n]}
	out=$initramfs/lib/modules/$n.ko
	case $src in
	*.ko) cp "$src" "$out" ;;
	*.ko.xz) xz -dc "$src" >"$out" ;;
	*.ko.zst) zstd -qdc "$src" >"$out" ;;
	*.ko.gz) gzip -dc "$src" >"$out" ;;
	*) die "unknown module format: $src" ;;
	esac
	echo "$n" >>"$initramfs/lib/modules/load.list"
done

root=$work/root
mkdir -p "$root/boot/extlinux"
cp "$work/kernel/boot/vmlinuz-$kver" "$root/boot/vmlinuz"
(cd "$initramfs" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0 --reproducible) |
	gzip -n >"$root/boot/initrd.img"
cp "$here/extlinux.conf" "$root/boot/extlinux/extlinux.conf"
echo base >"$root/marker.txt"

# The disk, built without mounting except for extlinux, which needs the mounted file system.
img=$work/guest.img
part_size=$((size - part_start))
truncate -s "$size" "$img"
printf 'label: dos\nstart=%d, size=%d, type=83, bootable\n' $((part_start / 512)) $((part_size / 512)) |
	sfdisk --quiet "$img"
mke2fs -q -t ext4 -L approot -d "$root" -E offset=$part_start "$img" $((part_size / 1024))k
dd if="$mbr_bin" of="$img" bs=440 count=1 conv=notrunc status=none
loop=$(losetup --find --show --offset $part_start --sizelimit $part_size "$img")
mkdir "$work/mnt"
mount "$loop" "$work/mnt"
extlinux --install "$work/mnt/boot/extlinux" >"$work/extlinux.log" 2>&1 ||
	die "extlinux --install: $(tail -n 1 "$work/extlinux.log")"
umount "$work/mnt"
losetup -d "$loop"
loop=""

mv "$img" "$cached"
# Older recipes' images: keep the last few (another size may be in use), drop the rest.
find "$build_dir" -maxdepth 1 -name 'guest-*.img' -printf '%T@ %p\n' | sort -rn | tail -n +5 | cut -d' ' -f2- |
	xargs -r rm -f
copy_out
echo "build.sh: $dest built (kernel $kver, ${#order[@]} modules, guest-$key.img)"
