//! scripts/pktgen/ballast_pktgen.sh in --dry-run mode: the pktgen commands it would write for
//! a multi-flow run at a VIP. This kernel has no pktgen, so only the commands are checked;
//! nothing is written and no root is needed.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::Context as _;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pktgen/ballast_pktgen.sh")
}

fn run(args: &[&str]) -> anyhow::Result<Output> {
    Command::new("bash").arg(script()).args(args).output().with_context(|| format!("running bash {:?}", script()))
}

/// The dry run's commands as (control file, command) pairs.
fn commands(args: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
    let output = run(args)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{args:?} failed: {}{stdout}", String::from_utf8_lossy(&output.stderr));
    Ok(stdout
        .lines()
        .map(|line| {
            let (command, file) = line.split_once(" > ").unwrap_or_else(|| panic!("not a pktgen write: {line}"));
            let command = command.strip_prefix("echo \"").and_then(|c| c.strip_suffix('"'));
            let file = file.strip_prefix("/proc/net/pktgen/");
            let (Some(file), Some(command)) = (file, command) else { panic!("not a pktgen write: {line}") };
            (file.to_owned(), command.to_owned())
        })
        .collect())
}

fn sent_to<'a>(commands: &'a [(String, String)], file: &str) -> Vec<&'a str> {
    commands.iter().filter(|(f, _)| f == file).map(|(_, c)| c.as_str()).collect()
}

const BASE: [&str; 7] = ["--dry-run", "-i", "eth9", "-d", "198.18.0.10", "-m", "02:00:00:00:00:02"];

#[test]
fn dry_run_configures_every_thread_for_many_flows_at_the_vip() -> anyhow::Result<()> {
    let mut args = BASE.to_vec();
    args.extend([
        "-p",
        "5353",
        "-s",
        "128",
        "-c",
        "5000",
        "-t",
        "2",
        "-f",
        "3",
        "--sport-min",
        "2000",
        "--sport-max",
        "2999",
        "--src-min",
        "198.19.0.1",
        "--src-max",
        "198.19.3.254",
    ]);
    let commands = commands(&args)?;
    assert_eq!(commands.first().map(|(f, c)| (f.as_str(), c.as_str())), Some(("pgctrl", "reset")));
    assert_eq!(commands.last().map(|(f, c)| (f.as_str(), c.as_str())), Some(("pgctrl", "start")));
    // Threads 3 and 4, each with its own device and half of the source ports.
    for (thread, ports) in [(3, ("2000", "2499")), (4, ("2500", "2999"))] {
        let dev = format!("eth9@{thread}");
        assert_eq!(
            sent_to(&commands, &format!("kpktgend_{thread}")),
            ["rem_device_all", format!("add_device {dev}").as_str()]
        );
        let sent = sent_to(&commands, &dev);
        for expected in [
            "count 5000".to_owned(),
            "pkt_size 128".to_owned(),
            "clone_skb 0".to_owned(),
            "dst 198.18.0.10".to_owned(),
            "dst_mac 02:00:00:00:00:02".to_owned(),
            "udp_dst_min 5353".to_owned(),
            "udp_dst_max 5353".to_owned(),
            format!("udp_src_min {}", ports.0),
            format!("udp_src_max {}", ports.1),
            "src_min 198.19.0.1".to_owned(),
            "src_max 198.19.3.254".to_owned(),
            "flows 4096".to_owned(),
            "flag FLOW_SEQ".to_owned(),
        ] {
            assert!(sent.contains(&expected.as_str()), "{dev}: no '{expected}' in {sent:?}");
        }
        assert!(!sent.iter().any(|c| c.ends_with("_RND")), "sequential by default: {sent:?}");
    }
    assert!(sent_to(&commands, "kpktgend_0").is_empty());
    Ok(())
}

#[test]
fn random_flags_and_ipv6() -> anyhow::Result<()> {
    let mut args = BASE.to_vec();
    args.push("--random");
    let sent: Vec<String> = commands(&args)?.into_iter().map(|(_, c)| c).collect();
    assert!(sent.contains(&"flag UDPSRC_RND".to_owned()) && sent.contains(&"flag IPSRC_RND".to_owned()), "{sent:?}");

    let v6 = ["--dry-run", "-6", "-i", "eth9", "-d", "2001:db8::10", "-m", "02:00:00:00:00:02", "--random"];
    let sent: Vec<String> = commands(&v6)?.into_iter().map(|(_, c)| c).collect();
    for expected in ["dst6 2001:db8::10", "src6 2001:db8:19::1", "flag UDPSRC_RND"] {
        assert!(sent.iter().any(|c| c == expected), "no '{expected}' in {sent:?}");
    }
    assert!(!sent.iter().any(|c| c.starts_with("src_m") || c == "flag IPSRC_RND"), "{sent:?}");
    Ok(())
}

#[test]
fn refusals_name_the_option() -> anyhow::Result<()> {
    for (args, message) in [
        (vec!["--dry-run", "-d", "198.18.0.10", "-m", "02:00:00:00:00:02"], "-i DEV is required"),
        (vec!["--dry-run", "-i", "eth9", "-m", "02:00:00:00:00:02"], "-d VIP is required"),
        (vec!["--dry-run", "-i", "eth9", "-d", "198.18.0.10", "-m", "02:00:00:00:00"], "is not a MAC address"),
        (vec!["--dry-run", "-i", "eth9", "-d", "198.18.0.300", "-m", "02:00:00:00:00:02"], "is not an IPv4 address"),
        ([BASE.as_slice(), &["--sport-min", "9", "--sport-max", "8"]].concat(), "is not a port range"),
        ([BASE.as_slice(), &["-c", "many"]].concat(), "COUNT: 'many' is not a number"),
        ([BASE.as_slice(), &["--bogus"]].concat(), "unknown option '--bogus'"),
        (
            vec![
                "--dry-run",
                "-6",
                "-i",
                "eth9",
                "-d",
                "2001:db8::10",
                "-m",
                "02:00:00:00:00:02",
                "--src-min",
                "198.19.0.1",
            ],
            "IPv4 only",
        ),
    ] {
        let output = run(&args)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: expected '{message}' in: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?} printed commands before refusing");
    }
    Ok(())
}
