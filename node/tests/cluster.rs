//! Real `shoal node` processes on loopback QUIC (and on hosts of their own, in network
//! namespaces), driven through the `shoal` command as a user would. Every process is killed when
//! its guard drops; every wait is bounded.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_node::protocol::PIECE_SIZE;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A running `shoal node`, killed on drop.
struct NodeProc {
    child: Child,
    dir: PathBuf,
    /// The network namespace it runs in, if not ours: its commands run there too.
    ns: Option<String>,
    peer_id: String,
    addr: String,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProc {
    fn start(dir: &Path, bootstrap: Option<&NodeProc>) -> NodeProc {
        Self::start_on(dir, bootstrap.map(|b| b.addr.as_str()), "/ip4/127.0.0.1/udp/0/quic-v1")
    }

    /// A node listening on `listen`, joining through the node at `bootstrap`.
    fn start_on(dir: &Path, bootstrap: Option<&str>, listen: &str) -> NodeProc {
        Self::spawn(dir, None, &["--listen", listen, "--api", "127.0.0.1:0"], bootstrap)
    }

    /// A node on `host` listening where a node listens by default (every interface, UDP 4737),
    /// with `args` added; its API is on the host's LAN address, where the test reaches it, and
    /// its `addr` is its LAN one.
    fn start_in(host: &Host, dir: &Path, args: &[&str], bootstrap: Option<&str>) -> NodeProc {
        let api = format!("{}:0", host.ip);
        Self::spawn(dir, Some(host), &[args, &["--api", &api]].concat(), bootstrap)
    }

    fn spawn(dir: &Path, host: Option<&Host>, args: &[&str], bootstrap: Option<&str>) -> NodeProc {
        std::fs::create_dir_all(dir).expect("data dir");
        let mut cmd = match host {
            None => Command::new(SHOAL),
            Some(h) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &h.ns, SHOAL]);
                cmd
            }
        };
        cmd.arg("node")
            .args(args)
            .env("SHOAL_DATA_DIR", dir)
            .env_remove("SHOAL_API")
            .env_remove("SHOAL_BOOTSTRAP")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log_file(dir));
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().expect("spawn shoal node");
        let stdout = child.stdout.take().expect("stdout");
        // Killed on drop from here on, also when it does not start in time.
        let ns = host.map(|h| h.ns.clone());
        let mut node = NodeProc { child, dir: dir.to_owned(), ns, peer_id: String::new(), addr: String::new() };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Drain stdout for the node's whole life, even after the start-up lines were read.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut peer_id = None;
        // On a host's LAN, its IPv4 address, unless the node listens on IPv6 alone.
        let mut addr = None;
        let v6_only = args.windows(2).any(|w| w[0] == "--listen" && w[1].starts_with("/ip6/"));
        let mut printed = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while peer_id.is_none() || addr.is_none() || !dir.join("api").exists() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
                panic!("node did not start within 20 s; it printed:\n{printed}its log:\n{log}");
            }
            match rx.recv_timeout(left) {
                Ok(line) => {
                    printed.push_str(&line);
                    printed.push('\n');
                    if let Some(p) = line.strip_prefix("peer id: ") {
                        peer_id = Some(p.to_string());
                    } else if let Some(a) = line.strip_prefix("listening: ")
                        && host.is_none_or(|h| match (v6_only, &h.ip6) {
                            (true, Some(ip6)) => a.starts_with(&format!("/ip6/{ip6}/")),
                            _ => a.starts_with(&format!("/ip4/{}/", h.ip)),
                        })
                    {
                        addr.get_or_insert(a.to_string());
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let (peer_id, addr) = (peer_id.expect("peer id"), addr.expect("address"));
        assert!(addr.ends_with(&format!("/p2p/{peer_id}")), "the printed address names the peer: {addr}");
        (node.peer_id, node.addr) = (peer_id, addr);
        node
    }

    /// Runs `shoal ARGS` against this node; returns stdout, or panics with stderr.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args);
        let log = std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default();
        assert!(out.0, "shoal {args:?} failed: {}\nnode log:\n{log}", out.2);
        out.1
    }

    /// The body of `GET path` on the node's API.
    fn api_get(&self, path: &str) -> String {
        let api = std::fs::read_to_string(self.dir.join("api")).expect("API address");
        ureq::get(format!("http://{}{path}", api.trim()))
            .call()
            .and_then(|mut r| r.body_mut().read_to_string())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The value of one metric line (`name{labels}`) on the node's API, 0 if absent.
    fn metric(&self, name: &str) -> f64 {
        let text = self.api_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().expect("a number"))
    }

    /// Stops the node with SIGTERM; returns how it exited, within 15 s.
    fn stop(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "the node did not stop within 15 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `shoal providers <hash>` here lists `provider` within 30 s.
    fn lists_provider(&self, hash: &str, provider: &NodeProc) -> bool {
        eventually(30, || self.try_cli(&["providers", hash]).1.contains(&provider.peer_id))
    }

    /// `shoal get <hash> -o <out>`, which must succeed and write the blob whose hash it is.
    fn fetch(&self, hash: &str, out: &Path) {
        let got = self.try_cli(&["get", hash, "-o", out.to_str().expect("utf-8")]);
        assert!(got.0, "get on {} failed: {}", self.peer_id, got.2);
        assert_eq!(b3sum(out), hash, "the fetched file's b3sum equals the hash");
    }

    fn try_cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = match &self.ns {
            None => Command::new(SHOAL),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, SHOAL]);
                cmd
            }
        };
        let out = cmd
            .args(args)
            .env("SHOAL_DATA_DIR", &self.dir)
            .env_remove("SHOAL_API")
            .env_remove("SHOAL_API_TOKEN")
            .output()
            .expect("run shoal");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }
}

/// A machine of its own on one LAN: a network namespace whose veth (`dev`) is on a bridge. The
/// test reaches the nodes' APIs over the bridge.
struct Host {
    ns: String,
    ip: String,
    dev: String,
    /// Its IPv6 address, where it has one.
    ip6: Option<String>,
}

/// Hosts on a bridge, removed on drop (with the processes still in them: drop the nodes first).
struct Lan {
    bridge: String,
    hosts: Vec<Host>,
}

impl Lan {
    /// `n` hosts on a private LAN, or `None` (said on standard error) where network namespaces
    /// cannot be made: not root, or no `ip`.
    fn new(n: usize) -> Option<Lan> {
        Self::on(n, &format!("10.213.{}", std::process::id() % 250))
    }

    /// `n` hosts on the /24 `subnet` (its first three numbers), the bridge at `.254`.
    fn on(n: usize, subnet: &str) -> Option<Lan> {
        static LANS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        // Unique names on the machine: this process's id, and which of its LANs.
        let id = format!("{}k{}", std::process::id(), LANS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut lan = Lan { bridge: format!("shb{id}"), hosts: Vec::new() };
        let made = (|| {
            ip(&["link", "add", &lan.bridge, "type", "bridge"])?;
            ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &lan.bridge])?;
            ip(&["link", "set", &lan.bridge, "up"])?;
            for i in 1..=n {
                let (outer, inner) = (format!("shv{id}x{i}"), format!("shp{id}x{i}"));
                let host =
                    Host { ns: format!("shoal-{id}-{i}"), ip: format!("{subnet}.{i}"), dev: inner.clone(), ip6: None };
                ip(&["netns", "add", &host.ns])?;
                lan.hosts.push(host);
                let host = &lan.hosts[i - 1];
                ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &host.ns])?;
                ip(&["link", "set", &outer, "master", &lan.bridge, "up"])?;
                let inside = |args: &[&str]| host.ip_inside(args);
                inside(&["addr", "add", &format!("{}/24", host.ip), "dev", &inner])?;
                inside(&["link", "set", &inner, "up"])?;
                inside(&["link", "set", "lo", "up"])?;
            }
            Ok::<(), String>(())
        })();
        match made {
            Ok(()) => Some(lan),
            Err(e) => {
                eprintln!("skipped: cannot make hosts in network namespaces here ({e})");
                None
            }
        }
    }
}

/// Runs `ip ARGS`; its error output if it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
    }
}

impl Host {
    /// Runs `ip ARGS` in the host's namespace.
    fn ip_inside(&self, args: &[&str]) -> Result<(), String> {
        ip(&[&["netns", "exec", &self.ns, "ip"], args].concat())
    }

