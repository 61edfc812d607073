#!/usr/bin/env bash
# Installs everything nbdfs needs to build and test on Debian 12 (or newer), as root.
# Idempotent: on a system that already has what is needed it installs nothing.
#   - build: meson, ninja, pkg-config, gcc, libfuse3, GLib 2, GnuTLS (and its certtool and
#     psktool, which the TLS tests use to make their certificates and keys)
#   - libnbd >= 1.18 (with nbdinfo, nbdcopy, nbdsh, nbdfuse): Debian's package when new
#     enough, otherwise built from Debian 13's source package into /usr/local
#   - test peers: qemu-utils 10 (bookworm-backports on Debian 12), nbdkit, nbd-server
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages)"
command -v apt-get >/dev/null || die "needs a Debian-based system (apt-get not found)"

. /etc/os-release
codename=${VERSION_CODENAME:-}

export DEBIAN_FRONTEND=noninteractive
apt_updated=
apt_update() {
  [ -n "$apt_updated" ] && return 0
  log "apt-get update"
  apt-get update -qq >/dev/null
  apt_updated=1
}

# Packages (name, or name=/target for a suite) missing from the system.
missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' ||
      printf '%s\n' "$p"
  done
}

install_pkgs() {   # install_pkgs [-t SUITE] PKG...
  local target=()
  if [ "$1" = -t ]; then target=(-t "$2"); shift 2; fi
  local need
  need=$(missing_pkgs "$@")
  [ -z "$need" ] && return 0
  apt_update
  log "installing: $(echo $need)"
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends "${target[@]}" $need >/dev/null
}

sources_file=/etc/apt/sources.list.d/nbdfs.sources
add_source() {     # add_source TYPE SUITE: a deb822 stanza for Debian's archive
  local type=$1 suite=$2
  grep -qs "^# nbdfs $type $suite\$" "$sources_file" && return 0
  log "adding apt source: $type $suite"
  cat >>"$sources_file" <<SRC
# nbdfs $type $suite
Types: $type
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

SRC
  apt_updated=
}

build_pkgs=(build-essential meson ninja-build pkg-config libfuse3-dev fuse3 libglib2.0-dev
            libjson-glib-dev
            libxml2-dev libgnutls28-dev gnutls-bin jq python3 python3-dev util-linux coreutils
            rsync tar iproute2 e2fsprogs clang libclang-rt-14-dev valgrind fio strace)
test_peers=(nbdkit nbd-server)
qemu_pkgs=(qemu-utils qemu-system-common qemu-block-extra)

install_pkgs "${build_pkgs[@]}" "${test_peers[@]}"

# qemu 10: qemu-nbd is the reference server for extended headers and block-status payloads.
qemu_major() { qemu-img --version 2>/dev/null | sed -n 's/^qemu-img version \([0-9]*\).*/\1/p'; }
if [ "$(qemu_major)" = "" ] || [ "$(qemu_major)" -lt 10 ]; then
  if [ "$codename" = bookworm ]; then
    add_source deb bookworm-backports
    apt_update
    log "installing qemu 10 from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${qemu_pkgs[@]}" >/dev/null
  else
    install_pkgs "${qemu_pkgs[@]}"
  fi
fi
[ "$(qemu_major)" -ge 10 ] || die "qemu-img >= 10 is needed, found $(qemu-img --version | head -1)"

