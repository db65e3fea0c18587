#!/bin/sh
# husk node installer, in the manner of kata-deploy: run by the husk-deploy DaemonSet (or by
# hand) with the node's root file system at $HUSK_HOST_ROOT (default /host). It copies the
# shim, husk-vmm, the VM helpers, the guest kernel and initramfs to /opt/husk on the node,
# links the shim into /usr/local/bin (also as containerd-shim-kata-v2), writes
# /etc/husk/config.toml if absent, and adds the `husk` runtime handler to containerd's config
# once (between markers, so running it again changes nothing and `uninstall` removes exactly
# it). containerd is restarted only when its config changed and HUSK_RESTART is not 0.
#
#   husk-install.sh install | uninstall
set -eu

HOST="${HUSK_HOST_ROOT:-/host}"
PAYLOAD="${HUSK_PAYLOAD:-/opt/husk-payload}"
CONTAINERD_CONFIG="$HOST/etc/containerd/config.toml"
BEGIN="# >>> husk runtime (husk-deploy) >>>"
END="# <<< husk runtime (husk-deploy) <<<"

say() { echo "husk-install: $*"; }
die() { echo "husk-install: error: $*" >&2; exit 1; }

[ -d "$HOST" ] || die "$HOST: the node's root is not mounted (hostPath / at $HOST)"

restart_containerd() {
    if [ "${HUSK_RESTART:-1}" = "0" ]; then
        say "containerd's config changed; restart containerd to load it (HUSK_RESTART=0)"
        return
    fi
    # From a privileged pod with hostPID: run systemctl in the node's namespaces.
    nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd \
        || die "restarting containerd failed; restart it by hand"
    say "containerd restarted"
}

install() {
    [ -d "$PAYLOAD/bin" ] && [ -f "$PAYLOAD/share/vmlinux" ] || die "$PAYLOAD: no payload (bin/, share/vmlinux)"
    mkdir -p "$HOST/opt/husk/bin" "$HOST/opt/husk/share" "$HOST/usr/local/bin" "$HOST/etc/husk"
    for f in "$PAYLOAD"/bin/*; do
        cp "$f" "$HOST/opt/husk/bin/.$(basename "$f").new"
        mv "$HOST/opt/husk/bin/.$(basename "$f").new" "$HOST/opt/husk/bin/$(basename "$f")"
    done
    for f in vmlinux initramfs.cpio; do
        cp "$PAYLOAD/share/$f" "$HOST/opt/husk/share/.$f.new"
        mv "$HOST/opt/husk/share/.$f.new" "$HOST/opt/husk/share/$f"
    done
    for name in containerd-shim-husk-v2 containerd-shim-kata-v2; do
        ln -sf /opt/husk/bin/containerd-shim-husk-v2 "$HOST/usr/local/bin/$name"
    done
    for name in husk-vmm virtiofsd vhost-device-vsock; do
        [ -f "$HOST/opt/husk/bin/$name" ] && ln -sf "/opt/husk/bin/$name" "$HOST/usr/local/bin/$name"
    done
    if [ ! -f "$HOST/etc/husk/config.toml" ]; then
        sed -e 's#/usr/share/husk/#/opt/husk/share/#' "$PAYLOAD/config.toml" > "$HOST/etc/husk/config.toml"
        say "wrote /etc/husk/config.toml"
    fi
    mkdir -p "$(dirname "$CONTAINERD_CONFIG")"
    if [ -f "$CONTAINERD_CONFIG" ] && grep -qF "$BEGIN" "$CONTAINERD_CONFIG"; then
        say "containerd already knows the husk runtime; nothing to change"
        return
    fi
    [ -f "$CONTAINERD_CONFIG" ] || echo "version = 2" > "$CONTAINERD_CONFIG"
    { echo; echo "$BEGIN"; cat "$PAYLOAD/containerd-husk.toml"; echo "$END"; } >> "$CONTAINERD_CONFIG"
    say "added the husk runtime handler to /etc/containerd/config.toml"
    restart_containerd
}

uninstall() {
    if [ -f "$CONTAINERD_CONFIG" ] && grep -qF "$BEGIN" "$CONTAINERD_CONFIG"; then
        sed -i "/^$BEGIN\$/,/^$END\$/d" "$CONTAINERD_CONFIG"
        say "removed the husk runtime handler from /etc/containerd/config.toml"
        restart_containerd
    fi
    for name in containerd-shim-husk-v2 containerd-shim-kata-v2 husk-vmm virtiofsd vhost-device-vsock; do
        link="$HOST/usr/local/bin/$name"
        if [ -L "$link" ]; then
            case "$(readlink "$link")" in /opt/husk/*) rm -f "$link" ;; esac
        fi
    done
    rm -rf "$HOST/opt/husk"
    say "removed /opt/husk (kept /etc/husk/config.toml)"
}

case "${1:-install}" in
    install) install ;;
    uninstall) uninstall ;;
    *) die "usage: husk-install.sh install|uninstall" ;;
esac
if [ "${HUSK_WAIT:-0}" = "1" ]; then
    say "done; waiting (DaemonSet)"
    exec sleep infinity
fi