    /// Gives the host the address Docker gives its bridge on every machine (as a CDN node's host
    /// often has): an address that names each such host itself.
    fn add_docker_bridge(&self) {
        for args in [
            &["link", "add", "docker0", "type", "bridge"][..],
            &["addr", "add", "172.17.0.1/16", "dev", "docker0"],
            &["link", "set", "docker0", "up"],
        ] {
            self.ip_inside(args).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

impl Lan {
    /// Gives each host an IPv6 address in the /64 `prefix` (`prefix::<i>`), without duplicate
    /// address detection, which would hold them for a second.
    fn add_ipv6(&mut self, prefix: &str) -> Result<(), String> {
        for (i, host) in self.hosts.iter_mut().enumerate() {
            let ip6 = format!("{prefix}::{}", i + 1);
            host.ip_inside(&["addr", "add", &format!("{ip6}/64"), "dev", &host.dev, "nodad"])?;
            host.ip6 = Some(ip6);
        }
        Ok(())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// A home router on a host of a LAN that stands for the Internet (its `wan` side): a LAN of its
/// own behind it with one host, `home`, whose flows out leave with the router's address (NAT);
/// inbound flows are dropped unless they answer one from inside or go to a port forwarded on
/// request. `miniupnpd` takes those requests from the home LAN, in the protocol the router is
/// made to speak (UPnP IGD, or PCP and NAT-PMP, as home routers offer). The test reaches the
/// home host's API over TCP through the router. Removed on drop, with its daemon; drop the home
/// host's nodes first.
struct Router {
    home: Host,
    /// The router's namespace, and the `iptables` (and for IPv6, `ip6tables`) that read its
    /// rules.
    wan_ns: String,
    iptables: PathBuf,
    ip6tables: Option<PathBuf>,
    daemon: Option<Child>,
    log: PathBuf,
    /// The route the test's side takes to the home LAN, once added.
    route: Option<String>,
    dir: tempfile::TempDir,
}

/// The path of `tool`, if this machine has it (looked for in `PATH` and the `sbin` directories,
/// which a user's `PATH` may lack).
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// What a home router takes requests for a forward in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speaks {
    Upnp,
    Pcp,
}

impl Router {
    /// `None` (said on standard error) where this machine lacks `miniupnpd` or
    /// `iptables-legacy` (the kernel interface `miniupnpd` writes its rules through): `.ci/run`
    /// installs both. With `home6` (a /64 prefix) and a `wan` host with an IPv6 address, the
    /// home LAN has IPv6 too, routed from the other hosts: public addresses whose inbound flows
    /// the router drops unless it opened a pinhole for them.
    fn new(lan: &Lan, wan: &Host, speaks: Speaks, home6: Option<&str>) -> Option<Router> {
        let (Some(daemon), Some(iptables)) = (find_tool("miniupnpd"), find_tool("iptables-legacy")) else {
            eprintln!(
                "skipped: no miniupnpd or iptables-legacy here (Debian: apt-get install miniupnpd-iptables iptables)"
            );
            return None;
        };
        // Apart from the other kind's: the two tests may run at once.
        let subnet = format!("10.{}.{}", if speaks == Speaks::Upnp { 214 } else { 216 }, std::process::id() % 250);
        let (lan_dev, home_dev) = (wan.dev.replacen("shp", "shl", 1), wan.dev.replacen("shp", "shh", 1));
        let home = Host { ns: format!("{}-home", wan.ns), ip: format!("{subnet}.2"), dev: home_dev, ip6: None };
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("miniupnpd.log");
        ip(&["netns", "add", &home.ns]).unwrap_or_else(|e| panic!("{e}"));
        // From here on a failure unwinds through the guard, which removes what was made.
        let mut router = Router {
            home,
            wan_ns: wan.ns.clone(),
            iptables: iptables.clone(),
            ip6tables: None,
            daemon: None,
            log,
            route: None,
            dir,
        };
        let home = &router.home;
        let inside = |args: &[&str]| wan.ip_inside(args).unwrap_or_else(|e| panic!("{e}"));
        inside(&["link", "add", &lan_dev, "type", "veth", "peer", "name", &home.dev, "netns", &home.ns]);
        inside(&["addr", "add", &format!("{subnet}.1/24"), "dev", &lan_dev]);
        inside(&["link", "set", &lan_dev, "up"]);
        for args in [
            &["addr", "add", &format!("{}/24", home.ip), "dev", &home.dev][..],
            &["link", "set", &home.dev, "up"],
            &["link", "set", "lo", "up"],
            &["route", "add", "default", "via", &format!("{subnet}.1")],
        ] {
            home.ip_inside(args).unwrap_or_else(|e| panic!("{e}"));
        }
        let try_run = |program: &Path, args: &[&str]| {
            let out = Command::new("ip")
                .args(["netns", "exec", &wan.ns])
                .arg(program)
                .args(args)
                .output()
                .expect("ip netns exec");
            out.status.success().then_some(()).ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let run = |program: &Path, args: &[&str]| {
            try_run(program, args).unwrap_or_else(|e| panic!("{program:?} {args:?}: {e}"));
        };
        // `-w` everywhere: the tests' routers share the machine's one xtables lock, and iptables
        // without it fails at once while another holds the lock.
        if let Err(e) = try_run(&iptables, &["-w", "-t", "nat", "-L", "-n"]) {
            eprintln!("skipped: this kernel offers no iptables NAT table to miniupnpd ({})", e.trim());
            return None;
        }
        run(Path::new("sh"), &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        let (w, l) = (wan.dev.as_str(), lan_dev.as_str());
        let bridge_ip = format!("{}.254", wan.ip.rsplit_once('.').expect("an IPv4 address").0);
        for rule in [
            &["-t", "nat", "-A", "POSTROUTING", "-o", w, "-j", "MASQUERADE"][..],
            // The chains miniupnpd adds its forwards to.
            &["-t", "nat", "-N", "MINIUPNPD"],
            &["-t", "nat", "-A", "PREROUTING", "-i", w, "-j", "MINIUPNPD"],
            &["-t", "nat", "-N", "MINIUPNPD-POSTROUTING"],
            &["-t", "nat", "-I", "POSTROUTING", "-o", w, "-j", "MINIUPNPD-POSTROUTING"],
            &["-t", "filter", "-N", "MINIUPNPD"],
            &["-A", "FORWARD", "-i", w, "-o", l, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            &["-A", "FORWARD", "-i", w, "-o", l, "-j", "MINIUPNPD"],
            // The test's own way in, to the home node's HTTP API: TCP from the bridge only.
            &["-A", "FORWARD", "-i", w, "-o", l, "-s", &bridge_ip, "-p", "tcp", "-j", "ACCEPT"],
            &["-A", "FORWARD", "-i", w, "-o", l, "-j", "DROP"],
        ] {
            run(&iptables, &[&["-w"][..], rule].concat());
        }
        let mut ext6 = String::new();
        if let (Some(prefix), Some(wan6)) = (home6, &wan.ip6) {
            // Where this machine cannot (IPv6 off, no ip6tables), the IPv4 part goes on alone.
            let made = (|| {
                let ip6tables = find_tool("ip6tables-legacy").ok_or("no ip6tables-legacy (Debian: iptables)")?;
                // The router as a home router is on its LAN: at a link-local address, which the
                // home host's default route names with the interface.
                wan.ip_inside(&["addr", "add", &format!("{prefix}::1/64"), "dev", &lan_dev, "nodad"])?;
                wan.ip_inside(&["addr", "add", "fe80::1/64", "dev", &lan_dev, "nodad"])?;
                let home6 = format!("{prefix}::2");
                let home = &router.home;
                home.ip_inside(&["addr", "add", &format!("{home6}/64"), "dev", &home.dev, "nodad"])?;
                home.ip_inside(&["-6", "route", "add", "default", "via", "fe80::1", "dev", &home.dev])?;
                for host in lan.hosts.iter().filter(|h| h.ns != wan.ns) {
                    host.ip_inside(&["-6", "route", "add", &format!("{prefix}::/64"), "via", wan6])?;
                }
                try_run(Path::new("sh"), &["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"])?;
                let conntrack = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"];
                for rule in [
                    // The chain miniupnpd adds its pinholes to.
                    &["-N", "MINIUPNPD"][..],
                    &[&["-A", "FORWARD", "-i", w, "-o", l][..], &conntrack, &["-j", "ACCEPT"]].concat(),
                    &["-A", "FORWARD", "-i", w, "-o", l, "-j", "MINIUPNPD"],
                    &["-A", "FORWARD", "-i", w, "-o", l, "-j", "DROP"],
                ] {
                    try_run(&ip6tables, &[&["-w"][..], rule].concat())?;
                }
                Ok::<_, String>((ip6tables, home6))
            })();
            match made {
                Ok((ip6tables, home6)) => {
                    router.home.ip6 = Some(home6);
                    router.ip6tables = Some(ip6tables);
                    ext6 = format!("ext_ifname6={w}\n");
                }
                Err(e) => eprintln!("IPv6 part skipped: {e}"),
            }
        }
        let conf = router.dir.path().join("miniupnpd.conf");
        std::fs::write(
            &conf,
            format!(
                "ext_ifname={w}\nlistening_ip={l}\nhttp_port=0\nenable_natpmp={}\nenable_upnp={}\n\
                 secure_mode=yes\nsystem_uptime=yes\nuuid=5b0a1c3e-0000-4000-8000-00000000{:04x}\n\
                 allow 1024-65535 {subnet}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n{ext6}",
                if speaks == Speaks::Pcp { "yes" } else { "no" },
                if speaks == Speaks::Upnp { "yes" } else { "no" },
                std::process::id() % 0xffff
            ),
        )
        .expect("write miniupnpd.conf");
        // Its own pid file: the default one may be another miniupnpd's.
        let pid_file = router.dir.path().join("miniupnpd.pid");
        let child = Command::new("ip")
            .args(["netns", "exec", &wan.ns])
            .arg(&daemon)
            .arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(&pid_file)
            .arg("-d")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&router.log).expect("log")))
            .spawn()
            .expect("start miniupnpd");
        router.daemon = Some(child);
        let route = format!("{subnet}.0/24");
        ip(&["route", "add", &route, "via", &wan.ip, "dev", &lan.bridge]).unwrap_or_else(|e| panic!("{e}"));
        router.route = Some(route);
        let listening = match speaks {
            Speaks::Upnp => "HTTP listening",
            // "NAT-PMP/PCP", or "NAT-PMP" alone from a build without PCP.
            Speaks::Pcp => "Listening for NAT-PMP",
        };
        let ready = eventually(10, || router.log().contains(listening));
        assert!(ready, "miniupnpd did not start: {}", router.log());
        Some(router)
    }

    /// What `miniupnpd` said.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The forwards in place: `miniupnpd`'s rules, one per line.
    fn forwards(&self) -> String {
        self.rules(&self.iptables, &["-t", "nat"], "DNAT")
    }

    /// The IPv6 pinholes in place: `miniupnpd`'s rules, one per line.
    fn pinholes(&self) -> String {
        self.rules(self.ip6tables.as_ref().expect("a router with IPv6"), &[], "ACCEPT")
    }

    /// The rules of `miniupnpd`'s chain in `table` that jump to `target`.
    fn rules(&self, tool: &Path, table: &[&str], target: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.wan_ns])
            .arg(tool)
            .arg("-w")
            .args(table)
            .args(["-S", "MINIUPNPD"])
            .output()
            .expect("iptables");
        assert!(out.status.success(), "{tool:?}: {}", String::from_utf8_lossy(&out.stderr));
        let rules = String::from_utf8_lossy(&out.stdout);
        rules.lines().filter(|l| l.contains(&format!("-j {target}"))).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if let Some(route) = &self.route {
            let _ = Command::new("ip").args(["route", "del", route]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.home.ns]).status();
    }
}

/// The node's stderr goes to `<dir>/node.log`, shown when a test fails.
fn log_file(dir: &Path) -> Stdio {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("node.log")).expect("log file");
    Stdio::from(f)
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("write input");
}

fn b3sum(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).expect("open")).expect("read");
    h.finalize().to_hex().to_string()
}