# libnbd >= 1.18: extended headers and nbd_block_status_filter.
export PKG_CONFIG_PATH=/usr/local/lib/pkgconfig:/usr/local/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
have_libnbd() { pkg-config --atleast-version=1.18 libnbd 2>/dev/null && command -v nbdinfo >/dev/null; }
if ! have_libnbd; then
  if [ "$codename" != bookworm ] && apt-cache policy libnbd-dev 2>/dev/null | grep -q 'Candidate: 1\.\(1[89]\|[2-9][0-9]\)'; then
    install_pkgs libnbd-dev libnbd-bin nbdfuse
  else
    # Debian 12 ships 1.14: build Debian 13's source package into /usr/local.
    add_source deb-src trixie
    apt_update
    install_pkgs dpkg-dev
    work=$(mktemp -d /tmp/nbdfs-libnbd.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    log "building libnbd from Debian 13's source package in $work"
    (cd "$work" && apt-get source -qq libnbd/trixie >/dev/null 2>&1) || die "apt-get source libnbd failed"
    src=$(find "$work" -maxdepth 1 -type d -name 'libnbd-*' | head -1)
    [ -n "$src" ] || die "libnbd source not found after apt-get source"
    (
      cd "$src"
      # Debian's python3 (not whatever python3 comes first on PATH) so nbdsh works.
      PYTHON=/usr/bin/python3 ./configure --prefix=/usr/local --disable-ocaml \
        --disable-golang --disable-rust >/dev/null 2>"$work/configure.err" ||
        { cat "$work/configure.err" >&2; exit 1; }
      make -j"$(nproc)" >/dev/null 2>"$work/make.err" || { tail -30 "$work/make.err" >&2; exit 1; }
      make install >/dev/null
    ) || die "libnbd build failed"
    ldconfig
  fi
fi
have_libnbd || die "libnbd >= 1.18 with nbdinfo is still missing"
for tool in nbdinfo nbdcopy nbdsh nbdfuse; do
  command -v "$tool" >/dev/null || log "warning: $tool not installed"
done
# libfuse >= 3.16 for FUSE passthrough (3.18: FUSE over io_uring); Debian 12 ships 3.14.
# Debian's newest source package is built into a prefix of its own, where meson.build
# looks first; the system's libfuse stays the fallback (nbdfs builds and works with it).
libfuse_prefix=/usr/local/libfuse3
have_new_libfuse() {
  PKG_CONFIG_PATH=$libfuse_prefix/lib/pkgconfig pkg-config --atleast-version=3.16 fuse3
}
if ! have_new_libfuse; then
  fwork=$(mktemp -d /tmp/nbdfs-libfuse.XXXXXX)
  log "building libfuse from Debian's newest source package in $fwork"
  # Optional: any failure (sid's index unreachable included) leaves the system's libfuse.
  if add_source deb-src sid && apt_update && install_pkgs dpkg-dev liburing-dev libnuma-dev && (
    cd "$fwork" && apt-get source -qq fuse3/sid >/dev/null 2>&1 &&
      src=$(find "$fwork" -maxdepth 1 -type d -name 'fuse3-*' | head -1) && [ -n "$src" ] &&
      cd "$src" &&
      meson setup build --prefix="$libfuse_prefix" --libdir=lib --buildtype=release \
        -Dutils=false -Dexamples=false -Dtests=false >"$fwork/setup.log" 2>&1 &&
      ninja -C build >"$fwork/build.log" 2>&1 && meson install -C build --quiet >/dev/null
  ); then
    log "libfuse $(PKG_CONFIG_PATH=$libfuse_prefix/lib/pkgconfig pkg-config --modversion fuse3) in $libfuse_prefix"
  else
    tail -20 "$fwork"/*.log 2>/dev/null >&2 || true
    log "warning: building libfuse failed: nbdfs uses the system's $(pkg-config --modversion fuse3) (no FUSE passthrough)"
    # A sid index that cannot be fetched must not break every later apt-get update.
    sed -i '/^# nbdfs deb-src sid$/,/^$/d' "$sources_file"
    apt_updated=
  fi
  rm -rf "$fwork"
fi
log "ok: libnbd $(pkg-config --modversion libnbd), libfuse $(PKG_CONFIG_PATH=$libfuse_prefix/lib/pkgconfig pkg-config --modversion fuse3), $(qemu-img --version | head -1), nbdkit $(nbdkit --version | cut -d' ' -f2)"
