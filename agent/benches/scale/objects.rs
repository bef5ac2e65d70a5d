//! The benchmark's cluster, as Kubernetes objects in the test cluster's API
//! server: 10 nodes, 100 namespaces, 10,000 pods (250 of them on the agent's
//! node), 1,000 policies of the shapes the policy engine benchmark uses, and
//! the prober pod in a namespace of its own. Every object is labelled
//! `portcullis-scale`, so a run removes what an interrupted one left.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, TryStreamExt as _, stream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

pub const NAMESPACES: usize = 100;
pub const PODS: usize = 10_000;
pub const NODES: usize = 10;
pub const LOCAL_PODS: usize = 250;
/// The agent's node; the other nine have no kubelet (their pods are API
/// objects with addresses, as remote pods are to an agent).
pub const LOCAL_NODE: &str = "scale-node-0";
/// The namespace of the 250 local pods (and some remote ones).
pub const LOCAL_NS: &str = "scale-00";
pub const PROBE_NS: &str = "scale-probe";
pub const PROBER: &str = "prober";
/// Every this many local pods one has a label of its own.
pub const SINGLES_EVERY: usize = 25;
pub const LABEL: &str = "portcullis-scale";
/// Concurrent requests while filling the API server.
const PARALLEL: usize = 32;

pub fn namespace_name(n: usize) -> String {
    format!("scale-{n:02}")
}

pub fn local_pod_name(i: usize) -> String {
    format!("local-{i:03}")
}

pub fn local_ipv4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250 + 1) as u8)
}

pub fn local_ipv6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, i as u16 + 1)
}

/// The prober pod's addresses (local, after the 250).
pub fn prober_ips() -> (Ipv4Addr, Ipv6Addr) {
    (local_ipv4(LOCAL_PODS), local_ipv6(LOCAL_PODS))
}

/// A client, and the API server's host (to route to it).
pub async fn client(kubeconfig: &Path) -> Result<(Client, String)> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
    let host = config.cluster_url.host().context("no host in the kubeconfig's server")?.to_string();
    Ok((Client::try_from(config)?, host))
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("the benchmark's own objects are well-formed")
}

fn namespace(name: &str, n: usize) -> Namespace {
    from_json(json!({"metadata": {"name": name, "labels": {
        LABEL: "1",
        "name": name,
        "team": format!("t{}", n % 5),
        "env": if n.is_multiple_of(3) { "prod" } else { "dev" },
    }}}))
}

/// A pod bound to `node`. Tolerating the taints of a node without kubelet
/// keeps the controller manager from evicting it.
fn pod(namespace: &str, name: &str, node: &str, labels: Value, i: usize) -> Pod {
    from_json(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists", "effect": "NoExecute"}, {"operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "app", "image": "k8s.gcr.io/pause:3.2", "ports": [
                {"name": "http", "containerPort": if i.is_multiple_of(7) { 8080 } else { 80 }, "protocol": "TCP"},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            ]}],
        },
    }))
}

fn app_labels(i: usize) -> Value {
    json!({
        LABEL: "1",
        "app": format!("app{}", i % 10),
        "tier": if i.is_multiple_of(2) { "fe" } else { "be" },
        "pod-template-hash": format!("h{}", i % 3),
    })
}

/// Remote pod `n` (0..9,750): its namespace, node and address.
fn remote(n: usize) -> (Pod, Ipv4Addr) {
    let ns = namespace_name(n % NAMESPACES);
    let node = format!("scale-node-{}", 1 + n % (NODES - 1));
    let ip = Ipv4Addr::new(10, 100, (n >> 8) as u8, n as u8);
    (pod(&ns, &format!("pod-{n:05}"), &node, app_labels(n), n), ip)
}

/// Local pod `i` (0..250), in `LOCAL_NS`, as a Deployment's replicas
/// are labelled (they share identities), and `placement: local`. Every
/// 25th also has a label of its own (`local-target`), as a StatefulSet's
/// pods do: the single-pod policies select those.
pub fn local(i: usize) -> Pod {
    let mut labels = app_labels(i);
    labels["placement"] = json!("local");
    if i.is_multiple_of(SINGLES_EVERY) {
        labels["local-target"] = json!(format!("t{i}"));
    }
    pod(LOCAL_NS, &local_pod_name(i), LOCAL_NODE, labels, i)
}