/// Polls `f` until it is true or `secs` pass.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

#[test]
fn five_nodes_fetch_through_the_dht_and_the_fetcher_serves_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2 = NodeProc::start(&tmp.path().join("n2"), Some(&n1));
    let n3 = NodeProc::start(&tmp.path().join("n3"), Some(&n2));
    let n4 = NodeProc::start(&tmp.path().join("n4"), Some(&n3));
    // The fetcher's only bootstrap peer (n4) never holds the blob.
    let n5 = NodeProc::start(&tmp.path().join("n5"), Some(&n4));

    // `peers --json` lists n2's peers with addresses of one form, whichever side dialled: n2
    // dialled n1 (an address ending in /p2p/<id>), and n3 dialled n2 (an address without it).
    let listed = |p: &NodeProc| {
        let json = n2.cli(&["peers", "--json"]);
        let peers: Vec<serde_json::Value> = serde_json::from_str(&json).expect("`peers --json` prints JSON");
        peers
            .iter()
            .find(|e| e["peer_id"] == p.peer_id.as_str())
            .map(|e| e["address"].as_str().unwrap_or("").to_owned())
    };
    for p in [&n1, &n3] {
        assert!(eventually(10, || listed(p).is_some()), "n2 does not list {} as a peer", p.peer_id);
        let address = listed(p).unwrap_or_default();
        assert!(
            address.starts_with("/ip4/127.0.0.1/udp/") && !address.contains("/p2p/"),
            "a peer's address, without its id: {address}"
        );
    }

    let input = tmp.path().join("input.bin");
    random_file(&input, 64 << 20, 42);
    let added = n1.cli(&["add", input.to_str().expect("utf-8")]);
    let hash = added.split_whitespace().next().expect("hash first").to_string();
    assert_eq!(hash, b3sum(&input), "`shoal add` prints the b3sum hash first");

    // n1 announces the blob; give the DHT a moment, bounded.
    assert!(n3.lists_provider(&hash, &n1), "n1 never showed up as a provider");
    n5.fetch(&hash, &tmp.path().join("out.bin"));

    // Whoever fetched it serves it on: n5 is now listed as a provider.
    assert!(n2.lists_provider(&hash, &n5), "the fetcher was never listed as a provider");
    drop((n1, n2, n3, n4, n5));
}

#[test]
fn cli_errors_say_what_went_wrong() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let (ok, _, err) = n1.try_cli(&["get", "not-a-hash"]);
    assert!(!ok);
    assert!(err.contains("64 hex digits"), "{err}");
    let (ok, _, err) = n1.try_cli(&["add", "/nonexistent/file"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/file"), "{err}");
    // A second node on the first one's port says which address, and what to do.
    let taken = n1.addr.split("/p2p/").next().expect("address");
    let out = Command::new(SHOAL)
        .args(["node", "--listen", taken, "--api", "127.0.0.1:0"])
        .env("SHOAL_DATA_DIR", tmp.path().join("second"))
        .env_remove("SHOAL_API")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("cannot listen on {taken}: ")) && err.contains("--listen"), "{err}");
    // Without a node, `status` says how to start one.
    let out = Command::new(SHOAL)
        .args(["status"])
        .env("SHOAL_DATA_DIR", tmp.path().join("none"))
        .env_remove("SHOAL_API")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shoal node"));
}

#[test]
fn providers_says_why_it_lists_nobody() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A node started without `--bootstrap` has nobody to ask, and says so.
    let dir = tmp.path().join("lone");
    std::fs::create_dir_all(&dir).expect("data dir");
    std::fs::write(dir.join("config.toml"), "lookup-timeout-secs = 2\n").expect("config");
    let lone = NodeProc::start(&dir, None);
    let (ok, out, err) = lone.try_cli(&["providers", &"ab".repeat(32)]);
    assert!(!ok && out.is_empty(), "a lookup with nobody to ask listed {out:?}");
    assert!(err.contains("no DHT peer to ask") && err.contains("--bootstrap"), "{err}");
    let (ok, out, err) = lone.try_cli(&["peers"]);
    assert!(ok && out.is_empty() && err.contains("no peer connected") && err.contains("--bootstrap"), "{err}");
    let (ok, _, err) = lone.try_cli(&["get", &"ab".repeat(32), "-o", tmp.path().join("x").to_str().expect("utf-8")]);
    assert!(!ok && err.contains("no provider of") && err.contains("--bootstrap"), "{err}");
    drop(lone);

    // A provider that stopped: its record outlives it on the node it announced to, which names
    // it but cannot reach it.
    let mut n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2 = NodeProc::start(&tmp.path().join("n2"), Some(&n1));
    let input = tmp.path().join("input.bin");
    random_file(&input, 5000, 11);
    let hash = add_and_wait(&n1, &n2, &input);
    // The lookup above may have found n1 by asking n1 itself: wait until n1's announcement
    // reached n2 (over QUIC it once never did).
    let announced = eventually(30, || n2.metric(r#"shoal_dht_served_requests_total{request="add_provider"}"#) >= 1.0);
    assert!(announced, "n1's announcement never reached n2");
    n1.stop();
    let mut last = String::new();
    // Up to QUIC's 30 s idle timeout if n1's close was lost, plus a dial's handshake timeout.
    let said = eventually(90, || {
        let (ok, out, err) = n2.try_cli(&["providers", &hash]);
        last = format!("{out}{err}");
        !ok && err.contains("named 1 provider(s)") && err.contains("none could be reached")
    });
    assert!(said, "a provider gone is not told apart from none: {last}");
}

#[test]
fn a_node_whose_bootstrap_peer_was_down_joins_once_it_is_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut seed = NodeProc::start(&tmp.path().join("seed"), None);
    let (addr, peer_id) = (seed.addr.clone(), seed.peer_id.clone());
    let listen = addr.split("/p2p/").next().expect("address").to_string();
    assert!(seed.stop().success());
    drop(seed);
    let joiner = NodeProc::start_on(&tmp.path().join("joiner"), Some(&addr), "/ip4/127.0.0.1/udp/0/quic-v1");
    // Once its first dial failed, the node used to wait for Kademlia's next periodic bootstrap,
    // 5 minutes on.
    let failed = r#"shoal_connections_total{direction="out",event="failed"}"#;
    assert!(eventually(60, || joiner.metric(failed) >= 1.0), "the dial to a node that is down never failed");
    assert!(!joiner.cli(&["peers"]).contains(&peer_id), "connected to a node that is down");
    let _seed = NodeProc::start_on(&tmp.path().join("seed"), None, &listen);
    assert!(
        eventually(60, || joiner.try_cli(&["peers"]).1.contains(&peer_id)),
        "the node never dialled its bootstrap peer again"
    );
}

#[test]
fn a_node_joins_through_a_bootstrap_peer_given_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let seed = NodeProc::start(&tmp.path().join("seed"), None);
    let named = seed.addr.replacen("/ip4/127.0.0.1/", "/dns4/localhost/", 1);
    assert!(named.starts_with("/dns4/localhost/udp/"), "{named}");
    let joiner = NodeProc::start_on(&tmp.path().join("joiner"), Some(&named), "/ip4/127.0.0.1/udp/0/quic-v1");
    assert!(
        eventually(30, || joiner.try_cli(&["peers"]).1.contains(&seed.peer_id)),
        "the node never reached its bootstrap peer by name"
    );
    let input = tmp.path().join("input.bin");
    random_file(&input, 1 << 20, 7);
    let hash = add_and_wait(&seed, &joiner, &input);
    joiner.fetch(&hash, &tmp.path().join("out.bin"));
}

