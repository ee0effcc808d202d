//! Real NATs in network namespaces: hosts and routers built with `ip netns`,
//! veth pairs and iptables (masquerade), `hypha` processes running inside
//! them. Addresses come from 198.18.0.0/15, the range reserved for
//! benchmark networks; the namespaces are made and removed by the test, and
//! no traffic leaves them.
//!
//! Needs root, iproute2 and iptables (`.ci/setup` installs the tools; CI
//! runs as root). Without them each test says so and returns, unless
//! `HYPHA_NETNS_TESTS=require` makes that a failure.
//!
//! Topology: a public link 198.18.0.0/24 holds public hosts and each
//! router's outside address; behind a router, its home network
//! 198.19.N.0/24. An "endpoint-independent" router masquerades and drops
//! unsolicited inbound packets before conntrack can record them (so a
//! stranger's packet never takes a port a later mapping wants, which would
//! make Linux choose another); a "symmetric" router masquerades with
//! `--random-fully`, a new port per destination.

use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

const HYPHA: &str = env!("CARGO_BIN_EXE_hypha");

fn run(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(args: &[&str]) {
    run(args).unwrap_or_else(|e| panic!("{e}"));
}

/// Namespaces and processes of one test, removed on drop.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Child>,
    links: u32,
    dir: tempfile::TempDir,
}

/// A `hypha` started in a namespace, with its stderr lines.
struct Started {
    lines: mpsc::Receiver<String>,
}

impl Started {
    fn wait_for(&self, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {marker:?}"));
            if let Some((_, rest)) = line.split_once(marker) {
                return rest.trim().to_owned();
            }
        }
    }
}

