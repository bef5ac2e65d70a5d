//! The `agent observe` command line, like `hubble observe`.
//!
//! Written against clap's builder rather than derived: `--not` negates the
//! filter that follows it, which needs the order of the flags on the command
//! line (`ArgMatches::indices_of`), not just their values.

use std::time::SystemTime;

use clap::{
    Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches,
    builder::PossibleValuesParser,
    error::{Error, ErrorKind},
    value_parser,
};

use super::filter::{Criteria, FlowQuery, parse_time};

/// How many stored flows to show when neither `--last`, `--all`, `--since`,
/// `--until` nor `--follow` says otherwise (hubble's default).
pub const DEFAULT_LAST: usize = 20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// One line per flow, like `hubble observe -o compact`.
    #[default]
    Compact,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserveArgs {
    pub query: FlowQuery,
    pub output: Output,
}

/// A repeatable filter flag and the [`Criteria`] field it fills.
struct Filter {
    long: &'static str,
    short: Option<char>,
    value_name: &'static str,
    help: &'static str,
    field: fn(&mut Criteria) -> &mut Vec<String>,
}

const FILTERS: &[Filter] = &[
    Filter {
        long: "pod",
        short: None,
        value_name: "[NAMESPACE/]POD",
        help: "Show all flows related to the given pod name prefix",
        field: |c| &mut c.pod,
    },
    Filter {
        long: "from-pod",
        short: None,
        value_name: "[NAMESPACE/]POD",
        help: "Show all flows originating in the given pod name prefix",
        field: |c| &mut c.from_pod,
    },
    Filter {
        long: "to-pod",
        short: None,
        value_name: "[NAMESPACE/]POD",
        help: "Show all flows terminating in the given pod name prefix",
        field: |c| &mut c.to_pod,
    },
    Filter {
        long: "namespace",
        short: Some('n'),
        value_name: "NAMESPACE",
        help: "Show all flows related to the given Kubernetes namespace",
        field: |c| &mut c.namespace,
    },
    Filter {
        long: "from-namespace",
        short: None,
        value_name: "NAMESPACE",
        help: "Show all flows originating in the given Kubernetes namespace",
        field: |c| &mut c.from_namespace,
    },
    Filter {
        long: "to-namespace",
        short: None,
        value_name: "NAMESPACE",
        help: "Show all flows terminating in the given Kubernetes namespace",
        field: |c| &mut c.to_namespace,
    },
    Filter {
        long: "label",
        short: Some('l'),
        value_name: "SELECTOR",
        help: "Show only flows related to an endpoint with the given labels (e.g. app=web,tier!=db)",
        field: |c| &mut c.label,
    },
    Filter {
        long: "from-label",
        short: None,
        value_name: "SELECTOR",
        help: "Show only flows originating in an endpoint with the given labels",
        field: |c| &mut c.from_label,
    },
    Filter {
        long: "to-label",
        short: None,
        value_name: "SELECTOR",
        help: "Show only flows terminating in an endpoint with the given labels",
        field: |c| &mut c.to_label,
    },
    Filter {
        long: "ip",
        short: None,
        value_name: "IP|CIDR",
        help: "Show all flows related to the given IP address or CIDR",
        field: |c| &mut c.ip,
    },
    Filter {
        long: "from-ip",
        short: None,
        value_name: "IP|CIDR",
        help: "Show all flows originating at the given IP address or CIDR",
        field: |c| &mut c.from_ip,
    },
    Filter {
        long: "to-ip",
        short: None,
        value_name: "IP|CIDR",
        help: "Show all flows terminating at the given IP address or CIDR",
        field: |c| &mut c.to_ip,
    },
    Filter {
        long: "port",
        short: None,
        value_name: "PORT",
        help: "Show only flows with the given source or destination port",
        field: |c| &mut c.port,
    },
    Filter {
        long: "from-port",
        short: None,
        value_name: "PORT",
        help: "Show only flows with the given source port",
        field: |c| &mut c.from_port,
    },
    Filter {
        long: "to-port",
        short: None,
        value_name: "PORT",
        help: "Show only flows with the given destination port",
        field: |c| &mut c.to_port,
    },
    Filter {
        long: "protocol",
        short: None,
        value_name: "PROTOCOL",
        help: "Show only flows of the given L4 protocol (tcp, udp, sctp, icmp, icmpv6)",
        field: |c| &mut c.protocol,
    },
    Filter {
        long: "verdict",
        short: None,
        value_name: "VERDICT",
        help: "Show only flows with this verdict (FORWARDED, DROPPED)",
        field: |c| &mut c.verdict,
    },
    Filter {
        long: "endpoint",
        short: None,
        value_name: "ID|NAMESPACE/POD",
        help: "Show only flows judged by the given endpoint",
        field: |c| &mut c.endpoint,
    },
    Filter {
        long: "traffic-direction",
        short: None,
        value_name: "DIRECTION",
        help: "Show only flows in the given traffic direction (ingress, egress)",
        field: |c| &mut c.direction,
    },
];