/// Nodes on separate hosts, each listening on every interface as a node does by default, and a
/// second node on the first host that joined over loopback. Every node used to announce its
/// 127.0.0.1 address too: a dial of a peer on another host then also dialled the dialler's own
/// node on that port, and both counted a failed connection. A fourth host announces an address
/// that is not its own, as a node behind a NAT does: the others used to hand it on to every
/// lookup, which dialled it in vain. The hosts of one node each have Docker's bridge address,
/// `172.17.0.1`: each such node announces it, and a dial of it at the port every node listens on
/// reached the dialler's own node.
#[test]
fn nodes_on_separate_hosts_dial_only_addresses_that_reach_each_other() {
    let Some(lan) = Lan::new(5) else { return };
    for host in &lan.hosts[1..] {
        host.add_docker_bridge();
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = NodeProc::start_in(&lan.hosts[0], &tmp.path().join("a"), &[], None);
    // A node that announces an address that is not its own, as a node behind a NAT announces
    // its private address, which on another LAN may be another node's: here `a`'s. It joins
    // first, so that the others learn of it only from what `a` tells them.
    let wrong = a.addr.split("/p2p/").next().expect("address").to_string();
    let d = NodeProc::start_in(&lan.hosts[3], &tmp.path().join("d"), &["--external", &wrong], Some(&a.addr));
    assert!(eventually(20, || d.cli(&["peers"]).contains(&a.peer_id)), "the hidden node did not join");
    let b = NodeProc::start_in(&lan.hosts[1], &tmp.path().join("b"), &[], Some(&a.addr));
    let c = NodeProc::start_in(&lan.hosts[2], &tmp.path().join("c"), &[], Some(&a.addr));
    let a_loopback = format!("/ip4/127.0.0.1/udp/4737/quic-v1/p2p/{}", a.peer_id);
    let listen = ["--listen", "/ip4/0.0.0.0/udp/4740/quic-v1"];
    let a2 = NodeProc::start_in(&lan.hosts[0], &tmp.path().join("a2"), &listen, Some(&a_loopback));
    let nodes = [&a, &b, &c, &a2];

    let input = tmp.path().join("input.bin");
    random_file(&input, 3 << 20, 5);
    let hash = add_and_wait(&a2, &b, &input);
    c.fetch(&hash, &tmp.path().join("out.bin"));
    assert!(b.lists_provider(&hash, &c), "the fetcher on another host was never listed as a provider");
    // The node that announces `a`'s address fetches too, and so announces itself a provider at
    // that address. The nodes it sends its record to, connected to it, take it as a provider
    // (they are `a`, `b`, `c` and `a2`: fewer than Kademlia's 20 closest); nobody else is told
    // that address.
    d.fetch(&hash, &tmp.path().join("out-d.bin"));
    assert!(a.lists_provider(&hash, &d), "the hidden node's provider record was not taken");
    // Each node dialled others, and each peer is connected to the three others at least.
    for n in nodes {
        assert!(eventually(20, || n.cli(&["peers"]).lines().count() >= 3), "{} lacks peers", n.peer_id);
    }
    // A node that joins now is connected to none of them: its lookup dials the peers it is
    // told of, and then the providers. It is told of no address that does not answer, so every
    // request it sent was answered, and no dial failed.
    let e = NodeProc::start_in(&lan.hosts[4], &tmp.path().join("e"), &[], Some(&a.addr));
    let found: serde_json::Value = serde_json::from_str(&e.api_get(&format!("/v1/providers/{hash}"))).expect("JSON");
    let lookup = &found["lookup"];
    assert!(lookup["requests"].as_u64() >= Some(3) && lookup["answered"] == lookup["requests"], "{found}");
    for n in nodes.into_iter().chain([&d, &e]) {
        for direction in ["in", "out"] {
            let failed = n.metric(&format!(r#"shoal_connections_total{{direction="{direction}",event="failed"}}"#));
            assert_eq!(failed, 0.0, "{} counted failed {direction}bound connections", n.peer_id);
        }
    }
    drop((a, b, c, a2, d, e));
    drop(lan);
}

/// A node at home, behind a router that drops inbound flows as home routers do, publishes a
/// blob. The router forwards the node's port when the node asks (UPnP), and the node announces
/// the router's public address beside its own: a node elsewhere that joins later finds it as a
/// provider, dials it through the forwarded port and fetches the blob from it, the only node
/// that holds it. Without the forward nobody outside could dial the home node: the fetch found
/// a provider it could not reach, and gave up after the lookup's 30 s. The home host also has
/// Docker's bridge address: a node that asked a forward to that one too (libp2p's UPnP
/// behaviour, before the node's own client) was refused it, and the refusal took down the
/// forward that worked (the test failed 1 time of 1).
#[test]
fn a_node_behind_a_home_router_is_dialled_through_the_port_the_router_forwards() {
    behind_a_home_router(Speaks::Upnp);
}

/// As above, with a router whose UPnP is off and that takes PCP (and NAT-PMP) requests instead;
/// the node removes its mapping when it stops.
#[test]
fn a_node_behind_a_pcp_router_is_dialled_through_the_port_it_maps() {
    behind_a_home_router(Speaks::Pcp);
}

fn behind_a_home_router(speaks: Speaks) {
    // The Internet side has addresses a router takes for public: none forwards a port to a
    // private one. They exist only on this test's bridge and in its namespaces.
    let prefix = match speaks {
        Speaks::Upnp => 213,
        Speaks::Pcp => 215,
    };
    let Some(mut internet) = Lan::on(3, &format!("11.{prefix}.{}", std::process::id() % 250)) else { return };
    // With PCP, IPv6 too: documentation prefixes, which a node takes for public as any global one.
    let id = std::process::id() % 0xffff;
    let home6 = (speaks == Speaks::Pcp)
        .then(|| internet.add_ipv6(&format!("2001:db8:{id:x}:a15")).map_err(|e| eprintln!("IPv6 part skipped: {e}")))
        .and_then(Result::ok)
        .map(|()| format!("2001:db8:{id:x}:b15"));
    let Some(router) = Router::new(&internet, &internet.hosts[1], speaks, home6.as_deref()) else { return };
    router.home.add_docker_bridge();
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = NodeProc::start_in(&internet.hosts[0], &tmp.path().join("a"), &[], None);
    let b = NodeProc::start_in(&router.home, &tmp.path().join("b"), &[], Some(&a.addr));
    let forwarded = format!("/ip4/{}/udp/4737/quic-v1/p2p/{}", internet.hosts[1].ip, b.peer_id);
    let announced = eventually(20, || b.cli(&["status", "--json"]).contains(&forwarded));
    assert!(announced, "the home node never announced {forwarded}; the router said:\n{}", router.log());
    // `shoal status` says what the router does for the node, and how it was asked.
    let by = match speaks {
        Speaks::Upnp => "UPnP",
        Speaks::Pcp => "PCP",
    };
    let said = format!("forwarded: /ip4/{}/udp/4737/quic-v1 by the router ({by})", internet.hosts[1].ip);
    assert!(b.cli(&["status"]).contains(&said), "{}", b.cli(&["status"]));
    if let Some(home6) = &router.home.ip6 {
        let open = format!("pinhole:   [{home6}]:4737 open in the router's firewall");
        assert!(eventually(10, || b.cli(&["status"]).contains(&open)), "{}", b.cli(&["status"]));
    }
    let input = tmp.path().join("input.bin");
    random_file(&input, 3 << 20, 11);
    let hash = add_and_wait(&b, &a, &input);
    let dialled_in = r#"shoal_connections_total{direction="in",event="opened"}"#;
    let before = b.metric(dialled_in);
    let c = NodeProc::start_in(&internet.hosts[2], &tmp.path().join("c"), &[], Some(&a.addr));
    assert!(c.lists_provider(&hash, &b), "the home node was not listed as a provider it can reach");
    c.fetch(&hash, &tmp.path().join("out.bin"));
    assert!(b.metric(dialled_in) > before, "no peer dialled the home node through its router");
    let status: serde_json::Value = serde_json::from_str(&b.cli(&["status", "--json"])).expect("JSON");
    assert!(status["inbound_connections"].as_u64() > Some(0), "{status}");
    let log = router.log();
    assert!(!log.contains("172.17.0.1"), "the home node asked a forward to Docker's address:\n{log}");
    // The rule's target reads `[unsupported revision]` to iptables-legacy; its port is enough.
    let to_home = "--dport 4737 -j DNAT";
    assert!(router.forwards().contains(to_home), "no forward to the home node: {}", router.forwards());
    // Over IPv6 the router does not translate, but its firewall drops what comes in unasked: the
    // home node's own address is reached through the pinhole it opened, by a node on IPv6 alone
    // that knows only that address.
    let pinhole = "--dport 4737 -j ACCEPT";
    if let Some(home6) = &router.home.ip6 {
        assert!(eventually(10, || router.pinholes().contains(pinhole)), "no pinhole: {}", router.pinholes());
        let at = format!("/ip6/{home6}/udp/4737/quic-v1/p2p/{}", b.peer_id);
        let v6 = ["--listen", "/ip6/::/udp/0/quic-v1", "--no-upnp"];
        let d = NodeProc::start_in(&internet.hosts[2], &tmp.path().join("d"), &v6, Some(&at));
        let reached = eventually(10, || d.cli(&["peers"]).contains(&format!("{}  /ip6/{home6}/", b.peer_id)));
        assert!(reached, "the home node was not reached at {at}: {}", d.cli(&["peers"]));
    }
    // A node that stops removes its forward, and its pinhole.
    let mut b = b;
    assert!(b.stop().success());
    let forwards = router.forwards();
    assert!(!forwards.contains(to_home), "the forward outlived the node: {forwards}");
    if router.home.ip6.is_some() {
        let pinholes = router.pinholes();
        assert!(!pinholes.contains(pinhole), "the pinhole outlived the node: {pinholes}");
    }
    drop((a, b, c));
    drop(router);
    drop(internet);
}

/// What a node holds, as `shoal ls` lists it, and what a user changes there: a blob added is
/// pinned, one fetched is cache; unpinned a blob is cache, pinned again it is pinned, removed it is
/// listed no more, and removing it again says it is not there. The listing needs the API token,
/// as changes do. Unpinned where the cache has no room for it, a blob is removed, and the user
/// is told.
#[test]
fn a_user_lists_unpins_pins_and_removes_what_a_node_holds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = NodeProc::start(&tmp.path().join("a"), None);
    let b = NodeProc::start(&tmp.path().join("b"), Some(&a));
    assert_eq!(a.cli(&["ls"]), "", "a new node lists nothing");
    let input = tmp.path().join("input.bin");
    random_file(&input, (1 << 20) + 5, 21);
    let hash = add_and_wait(&a, &b, &input);
    let listed = |n: &NodeProc| -> Vec<String> { n.cli(&["ls"]).lines().map(str::to_string).collect() };
    assert_eq!(listed(&a), [format!("{hash}     1.0 MiB  pinned")]);
    b.fetch(&hash, &tmp.path().join("out.bin"));
    assert_eq!(listed(&b), [format!("{hash}     1.0 MiB  cached")], "a fetched blob is cache");

    assert_eq!(a.cli(&["unpin", &hash]).trim(), format!("unpinned {hash}"));
    assert_eq!(listed(&a), [format!("{hash}     1.0 MiB  cached")]);
    a.cli(&["pin", &hash]);
    let json: serde_json::Value = serde_json::from_str(&a.cli(&["ls", "--json"])).expect("JSON");
    let expected = serde_json::json!([{
        "hash": hash, "size": (1 << 20) + 5, "held_bytes": (1 << 20) + 5, "complete": true, "pinned": true
    }]);
    assert_eq!(json, expected);

    assert_eq!(a.cli(&["rm", &hash]).trim(), format!("removed {hash}"));
    assert_eq!(a.cli(&["ls"]), "");
    assert!(!a.dir.join("store/blobs").join(&hash).exists(), "its files are gone");
    let again = a.try_cli(&["rm", &hash]);
    assert!(!again.0 && again.2.contains("is not in the store"), "{again:?}");
    let bad = a.try_cli(&["pin", "1234"]);
    assert!(!bad.0 && bad.2.contains("expected 64 hex digits"), "{bad:?}");
    let api = std::fs::read_to_string(a.dir.join("api")).expect("API address");
    let open = ureq::get(format!("http://{}/v1/blobs", api.trim())).call();
    assert!(matches!(open, Err(ureq::Error::StatusCode(401))), "listed without the token: {open:?}");

    let small = ["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0", "--cache-size", "512K"];
    let c = NodeProc::spawn(&tmp.path().join("c"), None, &small, None);
    let added = c.cli(&["add", input.to_str().expect("utf-8")]);
    assert!(added.starts_with(&hash), "{added}");
    let unpinned = c.try_cli(&["unpin", &hash]);
    assert!(unpinned.0 && unpinned.2.contains("larger than the room in the cache"), "{unpinned:?}");
    assert_eq!(c.cli(&["ls"]), "", "it no longer fits");
}

#[test]
fn a_lone_fetcher_is_sent_all_it_asks_though_the_fetcher_before_it_left() {
    // The publisher leaves the pieces it sent to a fetcher to that fetcher, but not while the
    // fetcher after it is the only one asking: the first may be gone without a word, as here.
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = NodeProc::start(&tmp.path().join("a"), None);
    let b = NodeProc::start(&tmp.path().join("b"), Some(&a));
    let c = NodeProc::start(&tmp.path().join("c"), Some(&a));
    let input = tmp.path().join("input.bin");
    random_file(&input, 16 << 20, 9);
    let hash = add_and_wait(&a, &c, &input);
    b.fetch(&hash, &tmp.path().join("out-b.bin"));
    drop(b);
    c.fetch(&hash, &tmp.path().join("out-c.bin"));
    let refused = a.metric(r#"shoal_transfer_served_requests_total{kind="get",outcome="spread"}"#);
    assert_eq!(refused, 0.0, "the publisher held pieces back from a fetcher alone on its uplink");
}

/// Reads `(already held, received from peers)` from `shoal get`'s closing line.
fn get_summary(stderr: &str) -> (u64, u64) {
    let line = stderr.lines().find(|l| l.starts_with("verified ")).expect("summary line");
    let num = |after: &str| -> u64 {
        let i = line.find(after).expect("field") + after.len();
        line[i..].trim_start().split(|c: char| !c.is_ascii_digit()).next().expect("digits").parse().expect("number")
    };
    (num("("), num("held,"))
}

fn add_and_wait(provider: &NodeProc, observer: &NodeProc, input: &Path) -> String {
    let added = provider.cli(&["add", input.to_str().expect("utf-8")]);
    let hash = added.split_whitespace().next().expect("hash").to_string();
    assert!(observer.lists_provider(&hash, provider), "provider never announced");
    hash
}

#[test]
fn a_provider_killed_mid_transfer_does_not_stop_the_fetch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2 = NodeProc::start(&tmp.path().join("n2"), Some(&n1));
    let n3 = NodeProc::start(&tmp.path().join("n3"), Some(&n2));
    let input = tmp.path().join("input.bin");
    random_file(&input, 96 << 20, 7);
    let hash = add_and_wait(&n1, &n3, &input);
    // n2 becomes a second full provider.
    n2.cli(&["get", &hash, "-o", tmp.path().join("n2.bin").to_str().expect("utf-8")]);
    assert!(n3.lists_provider(&hash, &n2));

    // n3 fetches; n1 dies as soon as n3 has begun.
    let out = tmp.path().join("out.bin");
    let mut get = Command::new(SHOAL)
        .args(["get", &hash, "-o", out.to_str().expect("utf-8")])
        .env("SHOAL_DATA_DIR", &n3.dir)
        .env_remove("SHOAL_API")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn get");
    let meta = n3.dir.join("store/blobs").join(&hash).join("meta");
    assert!(eventually(30, || meta.exists()), "the fetch never began");
    drop(n1);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = get.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = get.kill();
            panic!("the fetch did not finish within 120 s after a provider died");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut get.stderr.take().expect("stderr"), &mut stderr).expect("read");
    assert!(status.success(), "get failed: {stderr}");
    assert_eq!(b3sum(&out), hash);
}

#[test]
fn a_fetcher_killed_mid_fetch_resumes_without_refetching() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2dir = tmp.path().join("n2");
    let n2 = NodeProc::start(&n2dir, Some(&n1));
    let input = tmp.path().join("input.bin");
    let size = 512u64 << 20;
    random_file(&input, size as usize, 9);
    let hash = add_and_wait(&n1, &n2, &input);

    let mut get = Command::new(SHOAL)
        .args(["get", &hash, "-o", tmp.path().join("first.bin").to_str().expect("utf-8")])
        .env("SHOAL_DATA_DIR", &n2dir)
        .env_remove("SHOAL_API")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn get");
    // Kill the fetching node once its store has made a batch of pieces durable (the meta changes
    // from the empty map it was created with).
    let meta = n2dir.join("store/blobs").join(&hash).join("meta");
    assert!(eventually(30, || meta.exists()), "the fetch never began");
    let initial = std::fs::read(&meta).expect("meta");
    assert!(eventually(60, || std::fs::read(&meta).is_ok_and(|m| m != initial)), "no piece became durable within 60 s");
    let mut n2 = n2;
    n2.child.kill().expect("SIGKILL the fetcher");
    n2.child.wait().expect("reap");
    let _ = get.kill();
    let _ = get.wait();
    drop(n2);

    let n2 = NodeProc::start(&n2dir, Some(&n1));
    let out = tmp.path().join("out.bin");
    let (ok, _, stderr) = n2.try_cli(&["get", &hash, "-o", out.to_str().expect("utf-8")]);
    assert!(ok, "resumed get failed: {stderr}");
    assert_eq!(b3sum(&out), hash);
    let (held, received) = get_summary(&stderr);
    assert!(held > 0, "nothing was kept across the crash: {stderr}");
    assert!(held < size, "the first fetch should not have finished: {stderr}");
    // Verified pieces were not fetched again: what came from peers covers only the rest, plus
    // proofs and at most a few end-game duplicates.
    assert!(received <= size - held + (size - held) / 50 + (8 << 20), "re-fetched verified pieces: {stderr}");
}

