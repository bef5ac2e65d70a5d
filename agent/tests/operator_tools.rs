//! The operator tools against a running agent: pods as network namespaces,
//! the agent enforcing NetworkPolicy objects from a manifests directory,
//! real packets, and every `agent` subcommand asked through the local API
//! as an operator would run it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use portcullis_testbed::{Bed, PinDir, Transport, agent::AgentProcess, probe};
use serde_json::{Value, json};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");
const DENIED: Duration = Duration::from_millis(400);

fn pod_doc(bed: &Bed, name: &str, app: &str) -> Value {
    let pod = bed.pod(name);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
        "spec": {"nodeName": "node", "containers": [{"name": "c", "image": "x",
            "ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": pod.ipv4.to_string(),
            "podIPs": [{"ip": pod.ipv4.to_string()}, {"ip": pod.ipv6.to_string()}]},
    })
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

/// The seed scenario: default deny both ways in `shop`; the frontend may
/// reach the backend on its named port `http`, and (egress) nothing else.
fn objects(bed: &Bed) -> String {
    let docs = [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "shop"}}}),
        pod_doc(bed, "frontend", "frontend"),
        pod_doc(bed, "backend", "backend"),
        policy("default-deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})),
        policy(
            "backend-from-frontend",
            json!({"podSelector": {"matchLabels": {"app": "backend"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                             "ports": [{"port": "http", "protocol": "TCP"}]}]}),
        ),
        policy(
            "frontend-to-backend",
            json!({"podSelector": {"matchLabels": {"app": "frontend"}}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "backend"}}}],
                            "ports": [{"port": 80, "protocol": "TCP"}]}]}),
        ),
    ];
    docs.iter().map(|d| format!("---\n{}\n", serde_json::to_string(d).expect("json"))).collect()
}

/// `agent ARGS --socket S`, run to its end.
fn agent(socket: &Path, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run agent")
}

fn ok_json(socket: &Path, args: &[&str]) -> Value {
    let out = agent(socket, args);
    assert!(out.status.success(), "agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("agent {args:?}: {e}"))
}

fn ok_text(socket: &Path, args: &[&str]) -> String {
    let out = agent(socket, args);
    assert!(out.status.success(), "agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// JSON lines of `agent observe`.
fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).expect("flow json")).collect()
}

struct Follower {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(socket: &Path, args: &[&str]) -> Follower {
        let mut child = Command::new(AGENT)
            .arg("observe")
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::piped())
            .spawn()
            .expect("agent observe --follow");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }

    /// The first line `want` accepts within `timeout`.
    fn next_matching(&self, timeout: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let line = self.lines.recv_timeout(left).ok()?;
            let v: Value = serde_json::from_str(&line).expect("flow json");
            if want(&v) {
                return Some(v);
            }
        }
        None
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RFC 3339 (UTC) for `now - ago`, as `--since` takes it.
fn humantime_now_minus(ago: Duration) -> String {
    let t = std::time::SystemTime::now() - ago;
    let secs = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn metrics_over_tcp(bed: &Bed, port: u16) -> String {
    bed.node
        .run(move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        })
        .expect("netns")
        .expect("metrics over TCP")
}

