//! Scenario 10, the pod network (issue 5's benchmark): one pod per side on the same CNI
//! bridge (bridge + host-local, in network namespaces the bench creates; `ctr run --with-ns`),
//! busybox httpd and a `nc` sink in each. From the host: HTTP request latency (a new TCP
//! connection per request) and TCP throughput host→pod, alternating husk and runc.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_tests::cni::{BridgeNetwork, Netns};

use super::env::Env;
use super::results::Scenario;
use super::runner::{alternate, ms};
use super::scenarios::Sides;

const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;
const SERVE: &str = "mkdir -p /www && echo ok > /www/index.html && httpd -p 8080 -h /www && \
                     while true; do nc -l -p 9000 > /dev/null; done";

fn connect(addr: SocketAddr, within: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    }
}

/// One HTTP/1.0 GET on a new connection; the time to the end of the response.
fn http_get(ip: Ipv4Addr) -> Result<Duration> {
    let start = Instant::now();
    let mut s = connect(SocketAddr::from((ip, HTTP_PORT)), Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    let took = start.elapsed();
    if !body.ends_with(b"ok\n") {
        bail!(
            "unexpected answer from {ip}: {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(took)
}

/// `mib` MiB to the pod's sink; done when the sink has closed the connection (it read all).
fn send(ip: Ipv4Addr, mib: usize) -> Result<f64> {
    let chunk = vec![0x5au8; 1 << 20];
    let mut s = connect(SocketAddr::from((ip, SINK_PORT)), Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let start = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let secs = start.elapsed().as_secs_f64();
    Ok(mib as f64 / secs)
}

pub fn run(env: &Env, sides: &Sides, rounds: usize, mib: usize) -> Result<Scenario> {
    let mut sc = Scenario::new(
        10,
        "Pod network",
        format!(
            "One pod per side on the same CNI bridge (bridge + host-local, MTU 1500, in network \
             namespaces the bench creates, `ctr run --with-ns network:…`), busybox httpd and a `nc` \
             sink in each. From the host: an HTTP/1.0 GET on a new TCP connection (latency), and \
             {mib} MiB sent to the sink until it closes (throughput). husk's guest NIC is virtio-net \
             on a tap mirrored to the pod's veth (tc redirect), served by QEMU without vhost-net."
        ),
    );
    let mut net = BridgeNetwork::new(1500);
    let netns = [Netns::new("hbnh"), Netns::new("hbnr")];
    let ips = [net.attach(&netns[0]).ip, net.attach(&netns[1]).ip];
    let ids = [env.new_id("net"), env.new_id("net")];
    let result = (|| -> Result<()> {
        for side in 0..2 {
            let ns = format!("network:{}", netns[side].path().display());
            env.ctr_ok(&[
                "run",
                "-d",
                "--with-ns",
                &ns,
                "--runtime",
                Sides::runtime(side),
                env.image(),
                &ids[side],
                "sh",
                "-c",
                SERVE,
            ])?;
        }
        for ip in ips {
            // The server is up when the first GET answers.
            let deadline = Instant::now() + Duration::from_secs(60);
            while http_get(ip).is_err() {
                if Instant::now() > deadline {
                    bail!("the pod at {ip} did not answer HTTP within 60 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let lat = alternate(
            "HTTP GET host→pod",
            sides.labels(),
            "ms",
            2,
            rounds,
            |side| http_get(ips[side]).map(ms),
        )?;
        sc.rows
            .push(sides.row("HTTP GET host→pod, new connection each", "ms", lat));
        let tput = alternate(
            "TCP host→pod",
            sides.labels(),
            "MiB/s",
            1,
            rounds.div_ceil(4).max(3),
            |side| send(ips[side], mib),
        )?;
        sc.rows
            .push(sides.row(&format!("TCP host→pod, {mib} MiB"), "MiB/s", tput));
        Ok(())
    })();
    for id in &ids {
        let _ = env.remove(id);
    }
    drop(netns);
    drop(net);
    result?;
    Ok(sc)
}
