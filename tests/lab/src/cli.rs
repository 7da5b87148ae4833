//! `ballast-lab up|down|status` (`ballast lab ...`), and the hidden `serve` the servers run as.
use std::path::Path;

use serde::Serialize;

use super::command::{in_netns, Ballast};
use super::lock;
use super::record::{run_dir, Record};
use super::teardown::namespace_pin_dir;
use super::{
    backend_label, backend_v4, backend_v6, ballast_binary, config, down, lab_namespaces, lb_v4, namespace_of, serve,
    validate_name, Lab, LabSpec, Mtus, Role, ServeArgs, BACKEND_IFACE, CLIENT_V4, CLIENT_V6, LB_IFACE, TCP_PORT,
    VIP_V4,
};

/// What `ballast lab status` reports, read from the record, the lock and the kernel; the
/// text and `--json` render the same.
#[derive(Serialize, Debug)]
struct LabStatus {
    name: String,
    /// "up", "not up", or "leftovers" (namespaces without a record: a killed `up`).
    state: &'static str,
    run_dir: String,
    /// The process using the lab now (a demo, a test, an `up` or `down` under way).
    in_use_by: Option<Holder>,
    load_balancers: usize,
    backends: usize,
    namespaces: Vec<NamespaceStatus>,
    lbs: Vec<LbStatus>,
    servers: Vec<BackendStatus>,
    /// Namespaces named like the lab's but in no record.
    leftover_namespaces: Vec<String>,
}

#[derive(Serialize, Debug)]
struct Holder {
    pid: Option<u32>,
    command: Option<String>,
}

#[derive(Serialize, Debug)]
struct NamespaceStatus {
    name: String,
    exists: bool,
    /// The recorded cookie: its pins live in `pin_dir`.
    cookie: Option<u64>,
    pin_dir: Option<String>,
    /// Whether that pin directory exists (pins left by a namespace deleted by hand, while it
    /// no longer exists: `ballast lab down` removes them).
    pins: bool,
}

#[derive(Serialize, Debug)]
struct LbStatus {
    lb: usize,
    namespace: String,
    address: String,
    exists: bool,
    /// The digest of the generation running on lb0, if one is attached.
    generation: Option<String>,
    forwarded: Option<u64>,
}

#[derive(Serialize, Debug)]
struct BackendStatus {
    backend: String,
    namespace: String,
    exists: bool,
    ipv4: String,
    ipv6: String,
    server_pid: Option<u32>,
    server_running: bool,
    /// The decapsulator's count of decapsulated packets, if one runs.
    decapsulated: Option<u64>,
}

fn netns_exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

