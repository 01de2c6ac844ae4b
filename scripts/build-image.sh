#!/usr/bin/env bash
# Build the droplet base images for the Molecule scenarios and the demo, without a registry:
# debootstrap (minbase, systemd as PID 1, Python 3) -> tarball -> `podman import`.
#
#   scripts/build-image.sh [bookworm|trixie|all]     (default: all)
#
# Images: localhost/smt-droplet-base:<release>. The tarball is cached under
# .cache/images/ and keyed on this script's content hash; when the image carrying that key
# already exists the script does nothing. The apt mirror is read at run time from
# /etc/apt/sources.list.d/debian.sources (or SMT_APT_MIRROR / SMT_APT_SECURITY_MIRROR).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${REPO}/molecule/containers.conf"
IMAGE_REPO="localhost/smt-droplet-base"
CACHE_DIR="${REPO}/.cache/images"
SOURCES_FILE="${SMT_APT_SOURCES_FILE:-/etc/apt/sources.list.d/debian.sources}"
PACKAGES="procps,systemd,systemd-sysv,dbus,python3,python3-apt,sudo,iproute2,ca-certificates"
KEY="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# First `URIs:` value of the stanza whose Suites do (security=1) or do not (security=0)
# contain a "-security" suite.
read_mirror() {
    local want_security="$1"
    [[ -r "${SOURCES_FILE}" ]] || return 0
    awk -v want="${want_security}" '
        function flush() {
            if (uri != "" && found == "" && ((sec && want == 1) || (!sec && want == 0))) found = uri
            uri = ""; sec = 0
        }
        /^[[:space:]]*$/ { flush(); next }
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i ~ /-security$/) sec = 1 }
        END { flush(); print found }
    ' "${SOURCES_FILE}"
}

MIRROR="${SMT_APT_MIRROR:-$(read_mirror 0)}"
SECURITY_MIRROR="${SMT_APT_SECURITY_MIRROR:-$(read_mirror 1)}"

image_key() {
    podman image inspect --format '{{index .Config.Labels "smt.build-key"}}' "$1" 2>/dev/null || true
}

mask_units() {
    local rootfs="$1" unit
    # Units that fail (or make no sense) inside a container.
    for unit in \
        systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
        systemd-udev-trigger.service systemd-udev-settle.service \
        getty.target getty@tty1.service console-getty.service serial-getty@.service \
        systemd-remount-fs.service systemd-modules-load.service \
        sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
        sys-fs-fuse-connections.mount dev-hugepages.mount proc-sys-fs-binfmt_misc.automount \
        systemd-timesyncd.service systemd-firstboot.service systemd-journald-audit.socket \
        apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer \
        e2scrub_reap.service; do
        ln -sf /dev/null "${rootfs}/etc/systemd/system/${unit}"
    done
}

write_sources() {
    local rootfs="$1" release="$2"
    rm -f "${rootfs}/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' \
            "${MIRROR}" "${release}" "${release}"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        if [[ -n "${SECURITY_MIRROR}" ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' \
                "${SECURITY_MIRROR}" "${release}"
            printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        fi
    } >"${rootfs}/etc/apt/sources.list.d/debian.sources"
}

build_tarball() {
    local release="$1" tarball="$2" work rootfs
    [[ -n "${MIRROR}" ]] || die "no apt mirror found in ${SOURCES_FILE} (set SMT_APT_MIRROR)"
    work="$(mktemp -d "${CACHE_DIR}/build-${release}.XXXXXX")"
    rootfs="${work}/rootfs"
    # shellcheck disable=SC2064
    trap "rm -rf '${work}'" RETURN
    log "${release}: debootstrap from ${MIRROR}"
    debootstrap --variant=minbase --include="${PACKAGES}" "${release}" "${rootfs}" "${MIRROR}" \
        >"${work}/debootstrap.log" 2>&1 || {
        tail -n 30 "${work}/debootstrap.log" >&2
        die "${release}: debootstrap failed"
    }
    write_sources "${rootfs}" "${release}"
    mask_units "${rootfs}"
    # Fresh package lists save every converge an `apt update` round trip.
    chroot "${rootfs}" apt-get update -qq >/dev/null 2>&1 || log "${release}: apt-get update in rootfs failed (ignored)"
    chroot "${rootfs}" apt-get clean
    : >"${rootfs}/etc/machine-id"
    rm -f "${rootfs}/var/lib/dbus/machine-id"
    echo "smt-droplet" >"${rootfs}/etc/hostname"
    tar --numeric-owner -C "${rootfs}" -cf "${tarball}.part" .
    mv "${tarball}.part" "${tarball}"
}

build_one() {
    local release="$1" image="${IMAGE_REPO}:$1" tarball start
    tarball="${CACHE_DIR}/smt-droplet-base-${release}-${KEY}.tar"
    start=$SECONDS
    if [[ "$(image_key "${image}")" == "${KEY}" ]]; then
        log "${image}: up to date (key ${KEY})"
        return 0
    fi
    mkdir -p "${CACHE_DIR}"
    if [[ ! -s "${tarball}" ]]; then
        # Drop tarballs of older script versions for this release.
        rm -f "${CACHE_DIR}/smt-droplet-base-${release}-"*.tar
        build_tarball "${release}" "${tarball}"
        log "${release}: rootfs tarball built in $((SECONDS - start)) s"
    fi
    podman import --quiet \
        --change 'CMD ["/sbin/init"]' \
        --change 'ENV container=podman' \
        --change "LABEL smt.build-key=${KEY}" \
        "${tarball}" "${image}" >/dev/null
    log "${image}: imported (key ${KEY}) in $((SECONDS - start)) s total"
}

main() {
    local target="${1:-all}" releases=()
    case "${target}" in
        bookworm | trixie) releases=("${target}") ;;
        all) releases=(bookworm trixie) ;;
        -h | --help) sed -n '2,10p' "${BASH_SOURCE[0]}"; return 0 ;;
        *) die "unknown release '${target}' (bookworm|trixie|all)" ;;
    esac
    [[ "$(id -u)" == 0 ]] || die "run as root (debootstrap needs it)"
    command -v podman >/dev/null || die "podman is not installed (run scripts/setup)"
    for release in "${releases[@]}"; do
        build_one "${release}"
    done
}

main "$@"
