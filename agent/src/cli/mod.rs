//! The operator tools: subcommands of `agent` that ask the running agent on
//! this node through its local API and print aligned tables (or `-o json`).

mod render;
pub mod table;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::{
    api,
    flows::{
        Flow,
        observe_args::{ObserveArgs, Output as FlowOutput},
    },
    inspect::{CtView, EndpointDetail, EndpointSummary, IdentityInfo, TraceReport, TraceRequest},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables and sentences.
    #[default]
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Subcommand, Debug)]
pub enum EndpointCmd {
    /// The endpoints of this node: policy enforcement per direction,
    /// identity, labels, addresses, status.
    List(OutputArg),
    /// One endpoint: its identity, the policies selecting it, and its allow
    /// entries as read back from the kernel's maps.
    Get {
        /// Endpoint id or namespace/pod.
        endpoint: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// The verdict on one connection and why: the policies selecting each
    /// side and the rule that allows it, checked against the loaded maps.
    Trace {
        /// The client: namespace/pod or an IP address.
        #[arg(long)]
        from: String,
        /// The server: namespace/pod or an IP address.
        #[arg(long)]
        to: String,
        /// PORT/PROTOCOL, e.g. 80/TCP, 53/UDP (protocol defaults to TCP).
        #[arg(long)]
        port: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum IdentityCmd {
    /// Identities: numbers for label sets, with their addresses and endpoints.
    List(OutputArg),
}

#[derive(Subcommand, Debug)]
pub enum CtCmd {
    /// Tracked flows (conntrack), newest state of each.
    List {
        /// Only this endpoint (id or namespace/pod).
        #[arg(long)]
        endpoint: Option<String>,
        /// Only flows with this address on either side.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// Only flows with this port on either side.
        #[arg(long)]
        port: Option<u16>,
        /// Only TCP, UDP or SCTP.
        #[arg(long)]
        protocol: Option<String>,
        /// At most this many entries (0: all).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// The local API's client, with errors that say what to do.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client { socket: socket.to_path_buf() }
    }

    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "agent not running: is the DaemonSet up (kubectl -n portcullis get ds portcullis)? \
                 Or point --socket / PORTCULLIS_API_SOCKET at its socket"
            }
            std::io::ErrorKind::PermissionDenied => "the socket is root-only: run as root",
            _ => "the agent did not answer",
        };
        anyhow::anyhow!("{hint} ({}: {e})", self.socket.display())
    }

    fn get_text(&self, path: &str, body: Option<Vec<u8>>) -> Result<String> {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (status, text) = api::fetch(&self.socket, method, path, body, Some(Duration::from_secs(30)))
            .map_err(|e| self.unreachable(e))?;
        if status != 200 {
            bail!("{}", error_text(status, &text));
        }
        Ok(text)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str, body: Option<Vec<u8>>) -> Result<T> {
        let text = self.get_text(path, body)?;
        serde_json::from_str(&text).with_context(|| format!("the agent's answer to {path} did not parse"))
    }
}

fn error_text(status: u16, body: &str) -> String {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    match status {
        404 if message.starts_with("no route") => {
            format!("{message}: the agent is older than this command; upgrade it")
        }
        _ => message,
    }
}

