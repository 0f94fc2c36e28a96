//! Simulated hosts for multi-host tests: network namespaces (`ip netns`) joined to a bridge in the
//! test's own namespace by veth pairs. The test's namespace holds the bridge address (where the
//! coordinator listens); each host has its own address, so the trainers' ring runs over real TCP
//! between namespaces, and a host's link can be cut (`ip link set down`) or rate limited (`tbf`).
//! Everything is removed on drop, also when the test panics. Needs root and iproute2 (`ip`, `tc`).

use std::process::Command;

use crate::{text, tool};

/// A bridge and its hosts; removed on drop.
pub struct Net {
    bridge: String,
    prefix: String,
    subnet: u8,
    hosts: Vec<String>,
}

/// Runs `ip`/`tc` arguments; panics with the command's stderr when it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(tool(program, "iproute2"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        text(&out.stderr)
    );
}

impl Net {
    /// A bridge at `10.{subnet}.0.1/24` and `hosts` namespaces at `10.{subnet}.0.{11..}`. Names carry
    /// the test process's pid, so tests running side by side (each with its own `subnet`) do not
    /// collide.
    pub fn new(subnet: u8, hosts: usize) -> Net {
        let prefix = format!("xv{}", std::process::id() % 100_000);
        let mut net = Net {
            bridge: format!("{prefix}br"),
            prefix,
            subnet,
            hosts: Vec::new(),
        };
        // Left over by a killed earlier run with the same pid (rare), or none.
        let _ = Command::new(tool("ip", "iproute2"))
            .args(["link", "del", &net.bridge])
            .output();
        run("ip", &["link", "add", &net.bridge, "type", "bridge"]);
        let cidr = format!("{}/24", net.bridge_ip());
        run("ip", &["addr", "add", &cidr, "dev", &net.bridge]);
        run("ip", &["link", "set", &net.bridge, "up"]);
        for i in 0..hosts {
            net.add_host(i);
        }
        net
    }

    fn add_host(&mut self, i: usize) {
        let ns = format!("{}h{i}", self.prefix);
        let _ = Command::new(tool("ip", "iproute2"))
            .args(["netns", "del", &ns])
            .output();
        run("ip", &["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let (outside, inside) = (self.link(i), format!("{}i{i}", self.prefix));
        run(
            "ip",
            &[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ],
        );
        run("ip", &["link", "set", &inside, "netns", &ns]);
        run("ip", &["link", "set", &outside, "master", &self.bridge]);
        run("ip", &["link", "set", &outside, "up"]);
        let cidr = format!("{}/24", self.host_ip(i));
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        in_ns(&["addr", "add", &cidr, "dev", &inside]);
        in_ns(&["link", "set", &inside, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
    }

    /// The bridge's address in the test's namespace (where a coordinator listens).
    pub fn bridge_ip(&self) -> String {
        format!("10.{}.0.1", self.subnet)
    }

    /// Adds another address of the test's namespace on the bridge, `10.{subnet}.0.{101 + i}`, and
    /// returns it: where a proxy standing in for host `i` listens, reached by the hosts like a host
    /// of its own (a distinct address, so the ring does not take its peers for one host).
    pub fn add_stand_in(&self, i: usize) -> String {
        let ip = format!("10.{}.0.{}", self.subnet, 101 + i);
        run(
            "ip",
            &["addr", "add", &format!("{ip}/32"), "dev", &self.bridge],
        );
        ip
    }

    /// Host `i`'s address.
    pub fn host_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, 11 + i)
    }

    /// Host `i`'s namespace name.
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// The command prefix that runs a program on host `i`.
    pub fn exec_on(&self, i: usize) -> Vec<String> {
        vec![
            tool("ip", "iproute2").display().to_string(),
            "netns".into(),
            "exec".into(),
            self.hosts[i].clone(),
        ]
    }

    /// Host `i`'s link on the bridge side.
    fn link(&self, i: usize) -> String {
        format!("{}v{i}", self.prefix)
    }

    /// Cuts (`false`) or restores (`true`) host `i`'s link: a partition of that host.
    pub fn set_link(&self, i: usize, up: bool) {
        run(
            "ip",
            &["link", "set", &self.link(i), if up { "up" } else { "down" }],
        );
    }

    /// Limits what the bridge sends to host `i` to `rate` (a `tc` rate like `8mbit`), with a token
    /// bucket filter.
    pub fn limit_rate(&self, i: usize, rate: &str) {
        run(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &self.link(i),
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kbit",
                "latency",
                "400ms",
            ],
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