#[test]
fn operator_tools_answer_from_a_running_agent() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["frontend", "backend"] {
        bed.add_pod(pod).expect("pod");
        bed.serve(pod, 80).expect("serve");
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("portcullis-{}-operator-tools", bed.id));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("objects.yaml"), objects(&bed)).expect("objects");
    let pins = PinDir::new();
    let mut run = AgentProcess::start(
        &bed.node,
        Path::new(AGENT),
        [
            "run",
            "--manifests",
            dir.to_str().expect("utf-8"),
            "--node",
            "node",
            "--pin-dir",
            pins.path.to_str().expect("utf-8"),
            "--report-allowed",
            "--metrics-address",
            "127.0.0.1:9962",
        ],
    )
    .expect("agent run");
    run.wait_for(&["enforced revision"], Duration::from_secs(20)).expect("enforced");
    let socket = run.socket();
    let (frontend, backend) = (bed.pod("frontend"), bed.pod("backend"));
    let (f4, b4) = (IpAddr::from(frontend.ipv4), IpAddr::from(backend.ipv4));

    // A follower started before the drop receives it as it happens.
    // `--since` a moment before the probe: the stored flows since then and
    // every new one, so a slow start cannot miss the drop.
    let since = humantime_now_minus(Duration::from_secs(1));
    let follower =
        Follower::start(&socket, &["--follow", "--since", &since, "--verdict", "DROPPED", "-o", "json"]);
    let denied = probe(&backend.netns, Transport::Tcp, f4, 80, DENIED).expect("probe");
    assert_eq!(denied, None, "backend -> frontend is denied");
    let dropped = follower
        .next_matching(Duration::from_secs(10), |f| {
            f["src_pod"] == "shop/backend" && f["dst_pod"] == "shop/frontend"
        })
        .expect("observe --follow received the drop");
    assert_eq!(
        (dropped["verdict"].as_str(), dropped["direction"].as_str()),
        (Some("DROPPED"), Some("EGRESS"))
    );
    assert_eq!((dropped["dst_port"].as_u64(), dropped["reason"].as_str()), (Some(80), Some("Policy denied")));
    assert!(dropped["tcp_flags"].as_array().expect("flags").contains(&json!("SYN")));
    drop(follower);

    let allowed = probe(&frontend.netns, Transport::Tcp, b4, 80, Duration::from_secs(3)).expect("probe");
    assert_eq!(allowed.as_deref(), Some("backend"), "frontend -> backend:80 is allowed");

    // History, filters and `--not`.
    let last = lines(&ok_text(&socket, &["observe", "--last", "50", "-o", "json"]));
    assert!(last.iter().any(|f| f["verdict"] == "DROPPED" && f["src_pod"] == "shop/backend"));
    let forward = last
        .iter()
        .find(|f| {
            f["verdict"] == "FORWARDED" && f["dst_pod"] == "shop/backend" && f["direction"] == "INGRESS"
        })
        .expect("the allowed connection's forward (--report-allowed)");
    assert_eq!(forward["policy"], "shop/backend-from-frontend ingress rule 0", "{forward}");
    let only_frontend =
        lines(&ok_text(&socket, &["observe", "--last", "50", "--from-pod", "shop/frontend", "-o", "json"]));
    assert!(!only_frontend.is_empty() && only_frontend.iter().all(|f| f["src_pod"] == "shop/frontend"));
    let not_dropped =
        lines(&ok_text(&socket, &["observe", "--last", "50", "--not", "--verdict", "dropped", "-o", "json"]));
    assert!(!not_dropped.is_empty() && not_dropped.iter().all(|f| f["verdict"] == "FORWARDED"));
    let by_label =
        lines(&ok_text(&socket, &["observe", "--last", "50", "--to-label", "app=frontend", "-o", "json"]));
    assert!(!by_label.is_empty() && by_label.iter().all(|f| f["dst_pod"] == "shop/frontend"), "{by_label:?}");
    let compact = ok_text(&socket, &["observe", "--last", "1", "--verdict", "DROPPED"]);
    assert!(
        compact.contains("shop/backend:")
            && compact.contains("-> shop/frontend:80")
            && compact.contains("Policy denied DROPPED"),
        "{compact}"
    );

    // Endpoints.
    let list = ok_json(&socket, &["endpoint", "list", "-o", "json"]);
    let list = list.as_array().expect("list");
    assert_eq!(list.len(), 2);
    let be = list.iter().find(|e| e["name"] == "shop/backend").expect("backend endpoint");
    assert_eq!(be["ipv4"], b4.to_string());
    assert_eq!(be["ipv6"], IpAddr::from(backend.ipv6).to_string());
    assert_eq!(
        (&be["ingress_enforced"], &be["egress_enforced"], &be["status"]),
        (&json!(true), &json!(true), &json!("ready"))
    );
    assert!(be["labels"].as_array().expect("labels").contains(&json!("app=backend")));
    assert!(be["ingress"]["forwarded_packets"].as_u64().expect("counter") > 0);
    let table = ok_text(&socket, &["endpoint", "list"]);
    assert!(
        table.starts_with("ENDPOINT")
            && table.contains("POLICY (ingress) ENFORCEMENT")
            && table.contains("shop/backend")
    );

    let detail = ok_json(&socket, &["endpoint", "get", "shop/backend", "-o", "json"]);
    assert_eq!(detail["ingress_policies"], json!(["shop/backend-from-frontend", "shop/default-deny"]));
    assert_eq!(detail["disagreements"], json!([]));
    let entries = detail["entries"].as_array().expect("entries");
    let from_frontend = entries
        .iter()
        .find(|e| e["direction"] == "ingress")
        .unwrap_or_else(|| panic!("an ingress entry: {entries:?}"));
    assert!(from_frontend["peer"].as_str().expect("peer").contains("app=frontend"), "{from_frontend}");
    assert_eq!((&from_frontend["protocol"], &from_frontend["ports"]), (&json!("TCP"), &json!("80")));
    assert_eq!(from_frontend["rule"], "shop/backend-from-frontend ingress rule 0");
    // The rule counts the allowed connection's packets, both ways.
    let rules = detail["rules"].as_array().expect("rules");
    let rule = rules
        .iter()
        .find(|r| r["rule"] == "shop/backend-from-frontend ingress rule 0")
        .unwrap_or_else(|| panic!("{rules:?}"));
    assert!(rule["packets"].as_u64().expect("packets") >= 4, "SYN, ACK, data, FIN at least: {rule}");
    assert!(rule["bytes"].as_u64().expect("bytes") > 0);
    let by_id = ok_json(&socket, &["endpoint", "get", &be["id"].to_string(), "-o", "json"]);
    assert_eq!(by_id["name"], "shop/backend");
    let missing = agent(&socket, &["endpoint", "get", "shop/nope"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no endpoint shop/nope"));

    // Policy trace: the rule that allows, or what isolates and drops.
    let trace = ok_json(
        &socket,
        &[
            "policy",
            "trace",
            "--from",
            "shop/frontend",
            "--to",
            "shop/backend",
            "--port",
            "80/TCP",
            "-o",
            "json",
        ],
    );
    assert_eq!(trace["allowed"], true);
    assert_eq!(trace["ingress"]["allowed_by"], json!(["shop/backend-from-frontend ingress rule 0"]));
    assert_eq!(trace["egress"]["allowed_by"], json!(["shop/frontend-to-backend egress rule 0"]));
    assert_eq!(trace["datapath_agrees"], true, "{trace}");
    let denied = agent(
        &socket,
        &["policy", "trace", "--from", "shop/backend", "--to", &f4.to_string(), "--port", "80"],
    );
    assert_eq!(denied.status.code(), Some(1), "a dropped verdict exits 1");
    let text = String::from_utf8_lossy(&denied.stdout).into_owned();
    assert!(
        text.contains("isolated by shop/default-deny; no rule of it allows this connection: dropped")
            && text.contains("Verdict: DROPPED")
            && text.contains("agrees")
            && !text.contains("DISAGREES"),
        "{text}"
    );
    let wrong_port = agent(
        &socket,
        &[
            "policy",
            "trace",
            "--from",
            "shop/frontend",
            "--to",
            "shop/backend",
            "--port",
            "81/TCP",
            "-o",
            "json",
        ],
    );
    assert_eq!(wrong_port.status.code(), Some(1));
    let wrong_port: Value = serde_json::from_slice(&wrong_port.stdout).expect("trace json");
    assert_eq!((&wrong_port["allowed"], &wrong_port["datapath_agrees"]), (&json!(false), &json!(true)));

    // Identities, conntrack, status, metrics.
    let ids = ok_json(&socket, &["identity", "list", "-o", "json"]);
    let ids = ids.as_array().expect("identities");
    let id = ids
        .iter()
        .find(|i| i["labels"].as_array().is_some_and(|l| l.contains(&json!("app=frontend"))))
        .expect("frontend's identity");
    assert_eq!(id["addresses"], 2);
    let ct = ok_json(&socket, &["ct", "list", "--endpoint", "shop/backend", "--port", "80", "-o", "json"]);
    let flow = ct
        .as_array()
        .expect("ct")
        .iter()
        .find(|c| c["origin"] == "INGRESS")
        .unwrap_or_else(|| panic!("the allowed connection is tracked: {ct}"));
    assert_eq!(flow["rule"], "shop/backend-from-frontend ingress rule 0");
    assert_eq!(flow["local"], format!("{b4}:80"));

    let status = ok_json(&socket, &["status", "-o", "json"]);
    let health = &status["health"];
    assert_eq!((&health["endpoints"], &health["policies"]), (&json!(2), &json!(3)));
    assert!(health["drops"].as_array().expect("drops").iter().any(|d| d["reason"] == "Policy denied"));
    let status_text = ok_text(&socket, &["status"]);
    assert!(status_text.contains("Endpoints:       2 (0 failed)"), "{status_text}");

    // The human forms, as the README shows them (`--nocapture` prints them).
    for args in [
        &["endpoint", "list"][..],
        &["endpoint", "get", "shop/backend"],
        &["observe", "--last", "4"],
        &["policy", "trace", "--from", "shop/frontend", "--to", "shop/backend", "--port", "80/TCP"],
        &["identity", "list"],
        &["ct", "list"],
        &["status"],
    ] {
        let out = agent(&socket, args);
        println!("# agent {}\n{}", args.join(" "), String::from_utf8_lossy(&out.stdout));
    }
    println!("# agent policy trace (dropped)\n{text}");

    let metrics = ok_text(&socket, &["metrics"]);
    let denied_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("portcullis_dropped_packets_total{direction=\"egress\",reason=\"Policy denied\"}")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(denied_line.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0));
    assert!(metrics.contains("portcullis_endpoints 2"));
    let over_tcp = metrics_over_tcp(&bed, 9962);
    assert!(
        over_tcp.starts_with("HTTP/1.1 200") && over_tcp.contains("portcullis_endpoints 2"),
        "{over_tcp}"
    );

    // Completions, and the error when no agent answers.
    let completions = Command::new(AGENT).args(["completions", "bash"]).output().expect("completions");
    assert!(completions.status.success() && String::from_utf8_lossy(&completions.stdout).contains("observe"));
    let nobody = agent(Path::new("/nonexistent/agent.sock"), &["endpoint", "list"]);
    assert_eq!(nobody.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("agent not running"));

    run.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