/// Ten per namespace: a default deny, five app-to-app allows, a
/// namespace-selector rule with a named port and an `In` expression, an
/// egress CIDR rule with excepts plus a named-port rule to every
/// namespace, a port range (`endPort`: 1.20's API server drops the field,
/// so it arrives as its first port), a DNS egress rule.
fn policies(n: usize) -> Vec<NetworkPolicy> {
    let ns = namespace_name(n);
    let tcp = |p: u16| json!({"protocol": "TCP", "port": p});
    let mut out = vec![
        json!({"metadata": {"name": "default-deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    ];
    for k in 0..5 {
        out.push(json!({"metadata": {"name": format!("app{k}-from-app{}", k + 1)}, "spec": {
            "podSelector": {"matchLabels": {"app": format!("app{k}")}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app{}", k + 1)}}}], "ports": [tcp(80), tcp(443)]}],
        }}));
    }
    out.push(json!({"metadata": {"name": "from-team"}, "spec": {
        "podSelector": {"matchLabels": {"tier": "fe"}},
        "ingress": [{"from": [{
            "namespaceSelector": {"matchLabels": {"team": format!("t{}", n % 5)}},
            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app1", "app2"]}]},
        }], "ports": [{"protocol": "TCP", "port": "http"}]}],
    }}));
    out.push(json!({"metadata": {"name": "egress-cidr"}, "spec": {
        "podSelector": {"matchLabels": {"tier": "be"}},
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}], "ports": [tcp(443)]},
            {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app0"}}}], "ports": [{"protocol": "TCP", "port": "http"}]},
        ],
    }}));
    out.push(json!({"metadata": {"name": "port-range"}, "spec": {
        "podSelector": {"matchLabels": {"app": "app9"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}],
                     "ports": [{"protocol": "TCP", "port": 30000, "endPort": 32767}]}],
    }}));
    out.push(json!({"metadata": {"name": "dns"}, "spec": {
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "t0"}}}], "ports": [{"protocol": "UDP", "port": 53}]}],
    }}));
    out.into_iter()
        .map(|mut p| {
            p["metadata"]["namespace"] = json!(ns);
            p["metadata"]["labels"] = json!({LABEL: "1"});
            from_json(p)
        })
        .collect()
}

/// The measured policy: lets the prober reach `selector`'s pods in
/// `LOCAL_NS` on UDP `port` (or, with `allow` false, lets only pods that
/// do not exist in: still isolating, so the prober's probes drop).
pub fn probe_policy(name: &str, selector: Value, port: u16, allow: bool) -> NetworkPolicy {
    let from = if allow {
        json!({"namespaceSelector": {"matchLabels": {"name": PROBE_NS}}, "podSelector": {"matchLabels": {"role": PROBER}}})
    } else {
        json!({"podSelector": {"matchLabels": {"role": "nobody"}}})
    };
    from_json(json!({
        "metadata": {"name": name, "namespace": LOCAL_NS, "labels": {LABEL: "1"}},
        "spec": {"podSelector": selector, "ingress": [{"from": [from], "ports": [{"protocol": "UDP", "port": port}]}]},
    }))
}

async fn each<T, F>(items: Vec<T>, f: impl Fn(T) -> F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    stream::iter(items.into_iter().map(f)).buffer_unordered(PARALLEL).try_collect::<()>().await
}

