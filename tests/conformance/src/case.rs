//! A case file, parsed and checked: every error names the file and the field.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use crate::expect::Rule;

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{file}: reading: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {field}: {message}")]
    Invalid { file: String, field: String, message: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub requires: Vec<Requirement>,
    #[serde(default)]
    pub model: Option<ModelSpec>,
    pub steps: Vec<Step>,
    /// The file the case came from (for messages).
    #[serde(skip)]
    pub file: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Requirement {
    #[serde(rename = "endPort")]
    EndPort,
    #[serde(rename = "sctp")]
    Sctp,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    /// `namespace/name`.
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn model(self) -> portcullis_agent::model::Protocol {
        match self {
            Protocol::Tcp => portcullis_agent::model::Protocol::Tcp,
            Protocol::Udp => portcullis_agent::model::Protocol::Udp,
            Protocol::Sctp => portcullis_agent::model::Protocol::Sctp,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub apply: Vec<serde_yaml_ng::Value>,
    /// `<Kind>/<namespace>/<name>`.
    #[serde(default)]
    pub delete: Vec<String>,
    #[serde(default)]
    pub label: Vec<LabelOp>,
    #[serde(default)]
    pub probes: Vec<Probe>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelOp {
    #[serde(default)]
    pub namespace: Option<String>,
    /// `namespace/name`.
    #[serde(default)]
    pub pod: Option<String>,
    /// A null value removes the label.
    pub set: BTreeMap<String, Option<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum ProbePort {
    Number(u16),
    Named(String),
}

impl std::fmt::Display for ProbePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbePort::Number(n) => write!(f, "{n}"),
            ProbePort::Named(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Target {
    #[default]
    #[serde(rename = "pod-ip")]
    PodIp,
    #[serde(rename = "service")]
    Service,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub port: ProbePort,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub target: Target,
    pub expect: Vec<String>,
    /// Parsed `expect`.
    #[serde(skip)]
    pub rules: Vec<Rule>,
}

impl Case {
    pub fn load(path: &Path) -> Result<Case, CaseError> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| CaseError::Read { file: file.clone(), source })?;
        Case::parse(&file, &text)
    }

    pub fn parse(file: &str, text: &str) -> Result<Case, CaseError> {
        let invalid =
            |field: String, message: String| CaseError::Invalid { file: file.to_string(), field, message };
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut case: Case = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { "(top)".to_string() } else { field };
            let message = e.into_inner().to_string();
            // The YAML error may carry the path itself.
            let message = message.strip_prefix(&format!("{field}: ")).map(str::to_string).unwrap_or(message);
            invalid(field, message)
        })?;
        case.file = file.to_string();
        if case.name.trim().is_empty() {
            return Err(invalid("name".into(), "empty".into()));
        }
        if let Some(model) = &case.model {
            for (i, pod) in model.pods.iter().enumerate() {
                let Some((ns, _)) = pod.name.split_once('/') else {
                    return Err(invalid(
                        format!("model.pods[{i}].name"),
                        format!("{:?} is not namespace/name", pod.name),
                    ));
                };
                if !model.namespaces.contains_key(ns) {
                    return Err(invalid(
                        format!("model.pods[{i}].name"),
                        format!("namespace {ns:?} is not in the model"),
                    ));
                }
            }
        }
        for (s, step) in case.steps.iter_mut().enumerate() {
            for (i, op) in step.label.iter().enumerate() {
                if op.namespace.is_some() == op.pod.is_some() {
                    return Err(invalid(
                        format!("steps[{s}].label[{i}]"),
                        "needs exactly one of namespace and pod".into(),
                    ));
                }
            }
            for (i, d) in step.delete.iter().enumerate() {
                if d.splitn(3, '/').count() != 3 {
                    return Err(invalid(
                        format!("steps[{s}].delete[{i}]"),
                        format!("{d:?} is not Kind/namespace/name"),
                    ));
                }
            }
            for (p, probe) in step.probes.iter_mut().enumerate() {
                if probe.expect.is_empty() {
                    return Err(invalid(format!("steps[{s}].probes[{p}].expect"), "no rules".into()));
                }
                probe.rules = probe
                    .expect
                    .iter()
                    .enumerate()
                    .map(|(r, text)| {
                        Rule::parse(text)
                            .map_err(|m| invalid(format!("steps[{s}].probes[{p}].expect[{r}]"), m))
                    })
                    .collect::<Result<_, _>>()?;
            }
        }
        Ok(case)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let e = Case::parse("c.yaml", "name: x\nsteps:\n  - probes:\n      - port: 80\n").unwrap_err();
        assert_eq!(e.to_string(), "c.yaml: steps[0].probes[0]: missing field `expect` at line 4 column 9");
        let e =
            Case::parse("c.yaml", "name: x\nsteps:\n  - probes:\n      - {port: 80, expect: ['a -> b']}\n")
                .unwrap_err();
        assert!(e.to_string().starts_with("c.yaml: steps[0].probes[0].expect[0]: "), "{e}");
        let e = Case::parse("c.yaml", "name: x\nsteps: []\nbogus: 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = Case::parse(
            "c.yaml",
            "name: x\nsteps:\n  - probes:\n      - {port: 80, protocol: ICMP, expect: ['* -> *: allow']}\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("c.yaml: steps[0].probes[0].protocol: "), "{e}");
    }
}