#[test]
fn a_provider_with_a_corrupted_store_cannot_spoil_the_fetch_and_is_penalised() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2 = NodeProc::start(&tmp.path().join("n2"), Some(&n1));
    let (n3dir, n5dir) = (tmp.path().join("n3"), tmp.path().join("n5"));
    let n3 = NodeProc::start(&n3dir, Some(&n1));
    let n5 = NodeProc::start(&n5dir, Some(&n1));
    let input = tmp.path().join("input.bin");
    random_file(&input, 32 << 20, 11);
    let hash = add_and_wait(&n1, &n2, &input);
    for n in [&n2, &n3, &n5] {
        n.cli(&["get", &hash, "-o", tmp.path().join(format!("{}.bin", n.peer_id)).to_str().expect("utf-8")]);
    }
    // Rot one byte in every piece of two copies while their nodes are down: n3's near the start
    // of each piece (found as an answer opens, and left out of it: every piece asked goes
    // missing, so n3 answers `NotFound` and its map proved stale is counted against it; were
    // some pieces sound, it would send those and no penalty would follow), n5's deep in each,
    // past an answer's first 64 KiB step (found while the answer is on its way, which cuts it
    // off, as a peer that restarts would).
    let (n3_peer, n5_peer) = (n3.peer_id.clone(), n5.peer_id.clone());
    drop((n3, n5));
    for (dir, offset) in [(&n3dir, 1000), (&n5dir, 100_000)] {
        let data = dir.join("store/blobs").join(&hash).join("data");
        let mut bytes = std::fs::read(&data).expect("stored data");
        for start in (0..bytes.len()).step_by(PIECE_SIZE as usize) {
            bytes[start + offset] ^= 0x5a;
        }
        std::fs::write(&data, bytes).expect("corrupt");
    }
    let n3 = NodeProc::start(&n3dir, Some(&n1));
    let n5 = NodeProc::start(&n5dir, Some(&n1));
    assert_eq!((&n3.peer_id, &n5.peer_id), (&n3_peer, &n5_peer), "the identity persists across restarts");

    let n4 = NodeProc::start(&tmp.path().join("n4"), Some(&n3));
    assert!(eventually(30, || {
        let found = n4.try_cli(&["providers", &hash]).1;
        found.contains(&n3.peer_id) && found.contains(&n5.peer_id)
    }));
    let out = tmp.path().join("out.bin");
    let (ok, _, stderr) = n4.try_cli(&["get", &hash, "-o", out.to_str().expect("utf-8")]);
    assert!(ok, "get failed: {stderr}");
    assert_eq!(b3sum(&out), hash, "the fetch is correct despite the rotten providers");
    let status: serde_json::Value = serde_json::from_str(&n4.cli(&["status", "--json"])).expect("status is JSON");
    let penalised: Vec<String> = status["penalties"]
        .as_array()
        .expect("penalties")
        .iter()
        .filter_map(|p| p[0].as_str().map(String::from))
        .collect();
    assert!(penalised.contains(&n3.peer_id), "the rotten provider was not penalised: {status}");
    let text = n4.cli(&["status"]);
    assert!(text.contains(&format!("penalised: {}", n3.peer_id)), "{text}");
    assert!(!penalised.contains(&n1.peer_id) && !penalised.contains(&n2.peer_id), "{status}");
    // Rot is no lie: a Shoal node checks what it serves, and its peers keep asking it.
    assert_eq!(status["avoided"], serde_json::json!([]), "{status}");
    drop(n5);
}