impl Lab {
    /// A lab, or `None` (with the reason printed) where namespaces cannot
    /// be made here.
    fn try_new(tag: &str) -> Option<Self> {
        let why = match run(&["id", "-u"]) {
            Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {
                match (run(&["ip", "-V"]), run(&["iptables", "-V"])) {
                    (Ok(_), Ok(_)) => None,
                    _ => Some("needs iproute2 and iptables"),
                }
            }
            _ => Some("needs root"),
        };
        if let Some(why) = why {
            assert!(
                std::env::var("HYPHA_NETNS_TESTS").as_deref() != Ok("require"),
                "the NAT tests cannot run: {why}"
            );
            eprintln!("skipping the network-namespace NAT test: {why}");
            return None;
        }
        let prefix = format!("h{}{tag}", std::process::id() % 100_000);
        Some(Self {
            prefix,
            namespaces: Vec::new(),
            procs: Vec::new(),
            links: 0,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// A new namespace with its loopback up.
    fn host(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// A veth pair between two namespaces with an address (CIDR) on each
    /// end; the interface names.
    fn wire(&mut self, a: &str, a_cidr: &str, b: &str, b_cidr: &str) -> (String, String) {
        self.links += 1;
        let (ia, ib) = (
            format!("{}a{}", self.prefix, self.links),
            format!("{}b{}", self.prefix, self.links),
        );
        must(&[
            "ip", "link", "add", &ia, "type", "veth", "peer", "name", &ib,
        ]);
        for (ns, ifc, cidr) in [(a, &ia, a_cidr), (b, &ib, b_cidr)] {
            must(&["ip", "link", "set", ifc, "netns", ns]);
            if !cidr.is_empty() {
                must(&["ip", "-n", ns, "addr", "add", cidr, "dev", ifc]);
            }
            must(&["ip", "-n", ns, "link", "set", ifc, "up"]);
        }
        (ia, ib)
    }

    /// The public link: a namespace whose bridge joins its hosts and every
    /// router's outside end, with `addrs` (CIDR) on the bridge.
    fn public(&mut self, addrs: &[&str]) -> String {
        let ns = self.host("pub");
        let br = format!("{}br", self.prefix);
        must(&["ip", "-n", &ns, "link", "add", &br, "type", "bridge"]);
        must(&["ip", "-n", &ns, "link", "set", &br, "up"]);
        for a in addrs {
            must(&["ip", "-n", &ns, "addr", "add", a, "dev", &br]);
        }
        ns
    }

    /// A router namespace `rtr` between the public link's namespace `public`
    /// (`outside` is its address there) and a new home namespace on
    /// 198.19.`net`.0/24; the home namespace.
    fn nat(&mut self, public: &str, outside: &str, net: u8, symmetric: bool) -> String {
        let rtr = self.host(&format!("rtr{net}"));
        let home = self.host(&format!("home{net}"));
        let (pub_if, out_if) = self.wire(public, "", &rtr, &format!("{outside}/24"));
        let br = format!("{}br", self.prefix);
        must(&["ip", "-n", public, "link", "set", &pub_if, "master", &br]);
        let inside = format!("198.19.{net}.1");
        self.wire(
            &rtr,
            &format!("{inside}/24"),
            &home,
            &format!("198.19.{net}.2/24"),
        );
        must(&["ip", "-n", &home, "route", "add", "default", "via", &inside]);
        must(&[
            "ip",
            "netns",
            "exec",
            &rtr,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let mut masq = vec![
            "ip",
            "netns",
            "exec",
            &rtr,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &out_if,
            "-j",
            "MASQUERADE",
        ];
        if symmetric {
            masq.push("--random-fully");
        }
        must(&masq);
        // Unsolicited inbound packets are dropped before conntrack records
        // them (filtering, as home routers do).
        must(&[
            "ip",
            "netns",
            "exec",
            &rtr,
            "iptables",
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-i",
            &out_if,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]);
        home
    }

    /// Starts `hypha args...` inside `ns`.
    fn hypha(&mut self, ns: &str, args: &[&str]) -> Started {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, HYPHA])
            .args(args)
            .env("HYPHA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        self.procs.push(child);
        Started { lines }
    }

    /// A plain node (no model) on `quic` inside `ns`, its API on `http`.
    fn node(
        &mut self,
        ns: &str,
        name: &str,
        quic: &str,
        http: &str,
        bootstrap: Option<&str>,
    ) -> Started {
        self.up(ns, name, quic, http, bootstrap, false)
    }

    /// A seeder running the test model (one decode thread, two slots).
    fn seeder(&mut self, ns: &str, quic: &str, http: &str, bootstrap: Option<&str>) -> Started {
        self.up(ns, "seeder", quic, http, bootstrap, true)
    }

    fn up(
        &mut self,
        ns: &str,
        name: &str,
        quic: &str,
        http: &str,
        bootstrap: Option<&str>,
        model: bool,
    ) -> Started {
        let dir = self.dir.path().join(name);
        let pow = common::TEST_POW_BITS.to_string();
        let model_path = common::test_model();
        let mut args = vec![
            "up",
            "--quic",
            quic,
            "--http",
            http,
            "--pow-bits",
            &pow,
            "--data-dir",
            dir.to_str().unwrap(),
        ];
        if model {
            args.extend([
                "--model",
                model_path.to_str().unwrap(),
                "--threads",
                "1",
                "--parallel",
                "2",
                "--ctx-size",
                "512",
            ]);
        } else {
            args.push("--no-model");
        }
        if let Some(b) = bootstrap {
            args.extend(["--bootstrap", b]);
        }
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.hypha(ns, &args)
    }

    /// Runs a command inside `ns` and returns its stdout.
    fn exec(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        let out = run(&all).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `hypha status` of the node whose API is `http` in `ns` until
    /// its output contains `want`.
    fn wait_status(&self, ns: &str, http: &str, want: &str) -> String {
        let url = format!("http://{http}");
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let out = run(&["ip", "netns", "exec", ns, HYPHA, "status", "--url", &url])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if out.contains(want) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {want:?}; last:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Two public nodes and one behind a router of the given kind; what the
/// node behind it says of its mapping.
fn mapping_behind(symmetric: bool, tag: &str) -> Option<String> {
    let mut lab = Lab::try_new(tag)?;
    let public = lab.public(&["198.18.0.10/24", "198.18.0.11/24"]);
    let home = lab.nat(&public, "198.18.0.254", 1, symmetric);
    let a = lab.node(&public, "a", "198.18.0.10:7001", "127.0.0.1:8001", None);
    let a_addr = a.wait_for("peers reach this node as");
    let b = lab.node(
        &public,
        "b",
        "198.18.0.11:7002",
        "127.0.0.1:8002",
        Some(&a_addr),
    );
    b.wait_for("API at");
    // B is in A's table before the home node joins, so the home node's
    // own lookup finds it.
    lab.wait_status(&public, "127.0.0.1:8001", "routing table: 1 contacts");
    let c = lab.node(
        &home,
        "c",
        "198.19.1.2:7003",
        "127.0.0.1:8003",
        Some(&a_addr),
    );
    c.wait_for("API at");
    let want = if symmetric {
        "NAT mapping: endpoint-dependent"
    } else {
        "NAT mapping: endpoint-independent  public address: 198.18.0.254:7003"
    };
    let status = lab.wait_status(&home, "127.0.0.1:8003", want);
    println!("{status}");
    Some(status)
}

#[test]
fn an_endpoint_independent_nat_is_recognised() {
    let Some(status) = mapping_behind(false, "e") else {
        return;
    };
    assert!(status.contains("srflx 198.18.0.254:7003"), "{status}");
}

#[test]
fn a_symmetric_nat_is_recognised() {
    let Some(status) = mapping_behind(true, "s") else {
        return;
    };
    // A per-destination mapping is not offered to others.
    assert!(!status.contains("srflx"), "{status}");
}

/// A chat completion streamed through the API of the node at `http` in
/// `ns` (Python's standard library, inside the namespace): the seeder that
/// served it and the text.
fn stream_through(lab: &Lab, ns: &str, http: &str, model: &str) -> (String, String) {
    let script = format!(
        r#"
import json, urllib.request
req = urllib.request.Request("http://{http}/v1/chat/completions",
    data=json.dumps({{"model": "{model}", "stream": True, "max_tokens": 12, "temperature": 0,
        "messages": [{{"role": "user", "content": "Name three colors."}}]}}).encode(),
    headers={{"content-type": "application/json"}})
with urllib.request.urlopen(req, timeout=60) as r:
    peer = r.headers.get("x-hypha-peer")
    text = ""
    for line in r:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            d = json.loads(line[6:])
            if d.get("choices"):
                text += d["choices"][0]["delta"].get("content") or ""
print(peer)
print(text)
"#
    );
    let out = lab.exec(ns, &["python3", "-c", &script]);
    let mut lines = out.lines();
    let peer = lines.next().unwrap_or_default().to_owned();
    (peer, lines.collect::<Vec<_>>().join("\n"))
}

#[test]
fn completions_stream_to_public_and_natted_consumers() {
    let Some(mut lab) = Lab::try_new("c") else {
        return;
    };
    let public = lab.public(&["198.18.0.10/24", "198.18.0.11/24"]);
    let home = lab.nat(&public, "198.18.0.254", 1, false);
    let name = common::test_model()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let seeder = lab.seeder(&public, "198.18.0.10:7001", "127.0.0.1:8001", None);
    let seeder_addr = seeder.wait_for("peers reach this node as");
    let seeder_id = seeder_addr.split('@').next().unwrap().to_owned();
    // 1. Both public: a consumer on another public address.
    let c1 = lab.node(
        &public,
        "c1",
        "198.18.0.11:7002",
        "127.0.0.1:8002",
        Some(&seeder_addr),
    );
    c1.wait_for("API at");
    let (peer, text) = stream_through(&lab, &public, "127.0.0.1:8002", &name);
    assert_eq!(peer, seeder_id);
    assert!(!text.trim().is_empty());
    // 2. A consumer behind an endpoint-independent NAT reaches the public
    //    seeder through it.
    let c2 = lab.node(
        &home,
        "c2",
        "198.19.1.2:7003",
        "127.0.0.1:8003",
        Some(&seeder_addr),
    );
    c2.wait_for("API at");
    let (peer2, text2) = stream_through(&lab, &home, "127.0.0.1:8003", &name);
    assert_eq!(peer2, seeder_id);
    assert_eq!(text2, text, "greedy output is the same either way");
    println!("streamed through a public and a NATed consumer: {text:?}");
}

/// The seeder and the consumer each behind an endpoint-independent NAT
/// that drops unsolicited packets, a public bootstrap node between them:
/// the seeder publishes its NAT's address, the consumer asks it (through
/// the bootstrap node) to punch, and the completion flows over the direct
/// path between the two NATs' public addresses. (Here the two nodes' own
/// DHT requests to each other, sent both ways, open the holes too; the
/// punch exchange itself is checked in `tests/nat.rs`.)
#[test]
fn a_hole_is_punched_between_two_nats() {
    let Some(mut lab) = Lab::try_new("p") else {
        return;
    };
    let public = lab.public(&["198.18.0.10/24"]);
    let home_s = lab.nat(&public, "198.18.0.254", 1, false);
    let home_c = lab.nat(&public, "198.18.0.253", 2, false);
    let boot = lab.node(&public, "boot", "198.18.0.10:7001", "127.0.0.1:8001", None);
    let boot_addr = boot.wait_for("peers reach this node as");
    let name = common::test_model()
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let seeder = lab.seeder(
        &home_s,
        "198.19.1.2:7002",
        "127.0.0.1:8002",
        Some(&boot_addr),
    );
    let seeder_id = seeder
        .wait_for("peers reach this node as")
        .split('@')
        .next()
        .unwrap()
        .to_owned();
    // The seeder's records carry its NAT's address once two peers agree on
    // it; the bootstrap node is one, the consumer the other.
    let consumer = lab.node(
        &home_c,
        "c",
        "198.19.2.2:7003",
        "127.0.0.1:8003",
        Some(&boot_addr),
    );
    consumer.wait_for("API at");
    lab.wait_status(&home_s, "127.0.0.1:8002", "srflx 198.18.0.254:7002");
    lab.wait_status(&home_c, "127.0.0.1:8003", "srflx 198.18.0.253:7003");
    let started = Instant::now();
    let (peer, text) = stream_through(&lab, &home_c, "127.0.0.1:8003", &name);
    assert_eq!(peer, seeder_id);
    assert!(!text.trim().is_empty());
    // The consumer's connection to the seeder runs between the two NATs'
    // public addresses: direct, through the punched hole.
    let net = lab.exec(&home_c, &[HYPHA, "peers", "--url", "http://127.0.0.1:8003"]);
    let line = net
        .lines()
        .find(|l| l.contains(&seeder_id) && l.contains("connected"))
        .unwrap_or_else(|| panic!("no connection to the seeder:\n{net}"));
    assert!(line.contains("198.18.0.254:7002"), "{line}");
    println!(
        "punched and streamed in {:.1} s: {text:?}\n{line}",
        started.elapsed().as_secs_f64()
    );
}
