//! Expectation rules (`"x/* -> y/b: deny"`): ordered, the last one that
//! matches a pair decides it.

use std::collections::BTreeMap;

/// `*`, `<ns>/*` or `<ns>/<pod>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Namespace(String),
    Pod(String, String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Pattern::Any);
        }
        let Some((ns, pod)) = text.split_once('/') else {
            return Err(format!("{text:?} is not *, <ns>/* or <ns>/<pod>"));
        };
        if ns.is_empty() || ns == "*" || pod.is_empty() || pod.contains('/') {
            return Err(format!("{text:?} is not *, <ns>/* or <ns>/<pod>"));
        }
        Ok(if pod == "*" { Pattern::Namespace(ns.into()) } else { Pattern::Pod(ns.into(), pod.into()) })
    }

    pub fn matches(&self, pod: &str) -> bool {
        let (ns, name) = pod.split_once('/').unwrap_or((pod, ""));
        match self {
            Pattern::Any => true,
            Pattern::Namespace(n) => n == ns,
            Pattern::Pod(n, p) => n == ns && p == name,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub client: Pattern,
    pub server: Pattern,
    pub allow: bool,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, String> {
        let usage = || format!("{text:?} is not \"<client> -> <server>: allow|deny\"");
        let (pair, verdict) = text.rsplit_once(':').ok_or_else(usage)?;
        let allow = match verdict.trim() {
            "allow" => true,
            "deny" => false,
            _ => return Err(usage()),
        };
        let (client, server) = pair.split_once("->").ok_or_else(usage)?;
        Ok(Rule { client: Pattern::parse(client)?, server: Pattern::parse(server)?, allow })
    }
}

/// The expected verdict of every pair; `None` when no rule matches.
pub fn expected(rules: &[Rule], client: &str, server: &str) -> Option<bool> {
    rules.iter().rev().find(|r| r.client.matches(client) && r.server.matches(server)).map(|r| r.allow)
}

/// Verdicts of a probe: `(client, server) -> reached`.
pub type Matrix = BTreeMap<(String, String), bool>;

/// Expected and observed tables side by side (`.` reached, `X` blocked,
/// `-` not probed), marking the cells that differ.
pub fn side_by_side(clients: &[String], servers: &[String], expected: &Matrix, observed: &Matrix) -> String {
    let width = clients.iter().chain(servers).map(String::len).max().unwrap_or(1).max(3);
    let cell = |m: &Matrix, c: &String, s: &String| match m.get(&(c.clone(), s.clone())) {
        Some(true) => ".",
        Some(false) => "X",
        None => "-",
    };
    let header: String = servers.iter().map(|s| format!(" {s:>width$}")).collect();
    let mut out = format!("{:<width$}{header}   |   {:<width$}{header}\n", "expected", "observed");
    for c in clients {
        let row =
            |m: &Matrix| servers.iter().map(|s| format!(" {:>width$}", cell(m, c, s))).collect::<String>();
        let differs = servers.iter().any(|s| cell(expected, c, s) != cell(observed, c, s));
        out.push_str(&format!(
            "{c:<width$}{}   |   {c:<width$}{}{}\n",
            row(expected),
            row(observed),
            if differs { "   <-" } else { "" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_matching_rule_wins() {
        let rules: Vec<Rule> = ["* -> *: allow", "* -> x/*: deny", "x/b -> x/a: allow"]
            .iter()
            .map(|r| Rule::parse(r).unwrap())
            .collect();
        assert_eq!(expected(&rules, "y/a", "z/b"), Some(true));
        assert_eq!(expected(&rules, "y/a", "x/b"), Some(false));
        assert_eq!(expected(&rules, "x/b", "x/a"), Some(true));
        assert_eq!(expected(&rules[1..], "y/a", "z/b"), None);
    }

    #[test]
    fn malformed_rules_are_refused() {
        for bad in ["x -> y: allow", "* -> *: maybe", "* *: allow", "*/a -> *: deny", "x/a/b -> *: deny"] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }
}