/// `shoal get ARGS` as a user with no node running types it: it starts a short-lived node of its
/// own (`tmp` holds the data directory it finds no node in).
fn get_without_a_node(tmp: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(SHOAL);
    cmd.arg("get")
        .args(args)
        .env("SHOAL_DATA_DIR", tmp.join("no-node-here"))
        .env_remove("SHOAL_API")
        .env_remove("SHOAL_BOOTSTRAP");
    cmd
}

#[test]
fn get_without_a_running_node_starts_a_short_lived_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2 = NodeProc::start(&tmp.path().join("n2"), Some(&n1));
    let input = tmp.path().join("input.bin");
    random_file(&input, 5 << 20, 3);
    let hash = add_and_wait(&n1, &n2, &input);
    let out = tmp.path().join("out.bin");
    let run = |bootstrap: Option<&str>| {
        // A path relative to where `shoal get` runs, as a user types it.
        let mut cmd = get_without_a_node(tmp.path(), &[&hash, "-o", "out.bin"]);
        cmd.current_dir(tmp.path()).env("RUST_LOG", "shoal=debug");
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.output().expect("run get")
    };
    let without = run(None);
    assert!(!without.status.success());
    assert!(String::from_utf8_lossy(&without.stderr).contains("--bootstrap"), "the error says what to do");
    assert!(!out.exists());
    // What a get killed outright left beside the output an hour ago goes; a fresh one (a get
    // just starting) stays.
    let stale = tmp.path().join(".shoal-get-1-0000000000000001");
    let fresh = tmp.path().join(".shoal-get-2-0000000000000002");
    // Nor a user's own directory of a like name, however old.
    let users = tmp.path().join(".shoal-get-notes");
    for dir in [&stale, &fresh, &users] {
        std::fs::create_dir_all(dir.join("store/blobs")).expect("mkdir");
        std::fs::write(dir.join("store/lock"), b"").expect("write");
        std::fs::write(dir.join("store/blobs/partial"), vec![0u8; 1 << 20]).expect("write");
    }
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for dir in [&stale, &users] {
        std::fs::File::open(dir).and_then(|d| d.set_modified(hour_ago)).expect("age the directory");
    }
    // Its only bootstrap peer is n2, which never held the blob.
    let with = run(Some(&n2.addr));
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    assert_eq!(b3sum(&out), hash);
    // Moved out of its store beside the output, not copied: the blob's size once on disk.
    assert!(
        String::from_utf8_lossy(&with.stderr).contains("moved out of the store"),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert!(String::from_utf8_lossy(&with.stderr).contains("left by a `shoal get` that was killed"));
    // Its store, beside the output, is gone with it, and so is the leftover.
    let names: Vec<_> =
        std::fs::read_dir(tmp.path()).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
    let scratches: Vec<_> = names.iter().filter(|n| n.to_string_lossy().starts_with(".shoal-get")).collect();
    let mut kept = [fresh.file_name().expect("name"), users.file_name().expect("name")];
    kept.sort();
    let mut scratches = scratches;
    scratches.sort();
    assert_eq!(scratches, kept, "{names:?}");
    // A file replaced keeps its mode (one no umask gives a new file), and is still moved, not
    // copied, into place.
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o751)).expect("chmod");
    let again = run(Some(&n2.addr));
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && said.contains("moved out of the store"), "{said}");
    assert_eq!(b3sum(&out), hash);
    assert_eq!(std::fs::metadata(&out).expect("stat").permissions().mode() & 0o7777, 0o751);
    // To standard output, streamed through the short-lived node's own API; its store, in the
    // temporary directory, is gone with it.
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).expect("mkdir");
    let streamed = get_without_a_node(tmp.path(), &[&hash, "-o", "-", "--bootstrap", &n2.addr])
        .env("TMPDIR", &scratch)
        .output()
        .expect("run get");
    assert!(streamed.status.success(), "{}", String::from_utf8_lossy(&streamed.stderr));
    assert_eq!(blake3::hash(&streamed.stdout).to_hex().to_string(), hash);
    assert!(String::from_utf8_lossy(&streamed.stderr).contains("written as they came"));
    assert_eq!(std::fs::read_dir(&scratch).expect("list").count(), 0, "its store is gone");
}

#[test]
fn config_show_merges_file_environment_and_flags_in_that_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("config.toml"), "cache-size = \"2G\"\nmax-uploads = 16\nupload-rate = \"5M\"\n")
        .expect("write config");
    let out = Command::new(SHOAL)
        .args(["config", "show", "--max-uploads", "4"])
        .env("SHOAL_DATA_DIR", tmp.path())
        .env("SHOAL_CACHE_SIZE", "3G")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("cache-size = {}", 3u64 << 30)), "environment beats the file:\n{shown}");
    assert!(shown.contains("max-uploads = 4"), "flags beat the file:\n{shown}");
    assert!(shown.contains(&format!("upload-rate = {}", 5u64 << 20)), "the file beats the defaults:\n{shown}");
    std::fs::write(tmp.path().join("config.toml"), "cache-sise = 1\n").expect("write config");
    let out = Command::new(SHOAL).args(["config", "show"]).env("SHOAL_DATA_DIR", tmp.path()).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache-sise"), "the bad key is named");
    // A cap of 0 is refused, not taken for no cap.
    std::fs::write(tmp.path().join("config.toml"), "upload-rate = 0\n").expect("write config");
    let out = Command::new(SHOAL).args(["config", "show"]).env("SHOAL_DATA_DIR", tmp.path()).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upload-rate must be above 0"), "the cap is named");
}

#[test]
fn sigterm_stops_a_node_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut n = NodeProc::start(&tmp.path().join("n"), None);
    let exit = n.stop();
    assert!(exit.success(), "a SIGTERM stop is a clean exit: {exit:?}");
    assert!(!n.dir.join("api").exists(), "the API address file is removed on a clean stop");
}