async fn set_ip(pods: &Api<Pod>, name: &str, v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> Result<()> {
    let mut ips = vec![json!({"ip": v4.to_string()})];
    ips.extend(v6.map(|v6| json!({"ip": v6.to_string()})));
    let status = json!({"status": {"phase": "Running", "podIP": v4.to_string(), "podIPs": ips}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("setting pod {name}'s address"))?;
    Ok(())
}

/// Sets the status addresses of local pod `i`, as the kubelet does once
/// the pod's sandbox is up.
pub async fn local_started(client: &Client, i: usize) -> Result<()> {
    set_ip(&Api::namespaced(client.clone(), LOCAL_NS), &local_pod_name(i), local_ipv4(i), Some(local_ipv6(i)))
        .await
}

/// Removes every object of an earlier run but the nodes. Pods go with no
/// grace period: no kubelet would ever confirm their end on the nodes that
/// have none. The nodes stay (the next run uses them again; `cluster down`
/// ends them): 1.20's controller manager crashes on deleting a node it has
/// tainted as unreachable (a nil pointer in its NoExecute tainting pass).
pub async fn clean(client: &Client) -> Result<()> {
    let lp = ListParams::default().labels(LABEL);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> =
        namespaces.list(&lp).await?.items.into_iter().filter_map(|n| n.metadata.name).collect();
    if names.is_empty() {
        return Ok(());
    }
    let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::background() };
    each(names.clone(), |ns| {
        let client = client.clone();
        let now = now.clone();
        async move {
            Api::<Pod>::namespaced(client.clone(), &ns)
                .delete_collection(&now, &ListParams::default())
                .await?;
            Api::<Namespace>::all(client).delete(&ns, &DeleteParams::background()).await?;
            Ok(())
        }
    })
    .await?;
    let t = Instant::now();
    while !namespaces.list(&lp).await?.items.is_empty() {
        if t.elapsed() > Duration::from_secs(180) {
            bail!("the namespaces of an earlier run are still there after 180 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// What `create` made, with how long the API server took.
pub struct Created {
    pub seconds: f64,
    pub requests: usize,
}

/// Creates the whole cluster. Local pods get no address yet: that is the
/// CNI ADD's (and then the kubelet's) part.
pub async fn create(client: &Client) -> Result<Created> {
    let t = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    for n in 0..NODES {
        let node: Node =
            from_json(json!({"metadata": {"name": format!("scale-node-{n}"), "labels": {LABEL: "1"}}}));
        match nodes.create(&PostParams::default(), &node).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {} // an earlier run's
            other => {
                other.context("creating a node")?;
            }
        }
    }
    let mut all_ns: Vec<Namespace> = (0..NAMESPACES).map(|n| namespace(&namespace_name(n), n)).collect();
    all_ns.push(namespace(PROBE_NS, NAMESPACES));
    let names: Vec<String> = all_ns.iter().filter_map(|n| n.metadata.name.clone()).collect();
    each(all_ns, |ns| {
        let api: Api<Namespace> = Api::all(client.clone());
        async move {
            api.create(&PostParams::default(), &ns).await.context("creating a namespace")?;
            Ok(())
        }
    })
    .await?;
    // Pods are refused until the namespace's default ServiceAccount exists.
    for ns in &names {
        let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let t = Instant::now();
        while sa.get_opt("default").await?.is_none() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("namespace {ns} has no default ServiceAccount after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let remote_pods = PODS - LOCAL_PODS;
    let mut requests = NODES + names.len();
    each((0..remote_pods).collect(), |n| {
        let client = client.clone();
        async move {
            let (p, ip) = remote(n);
            let api: Api<Pod> = Api::namespaced(client, &namespace_name(n % NAMESPACES));
            api.create(&PostParams::default(), &p)
                .await
                .with_context(|| format!("creating remote pod {n}"))?;
            set_ip(&api, &format!("pod-{n:05}"), ip, None).await
        }
    })
    .await?;
    requests += 2 * remote_pods;
    each((0..LOCAL_PODS).collect(), |i| {
        let api: Api<Pod> = Api::namespaced(client.clone(), LOCAL_NS);
        async move {
            api.create(&PostParams::default(), &local(i))
                .await
                .with_context(|| format!("creating local pod {i}"))?;
            Ok(())
        }
    })
    .await?;
    requests += LOCAL_PODS;
    let probe_pods: Api<Pod> = Api::namespaced(client.clone(), PROBE_NS);
    let prober = pod(PROBE_NS, PROBER, LOCAL_NODE, json!({LABEL: "1", "role": PROBER}), 1);
    probe_pods.create(&PostParams::default(), &prober).await.context("creating the prober pod")?;
    let (v4, v6) = prober_ips();
    set_ip(&probe_pods, PROBER, v4, Some(v6)).await?;
    requests += 2;
    let all: Vec<NetworkPolicy> = (0..NAMESPACES).flat_map(policies).collect();
    requests += all.len();
    each(all, |p| {
        let client = client.clone();
        async move {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            Api::<NetworkPolicy>::namespaced(client, &ns)
                .create(&PostParams::default(), &p)
                .await
                .context("creating a policy")?;
            Ok(())
        }
    })
    .await?;
    Ok(Created { seconds: t.elapsed().as_secs_f64(), requests })
}
