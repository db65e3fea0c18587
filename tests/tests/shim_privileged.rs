//! Tier 3: what a privileged or NET_ADMIN container can do, on husk and on runc side by side
//! under one private containerd (#16): `ctr run --privileged` starts (containerd adds the
//! host's devices, /dev/cpu/0/cpuid among them, whose parents the agent creates), and makes a
//! bridge, a veth pair and an nftables-backed iptables rule (the guest kernel has them:
//! `guest-kernel-config/45-netadmin.config`); CAP_NET_ADMIN added lets a container make a
//! bridge, dropped (the default) refuses it.

use husk_tests::husk::{HuskContainerd, BUSYBOX};
use husk_tests::require_root;

const HUSK: &str = "io.containerd.husk.v2";
const RUNC: &str = "io.containerd.runc.v2";

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// `ctr run --rm` with `options`, the script, on `runtime`: (exit ok, stdout + stderr).
fn run(
    h: &HuskContainerd,
    runtime: &str,
    id: &str,
    options: &[&str],
    script: &str,
) -> (bool, String) {
    let out = h
        .ctd
        .run_rm(Some(runtime), options, BUSYBOX, id, &["sh", "-c", script]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn privileged_and_net_admin_containers_behave_as_under_runc() {
    require_root("containerd");
    let h = HuskContainerd::start();
    let script = "test -e /dev/cpu/0/cpuid -o ! -e /dev/cpu && echo DEVICES-OK; \
                  brctl addbr foobar && ip link show foobar >/dev/null && echo BRIDGE-OK; \
                  ip link add v0 type veth peer name v1 && echo VETH-OK; \
                  ip link set foobar up && echo UP-OK";
    for runtime in [RUNC, HUSK] {
        let id = unique(&format!("priv-{}", runtime.split('.').nth(2).unwrap()));
        let (ok, out) = run(&h, runtime, &id, &["--privileged"], script);
        assert!(
            ok,
            "{runtime}: a privileged container did not run:\n{out}\n{}",
            h.ctd.log()
        );
        for want in ["DEVICES-OK", "BRIDGE-OK", "VETH-OK", "UP-OK"] {
            assert!(out.contains(want), "{runtime}: {want} missing:\n{out}");
        }
        let id = unique(&format!("netadm-{}", runtime.split('.').nth(2).unwrap()));
        let (ok, out) = run(
            &h,
            runtime,
            &id,
            &["--cap-add", "CAP_NET_ADMIN"],
            "brctl addbr foobar && echo BRIDGE-OK",
        );
        assert!(
            ok && out.contains("BRIDGE-OK"),
            "{runtime}: NET_ADMIN added:\n{out}"
        );
        let id = unique(&format!("nonetadm-{}", runtime.split('.').nth(2).unwrap()));
        let (_, out) = run(
            &h,
            runtime,
            &id,
            &[],
            "brctl addbr foobar && echo BRIDGE-OK; true",
        );
        assert!(
            !out.contains("BRIDGE-OK"),
            "{runtime}: a bridge without NET_ADMIN:\n{out}"
        );
        assert!(
            out.contains("not permitted") || out.contains("Permission denied"),
            "{runtime}: without NET_ADMIN the refusal is EPERM, not ENOPKG:\n{out}"
        );
    }
}