#[test]
fn a_directory_added_is_fetched_back_as_that_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let n2 = NodeProc::start(&tmp.path().join("n2"), Some(&n1));
    let site = tmp.path().join("site");
    std::fs::create_dir_all(site.join("sub dir")).expect("mkdir");
    random_file(&site.join("a.bin"), 700_000, 5);
    random_file(&site.join("sub dir/b.bin"), 3, 6);
    // Two files of one blob: the short-lived node below moves a blob out of its store for the
    // last file that holds it, and copies it for the others.
    std::fs::copy(site.join("a.bin"), site.join("sub dir/a copy.bin")).expect("copy");
    let files = ["a.bin", "sub dir/b.bin", "sub dir/a copy.bin"];
    let hash = add_and_wait(&n1, &n2, &site);
    let out = tmp.path().join("copy");
    n2.cli(&["get", &hash, "-o", out.to_str().expect("utf-8")]);
    for file in files {
        assert_eq!(b3sum(&out.join(file)), b3sum(&site.join(file)), "{file}");
    }
    assert_eq!(std::fs::read_dir(&out).expect("list").count(), 2, "a.bin and sub dir, nothing else");
    // The same without a running node: a short-lived one reads the files from its own store.
    let own = tmp.path().join("own");
    let out2 = get_without_a_node(tmp.path(), &[&hash, "-o", own.to_str().expect("utf-8"), "--bootstrap", &n1.addr])
        .output()
        .expect("run get");
    assert!(out2.status.success(), "{}", String::from_utf8_lossy(&out2.stderr));
    for file in files {
        assert_eq!(b3sum(&own.join(file)), b3sum(&site.join(file)), "without a node: {file}");
    }
    // Its publisher names the paths: an existing directory is not written into.
    let (ok, _, err) = n2.try_cli(&["get", &hash, "-o", tmp.path().to_str().expect("utf-8")]);
    assert!(!ok && err.contains("exists"), "{err}");
    assert!(!tmp.path().join("a.bin").exists());
    // To standard output it is the collection's own bytes, which hash to its id.
    let raw = Command::new(SHOAL)
        .args(["get", &hash, "-o", "-"])
        .env("SHOAL_DATA_DIR", &n2.dir)
        .env_remove("SHOAL_API")
        .output()
        .expect("run get");
    assert!(raw.status.success());
    assert_eq!(blake3::hash(&raw.stdout).to_hex().to_string(), hash);
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn get_to_standard_output_writes_each_piece_once_it_verifies_and_stopped_stops_the_fetch() {
    use std::io::Read;
    let tmp = tempfile::tempdir().expect("tempdir");
    // A provider sending 1 MiB/s: the blob takes 8 s.
    let args = ["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0", "--upload-rate", "1M"];
    let slow = NodeProc::spawn(&tmp.path().join("slow"), None, &args, None);
    let fetcher = NodeProc::start(&tmp.path().join("fetcher"), Some(&slow));
    let input = tmp.path().join("input.bin");
    random_file(&input, 8 << 20, 11);
    let hash = add_and_wait(&slow, &fetcher, &input);
    let held = || {
        let listed: Vec<serde_json::Value> = serde_json::from_str(&fetcher.cli(&["ls", "--json"])).expect("JSON");
        listed.into_iter().find(|b| b["hash"] == hash.as_str()).expect("the blob, partly held")
    };
    // `shoal get -o -`, its output read by a thread: the first piece, then the rest.
    let get = || {
        let mut get = Killed(
            Command::new(SHOAL)
                .args(["get", &hash, "-o", "-"])
                .env("SHOAL_DATA_DIR", &fetcher.dir)
                .env_remove("SHOAL_API")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("run get"),
        );
        let mut stdout = get.0.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = vec![0u8; PIECE_SIZE as usize];
            let got = stdout.read_exact(&mut first).map(|()| first);
            let _ = tx.send(got);
            let mut rest = Vec::new();
            let _ = tx.send(stdout.read_to_end(&mut rest).map(|_| rest));
        });
        let first = rx.recv_timeout(Duration::from_secs(60)).expect("a first piece within 60 s").expect("read");
        (get, first, rx)
    };

    // Stopped after its first piece, it stops the fetch it started: the node does not go on
    // fetching a blob nobody reads.
    let (stopped, _, _) = get();
    drop(stopped);
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(held()["complete"], false, "the fetch went on after `shoal get` stopped: {}", held());

    let (mut get, first, rx) = get();
    // It came while the fetcher still lacked most of the blob: the node streamed it once verified.
    let entry = held();
    assert_eq!(entry["complete"], false, "the first bytes came only once the whole blob was held: {entry}");
    let rest = rx.recv_timeout(Duration::from_secs(60)).expect("the rest within 60 s").expect("read");
    assert!(get.0.wait().expect("wait").success(), "shoal get failed");
    let mut all = first;
    all.extend(rest);
    assert_eq!(blake3::hash(&all).to_hex().to_string(), hash, "standard output got the blob");
}

#[test]
fn get_writes_through_a_symlink_and_into_a_pipe_without_replacing_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let input = tmp.path().join("input.bin");
    random_file(&input, 600_000, 8);
    let hash = n1.cli(&["add", input.to_str().expect("utf-8")]).split_whitespace().next().expect("hash").to_string();

    let target = tmp.path().join("target.bin");
    std::fs::write(&target, b"old").expect("write");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o751)).expect("chmod");
    let link = tmp.path().join("link.bin");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    n1.cli(&["get", &hash, "-o", link.to_str().expect("utf-8")]);
    assert!(std::fs::symlink_metadata(&link).expect("stat").file_type().is_symlink(), "the link is still a link");
    assert_eq!(b3sum(&target), hash, "its target holds the blob");
    let mode = std::fs::metadata(&target).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o751, "the file replaced keeps its mode");

    // A pipe (as /dev/stdout or a device would be) is written into, not replaced by a file.
    let fifo = tmp.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo").success(), "mkfifo");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let fifo = fifo.clone();
        // Were the pipe replaced, this would wait for a writer for ever: the wait below is bounded.
        std::thread::spawn(move || tx.send(std::fs::read(&fifo).expect("read the pipe")));
    }
    n1.cli(&["get", &hash, "-o", fifo.to_str().expect("utf-8")]);
    let through = rx.recv_timeout(Duration::from_secs(20)).expect("the pipe was written into and closed");
    assert_eq!(blake3::hash(&through).to_hex().to_string(), hash);
    assert!(std::fs::symlink_metadata(&fifo).expect("stat").file_type().is_fifo(), "the pipe is still a pipe");
    let left: Vec<_> =
        std::fs::read_dir(tmp.path()).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().contains(".shoal-partial")), "{left:?}");
}

#[test]
fn an_empty_blob_and_one_that_only_looks_like_a_directory_are_written_as_they_are() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let mut lookalike = shoal_node::protocol::collection::MAGIC.to_vec();
    lookalike.extend_from_slice(b"\x01 but not a collection");
    for (name, bytes) in [("empty", &b""[..]), ("lookalike", &lookalike[..])] {
        let input = tmp.path().join(name);
        std::fs::write(&input, bytes).expect("write");
        let hash =
            n1.cli(&["add", input.to_str().expect("utf-8")]).split_whitespace().next().expect("hash").to_string();
        let out = tmp.path().join(format!("{name}.out"));
        n1.cli(&["get", &hash, "-o", out.to_str().expect("utf-8")]);
        assert_eq!(std::fs::read(&out).expect("read"), bytes, "{name}");
        // And through a short-lived node, which moves the blob out of its store.
        let own = tmp.path().join(format!("{name}.own"));
        let run = get_without_a_node(tmp.path(), &[&hash, "-o", own.to_str().expect("utf-8"), "--bootstrap", &n1.addr])
            .output()
            .expect("run get");
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(std::fs::read(&own).expect("read"), bytes, "{name}, without a node");
    }
}

#[test]
fn a_second_node_on_one_data_directory_is_refused_and_a_killed_one_is_not_waited_for() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut n1 = NodeProc::start(&tmp.path().join("n1"), None);
    let second = Command::new(SHOAL)
        .args(["node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0"])
        .env("SHOAL_DATA_DIR", &n1.dir)
        .env_remove("SHOAL_API")
        .env_remove("SHOAL_BOOTSTRAP")
        .output()
        .expect("run a second node");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"), "{}", String::from_utf8_lossy(&second.stderr));
    // The first node is untouched: its API address file is still there and it answers.
    assert!(n1.try_cli(&["status"]).0, "the running node still answers");

    // Killed, a node leaves its API address file behind; the command knows it is gone.
    n1.child.kill().expect("kill");
    n1.child.wait().expect("wait");
    assert!(n1.dir.join("api").exists());
    let (ok, _, err) = n1.try_cli(&["status"]);
    assert!(!ok);
    assert!(err.contains("no running node"), "{err}");
}