/// Prints `value` as JSON or as `table` renders it.
fn show<T: serde::Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    match output {
        Output::Json => print_json(value),
        Output::Table => {
            print!("{}", table(value));
            Ok(())
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn encode(segment: &str) -> String {
    segment.bytes().fold(String::new(), |mut s, b| {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
        s
    })
}

pub fn endpoint(client: &Client, cmd: EndpointCmd) -> Result<()> {
    match cmd {
        EndpointCmd::List(out) => {
            let list: Vec<EndpointSummary> = client.get("/v1/endpoints", None)?;
            show(out.output, &list, |l| render::endpoints(l))
        }
        EndpointCmd::Get { endpoint, out } => {
            let detail: EndpointDetail = client.get(&format!("/v1/endpoints/{}", encode(&endpoint)), None)?;
            show(out.output, &detail, render::endpoint)
        }
    }
}

pub fn identity(client: &Client, cmd: IdentityCmd) -> Result<()> {
    let IdentityCmd::List(out) = cmd;
    let list: Vec<IdentityInfo> = client.get("/v1/identities", None)?;
    show(out.output, &list, |l| render::identities(l))
}

pub fn ct(client: &Client, cmd: CtCmd) -> Result<()> {
    let CtCmd::List { endpoint, ip, port, protocol, limit, out } = cmd;
    let mut params = Vec::new();
    if limit > 0 {
        params.push(format!("limit={limit}"));
    }
    if let Some(e) = endpoint {
        params.push(format!("endpoint={}", encode(&e)));
    }
    if let Some(ip) = ip {
        params.push(format!("ip={}", encode(&ip.to_string())));
    }
    if let Some(p) = port {
        params.push(format!("port={p}"));
    }
    if let Some(p) = protocol {
        params.push(format!("protocol={}", encode(&p)));
    }
    let path = if params.is_empty() { "/v1/ct".to_owned() } else { format!("/v1/ct?{}", params.join("&")) };
    let list: Vec<CtView> = client.get(&path, None)?;
    show(out.output, &list, |l| render::conntrack(l))
}

pub fn status(client: &Client, out: OutputArg) -> Result<()> {
    let status: api::Status = client.get("/v1/status", None)?;
    show(out.output, &status, render::status)
}

pub fn metrics(client: &Client) -> Result<()> {
    print!("{}", client.get_text("/metrics", None)?);
    Ok(())
}

/// `80/TCP`, `53/udp`, `8080` (TCP).
fn parse_port(text: &str) -> Result<(u16, String)> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("--port {text}: expected PORT/PROTOCOL, e.g. 80/TCP"))?;
    let protocol = protocol.to_uppercase();
    if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
        bail!("--port {text}: the protocol must be TCP, UDP or SCTP");
    }
    Ok((port, protocol))
}

/// Exit code: 0 when allowed, 1 when dropped (scripts can test it), 2 on
/// errors (from main).
pub fn policy(client: &Client, cmd: PolicyCmd) -> Result<i32> {
    let PolicyCmd::Trace { from, to, port, out } = cmd;
    let (port, protocol) = parse_port(&port)?;
    let req = TraceRequest { from, to, port, protocol };
    let report: TraceReport = client.get("/v1/trace", Some(serde_json::to_vec(&req)?))?;
    match out.output {
        Output::Json => print_json(&report)?,
        Output::Table => print!("{}", render::trace(&report)),
    }
    Ok(if report.allowed { 0 } else { 1 })
}

pub fn observe(client: &Client, args: ObserveArgs) -> Result<()> {
    let body = serde_json::to_vec(&args.query)?;
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let result = api::stream_lines(&client.socket, "POST", "/v1/flows", Some(body), |line| {
        if line.is_empty() {
            return true;
        }
        let written = match args.output {
            FlowOutput::Json => writeln!(stdout, "{line}"),
            FlowOutput::Compact => match serde_json::from_str::<Flow>(line) {
                Ok(flow) => writeln!(stdout, "{flow}"),
                Err(_) => match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) if v.get("lost").is_some() => {
                        eprintln!("warning: {} flows lost: this client fell behind", v["lost"]);
                        Ok(())
                    }
                    _ => {
                        failed = Some(format!("unreadable flow from the agent: {line}"));
                        return false;
                    }
                },
            },
        };
        // A closed pipe (`| head`) ends the stream quietly.
        written.and_then(|()| stdout.flush()).is_ok()
    })
    .map_err(|e| client.unreachable(e))?;
    if let Err((status, body)) = result {
        bail!("{}", error_text(status, &body));
    }
    if let Some(e) = failed {
        bail!(e);
    }
    Ok(())
}
