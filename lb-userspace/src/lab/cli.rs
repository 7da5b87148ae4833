//! `ballast lab up|down|status`, and the hidden `serve` the servers run as.
use std::path::Path;

use anyhow::Context as _;

use super::command::{in_netns, Ballast};
use super::record::{run_dir, Record};
use super::{
    backend_label, backend_v4, backend_v6, config, down, lab_namespaces, lb_v4, namespace_of, serve, validate_name,
    Lab, LabSpec, Role, ServeArgs, BACKEND_IFACE, CLIENT_V4, CLIENT_V6, LB_IFACE, TCP_PORT, VIP_V4,
};

/// `ballast lab status`: what is up, read from the record and the kernel.
pub fn status(name: &str, binary: &Path) -> anyhow::Result<String> {
    validate_name(name)?;
    let Some(record) = Record::load(name)? else {
        let leftovers = lab_namespaces(name)?;
        if leftovers.is_empty() {
            return Ok(format!("lab '{name}' is not up\n"));
        }
        return Ok(format!(
            "lab '{name}' has no record but namespaces {}: `ballast lab down --name {name}`\n",
            leftovers.join(", ")
        ));
    };
    let ballast = Ballast::new(binary, &run_dir(name).join("state"));
    let ns = |role| namespace_of(name, role);
    let mut out = format!(
        "lab '{name}': {} load balancer(s), {} backends; run directory {}\n",
        record.lbs,
        record.backends,
        run_dir(name).display()
    );
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("  client  {:<14} {CLIENT_V4}, {CLIENT_V6}", ns(Role::Client)));
    let hops: Vec<String> = (1..=record.lbs).map(|k| format!("lb{k}")).collect();
    line(format!("  router  {:<14} 192.0.2.0/24 and 2001:db8::/64 -> {}", ns(Role::Router), hops.join(" + ")));
    for k in 1..=record.lbs {
        line(format!("  lb{k}     {:<14} {}", ns(Role::Lb(k)), lb_summary(&ballast, &ns(Role::Lb(k)), k)));
    }
    for i in 1..=record.backends {
        let label = backend_label(i);
        let server = match record.servers.iter().find(|s| s.backend == label) {
            Some(s) if s.is_running() => format!("server pid {}", s.pid),
            Some(s) => format!("server pid {} NOT RUNNING", s.pid),
            None => "no server".to_owned(),
        };
        let backend_ns = ns(Role::Backend(i));
        if !Path::new("/run/netns").join(&backend_ns).exists() {
            line(format!("  {label:<7} {backend_ns:<14} not created"));
            continue;
        }
        let decap = in_netns(&backend_ns, || crate::decap::counters(BACKEND_IFACE))
            .map(|c| format!("decapsulated {}", c.iter().find(|(r, _)| *r == "decapsulated").map_or(0, |(_, n)| *n)))
            .unwrap_or_else(|_| "no decapsulator".to_owned());
        line(format!("  {label:<7} {backend_ns:<14} {}, {}; {server}; {decap}", backend_v4(i), backend_v6(i)));
    }
    Ok(out)
}

fn lb_summary(ballast: &Ballast, ns: &str, k: usize) -> String {
    let status = ballast
        .run(&["status", "--json", "--iface", LB_IFACE, "--netns", ns])
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    match status {
        Some(s) => format!(
            "{}, {LB_IFACE} runs {}; forwarded {}",
            lb_v4(k),
            s["generation"].as_str().unwrap_or("?"),
            s["reasons"]["forwarded"].as_u64().unwrap_or(0)
        ),
        None => format!("{}, {LB_IFACE}: no generation attached", lb_v4(k)),
    }
}

/// `ballast lab ...`
#[derive(clap::Subcommand, Debug)]
pub enum LabCommand {
    /// Build the lab in network namespaces and attach a generation serving its VIPs with
    /// every backend; try it with e.g.
    /// `ip netns exec bl-lab-cl bash -c 'cat </dev/tcp/192.0.2.10/80'`.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// 1, or 2 behind an ECMP route.
        #[arg(long, default_value_t = 1)]
        lbs: usize,
    },
    /// End the lab's servers, detach everything and delete its namespaces (also after a
    /// partial `up`).
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// What is up: namespaces, generations, servers, counters.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// A backend's server (started by `up`).
    #[command(hide = true)]
    Serve(ServeArgs),
}

pub fn run(command: LabCommand) -> anyhow::Result<()> {
    let binary = || std::env::current_exe().context("locating the ballast binary");
    match command {
        LabCommand::Up { name, backends, lbs } => {
            let lab = Lab::up(&LabSpec::new(&name, backends, lbs), &binary()?)?;
            let all: Vec<(usize, u32)> = (1..=backends).map(|i| (i, 1)).collect();
            let config = lab.write_file("lb.toml", &config(&all))?;
            for output in lab.attach(&config)? {
                print!("{output}");
            }
            print!("{}", status(&name, &binary()?)?);
            println!("try: ip netns exec {} bash -c 'cat </dev/tcp/{VIP_V4}/{TCP_PORT}'", lab.namespace(Role::Client));
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
        }
        LabCommand::Status { name } => print!("{}", status(&name, &binary()?)?),
        LabCommand::Serve(args) => serve(&args)?,
    }
    Ok(())
}