#[test]
fn an_interrupted_get_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    // The short-lived node's store goes beside the output.
    let scratch = tmp.path().join("downloads");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    // Nobody has this blob: a get without a running node looks for it until interrupted.
    let out = scratch.join("out");
    let mut get = get_without_a_node(tmp.path(), &[&"ab".repeat(32), "-o", out.to_str().expect("utf-8")])
        .args(["--bootstrap", &n1.addr])
        .stderr(Stdio::null())
        .spawn()
        .expect("run get");
    let started = eventually(20, || std::fs::read_dir(&scratch).expect("list").next().is_some());
    assert!(started, "the short-lived node's directory never appeared");
    assert!(Command::new("kill").args(["-INT", &get.id().to_string()]).status().expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = get.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = get.kill();
            panic!("get did not stop within 15 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(130));
    let left: Vec<_> = std::fs::read_dir(&scratch).expect("list").filter_map(Result::ok).map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Runs `cmd` for at most `secs`; returns (success, stdout, stderr), or panics if it was still
/// running then (it is killed first).
fn output_within(cmd: &mut Command, secs: u64) -> (bool, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run shoal");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} was still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn add_refuses_a_pipe_or_a_device_and_says_what_a_directory_left_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // In a directory the user may add whole, as a home directory holds the default one.
    let home = tmp.path().join("home");
    let mut n1 = NodeProc::start(&home.join("data"), None);
    let add = |path: &Path| {
        let mut cmd = Command::new(SHOAL);
        cmd.args(["add", path.to_str().expect("utf-8")]).env("SHOAL_DATA_DIR", &n1.dir).env_remove("SHOAL_API");
        output_within(&mut cmd, 20)
    };
    // Opening a pipe waits for a writer: the add waited for ever, and so did the node's exit.
    let fifo = tmp.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo").success(), "mkfifo");
    let (ok, _, err) = add(&fifo);
    assert!(!ok && err.contains("is a named pipe, not a regular file or directory"), "{err}");
    let (ok, _, err) = add(Path::new("/dev/zero"));
    assert!(!ok && err.contains("/dev/zero is a device"), "{err}");
    // A symlink to a file, named by the user, is followed.
    let file = tmp.path().join("file.txt");
    std::fs::write(&file, b"bytes").expect("write");
    let link = tmp.path().join("link.txt");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    let (ok, out, err) = add(&link);
    assert!(ok, "{err}");
    assert!(out.starts_with(&blake3::hash(b"bytes").to_hex().to_string()), "{out}");

    // In a directory, what is not a regular file is left out, and said.
    let site = tmp.path().join("site");
    std::fs::create_dir_all(site.join("empty")).expect("mkdir");
    std::fs::write(site.join("a.txt"), b"a").expect("write");
    std::os::unix::fs::symlink(&file, site.join("link")).expect("symlink");
    assert!(Command::new("mkfifo").arg(site.join("pipe")).status().expect("run mkfifo").success(), "mkfifo");
    let (ok, out, err) = add(&site);
    assert!(ok, "{err}");
    assert!(
        err.contains(
            "skipped 3 entries (not regular files, or ones that changed as they were read): empty/, link, pipe"
        ),
        "{err}"
    );
    let hash = out.split_whitespace().next().expect("hash").to_string();
    let copy = tmp.path().join("copy");
    n1.cli(&["get", &hash, "-o", copy.to_str().expect("utf-8")]);
    let names: Vec<_> = std::fs::read_dir(&copy).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert_eq!(names, ["a.txt"], "only the regular file was added");
    // A directory of regular files says nothing of the kind.
    std::fs::remove_dir_all(&site).expect("rm");
    std::fs::create_dir_all(&site).expect("mkdir");
    std::fs::write(site.join("a.txt"), b"a").expect("write");
    let (ok, _, err) = add(&site);
    assert!(ok && !err.contains("skipped"), "{err}");

    // The node's own data directory, with its private key, is never published: not named, and
    // not as part of a directory that holds it.
    let (ok, _, err) = add(&n1.dir.join("identity"));
    assert!(!ok && err.contains("the node's own data directory"), "{err}");
    std::fs::write(home.join("notes.txt"), b"notes").expect("write");
    let (ok, out, err) = add(&home);
    assert!(ok, "{err}");
    assert!(err.contains("skipped 1 entry (not a regular file, or one that changed as it was read): data/"), "{err}");
    let hash = out.split_whitespace().next().expect("hash").to_string();
    let copy = tmp.path().join("home-copy");
    n1.cli(&["get", &hash, "-o", copy.to_str().expect("utf-8")]);
    let names: Vec<_> = std::fs::read_dir(&copy).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert_eq!(names, ["notes.txt"], "only the user's file was added");

    // A name that is not UTF-8 cannot travel in the API's JSON: said so, not blamed on the node.
    use std::os::unix::ffi::OsStrExt;
    let odd = tmp.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt"));
    std::fs::write(&odd, b"bytes").expect("write");
    let mut cmd = Command::new(SHOAL);
    cmd.arg("add").arg(&odd).env("SHOAL_DATA_DIR", &n1.dir).env_remove("SHOAL_API");
    let (ok, _, err) = output_within(&mut cmd, 20);
    assert!(!ok && err.contains("not valid UTF-8") && !err.contains("cannot reach"), "{err}");
    assert!(n1.stop().success());
}

#[test]
fn a_new_data_directory_is_its_owners_alone_and_an_existing_one_is_left_as_it_is() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let existing = tmp.path().join("existing");
    std::fs::create_dir_all(&existing).expect("mkdir");
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    for (dir, want) in [(tmp.path().join("new/data"), 0o700), (existing, 0o750)] {
        let child = Command::new(SHOAL)
            .args(["node", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--api", "127.0.0.1:0"])
            .env("SHOAL_DATA_DIR", &dir)
            .env_remove("SHOAL_BOOTSTRAP")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn shoal node");
        // Killed on drop.
        let mut node = NodeProc { child, dir: dir.clone(), ns: None, peer_id: String::new(), addr: String::new() };
        assert!(eventually(20, || dir.join("api").exists()), "the node did not start");
        assert_eq!(mode(&dir), want, "{}", dir.display());
        // The token is there as soon as the address a command reads before it.
        assert!(dir.join("api-token").exists());
        assert!(node.stop().success());
    }
    assert_eq!(mode(&tmp.path().join("new")), 0o777 & !umask(), "a parent is made as any directory is");
}

/// The process's file-mode creation mask, as a directory made here shows it.
fn umask() -> u32 {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(tmp.path().join("probe")).expect("mkdir");
    !std::fs::metadata(tmp.path().join("probe")).expect("stat").permissions().mode() & 0o777
}

#[test]
fn get_checks_where_it_writes_before_it_fetches() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n1 = NodeProc::start(&tmp.path().join("n1"), None);
    // Nobody has this blob: a get that went looking for it would not fail on the path at once.
    let nobody = "ab".repeat(32);
    let dir = tmp.path().join("a dir");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let missing = tmp.path().join("no such dir/out");
    for (output, says) in [
        (dir.clone(), format!("{} exists and is a directory", dir.display())),
        (missing.clone(), format!("the directory {} does not exist", tmp.path().join("no such dir").display())),
    ] {
        let mut cmd = Command::new(SHOAL);
        cmd.args(["get", &nobody, "-o", output.to_str().expect("utf-8")])
            .env("SHOAL_DATA_DIR", &n1.dir)
            .env_remove("SHOAL_API");
        let (ok, _, err) = output_within(&mut cmd, 10);
        assert!(!ok && err.contains(&says) && !err.contains(".shoal-partial"), "{err}");
        // And without a running node, before a node of its own is started.
        let mut cmd =
            get_without_a_node(tmp.path(), &[&nobody, "-o", output.to_str().expect("utf-8"), "--bootstrap", &n1.addr]);
        let (ok, _, err) = output_within(&mut cmd, 10);
        assert!(!ok && err.contains(&says) && !err.contains(".shoal-get"), "{err}");
    }
    assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 0, "nothing was written into the directory");
}

#[test]
fn config_show_refuses_settings_a_node_cannot_run_with() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let show = |file: &str, args: &[&str], env: &[(&str, &str)]| {
        std::fs::write(tmp.path().join("config.toml"), file).expect("write config");
        let out = Command::new(SHOAL)
            .args(["config", "show"])
            .args(args)
            .env("SHOAL_DATA_DIR", tmp.path())
            .envs(env.iter().copied())
            .output()
            .expect("run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let refused = [
        ("allow-peers = []\n", &[][..], "allow-peers is empty, so no peer could fetch from this node"),
        ("max-uploads = 0\n", &[], "max-uploads must be between 1 and 65536, not 0"),
        ("max-uploads-per-peer = 0\n", &[], "max-uploads-per-peer must be between 1"),
        ("max-connections = 0\n", &[], "max-connections must be between 1"),
        ("lookup-timeout-secs = 0\n", &[], "lookup-timeout-secs must be between 1 and 86400"),
        // These panicked the node: a deadline past what the clock holds, a semaphore's limit.
        ("lookup-timeout-secs = 18446744073709551615\n", &[], "lookup-timeout-secs must be between 1 and 86400"),
        ("spread-patience-secs = 18446744073709551615\n", &[], "spread-patience-secs must be at most 86400"),
        ("", &["--max-uploads", "4000000000000000000"], "max-uploads must be between 1 and 65536"),
        ("", &["--max-connections", "0"], "max-connections must be between 1"),
        ("cache-size = -1\n", &[], "cache-size: expected a whole number of bytes or a size such as \"10G\""),
        ("cache-size = 1.5\n", &[], "cache-size: expected a whole number of bytes or a size such as \"10G\""),
        ("upload-rate = -1\n", &[], "upload-rate: expected a whole number of bytes"),
        // A bare number is bytes: meant as gigabytes, it would have dropped the whole cache.
        ("cache-size = 10\n", &[], "cache-size must be at least 64K, not 10 bytes"),
        ("", &["--cache-size", "0"], "cache-size must be at least 64K"),
        ("cache-size = \"10GBBB\"\n", &[], "unknown unit"),
        ("listen = []\n", &[], "listen is empty"),
    ];
    for (file, args, says) in refused {
        let (ok, _, err) = show(file, args, &[]);
        assert!(!ok && err.contains(says), "{file}{args:?}: {err}");
    }
    // A file's value that a flag replaces is not refused: the whole is checked.
    let (ok, shown, err) = show("cache-size = 10\nlisten = []\n", &["--cache-size", "10G"], &[]);
    assert!(!ok && err.contains("listen is empty"), "{err}{shown}");
    let (ok, shown, err) = show("cache-size = 10\n", &["--cache-size", "10G"], &[]);
    assert!(ok && shown.contains(&format!("cache-size = {}", 10u64 << 30)), "{err}");
    // The bounds themselves are taken.
    let (ok, shown, err) = show("max-uploads = 65536\nlookup-timeout-secs = 86400\n", &[], &[]);
    assert!(ok && shown.contains("max-uploads = 65536") && shown.contains("lookup-timeout-secs = 86400"), "{err}");
    // SHOAL_NO_UPNP takes 1 and 0, as environment switches are commonly set.
    for (value, upnp) in [("1", false), ("yes", false), ("true", false), ("0", true), ("false", true)] {
        let (ok, shown, err) = show("", &[], &[("SHOAL_NO_UPNP", value)]);
        assert!(ok && shown.contains(&format!("upnp = {upnp}")), "SHOAL_NO_UPNP={value}: {err}{shown}");
    }
}

#[test]
fn listings_to_a_reader_that_went_away_end_quietly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = NodeProc::start(&tmp.path().join("a"), None);
    let b = NodeProc::start(&tmp.path().join("b"), Some(&a));
    let input = tmp.path().join("input.bin");
    random_file(&input, 1000, 31);
    let hash = add_and_wait(&a, &b, &input);
    for args in [
        &["providers", hash.as_str()][..],
        &["peers"],
        &["peers", "--json"],
        &["status"],
        &["status", "--json"],
        &["ls"],
        &["get", hash.as_str(), "-o", "-"],
    ] {
        // A pipe whose reader is gone, as `shoal peers | head -0` leaves it.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_DATA_DIR", &b.dir)
            .env_remove("SHOAL_API")
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("panicked"), "{args:?}: {err}");
    }
}