fn lab_status(name: &str, binary: &Path) -> anyhow::Result<LabStatus> {
    validate_name(name)?;
    let record = Record::load(name)?;
    let found = lab_namespaces(name)?;
    // Another process's use (this one's, as in `up`, goes without saying).
    let in_use_by = lock::holder(name)
        .filter(|in_use| in_use.holder.as_ref().map(|(pid, _)| *pid) != Some(std::process::id()))
        .map(|in_use| Holder {
            pid: in_use.holder.as_ref().map(|(pid, _)| *pid),
            command: in_use.holder.map(|(_, command)| command).filter(|c| !c.is_empty()),
        });
    let mut status = LabStatus {
        name: name.to_owned(),
        state: "not up",
        run_dir: run_dir(name).display().to_string(),
        in_use_by,
        load_balancers: 0,
        backends: 0,
        namespaces: Vec::new(),
        lbs: Vec::new(),
        servers: Vec::new(),
        leftover_namespaces: Vec::new(),
    };
    let Some(record) = record else {
        if !found.is_empty() {
            status.state = "leftovers";
            status.leftover_namespaces = found;
        }
        return Ok(status);
    };
    status.state = "up";
    status.load_balancers = record.lbs;
    status.backends = record.backends;
    status.leftover_namespaces = found.into_iter().filter(|ns| !record.namespaces.contains(ns)).collect();
    status.namespaces = record
        .namespaces
        .iter()
        .map(|ns| {
            let cookie = record.cookies.get(ns).copied();
            let pin_dir = cookie.map(namespace_pin_dir);
            NamespaceStatus {
                name: ns.clone(),
                exists: netns_exists(ns),
                cookie,
                pins: pin_dir.as_ref().is_some_and(|dir| dir.exists()),
                pin_dir: pin_dir.map(|dir| dir.display().to_string()),
            }
        })
        .collect();
    let ballast = Ballast::new(binary, &run_dir(name).join("state"));
    for k in 1..=record.lbs {
        let ns = namespace_of(name, Role::Lb(k));
        let running = netns_exists(&ns)
            .then(|| ballast.run(&["status", "--json", "--iface", LB_IFACE, "--netns", &ns]).ok())
            .flatten()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        status.lbs.push(LbStatus {
            lb: k,
            exists: netns_exists(&ns),
            namespace: ns,
            address: lb_v4(k).to_string(),
            generation: running.as_ref().and_then(|s| s["generation"].as_str().map(str::to_owned)),
            forwarded: running.as_ref().and_then(|s| s["reasons"]["forwarded"].as_u64()),
        });
    }
    for i in 1..=record.backends {
        let label = backend_label(i);
        let server = record.servers.iter().find(|s| s.backend == label);
        let ns = namespace_of(name, Role::Backend(i));
        let decapsulated = netns_exists(&ns)
            .then(|| in_netns(&ns, || Ok(ballast::ops::decap::counters(BACKEND_IFACE)?)).ok())
            .flatten()
            .map(|counters| counters.iter().find(|(r, _)| *r == "decapsulated").map_or(0, |(_, n)| *n));
        status.servers.push(BackendStatus {
            backend: label,
            exists: netns_exists(&ns),
            namespace: ns,
            ipv4: backend_v4(i).to_string(),
            ipv6: backend_v6(i).to_string(),
            server_pid: server.map(|s| s.pid),
            server_running: server.is_some_and(|s| s.is_running()),
            decapsulated,
        });
    }
    Ok(status)
}

/// `ballast lab status`: what is up, read from the record and the kernel.
pub fn status(name: &str, binary: &Path) -> anyhow::Result<String> {
    Ok(render_status(&lab_status(name, binary)?))
}

/// `ballast lab status --json`.
pub fn status_json(name: &str, binary: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(lab_status(name, binary)?)?)
}

fn render_status(status: &LabStatus) -> String {
    let name = &status.name;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    match status.state {
        "up" => line(format!(
            "lab '{name}': {} load balancer(s), {} backends; run directory {}",
            status.load_balancers, status.backends, status.run_dir
        )),
        "leftovers" => line(format!(
            "lab '{name}' has no record but namespaces {}: `ballast lab down --name {name}`",
            status.leftover_namespaces.join(", ")
        )),
        _ => line(format!("lab '{name}' is not up")),
    }
    if let Some(holder) = &status.in_use_by {
        let pid = holder.pid.map_or_else(|| "?".to_owned(), |pid| pid.to_string());
        let command = holder.command.as_deref().map(|c| format!(" (`{c}`)")).unwrap_or_default();
        line(format!("  in use by process {pid}{command}"));
    }
    if status.state != "up" {
        return out;
    }
    let ns = |role| namespace_of(name, role);
    line(format!("  client  {:<14} {CLIENT_V4}, {CLIENT_V6}", ns(Role::Client)));
    let hops: Vec<String> = status.lbs.iter().map(|lb| format!("lb{}", lb.lb)).collect();
    line(format!("  router  {:<14} 192.0.2.0/24 and 2001:db8::/64 -> {}", ns(Role::Router), hops.join(" + ")));
    for lb in &status.lbs {
        let what = match (&lb.generation, lb.exists) {
            (_, false) => "namespace deleted".to_owned(),
            (Some(digest), true) => {
                format!("{}, {LB_IFACE} runs {digest}; forwarded {}", lb.address, lb.forwarded.unwrap_or(0))
            }
            (None, true) => format!("{}, {LB_IFACE}: no generation attached", lb.address),
        };
        line(format!("  lb{}     {:<14} {what}", lb.lb, lb.namespace));
    }
    for backend in &status.servers {
        if !backend.exists {
            let was_created = status.namespaces.iter().any(|n| n.name == backend.namespace);
            let what = if was_created { "namespace deleted" } else { "not created" };
            line(format!("  {:<7} {:<14} {what}", backend.backend, backend.namespace));
            continue;
        }
        let server = match (backend.server_pid, backend.server_running) {
            (Some(pid), true) => format!("server pid {pid}"),
            (Some(pid), false) => format!("server pid {pid} NOT RUNNING"),
            (None, _) => "no server".to_owned(),
        };
        let decap = backend.decapsulated.map_or_else(|| "no decapsulator".to_owned(), |n| format!("decapsulated {n}"));
        line(format!(
            "  {:<7} {:<14} {}, {}; {server}; {decap}",
            backend.backend, backend.namespace, backend.ipv4, backend.ipv6
        ));
    }
    for gone in status.namespaces.iter().filter(|n| !n.exists && n.pins) {
        line(format!(
            "  {} was deleted but left pins in {}: `ballast lab down --name {name}` removes them",
            gone.name,
            gone.pin_dir.as_deref().unwrap_or("?")
        ));
    }
    if !status.leftover_namespaces.is_empty() {
        line(format!("  namespaces in no record: {}", status.leftover_namespaces.join(", ")));
    }
    out
}