const FILTERS_HEADING: &str = "Filters";

fn invalid(message: impl std::fmt::Display) -> Error {
    Error::raw(ErrorKind::InvalidValue, message)
}

impl ObserveArgs {
    /// From parsed matches, with `--since`/`--until` relative to `now_ns`.
    fn from_matches_at(m: &ArgMatches, now_ns: u64) -> Result<Self, Error> {
        let mut include = Criteria::default();
        let mut exclude = Criteria::default();

        // Every filter value and every `--not`, in command-line order; a
        // value's index follows its flag's in both `--pod x` and `--pod=x`.
        let mut events: Vec<(usize, Option<(&Filter, String)>)> = Vec::new();
        for filter in FILTERS {
            let (Some(values), Some(indices)) =
                (m.get_many::<String>(filter.long), m.indices_of(filter.long))
            else {
                continue;
            };
            events.extend(indices.zip(values).map(|(i, v)| (i, Some((filter, v.clone())))));
        }
        events.extend(m.indices_of("not").into_iter().flatten().map(|i| (i, None)));
        events.sort_by_key(|e| e.0);

        let mut negate = false;
        for (_, event) in events {
            match event {
                None if negate => {
                    return Err(invalid("--not must be followed by a filter, not by another --not"));
                }
                None => negate = true,
                Some((filter, value)) => {
                    let target = if negate { &mut exclude } else { &mut include };
                    (filter.field)(target).push(value);
                    negate = false;
                }
            }
        }
        if negate {
            return Err(invalid("--not must be followed by a filter (e.g. --not --to-port 53)"));
        }
        include.validate().map_err(invalid)?;
        exclude.validate().map_err(|e| invalid(format!("--not {e}")))?;

        let time = |flag: &str| -> Result<Option<u64>, Error> {
            m.get_one::<String>(flag)
                .map(|text| parse_time(text, now_ns).map_err(|e| invalid(format!("--{flag} {e}"))))
                .transpose()
        };
        let since_ns = time("since")?;
        let until_ns = time("until")?;
        if let (Some(since), Some(until)) = (since_ns, until_ns)
            && since > until
        {
            return Err(invalid("--since is later than --until"));
        }

        let follow = m.get_flag("follow");
        let last = if m.get_flag("all") {
            None
        } else if let Some(&n) = m.get_one::<usize>("last") {
            Some(n)
        } else if since_ns.is_some() || until_ns.is_some() {
            // A time window bounds the history by itself.
            None
        } else if follow {
            // Following starts from now, without history.
            Some(0)
        } else {
            Some(DEFAULT_LAST)
        };

        // The parser checked the name but keeps the case it was given in.
        let output = match m.get_one::<String>("output") {
            Some(o) if o.eq_ignore_ascii_case("json") || o.eq_ignore_ascii_case("jsonpb") => Output::Json,
            _ => Output::Compact,
        };
        Ok(ObserveArgs { query: FlowQuery { include, exclude, last, follow, since_ns, until_ns }, output })
    }
}