/// `ballast lab ...`
#[derive(clap::Subcommand, Debug)]
pub enum LabCommand {
    /// Build the lab in network namespaces and attach a generation serving its VIPs with
    /// every backend; try it with e.g.
    /// `ip netns exec bl-lab-cl bash -c 'exec 3<>/dev/tcp/192.0.2.10/80; echo >&3; cat <&3'`.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// 1, or 2 behind an ECMP route.
        #[arg(long, default_value_t = 1)]
        lbs: usize,
        /// MTU of the links toward the load balancers and backends (default: the client's 1500
        /// plus the largest outer header, so nothing is too big); 1500 is the common case,
        /// where full-size packets are answered with "fragmentation needed" / "packet too big".
        #[arg(long)]
        fabric_mtu: Option<u32>,
    },
    /// End the lab's servers, detach everything and delete its namespaces (also after a
    /// partial `up`, and the pins of namespaces deleted by hand); refused while another
    /// process (a demo, a test) uses the lab.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// What is up: namespaces, generations, servers, counters, and the process using the lab.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A backend's server (started by `up`).
    #[command(hide = true)]
    Serve(ServeArgs),
}

pub fn run(command: LabCommand) -> anyhow::Result<()> {
    let binary = ballast_binary;
    match command {
        LabCommand::Up { name, backends, lbs, fabric_mtu } => {
            let mut spec = LabSpec::new(&name, backends, lbs);
            if let Some(fabric) = fabric_mtu {
                spec = spec.with_mtus(Mtus { fabric, ..Mtus::FABRIC });
            }
            let lab = Lab::up(&spec, &binary()?)?;
            let all: Vec<(usize, u32)> = (1..=backends).map(|i| (i, 1)).collect();
            let config = lab.write_file("lb.toml", &config(&all))?;
            for output in lab.attach(&config)? {
                print!("{output}");
            }
            print!("{}", status(&name, &binary()?)?);
            // The server answers a request line (any) with its name.
            println!(
                "try: ip netns exec {} bash -c 'exec 3<>/dev/tcp/{VIP_V4}/{TCP_PORT}; echo >&3; cat <&3'",
                lab.namespace(Role::Client)
            );
            lab.keep();
        }
        LabCommand::Down { name } => {
            let done = down(&name)?;
            println!(
                "lab '{name}' down: {} server(s) ended, {} pin directories removed, namespaces deleted: {}",
                done.servers_stopped,
                done.pin_dirs,
                if done.namespaces.is_empty() { "none".to_owned() } else { done.namespaces.join(" ") }
            );
            if !done.already_gone.is_empty() {
                println!("  already deleted (their pins removed all the same): {}", done.already_gone.join(" "));
            }
        }
        LabCommand::Status { name, json: false } => print!("{}", status(&name, &binary()?)?),
        LabCommand::Status { name, json: true } => {
            println!("{}", serde_json::to_string_pretty(&status_json(&name, &binary()?)?)?)
        }
        LabCommand::Serve(args) => serve(&args)?,
    }
    Ok(())
}