impl FromArgMatches for ObserveArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, Error> {
        let now_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self::from_matches_at(m, now_ns)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), Error> {
        // Every flag has a default, so the matches describe the whole value.
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ObserveArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = cmd
            .arg(
                Arg::new("follow")
                    .short('f')
                    .long("follow")
                    .action(ArgAction::SetTrue)
                    .help("Follow flows output"),
            )
            .arg(Arg::new("last").long("last").value_name("N").value_parser(value_parser!(usize)).help(
                format!(
                    "Get last N flows stored in the agent's buffer \
                         [default: {DEFAULT_LAST}; none with --follow, all with --since/--until]"
                ),
            ))
            .arg(
                Arg::new("all")
                    .long("all")
                    .action(ArgAction::SetTrue)
                    .conflicts_with("last")
                    .help("Get all flows stored in the agent's buffer"),
            )
            .arg(Arg::new("since").long("since").value_name("TIME").help(
                "Filter flows since a specific date: relative (e.g. 3s, 4m, 1h, 2h30m) \
                 or RFC 3339 (e.g. 2026-01-02T15:04:05Z)",
            ))
            .arg(
                Arg::new("until")
                    .long("until")
                    .value_name("TIME")
                    .help("Filter flows until a specific date (same formats as --since)"),
            )
            .arg(
                Arg::new("output")
                    .short('o')
                    .long("output")
                    .value_name("FORMAT")
                    .value_parser(PossibleValuesParser::new(["compact", "json", "jsonpb"]))
                    .ignore_case(true)
                    .default_value("compact")
                    .help("Output format"),
            )
            .arg(
                // Append with a missing-value default, not SetTrue/Count:
                // those keep only the last occurrence's index.
                Arg::new("not")
                    .long("not")
                    .action(ArgAction::Append)
                    .num_args(0)
                    .default_missing_value("true")
                    .value_parser(value_parser!(bool))
                    .help_heading(FILTERS_HEADING)
                    .help("Reverse the next filter, e.g. --not --to-port 53"),
            );
        FILTERS.iter().fold(cmd, |cmd, f| {
            let arg = Arg::new(f.long)
                .long(f.long)
                .value_name(f.value_name)
                .action(ArgAction::Append)
                .num_args(1)
                .help_heading(FILTERS_HEADING)
                .help(f.help);
            cmd.arg(match f.short {
                Some(s) => arg.short(s),
                None => arg,
            })
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        a: ObserveArgs,
    }

    fn parse(args: &[&str]) -> Result<ObserveArgs, Error> {
        T::try_parse_from(std::iter::once("observe").chain(args.iter().copied())).map(|t| t.a)
    }

    fn ok(args: &[&str]) -> ObserveArgs {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn err(args: &[&str]) -> String {
        parse(args).expect_err(&format!("{args:?} parsed")).to_string()
    }

    fn v(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn command_is_well_formed() {
        use clap::CommandFactory;
        T::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let a = ok(&[]);
        assert_eq!(a.output, Output::Compact);
        assert_eq!(a.query, FlowQuery { last: Some(DEFAULT_LAST), ..Default::default() });
        let follow = ok(&["-f"]).query;
        assert!(follow.follow);
        assert_eq!(follow.last, Some(0));
        assert_eq!(ok(&["--follow", "--last", "5"]).query.last, Some(5));
        assert_eq!(ok(&["--last", "0"]).query.last, Some(0));
        assert_eq!(ok(&["--all"]).query.last, None);
        assert_eq!(ok(&["--all", "-f"]).query.last, None);
        assert_eq!(ok(&["--since", "5m"]).query.last, None);
        assert_eq!(ok(&["--since", "5m", "--last", "3"]).query.last, Some(3));
        assert!(err(&["--all", "--last", "3"]).contains("cannot be used with"));
        assert!(err(&["--last", "-1"]).contains("-1"));
    }

    #[test]
    fn output_formats() {
        assert_eq!(ok(&["-o", "json"]).output, Output::Json);
        assert_eq!(ok(&["--output=jsonpb"]).output, Output::Json);
        assert_eq!(ok(&["-o", "JSON"]).output, Output::Json);
        assert_eq!(ok(&["-o", "compact"]).output, Output::Compact);
        assert!(err(&["-o", "yaml"]).contains("yaml"));
    }

    #[test]
    fn filters_both_forms() {
        let a = ok(&["--pod", "default/web", "--pod=api", "-n", "kube-system", "-n=default", "-l", "app=x"]);
        assert_eq!(a.query.include.pod, v(&["default/web", "api"]));
        assert_eq!(a.query.include.namespace, v(&["kube-system", "default"]));
        assert_eq!(a.query.include.label, v(&["app=x"]));
        assert!(a.query.exclude.is_empty());
        // Clustered short flags.
        let q = ok(&["--not", "-fn", "kube-system", "-n", "default"]).query;
        assert!(q.follow);
        assert_eq!(q.exclude.namespace, v(&["kube-system"]));
        assert_eq!(q.include.namespace, v(&["default"]));
        let all = ok(&[
            "--from-pod=a",
            "--to-pod",
            "b",
            "--from-namespace=c",
            "--to-namespace",
            "d",
            "--from-label=k8s:e=f",
            "--to-label",
            "g",
            "--ip=10.0.0.1",
            "--from-ip",
            "10.0.0.0/8",
            "--to-ip=fd00::1",
            "--port",
            "1",
            "--from-port=2",
            "--to-port",
            "3",
            "--protocol=icmp",
            "--verdict",
            "dropped",
            "--endpoint=12",
            "--traffic-direction",
            "ingress",
        ]);
        let want = Criteria {
            from_pod: v(&["a"]),
            to_pod: v(&["b"]),
            from_namespace: v(&["c"]),
            to_namespace: v(&["d"]),
            from_label: v(&["k8s:e=f"]),
            to_label: v(&["g"]),
            ip: v(&["10.0.0.1"]),
            from_ip: v(&["10.0.0.0/8"]),
            to_ip: v(&["fd00::1"]),
            port: v(&["1"]),
            from_port: v(&["2"]),
            to_port: v(&["3"]),
            protocol: v(&["icmp"]),
            verdict: v(&["dropped"]),
            endpoint: v(&["12"]),
            direction: v(&["ingress"]),
            ..Default::default()
        };
        assert_eq!(all.query.include, want);
    }

    #[test]
    fn not_negates_the_next_filter() {
        let q = ok(&["--not", "--pod", "x"]).query;
        assert!(q.include.is_empty());
        assert_eq!(q.exclude, Criteria { pod: v(&["x"]), ..Default::default() });

        let q = ok(&["--pod", "a", "--not", "--to-port", "53"]).query;
        assert_eq!(q.include, Criteria { pod: v(&["a"]), ..Default::default() });
        assert_eq!(q.exclude, Criteria { to_port: v(&["53"]), ..Default::default() });

        // `=` forms, several --not, and a filter after the negated one.
        let q = ok(&["--not", "--pod=x", "--pod=y", "--not", "--pod", "z", "--not", "-n=kube-system", "-f"])
            .query;
        assert_eq!(q.include, Criteria { pod: v(&["y"]), ..Default::default() });
        assert_eq!(
            q.exclude,
            Criteria { pod: v(&["x", "z"]), namespace: v(&["kube-system"]), ..Default::default() }
        );
        assert!(q.follow);

        // A flag that is not a filter in between does not use up the --not.
        let q = ok(&["--not", "-f", "--verdict", "forwarded", "--verdict=dropped"]).query;
        assert_eq!(q.exclude, Criteria { verdict: v(&["forwarded"]), ..Default::default() });
        assert_eq!(q.include, Criteria { verdict: v(&["dropped"]), ..Default::default() });

        assert!(err(&["--pod", "a", "--not"]).contains("--not must be followed by a filter"));
        assert!(err(&["--not", "--not", "--pod", "a"]).contains("not by another --not"));
        assert!(err(&["--not=true", "--pod", "a"]).contains("--not"));
    }

    #[test]
    fn not_combines_with_include_semantics() {
        use crate::flows::Flow;
        let flow = |pod: &str, port: u16| Flow {
            time: String::new(),
            time_ns: 0,
            endpoint_id: 1,
            endpoint: None,
            direction: "EGRESS".into(),
            verdict: "FORWARDED".into(),
            reason: String::new(),
            protocol: Some("UDP".into()),
            src: None,
            dst: None,
            src_port: 40000,
            dst_port: port,
            tcp_flags: Vec::new(),
            src_pod: Some(format!("default/{pod}")),
            dst_pod: None,
            src_identity: None,
            dst_identity: None,
            src_labels: Vec::new(),
            dst_labels: Vec::new(),
            policy: None,
        };
        let q = ok(&["--pod", "a", "--pod", "b", "--not", "--to-port", "53", "--to-port=54"]).query;
        // Include: pod (a or b) and to-port 54; exclude: to-port 53.
        assert!(q.matches(&flow("a", 54)));
        assert!(q.matches(&flow("b", 54)));
        assert!(!q.matches(&flow("c", 54)));
        assert!(!q.matches(&flow("a", 80)));
        let q = ok(&["--pod", "a", "--not", "--to-port", "53"]).query;
        assert!(q.matches(&flow("a", 80)));
        assert!(!q.matches(&flow("a", 53)));
        assert!(!q.matches(&flow("b", 80)));
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(err(&["--to-ip", "10.0.0.300"]).contains("--to-ip 10.0.0.300: not an IP address or CIDR"));
        assert!(err(&["--not", "--port=http"]).contains("--not --port http:"));
        assert!(err(&["--protocol", "gre"]).contains("--protocol gre"));
        assert!(err(&["--traffic-direction", "sideways"]).contains("--traffic-direction sideways"));
        assert!(err(&["--verdict", "denied"]).contains("--verdict denied"));
        assert!(err(&["--pod"]).contains("--pod"));
    }

    #[test]
    fn times() {
        let now = 1_000_000 * 1_000_000_000u64;
        let cmd = T::augment_args(Command::new("observe"));
        let at = |args: &[&str]| {
            let m =
                cmd.clone().try_get_matches_from(std::iter::once("observe").chain(args.iter().copied()))?;
            ObserveArgs::from_matches_at(&m, now)
        };
        let q = at(&["--since", "1m", "--until=30s"]).unwrap().query;
        assert_eq!(q.since_ns, Some(now - 60_000_000_000));
        assert_eq!(q.until_ns, Some(now - 30_000_000_000));
        assert_eq!(q.last, None);
        let q = at(&["--since=1970-01-02T00:00:00Z"]).unwrap().query;
        assert_eq!(q.since_ns, Some(86400 * 1_000_000_000));

        let e = at(&["--since", "5 minutes"]).unwrap_err().to_string();
        assert!(e.contains("--since \"5 minutes\"") && e.contains("RFC 3339"), "{e}");
        let e = at(&["--until", "2026-11-24"]).unwrap_err().to_string();
        assert!(e.contains("--until \"2026-11-24\""), "{e}");
        let e = at(&["--since", "1m", "--until", "2m"]).unwrap_err().to_string();
        assert!(e.contains("--since is later than --until"), "{e}");
        // And through the derive, against the wall clock.
        assert!(ok(&["--since", "1h"]).query.since_ns.is_some());
        assert!(err(&["--since", "yesterday"]).contains("yesterday"));
    }
}
